"""The attention interface between models and kernels.

Models call `backend.forward(q, k, v, kv_cache, meta, scale)`; the backend writes the new
keys and values into the paged KV cache and attends over it through the block table.
A backend with `stores_kv_in_rope = True` (the Triton one) lets the model write them itself,
in its fused q/k-norm + rotary kernel; the model then passes `kv_stored=True` and the backend
skips its own store.
Two backends implement it: the PyTorch reference (`torch_backend`, any device) and our
Triton kernels (`triton_backend`, CUDA, or the CPU under TRITON_INTERPRET=1).
The backend is chosen once, when the engine starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

BACKEND_NAMES = ("torch", "triton")


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's batch (built by the ModelRunner)."""

    is_prefill: bool
    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = do not store
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32, context + this step's tokens
    context_lens: torch.Tensor  # [num_seqs] int32, tokens already cached
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    max_context_len: int = 0  # longest cached context of the step (picks the prefill kernel's tiling)
    seq_lens_list: list[int] = field(default_factory=list)
    query_lens_list: list[int] = field(default_factory=list)
    # [num_seqs] int32, decode steps on backends that schedule by it: the order in which the
    # decode kernel's programs take the sequences (longest first; see decode_launch_order)
    decode_order: torch.Tensor | None = None
    # [1] int32, decode steps on backends that balance by it: the most keys one program of the
    # decode kernel takes (a long sequence is split into several; see decode_split_len)
    decode_split_len: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)


class AttentionBackend:
    """Interface; see ARCHITECTURE.md. Subclasses implement the three methods."""

    name = "base"
    kernels = None  # labengine.kernels on the Triton path: the models' fused layer kernels, the sampler's kernel
    # True: a model may store the step's keys/values itself (kernels.qk_norm_rope with the cache)
    # and call forward(..., kv_stored=True). Models never pass kv_stored=True to other backends.
    stores_kv_in_rope = False

    def forward(self, query, key, value, kv_cache, meta: AttentionMetadata, scale: float, kv_stored: bool = False):
        """kv_stored: key/value are already in kv_cache at meta.slot_mapping (skip the store)."""
        raise NotImplementedError

    def decode_launch_order(self, seq_lens: list[int]):
        """The order in which a decode step's kernel should take the sequences (an int32 numpy
        array, a permutation of range(len(seq_lens))), or None: this backend has no use for one."""
        return None

    def decode_split_len(self, seq_lens: list[int], num_kv_heads: int, head_size: int, dtype, device):
        """The most keys one program of a decode step's kernel should take (an int; longer
        sequences are split across programs), or None: this backend has no use for one."""
        return None

    def copy_blocks(self, kv_caches, src_to_dst):
        raise NotImplementedError

    def swap_blocks(self, src_caches, dst_caches, src_to_dst):
        raise NotImplementedError


def resolve_backend_name(name: str | None, device: torch.device) -> str:
    """An explicit name wins, then LABENGINE_ATTENTION_BACKEND, then triton on CUDA / torch elsewhere."""
    if name is None or name == "auto":
        name = os.environ.get("LABENGINE_ATTENTION_BACKEND") or None
    if name is None:
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"attention_backend={name!r} is not a known backend; allowed: 'auto', "
            + ", ".join(repr(n) for n in BACKEND_NAMES)
        )
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"attention_backend='triton' needs a CUDA device (the model runs on {device.type}); "
            "set TRITON_INTERPRET=1 to run the Triton kernels on the CPU through Triton's interpreter, "
            "or use attention_backend='torch'"
        )
    return name


def get_attn_backend(name: str | None, device: torch.device) -> AttentionBackend:
    name = resolve_backend_name(name, device)
    if name == "triton":
        from labengine.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    from labengine.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
