"""labengine's Triton kernels (installed as `labengine.kernels`; the folder is `kernels/`).

Import them as `from labengine.kernels import decode_attention` (never as a top-level
`kernels`, which is an unrelated PyPI package). Each file holds a kernel, its launcher and
a PyTorch reference. They need only torch and triton; they know nothing of labengine.
On a machine without a GPU they run on CPU tensors under TRITON_INTERPRET=1.

| file                  | launchers                                   | reference                          |
|-----------------------|---------------------------------------------|------------------------------------|
| decode_attention.py   | decode_attention (flash-decoding, GQA)      | decode_attention_ref               |
| prefill_attention.py  | prefill_attention (causal varlen, paged)    | prefill_attention_ref              |
| cache_ops.py          | store_kv, copy_blocks, swap_blocks          | store_kv_ref, copy_blocks_ref, ... |
| layer_ops.py          | rms_norm, qk_norm_rope, silu_and_mul        | rms_norm_ref, qk_norm_rope_ref, ...|
| sampling.py           | sample (greedy + Gumbel-max, one pass)      | sampling_probs_ref                 |
"""
from .cache_ops import copy_blocks, copy_blocks_ref, store_kv, store_kv_ref, swap_blocks, swap_blocks_ref
from .layer_ops import (
    qk_norm_rope, qk_norm_rope_ref, rms_norm, rms_norm_ref, silu_and_mul, silu_and_mul_ref,
)
from .decode_attention import choose_num_splits, decode_attention, decode_attention_ref
from .prefill_attention import prefill_attention, prefill_attention_ref
from .sampling import sample, sampling_probs_ref

__all__ = [
    "decode_attention", "decode_attention_ref", "choose_num_splits",
    "prefill_attention", "prefill_attention_ref",
    "rms_norm", "rms_norm_ref", "qk_norm_rope", "qk_norm_rope_ref", "silu_and_mul", "silu_and_mul_ref",
    "sample", "sampling_probs_ref",
    "store_kv", "store_kv_ref", "copy_blocks", "copy_blocks_ref", "swap_blocks", "swap_blocks_ref",
]
