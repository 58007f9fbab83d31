"""Shared helpers of the kernel tests (conftest.py has already set up the interpreter/imports)."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# every kernel is tested in each dtype the engine runs
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["fp32", "fp16", "bf16"]
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# ||out - ref|| / ||ref|| against a float64 reference, and elementwise atol (outputs are O(1))
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (3e-3, 1e-2),
    torch.bfloat16: (1.5e-2, 6e-2),
}

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="real-size kernel tests need a CUDA GPU")


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite (unwritten or poisoned) elements in output"
    rel_tol, atol = TOL[dtype]
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    max_abs = (o - r).abs().max().item()
    assert rel < rel_tol and max_abs < atol, f"{what}: rel err {rel:.2e} (tol {rel_tol}), max abs {max_abs:.2e} (tol {atol})"


def make_paged(seq_lens, num_kv_heads, head_size, block_size, dtype, device=DEVICE, spare_blocks=3, gen=None):
    """Random K/V caches and a shuffled block table holding `seq_lens` tokens per sequence.

    Every block (used or not) holds random values, so reading a wrong block or slot changes
    the answer. Padding entries of the table point at block 0, which is never read.
    """
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(max(blocks_per_seq), 1)
    num_blocks = sum(blocks_per_seq) + spare_blocks + 1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_size, generator=gen).to(dtype).to(device)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 = padding
    table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    i = 0
    for b, nb in enumerate(blocks_per_seq):
        table[b, :nb] = torch.tensor(perm[i : i + nb], dtype=torch.int32)
        i += nb
    return k_cache, v_cache, table.to(device)
