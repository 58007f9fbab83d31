"""Decode (flash-decoding) kernel vs its PyTorch reference, on fresh random paged caches."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_test_utils import DEVICE, DTYPES, DT_IDS, assert_close, make_paged, requires_cuda

from labengine.kernels.decode_attention import (
    BALANCED_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    balanced_num_splits,
    choose_num_splits,
    choose_split_len,
    decode_attention,
    decode_attention_ref,
    longest_first,
    programs_per_sm,
)


def run_case(seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, num_splits, seed, query=None, **kw):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, table = make_paged(seq_lens, num_kv_heads, head_size, block_size, dtype, gen=gen)
    B = len(seq_lens)
    if query is None:
        query = torch.randn(B, num_heads, head_size, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = head_size**-0.5
    out = torch.full((B, num_heads, head_size), float("nan"), dtype=dtype, device=DEVICE)  # poison
    decode_attention(query, k_cache, v_cache, table, lens, scale, max_seq_len=max(seq_lens), out=out,
                     num_splits=num_splits, **kw)
    ref = decode_attention_ref(query, k_cache, v_cache, table, lens, scale, compute_dtype=torch.float64)
    assert_close(out, ref, dtype, f"decode B={B} H={num_heads}/{num_kv_heads} D={head_size} bs={block_size} S={num_splits}")


# ragged lengths: 1 token, a partial last block, an exact multiple of the block size
LENS = [1, 45, 64, 100]


@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_decode_head_sizes(head_size, dtype):
    run_case(LENS, 8, 2, head_size, 16, dtype, num_splits=2, seed=head_size)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_decode_gqa_block_sizes(heads, block_size, dtype):
    # the single-split path (stage 1 writes the output) and a 3-way split (stage 2 merges)
    run_case(LENS, *heads, 64, block_size, dtype, num_splits=1, seed=block_size + heads[1])
    run_case([7, 130, 33], *heads, 64, block_size, dtype, num_splits=3, seed=7 * block_size)


def test_decode_many_splits_with_empty_ones():
    # 8 splits of a 20-token sequence: most splits are empty and must not pollute the merge
    run_case([20, 3, 200], 8, 2, 64, 16, torch.float32, num_splits=8, seed=11)


@pytest.mark.parametrize("head_fastest", [False, True])
def test_decode_grid_orders_and_tilings(head_fastest):
    # the launcher's knobs (grid order, BLOCK_N, stages) change the schedule, never the result
    for block_n, stages in ((32, 2), (128, 3)):
        run_case([3, 90, 64], 8, 2, 64, 16, torch.bfloat16, num_splits=2, seed=block_n,
                 head_fastest=head_fastest, block_n=block_n, num_stages=stages)


def test_longest_first():
    assert longest_first([5, 900, 5, 17]).tolist() == [1, 3, 0, 2]  # ties keep index order
    assert longest_first([5, 900, 5, 17], size=6).tolist() == [1, 3, 0, 2, 4, 5]  # padding rows last
    order = longest_first([3, 1, 2])
    assert order.dtype == np.int32 and sorted(order.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("head_fastest", [False, True])
def test_decode_launch_order_changes_the_schedule_not_the_result(num_splits, head_fastest):
    # programs take their sequence from `order`: longest first, and a shuffled permutation;
    # every sequence's output lands in its own row either way
    lens = [3, 200, 65, 1, 130]
    gen = torch.Generator().manual_seed(21)
    shuffled = torch.randperm(len(lens), generator=gen).to(torch.int32).tolist()
    for order in (longest_first(lens).tolist(), shuffled):
        run_case(lens, 8, 2, 64, 16, torch.bfloat16, num_splits=num_splits, seed=22, head_fastest=head_fastest,
                 order=torch.tensor(order, dtype=torch.int32, device=DEVICE))


def test_decode_launch_order_is_checked():
    with pytest.raises(AssertionError, match="order must be"):
        run_case([3, 4], 8, 2, 64, 16, torch.float32, num_splits=1, seed=1,
                 order=torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("num_splits", [2, BALANCED_SPLITS])
def test_decode_balanced_splits_match_the_reference(num_splits):
    # split_len keys per program: sequences of one split (written directly, skipped by the
    # merge), of several, of more than the grid has (the last split takes the rest); a
    # split_len that is not a multiple of the key tile (rounded up), and one past every length
    lens = [1, 200, 65, 17, 130, 64]
    order = torch.tensor(longest_first(lens).tolist(), dtype=torch.int32, device=DEVICE)
    for split_len in (16, 64, 100, 128, 10_000):
        sl = torch.tensor([split_len], dtype=torch.int32, device=DEVICE)
        run_case(lens, 8, 2, 64, 16, torch.bfloat16, num_splits=num_splits, seed=split_len, split_len=sl, order=order)
    # float32 and a head size padded to 128 lanes, without an order
    run_case(lens, 8, 4, 80, 16, torch.float32, num_splits=num_splits, seed=3,
             split_len=torch.tensor([64], dtype=torch.int32, device=DEVICE), block_n=32)


def test_decode_balanced_splits_are_checked():
    with pytest.raises(AssertionError, match="split_len must be"):
        run_case([3, 4], 8, 2, 64, 16, torch.float32, num_splits=2, seed=1,
                 split_len=torch.tensor([64, 64], dtype=torch.int32, device=DEVICE))


def test_balanced_num_splits():
    # H200: 132 SMs x 4 programs; 8 KV heads: batch 98 still splits, 99 has 1.5 waves of pairs
    assert balanced_num_splits(98, 8, 528) == BALANCED_SPLITS
    assert balanced_num_splits(99, 8, 528) == 1
    assert balanced_num_splits(1, 1, 528) == BALANCED_SPLITS


def test_choose_split_len():
    slots = 528
    # one long sequence among short ones, few programs: split it (but never below the minimum,
    # and within BALANCED_SPLITS splits of the longest), a whole number of key tiles
    lens = [4000] + [300] * 20
    sl = choose_split_len(lens, 8, slots)
    assert sl % 64 == 0 and MIN_TOKENS_PER_SPLIT <= sl < 4000 and -(-4000 // sl) <= BALANCED_SPLITS
    # equal lengths that fill the GPU several times over: no split (the longest, rounded up to a tile)
    assert choose_split_len([1000] * 256, 8, slots) == 1024
    # mixed lengths in about one wave (the throughput workload's batch 64): split
    gen = np.random.default_rng(0)
    mixed = gen.integers(200, 2000, 64).tolist()
    assert choose_split_len(mixed, 8, slots) < max(mixed)
    # short sequences: one split each (the minimum length covers them)
    assert choose_split_len([5, 100, 200], 8, slots) == 256
    assert choose_split_len([1], 8, slots) == 64


def test_decode_whole_tiles_and_tails():
    # the kernel runs whole BLOCK_N tiles without masks and only the last partial one with
    # them: lengths of exactly one and two tiles, one key past a tile, one short of it; a
    # padded head size (80 -> 128 lanes) on the unmasked path; splits ending inside a tile
    run_case([64, 128, 65, 127], 8, 2, 80, 16, torch.bfloat16, num_splits=1, seed=9)
    run_case([64, 128, 65, 127], 8, 2, 64, 32, torch.float32, num_splits=3, seed=10)


def test_decode_block_table_view_with_garbage_past_rows():
    # a tile reads the table entries of whole pages: a sequence of 65 keys (block 16, tiles of
    # 64) asks for pages 4-7 of a 5-entry row. The table here is a column slice of a wider
    # tensor whose hidden columns hold block ids far out of range: the kernel must stay inside
    # each row (max_blocks) and mask the keys past the sequence's end.
    gen = torch.Generator().manual_seed(12)
    lens = [65, 17, 80]
    k_cache, v_cache, table = make_paged(lens, 2, 64, 16, torch.float32, gen=gen)
    wide = torch.full((len(lens), table.shape[1] + 7), 2**30, dtype=torch.int32, device=DEVICE)
    wide[:, : table.shape[1]] = table
    view = wide[:, : table.shape[1]]
    query = torch.randn(len(lens), 8, 64, generator=gen).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    for splits in (1, 2):
        out = torch.full((len(lens), 8, 64), float("nan"), device=DEVICE)
        decode_attention(query, k_cache, v_cache, view, seq_lens, 0.125, max_seq_len=80, out=out, num_splits=splits)
        ref = decode_attention_ref(query, k_cache, v_cache, table, seq_lens, 0.125, compute_dtype=torch.float64)
        assert_close(out, ref, torch.float32, f"table view, {splits} split(s)")


def test_decode_strided_query():
    # the model passes q as a view of a fused qkv projection: [T, (Hq + 2 Hkv) * D]
    gen = torch.Generator().manual_seed(5)
    B, Hq, Hkv, D = 3, 8, 2, 64
    qkv = torch.randn(B, (Hq + 2 * Hkv) * D, generator=gen).to(DEVICE)
    q = qkv[:, : Hq * D].view(B, Hq, D)
    assert not q.is_contiguous()
    run_case([5, 40, 17], Hq, Hkv, D, 16, torch.float32, num_splits=2, seed=5, query=q)


def test_choose_num_splits():
    # big batches: no split; batch 1 on a long context: split to fill the SMs, capped
    assert choose_num_splits(64, 8, 4096, 132) == 1
    assert choose_num_splits(1, 8, 32768, 132) == 64
    assert choose_num_splits(1, 8, 300, 132) == 1  # too short to split
    assert 1 <= choose_num_splits(4, 8, 2048, 132) <= 2048 // 256
    # past one wave of 132 SMs x 4 programs: a nearly empty second wave is split away...
    assert choose_num_splits(72, 8, 4096, 132, per_sm=4) > 1
    assert choose_num_splits(99, 8, 4096, 132, per_sm=4) == 2
    # ...but full waves are not (batch 64 fits one wave, batch 128 two almost full ones)
    assert choose_num_splits(64, 8, 4096, 132, per_sm=4) == 1
    assert choose_num_splits(128, 8, 4096, 132, per_sm=4) == 1
    for batch in range(1, 300, 7):
        for ctx in (100, 1000, 4096, 32768):
            s = choose_num_splits(batch, 8, ctx, 132, per_sm=4)
            assert s & (s - 1) == 0 and (s == 1 or ctx // s >= MIN_TOKENS_PER_SPLIT), (batch, ctx, s)


def test_programs_per_sm():
    # H200 (228 KB of shared memory per SM), D=128, bf16: 128 registers x 4 warps -> 4 programs;
    # head size 256 with 8 warps -> 2; fp32 tiles uncapped -> 2 (registers)
    smem = 228 * 1024
    assert programs_per_sm(64, 128, 16, 2, 4, 128, smem) == 4
    assert programs_per_sm(32, 256, 16, 2, 8, 128, smem) == 2
    assert programs_per_sm(64, 128, 16, 4, 4, 0, smem) == 2
    assert programs_per_sm(64, 128, 16, 2, 4, 128, 100 * 1024) == 2  # a GPU with little shared memory


# ---------------------------------------------------------------- real sizes, GPU only


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_decode_real_sizes(dtype, head_size):
    gen = torch.Generator().manual_seed(head_size)
    lens = torch.randint(1, 4096, (20,), generator=gen).tolist() + [4096, 1, 16, 17]
    run_case(lens, 32, 8, head_size, 16, dtype, num_splits=None, seed=head_size)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_decode_real_sizes_gqa_block32_long(dtype):
    gen = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 4096, (12,), generator=gen).tolist() + [4096, 1]
    run_case(lens, 32, 32, 128, 32, dtype, num_splits=None, seed=2)  # GQA 1
    run_case(lens, 64, 8, 128, 32, dtype, num_splits=None, seed=3)  # GQA 8
    # batch 1, long context: the split-KV path chosen by the launcher
    run_case([32768 - 5], 32, 8, 128, 16, dtype, num_splits=None, seed=4)


@requires_cuda
@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    """Captured once with max_seq_len = max_model_len, replayed with other lengths and inputs."""
    dtype, B, Hq, Hkv, D, bs, max_model_len = torch.bfloat16, 4, 32, 8, 128, 16, 8192
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache, table = make_paged([max_model_len] * B, Hkv, D, bs, dtype, gen=gen)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype).to(DEVICE)
    lens = torch.full((B,), 10, dtype=torch.int32, device=DEVICE)
    out = torch.empty(B, Hq, D, dtype=dtype, device=DEVICE)
    kw = dict(max_seq_len=max_model_len, out=out)
    decode_attention(q, k_cache, v_cache, table, lens, D**-0.5, **kw)  # compile outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        decode_attention(q, k_cache, v_cache, table, lens, D**-0.5, **kw)
    for new_lens in ([1, 77, 4096, 8192], [8000, 3, 16, 513]):
        q.copy_(torch.randn(B, Hq, D, generator=gen).to(dtype))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        out.fill_(float("nan"))
        g.replay()
        ref = decode_attention_ref(q, k_cache, v_cache, table, lens, D**-0.5, compute_dtype=torch.float64)
        assert_close(out, ref, dtype, f"graph replay {new_lens}")


@requires_cuda
@pytest.mark.gpu
def test_decode_balanced_splits_cuda_graph_replay():
    """Balanced splits under a CUDA graph: captured once (the launcher's grid for batch 48), replayed
    with new lengths, orders and split lengths written into the captured tensors."""
    dtype, B, Hq, Hkv, D, bs, max_model_len = torch.bfloat16, 48, 16, 8, 128, 16, 4096
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, table = make_paged([max_model_len] * B, Hkv, D, bs, dtype, gen=gen)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype).to(DEVICE)
    lens = torch.full((B,), 10, dtype=torch.int32, device=DEVICE)
    order = torch.arange(B, dtype=torch.int32, device=DEVICE)
    split_len = torch.tensor([max_model_len], dtype=torch.int32, device=DEVICE)
    out = torch.empty(B, Hq, D, dtype=dtype, device=DEVICE)
    kw = dict(max_seq_len=max_model_len, out=out, order=order, split_len=split_len)
    decode_attention(q, k_cache, v_cache, table, lens, D**-0.5, **kw)  # compile outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        decode_attention(q, k_cache, v_cache, table, lens, D**-0.5, **kw)
    from labengine.kernels.decode_attention import decode_split_len

    for seed in range(3):
        new_lens = torch.randint(1, max_model_len + 1, (B,), generator=torch.Generator().manual_seed(seed)).tolist()
        new_lens[seed] = max_model_len
        q.copy_(torch.randn(B, Hq, D, generator=gen).to(dtype))
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        order.copy_(torch.tensor(longest_first(new_lens).tolist(), dtype=torch.int32))
        sl = decode_split_len(new_lens, Hkv, D, dtype, lens.device)
        assert sl < max_model_len  # these lengths in under one wave: split
        split_len.fill_(sl)
        out.fill_(float("nan"))
        g.replay()
        ref = decode_attention_ref(q, k_cache, v_cache, table, lens, D**-0.5, compute_dtype=torch.float64)
        assert_close(out, ref, dtype, f"balanced graph replay, split_len {sl}")
