"""Prefill (causal varlen over the paged cache) kernel vs its PyTorch reference."""
from __future__ import annotations

import pytest
import torch
from kernel_test_utils import DEVICE, DTYPES, DT_IDS, assert_close, make_paged, requires_cuda

from labengine.kernels.prefill_attention import prefill_attention, prefill_attention_ref


def run_case(q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, dtype, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    k_cache, v_cache, table = make_paged(seq_lens, num_kv_heads, head_size, block_size, dtype, gen=gen)
    T = sum(q_lens)
    query = torch.randn(T, num_heads, head_size, generator=gen).to(dtype).to(DEVICE)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_size**-0.5
    out = torch.full((T, num_heads, head_size), float("nan"), dtype=dtype, device=DEVICE)  # poison
    prefill_attention(query, k_cache, v_cache, table, qsl, lens, scale, max_query_len=max(q_lens), out=out, **kw)
    ref = prefill_attention_ref(query, k_cache, v_cache, table, qsl, lens, scale, compute_dtype=torch.float64)
    assert_close(out, ref, dtype, f"prefill q={q_lens} ctx={ctx_lens} H={num_heads}/{num_kv_heads} D={head_size}")


# plain prompt; a cached prefix ending mid-block; a single-token chunk after a long context;
# a chunk that starts mid-block and spans several query blocks
Q_LENS = [5, 21, 1, 24]
CTX_LENS = [0, 19, 50, 23]


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_prefill_head_sizes(head_size, dtype):
    run_case(Q_LENS, CTX_LENS, 4, 1, head_size, 16, dtype, seed=head_size)  # GQA 4


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_prefill_gqa_block_sizes(heads, block_size, dtype):
    run_case(Q_LENS, CTX_LENS, *heads, 64, block_size, dtype, seed=block_size + heads[1])


def test_prefill_query_blocks_smaller_than_pages():
    # BLOCK_M and BLOCK_N of 16 with 32-token pages: tiles that are half a page
    run_case([33, 2], [31, 64], 4, 2, 64, 32, torch.float32, seed=3, block_m=16, block_n=16)


# ---------------------------------------------------------------- real sizes, GPU only


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_prefill_real_sizes(dtype, head_size):
    # prompts, a chunked prompt after 1000 cached tokens, a cached prefix, a 1-token chunk
    q_lens, ctx = [1000, 513, 64, 1, 2048], [0, 1000, 4000, 3000, 0]
    run_case(q_lens, ctx, 32, 8, head_size, 16, dtype, seed=head_size)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_prefill_real_sizes_gqa_block32(dtype):
    q_lens, ctx = [700, 129, 1], [0, 300, 2000]
    run_case(q_lens, ctx, 16, 16, 128, 32, dtype, seed=1)  # GQA 1
    run_case(q_lens, ctx, 64, 8, 128, 32, dtype, seed=2)  # GQA 8
