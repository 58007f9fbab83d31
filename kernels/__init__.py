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

This file must import cleanly without triton, and under any name. Whenever the repo root is
on sys.path (`python -m ...` from the clone puts it there by itself), this folder is found
as a top-level `kernels`, and transformers probes for Hugging Face's `kernels` package by
*importing* whatever `kernels` it finds; an ImportError from here would abort transformers'
lazy imports (`LlamaConfig` and all). So:
  * imported as a top-level `kernels`, it steps aside: it hands over the real `kernels`
    package when one is installed elsewhere on sys.path, and otherwise is an empty package
    with no `__version__` (transformers then reports the Hub kernels as unavailable);
  * imported as `labengine.kernels` without triton (the `[lab]` install), it imports, and
    each launcher raises an ImportError naming what to install when it is asked for.
"""
import importlib.util
import os
import sys

__all__ = [
    "decode_attention", "decode_attention_ref", "choose_num_splits", "longest_first",
    "choose_split_len", "decode_split_len",
    "prefill_attention", "prefill_attention_ref",
    "rms_norm", "rms_norm_ref", "qk_norm_rope", "qk_norm_rope_ref", "kv_store_fits", "silu_and_mul", "silu_and_mul_ref",
    "sample", "sampling_probs_ref",
    "store_kv", "store_kv_ref", "copy_blocks", "copy_blocks_ref", "swap_blocks", "swap_blocks_ref",
]

PACKAGE_NAME = "labengine.kernels"


def _installed_elsewhere(name: str):
    """The spec of a package `name` on sys.path outside the folder that holds this one, or None."""
    from importlib.machinery import PathFinder

    here = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    spec = PathFinder.find_spec(name, path)
    # a folder without __init__.py (tests/kernels, when pytest puts tests/ on the path) is a
    # namespace package, not an installed one
    return spec if spec is not None and spec.origin is not None else None


if __name__ != PACKAGE_NAME:
    # Found as a top-level package (the repo root is on sys.path). Hand over the real one if
    # there is one: the import machinery returns whatever sys.modules holds once we finish.
    __all__ = []
    _spec = _installed_elsewhere(__name__)
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules[__name__] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules[__name__]
            raise
elif importlib.util.find_spec("triton") is None:
    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(
                f"labengine.kernels.{name} needs triton, which is not installed: "
                "pip install 'labengine[gpu]' (or triton); without it use attention_backend='torch'"
            )
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    from .cache_ops import copy_blocks, copy_blocks_ref, store_kv, store_kv_ref, swap_blocks, swap_blocks_ref
    from .layer_ops import (
        kv_store_fits, qk_norm_rope, qk_norm_rope_ref, rms_norm, rms_norm_ref, silu_and_mul, silu_and_mul_ref,
    )
    from .decode_attention import (
        choose_num_splits, choose_split_len, decode_attention, decode_attention_ref, decode_split_len, longest_first,
    )
    from .prefill_attention import prefill_attention, prefill_attention_ref
    from .sampling import sample, sampling_probs_ref
