"""The Triton attention backend: labengine's GPU path.

forward(query, key, value, kv_cache, meta, scale, kv_stored=False):
  1. `store_kv` writes the step's keys/values into the paged cache at meta.slot_mapping
     (slot -1 skipped), unless kv_stored: the Llama-family models store them in their fused
     q/k-norm + rotary kernel (`kernels.qk_norm_rope` given the cache; this backend says it
     accepts that with `stores_kv_in_rope = True`), one launch fewer per layer and step;
  2. decode steps (`not meta.is_prefill`, one query token per sequence) run the
     flash-decoding kernel, which reads every key through meta.block_tables and takes the
     sequences longest first (meta.decode_order, from `decode_launch_order`) and splits the
     long ones into programs of at most meta.decode_split_len keys; prefill steps
     (prompts, chunked prompts, cached prefixes, recomputation) run the causal varlen
     prefill kernel, which reads the context through the block table and the step's own
     keys/values from `key`/`value` where the projection left them.

The decode path is CUDA-graph capturable: it launches kernels only, with grid sizes and
the split-KV count computed from host integers (query.shape[0] and meta.max_seq_len; the
runner passes max_seq_len = max_model_len while capturing), takes what changes per step
(the order, the balanced split length) from device tensors the runner rewrites before each
replay, and never reads a tensor back to the host (no .item()/.tolist()). The prefill path
sizes its grid from meta.max_query_len and is not captured.

It runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on
(TRITON_INTERPRET=1 set before the kernels were imported), so CI exercises the very code
the GPU runs.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from labengine.attention import AttentionBackend, AttentionMetadata


def _import_kernels():
    """`labengine.kernels` once installed; from a source checkout, the repo's kernels/ folder."""
    try:
        import labengine.kernels as kernels
    except ImportError:
        folder = Path(__file__).resolve().parents[2] / "kernels"
        if not (folder / "__init__.py").exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "labengine.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["labengine.kernels"] = kernels
        spec.loader.exec_module(kernels)
        import labengine

        labengine.kernels = kernels
    kernels.store_kv  # without triton the package imports, but its launchers raise ImportError
    return kernels


kernels = _import_kernels()


def kernels_interpreted() -> bool:
    """True when the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    from labengine.kernels.decode_attention import _decode_stage1_kernel

    return type(_decode_stage1_kernel).__name__ == "InterpretedFunction"


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    kernels = kernels
    stores_kv_in_rope = True

    def _check_device(self, t: torch.Tensor) -> None:
        if t.device.type != "cuda" and not kernels_interpreted():
            raise RuntimeError(
                f"the Triton attention backend got {t.device.type} tensors: it needs CUDA, or "
                "TRITON_INTERPRET=1 set before labengine.kernels is imported (or use the 'torch' backend)"
            )

    def forward(self, query, key, value, kv_cache, meta: AttentionMetadata, scale: float, kv_stored: bool = False):
        """query [T, Hq, D], key/value [T, Hkv, D], kv_cache (k_cache, v_cache) -> out [T, Hq, D].
        kv_stored: key/value are already in the cache (written by kernels.qk_norm_rope)."""
        k_cache, v_cache = kv_cache
        self._check_device(query)
        if not kv_stored:
            kernels.store_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        if not meta.is_prefill:
            # one token per sequence: T == num_seqs
            return kernels.decode_attention(
                query, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                max_seq_len=meta.max_seq_len, order=meta.decode_order, split_len=meta.decode_split_len,
            )
        return kernels.prefill_attention(
            query, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
            max_query_len=meta.max_query_len, max_context_len=meta.max_context_len, key=key, value=value,
        )

    def decode_launch_order(self, seq_lens: list[int]):
        """Longest sequences first: the decode kernel's last programs are then the shortest
        (its docstring says why)."""
        return kernels.longest_first(seq_lens)

    def decode_split_len(self, seq_lens, num_kv_heads, head_size, dtype, device):
        """Balanced splits: at most this many keys per program, so that a batch whose programs
        fit in about one wave is not held up by its longest sequence (the kernel's docstring)."""
        return kernels.decode_split_len(seq_lens, num_kv_heads, head_size, dtype, device)

    def copy_blocks(self, kv_caches, src_to_dst) -> None:
        """Copy-on-write: for each (src, dst), block dst <- block src in every layer's K and V."""
        if len(src_to_dst) == 0:
            return
        self._check_device(kv_caches[0][0])
        kernels.copy_blocks(kv_caches, src_to_dst)

    def swap_blocks(self, src_caches, dst_caches, src_to_dst) -> None:
        """Move blocks between pools (GPU <-> CPU); synchronous."""
        if len(src_to_dst) == 0:
            return
        if src_caches[0][0].device == dst_caches[0][0].device:
            self._check_device(src_caches[0][0])
        kernels.swap_blocks(src_caches, dst_caches, src_to_dst)
