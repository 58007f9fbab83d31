"""Prefill (causal varlen over the paged cache) kernel vs its PyTorch reference."""
from __future__ import annotations

import pytest
import torch
from kernel_test_utils import DEVICE, DTYPES, DT_IDS, assert_close, make_paged, requires_cuda

from labengine.kernels.prefill_attention import TensorDescriptor, prefill_attention, prefill_attention_ref

# where the kernel reads the step's new keys: through the block table, or from the step's K/V
# tensors (as the model passes them: strided views of one fused QKV row) by pointers or TMA
NEW_KV = ["paged", "pointers"] + (["tma"] if TensorDescriptor is not None else [])


def new_kv_views(query, k_cache, v_cache, table, q_lens, ctx_lens):
    """The step's new keys/values, gathered from the cache, as strided views of a fused
    [T, Hq + 2 Hkv, D] QKV buffer (what LlamaAttention hands the backend)."""
    T, Hq, D = query.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    fused = torch.empty(T, Hq + 2 * Hkv, D, dtype=query.dtype, device=query.device)
    row = 0
    for b, (q, c) in enumerate(zip(q_lens, ctx_lens)):
        pos = torch.arange(c, c + q, device=query.device)
        slots = table[b].long()[pos // bs] * bs + pos % bs
        fused[row : row + q, Hq : Hq + Hkv] = k_cache.reshape(-1, Hkv, D)[slots]
        fused[row : row + q, Hq + Hkv :] = v_cache.reshape(-1, Hkv, D)[slots]
        row += q
    return fused[:, Hq : Hq + Hkv], fused[:, Hq + Hkv :]


def run_case(q_lens, ctx_lens, num_heads, num_kv_heads, head_size, block_size, dtype, seed, new_kv="paged",
             q_scale=1.0, **kw):
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, ctx_lens)]
    k_cache, v_cache, table = make_paged(seq_lens, num_kv_heads, head_size, block_size, dtype, gen=gen)
    T = sum(q_lens)
    query = (q_scale * torch.randn(T, num_heads, head_size, generator=gen)).to(dtype).to(DEVICE)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_size**-0.5
    out = torch.full((T, num_heads, head_size), float("nan"), dtype=dtype, device=DEVICE)  # poison
    if new_kv != "paged":
        kw.update(zip(("key", "value"), new_kv_views(query, k_cache, v_cache, table, q_lens, ctx_lens)))
        if new_kv == "tma" and head_size & (head_size - 1):
            new_kv = None  # TMA needs a power-of-two head size: the default falls back to pointers
    prefill_attention(query, k_cache, v_cache, table, qsl, lens, scale, max_query_len=max(q_lens), out=out,
                      new_kv=new_kv, **kw)
    ref = prefill_attention_ref(query, k_cache, v_cache, table, qsl, lens, scale, compute_dtype=torch.float64)
    assert_close(out, ref, dtype, f"prefill q={q_lens} ctx={ctx_lens} H={num_heads}/{num_kv_heads} D={head_size}")


# plain prompt; a cached prefix ending mid-block; a single-token chunk after a long context;
# a chunk that starts mid-block and spans several query blocks
Q_LENS = [5, 21, 1, 24]
CTX_LENS = [0, 19, 50, 23]


@pytest.mark.parametrize("new_kv", NEW_KV)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_prefill_head_sizes(head_size, dtype, new_kv):
    run_case(Q_LENS, CTX_LENS, 4, 1, head_size, 16, dtype, seed=head_size, new_kv=new_kv)  # GQA 4


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_prefill_gqa_block_sizes(heads, block_size, dtype):
    run_case(Q_LENS, CTX_LENS, *heads, 64, block_size, dtype, seed=block_size + heads[1])


def test_prefill_query_blocks_smaller_than_pages():
    # BLOCK_M and BLOCK_N of 16 with 32-token pages: tiles that are half a page
    run_case([33, 2], [31, 64], 4, 2, 64, 32, torch.float32, seed=3, block_m=16, block_n=16)


# The GPU's tilings at interpreter-sized shapes: 128-row query blocks (the diagonal then spans
# several key tiles, and a block's rows start mid-tile after an odd context), tiles of several
# pages and of part of a page, the block table read in the loop instead of one tile ahead.
TILINGS = [
    dict(block_m=128, block_n=64),
    dict(block_m=64, block_n=32),
    dict(block_m=32, block_n=64),
    dict(block_m=16, block_n=32, table_ahead=False),
    dict(block_m=32, block_n=16, table_ahead=False),
]


@pytest.mark.parametrize("new_kv", NEW_KV)
@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_tilings(tiling, block_size, new_kv):
    # odd lengths; a 1-token sequence; a prompt of exactly one tile; contexts ending mid-page
    q_lens, ctx = [131, 1, 64, 77], [0, 45, 0, 150]
    run_case(q_lens, ctx, 4, 2, 64, block_size, torch.bfloat16, seed=block_size, new_kv=new_kv, **tiling)


# the query tile and whole output tiles through TMA, and the warp-specialized loop over new
# keys: whole and partial query blocks, a block whose rows run into the next sequence's rows
# (its query tile holds them; they are never stored), a context ending mid-tile
HOPPER_PATHS = [dict(q_tma=True), dict(o_tma=True), dict(q_tma=True, o_tma=True),
                dict(warp_specialize=True), dict(q_tma=True, o_tma=True, warp_specialize=True)]


@pytest.mark.skipif(TensorDescriptor is None, reason="this triton has no TMA descriptors")
@pytest.mark.parametrize("new_kv", ["pointers", "tma"])
@pytest.mark.parametrize("paths", HOPPER_PATHS, ids=lambda t: "-".join(t))
def test_prefill_tma_query_output_and_warp_specialize(paths, new_kv):
    q_lens, ctx = [64, 37, 1, 96], [0, 0, 45, 150]
    run_case(q_lens, ctx, 4, 2, 64, 16, torch.bfloat16, seed=13, new_kv=new_kv, block_m=32, block_n=16, **paths)


@pytest.mark.parametrize("new_kv", NEW_KV)
def test_prefill_peaked_scores(new_kv):
    # queries x12: rows' running maxima jump by hundreds between tiles, so the online softmax
    # rescales its output and sum often (and exp2 underflows to 0 for most keys)
    q_lens, ctx = [131, 1, 64, 77], [0, 45, 0, 150]
    run_case(q_lens, ctx, 4, 2, 64, 16, torch.float32, seed=17, new_kv=new_kv, q_scale=12.0, block_m=32, block_n=16)


def test_prefill_tma_query_needs_describable_rows():
    q = torch.zeros(4, 2, 80, device=DEVICE)  # head size 80: not a power of two
    kc, vc, table = make_paged([4], 2, 80, 16, torch.float32)
    args = (q, kc, vc, table, torch.tensor([0, 4], dtype=torch.int32, device=DEVICE),
            torch.tensor([4], dtype=torch.int32, device=DEVICE), 0.125)
    with pytest.raises(ValueError, match="q_tma/o_tma need a power-of-two head size"):
        prefill_attention(*args, max_query_len=4, q_tma=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_prefill_chunks_match_whole_prompt(dtype):
    # chunked prefill: a prompt computed in three chunks (each attending to the cached earlier
    # chunks) gives the same output rows as the whole prompt at once
    gen = torch.Generator().manual_seed(11)
    n, Hq, Hkv, D, bs = 70, 4, 2, 64, 16
    k_cache, v_cache, table = make_paged([n], Hkv, D, bs, dtype, gen=gen)
    query = torch.randn(n, Hq, D, generator=gen).to(dtype).to(DEVICE)
    scale = D**-0.5

    def run(start, stop):
        qsl = torch.tensor([0, stop - start], dtype=torch.int32, device=DEVICE)
        lens = torch.tensor([stop], dtype=torch.int32, device=DEVICE)
        return prefill_attention(query[start:stop].contiguous(), k_cache, v_cache, table, qsl, lens, scale,
                                 max_query_len=stop - start)

    whole = run(0, n)
    chunks = torch.cat([run(0, 23), run(23, 48), run(48, n)])
    torch.testing.assert_close(chunks, whole, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("new_kv", NEW_KV)
def test_prefill_empty_and_zero_length_sequences(new_kv):
    # a step whose first sequence has no new tokens (q_len 0): its rows are absent, others unaffected
    run_case([0, 9, 3], [5, 0, 20], 4, 4, 64, 16, torch.float32, seed=5, new_kv=new_kv)


def test_prefill_new_kv_errors():
    q = torch.zeros(4, 2, 64, device=DEVICE)
    kc, vc, table = make_paged([4], 2, 64, 16, torch.float32)
    args = (q, kc, vc, table, torch.tensor([0, 4], dtype=torch.int32, device=DEVICE),
            torch.tensor([4], dtype=torch.int32, device=DEVICE), 0.125)
    with pytest.raises(ValueError, match="new_kv='fast'; allowed: 'paged', 'pointers', 'tma'"):
        prefill_attention(*args, max_query_len=4, new_kv="fast")
    with pytest.raises(ValueError, match="needs the step's key and value"):
        prefill_attention(*args, max_query_len=4, new_kv="pointers")


# ---------------------------------------------------------------- real sizes, GPU only


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("new_kv", NEW_KV)
def test_prefill_real_sizes(dtype, head_size, new_kv):
    # prompts, a chunked prompt after 1000 cached tokens, a cached prefix, a 1-token chunk
    q_lens, ctx = [1000, 513, 64, 1, 2048], [0, 1000, 4000, 3000, 0]
    run_case(q_lens, ctx, 32, 8, head_size, 16, dtype, seed=head_size, new_kv=new_kv)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tiling", TILINGS + [
    dict(block_m=128, block_n=128, num_warps=8, num_stages=3),
    dict(block_m=128, block_n=32, num_warps=8, num_stages=3, maxnreg=128),
    dict(block_m=128, block_n=64, num_warps=8, num_stages=4),
], ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
@pytest.mark.parametrize("new_kv", NEW_KV)
def test_prefill_real_sizes_tilings(tiling, new_kv):
    # the benchmark's tilings at real size: long prompts, a chunk after a long context
    q_lens, ctx = [2048, 1000, 3, 517], [0, 3000, 4000, 0]
    run_case(q_lens, ctx, 32, 8, 128, 16, torch.bfloat16, seed=7, new_kv=new_kv, **tiling)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("paths", HOPPER_PATHS, ids=lambda t: "-".join(t))
@pytest.mark.parametrize("tiling", [dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
                                    dict(block_m=128, block_n=128, num_warps=8, num_stages=3)],
                         ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
def test_prefill_real_sizes_hopper_paths(tiling, paths):
    if TensorDescriptor is None or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper GPU")
    q_lens, ctx = [2048, 1000, 3, 517], [0, 3000, 4000, 0]
    run_case(q_lens, ctx, 32, 8, 128, 16, torch.bfloat16, seed=9, new_kv="tma", **tiling, **paths)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_prefill_real_sizes_gqa_block32(dtype):
    q_lens, ctx = [700, 129, 1], [0, 300, 2000]
    run_case(q_lens, ctx, 16, 16, 128, 32, dtype, seed=1)  # GQA 1
    run_case(q_lens, ctx, 64, 8, 128, 32, dtype, seed=2)  # GQA 8
