"""Prefill attention over the paged KV cache: causal, variable-length, with cached context.

Each sequence b of the step has q_len = query_start_loc[b+1] - query_start_loc[b] new
tokens and ctx = seq_lens[b] - q_len tokens already in the cache (a cached prefix, or
the earlier chunks of a chunked prompt). Query token i sits at absolute position ctx + i
and attends keys 0 .. ctx + i. The step's own keys/values have already been written into
the cache, but the kernel reads them where the QKV projection left them (`key`/`value`,
rows of the step in order; by TMA descriptors on Hopper, else by pointers): whole
contiguous tiles, no block-table lookups. Only the context is read through the block table.
On Hopper the query tile is loaded and whole output tiles are stored by TMA too.
(`new_kv="paged"`, or no key/value given, reads every key through the block table: the
kernel before 2026-12-04, kept as the baseline of benchmarks/exp_prefill.py.)

Kernel (flash-attention 2 on the paged cache): grid (num_q_heads, num_seqs, query blocks).
A program takes BLOCK_M query rows of one head of one sequence and walks the keys in
tiles of BLOCK_N with an online softmax:

* the context (visible to every row): whole tiles without masks through the block table,
  then its partial last tile masked at ctx;
* the new keys before the block's first row (visible to every row): whole tiles, no masks;
* the diagonal tiles, up to the last row's causal limit, with the causal and length masks.
  Tiles past the last row's limit are never visited, so causal prefill does half the work
  of a full square.

The softmax runs in base 2 with the scale folded into one FMA per score
(exp2(s * scale * log2 e - m)), the P.V product accumulates into the output tile inside
`tl.dot` (tensor cores keep the accumulator), and the block-table entries of the next
context tile are read one tile ahead, so the K/V addresses of a tile never wait on a load
of the same iteration and triton's software pipeliner can keep several K/V tiles in flight
(num_stages). The query blocks run heaviest first (the last block of a prompt has the
most keys), with the heads of a sequence side by side, so the query heads of one KV head
read the same K/V tiles at about the same time (through the L2 cache).

`prefill_attention_ref` is the PyTorch reference.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .decode_attention import LOG2E, dot, dot_ieee

try:  # TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None


@triton.jit
def dot_acc(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b inside tl.dot (the tensor cores accumulate in place); IEEE as in `dot`."""
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _key_pages(bt_row, n0, seq_len, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """[BLOCK_N] int64: the physical block of each key n0 .. n0 + BLOCK_N - 1 (0 past seq_len)."""
    pos = n0 + tl.arange(0, BLOCK_N)
    return tl.load(bt_row + pos // PAGE_SIZE, mask=pos < seq_len, other=0).to(tl.int64)


@triton.jit
def _softmax_tile(qk, acc, m_i, l_i, sm_scale_log2):
    """The online softmax of one tile of raw scores qk [BLOCK_M, BLOCK_N]: returns p (base 2,
    against the rows' new running max) and acc, m_i, l_i moved to that max.

    (FlashAttention-4's conditional rescaling, skipping the rescale of acc unless a row's max
    grew by more than 2^8, was tried on the H200 on 2026-12-04: the tile-wide branch it needs
    made the kernel 1.1-2x slower. So was FlashAttention-3's in-warpgroup overlap written out
    by hand, the next tile's scores issued before this tile's softmax: 1.1-1.5x slower with
    64 x 64 tiles, and 128 x 128 tiles no longer fit in shared memory; triton 3.6 did not turn
    it into overlap. Also measured and removed (2026-12-04, seventh session): the query tile held
    in registers, so each q.K^T dot reads only K from shared memory (no faster: within the 3 %
    spread of repeated timings, slower with fewer stages), and several query heads of one KV
    head stacked in one tile (no faster with 64-row tiles, slower with 128); and the in-warpgroup
    overlap written in Gluon, where it does reach the sass (benchmarks/exp_prefill_gluon.py: 2-6 %
    slower than this kernel; the same Gluon kernel without the overlap is on par). See RESULTS.md.)"""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)
    alpha = tl.math.exp2(m_i - m_new)
    acc = acc * alpha[:, None]
    l_i = l_i * alpha
    p = tl.math.exp2(qk * sm_scale_log2 - m_new[:, None])
    l_i = l_i + tl.sum(p, 1)
    return p, acc, m_new, l_i


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,  # [BLOCK_M, BLOCK_D] queries; running output, max (log2 units), sum (fp32)
    n0, pages,  # first key of the tile; [BLOCK_N] int64 physical block of each of its keys
    q_pos, seq_len,  # [BLOCK_M] absolute position of each query row; keys in the sequence
    k_head, v_head,  # K/V cache pointers offset to this KV head
    sm_scale_log2,
    stride_b, stride_t,  # block and token strides, shared by the K and V caches
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the tile is visible to every row (no masks)
):
    """One tile of BLOCK_N keys into the online softmax; returns (acc, m_i, l_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = n0 + offs_n
    kv_off = pages * stride_b + (pos % PAGE_SIZE) * stride_t  # [BLOCK_N] offset of each key's row
    k_ptrs = k_head + kv_off[None, :] + offs_d[:, None]  # K^T tile [BLOCK_D, BLOCK_N]
    v_ptrs = v_head + kv_off[:, None] + offs_d[None, :]  # V tile [BLOCK_N, BLOCK_D]
    mask_d = offs_d < HEAD_DIM  # HEAD_DIM is a multiple of 16: loads stay 16-byte vectors
    if MASKED:
        mask_n = pos < seq_len
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
    qk = dot(q, k, DOT_IEEE)  # raw scores; the scale is folded into the exponent below
    if MASKED:
        # causal + length; key 0 is visible to every row and is in the first tile a program
        # visits, so m_i is finite from the first tile on and no row divides 0 by 0
        keep = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    p, acc, m_i, l_i = _softmax_tile(qk, acc, m_i, l_i, sm_scale_log2)
    if MASKED:
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    acc = dot_acc(p.to(v.dtype), v, acc, DOT_IEEE)
    return acc, m_i, l_i


@triton.jit
def _paged_whole_tiles(
    q, acc, m_i, l_i,  # as in _attend_tile
    n_end, limit,  # keys 0 .. n_end - 1 (a multiple of BLOCK_N), all visible to every row; keys in the sequence
    q_pos, bt_row, k_head, v_head, sm_scale_log2, stride_b, stride_t,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_IEEE: tl.constexpr, TABLE_AHEAD: tl.constexpr,
):
    """Whole tiles of keys through the block table, no masks; the next tile's block-table
    entries read one tile ahead (TABLE_AHEAD) so no K/V address waits on a load of its own
    iteration."""
    pages = _key_pages(bt_row, 0, limit, BLOCK_N, PAGE_SIZE)
    for n0 in range(0, n_end, BLOCK_N):
        if TABLE_AHEAD:
            next_pages = _key_pages(bt_row, n0 + BLOCK_N, limit, BLOCK_N, PAGE_SIZE)
        else:
            pages = _key_pages(bt_row, n0, limit, BLOCK_N, PAGE_SIZE)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n0, pages, q_pos, limit, k_head, v_head, sm_scale_log2,
            stride_b, stride_t, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_IEEE, False)
        if TABLE_AHEAD:
            pages = next_pages
    return acc, m_i, l_i


@triton.jit
def _new_k_tile(K_new, desc_k, j0, q_start, q_len, kv_col, stride_knt,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                NEW_KV: tl.constexpr, MASKED: tl.constexpr):
    """K^T tile [BLOCK_D, BLOCK_N] of new keys j0 .. j0 + BLOCK_N - 1 (zeros past q_len when MASKED;
    by TMA, rows past the step's last token are zeros and rows of the next sequence are read)."""
    if NEW_KV == 2:
        # TMA: the copy engine fetches the [BLOCK_N, D] tile
        return desc_k.load([q_start + j0, kv_col]).T
    offs_d = tl.arange(0, BLOCK_D)
    j = j0 + tl.arange(0, BLOCK_N)
    rows = (q_start + j).to(tl.int64)
    mask = (offs_d < HEAD_DIM)[:, None]
    if MASKED:
        mask = mask & (j < q_len)[None, :]
    return tl.load(K_new + rows[None, :] * stride_knt + offs_d[:, None], mask=mask, other=0.0)


@triton.jit
def _new_v_tile(V_new, desc_v, j0, q_start, q_len, kv_col, stride_vnt,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                NEW_KV: tl.constexpr, MASKED: tl.constexpr):
    """V tile [BLOCK_N, BLOCK_D] of new keys j0 .. j0 + BLOCK_N - 1 (zeros past q_len when MASKED)."""
    j = j0 + tl.arange(0, BLOCK_N)
    if NEW_KV == 2:
        v = desc_v.load([q_start + j0, kv_col])
        if MASKED:
            # zero the rows of the next sequence: their p is 0, but 0 * (a NaN or inf there) is not
            v = tl.where((j < q_len)[:, None], v, 0.0)
        return v
    offs_d = tl.arange(0, BLOCK_D)
    rows = (q_start + j).to(tl.int64)
    mask = (offs_d < HEAD_DIM)[None, :]
    if MASKED:
        mask = mask & (j < q_len)[:, None]
    return tl.load(V_new + rows[:, None] * stride_vnt + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _attend_new_tile(
    q, acc, m_i, l_i,  # as in _attend_tile
    j0, q_start, q_len,  # first new key of the tile (0 = the sequence's first new token); its row offset; new keys
    offs_m,  # [BLOCK_M] each query row's index among the new tokens
    K_new, V_new,  # [T, Hkv, D] the step's keys/values (NEW_KV == 1), offset to this KV head
    desc_k, desc_v,  # TMA descriptors over [T, Hkv * D], block [BLOCK_N, D] (NEW_KV == 2)
    kv_col,  # column of this KV head in the descriptors' rows (kvh * D)
    sm_scale_log2,
    stride_knt, stride_vnt,  # token strides of K_new and V_new
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IEEE: tl.constexpr, NEW_KV: tl.constexpr,
    MASKED: tl.constexpr,  # False: every key of the tile is visible to every row
):
    """One tile of BLOCK_N new keys (rows q_start + j0 .. of the step's K/V) into the online softmax."""
    k = _new_k_tile(K_new, desc_k, j0, q_start, q_len, kv_col, stride_knt, HEAD_DIM, BLOCK_D, BLOCK_N,
                    NEW_KV, MASKED)
    qk = dot(q, k, DOT_IEEE)
    if MASKED:  # causal among the new tokens, and the sequence's end
        j = j0 + tl.arange(0, BLOCK_N)
        keep = (j[None, :] <= offs_m[:, None]) & (j < q_len)[None, :]
        qk = tl.where(keep, qk, float("-inf"))
    p, acc, m_i, l_i = _softmax_tile(qk, acc, m_i, l_i, sm_scale_log2)
    v = _new_v_tile(V_new, desc_v, j0, q_start, q_len, kv_col, stride_vnt, HEAD_DIM, BLOCK_D, BLOCK_N,
                    NEW_KV, MASKED)
    acc = dot_acc(p.to(v.dtype), v, acc, DOT_IEEE)
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    Q,  # [T, Hq, D] new query tokens of all sequences, flattened; last dim contiguous
    K_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] key cache (new keys already stored)
    V_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] value cache (same block/token strides as K)
    Out,  # [T, Hq, D] output
    K_new,  # [T, Hkv, D] the step's new keys (NEW_KV == 1; rows may be strided views of a fused QKV)
    V_new,  # [T, Hkv, D] the step's new values (NEW_KV == 1)
    desc_k,  # TMA descriptor of K_new as [T, Hkv * D], block [BLOCK_N, D] (NEW_KV == 2)
    desc_v,  # TMA descriptor of V_new, same shape and block (NEW_KV == 2)
    desc_q,  # TMA descriptor of Q as [T, Hq * D], block [BLOCK_M, D] (Q_TMA)
    desc_o,  # TMA descriptor of Out as [T, Hq * D], block [BLOCK_M, D] (O_TMA)
    Block_tables,  # [B, max_blocks] int32
    Query_start_loc,  # [B + 1] int32 cumulative query lengths
    Seq_lens,  # [B] int32 context + new tokens
    sm_scale_log2,  # float: softmax scale * log2(e)
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,  # V shares K's block and token strides
    stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
    PAGE_SIZE: tl.constexpr,
    TABLE_AHEAD: tl.constexpr,  # read the next tile's block-table entries one tile ahead
    DOT_IEEE: tl.constexpr,
    NEW_KV: tl.constexpr,  # new keys from: 0 the paged cache, 1 K_new/V_new (pointers), 2 their TMA descriptors
    Q_TMA: tl.constexpr,  # load the query tile by TMA (it stays in shared memory for the dots)
    O_TMA: tl.constexpr,  # store whole output tiles by TMA (a partial last tile by pointers)
    WS: tl.constexpr,  # warp-specialize the loop over whole tiles of new keys (producer/consumer warps)
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    mblk = tl.num_programs(2) - 1 - tl.program_id(2)  # heaviest (last) query blocks first

    q_start = tl.load(Query_start_loc + b)
    q_len = tl.load(Query_start_loc + b + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    seq_len = tl.load(Seq_lens + b)
    ctx = seq_len - q_len
    kvh = h // GROUP

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    if Q_TMA:
        # rows past the sequence's end belong to the next sequence (or are zeros past T): their
        # scores are computed and never stored
        q = desc_q.load([q_start + mblk * BLOCK_M, h * HEAD_DIM])
    else:
        q = tl.load(
            Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )
    q_pos = ctx + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    first_pos = ctx + mblk * BLOCK_M  # position of the block's first row
    diag_start = first_pos // BLOCK_N * BLOCK_N  # every key before this is visible to every row
    end = tl.minimum(seq_len, first_pos + BLOCK_M)  # the last row's causal limit
    bt_row = Block_tables + b.to(tl.int64) * stride_bt
    k_head = K_cache + kvh * stride_kh
    v_head = V_cache + kvh * stride_vh

    if NEW_KV != 0:
        # the context (cached prefix, earlier chunks) through the block table, visible to every
        # row: whole tiles without masks, then the partial last tile masked at ctx
        ctx_whole = ctx // BLOCK_N * BLOCK_N
        acc, m_i, l_i = _paged_whole_tiles(
            q, acc, m_i, l_i, ctx_whole, ctx, q_pos, bt_row, k_head, v_head, sm_scale_log2,
            stride_kb, stride_kt, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_IEEE, TABLE_AHEAD)
        if ctx_whole < ctx:
            pages = _key_pages(bt_row, ctx_whole, ctx, BLOCK_N, PAGE_SIZE)
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, ctx_whole, pages, q_pos, ctx, k_head, v_head, sm_scale_log2,
                stride_kb, stride_kt, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_IEEE, True)
        # the new keys, read where the QKV projection left them (contiguous rows, no block
        # table): whole tiles before the block's first row, then the diagonal, masked
        k_new = K_new + kvh * stride_knh
        v_new = V_new + kvh * stride_vnh
        first_row = mblk * BLOCK_M
        diag_j = first_row // BLOCK_N * BLOCK_N  # every new key before this is visible to every row
        for j0 in tl.range(0, diag_j, BLOCK_N, warp_specialize=WS):
            acc, m_i, l_i = _attend_new_tile(
                q, acc, m_i, l_i, j0, q_start, q_len, offs_m, k_new, v_new, desc_k, desc_v, kvh * HEAD_DIM,
                sm_scale_log2, stride_knt, stride_vnt, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_IEEE, NEW_KV, False)
        for j0 in range(diag_j, tl.minimum(q_len, first_row + BLOCK_M), BLOCK_N):
            acc, m_i, l_i = _attend_new_tile(
                q, acc, m_i, l_i, j0, q_start, q_len, offs_m, k_new, v_new, desc_k, desc_v, kvh * HEAD_DIM,
                sm_scale_log2, stride_knt, stride_vnt, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_IEEE, NEW_KV, True)
    else:
        # every key through the block table: whole tiles below the diagonal without masks,
        # then the diagonal tiles, masked (at most cdiv(BLOCK_M, BLOCK_N) + 1 of them)
        acc, m_i, l_i = _paged_whole_tiles(
            q, acc, m_i, l_i, diag_start, seq_len, q_pos, bt_row, k_head, v_head, sm_scale_log2,
            stride_kb, stride_kt, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_IEEE, TABLE_AHEAD)
        for n0 in range(diag_start, end, BLOCK_N):
            pages = _key_pages(bt_row, n0, seq_len, BLOCK_N, PAGE_SIZE)
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, n0, pages, q_pos, seq_len, k_head, v_head, sm_scale_log2,
                stride_kb, stride_kt, HEAD_DIM, BLOCK_D, BLOCK_N, PAGE_SIZE, DOT_IEEE, True)

    acc = acc / l_i[:, None]
    if O_TMA and (mblk + 1) * BLOCK_M <= q_len:
        desc_o.store([q_start + mblk * BLOCK_M, h * HEAD_DIM], acc.to(Out.dtype.element_ty))
    else:
        tl.store(
            Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
            acc.to(Out.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )


NEW_KV_MODES = {"paged": 0, "pointers": 1, "tma": 2}


@functools.lru_cache(maxsize=None)
def _tma_capable(device: torch.device) -> bool:
    """TMA descriptors exist in this triton and on this device (Hopper or newer, or the interpreter).
    Cached: the launcher asks once per layer of every prefill step."""
    if TensorDescriptor is None:
        return False
    if device.type != "cuda":
        return True  # the interpreter emulates descriptor loads
    return torch.cuda.get_device_capability(device)[0] >= 9


def prefill_config(max_query_len: int, head_size: int, on_gpu: bool, max_context_len: int = 0,
                   elem_size: int = 2) -> dict:
    """The launcher's defaults: BLOCK_M, BLOCK_N, num_warps, num_stages, TABLE_AHEAD, new_kv,
    q_tma, o_tma, warp_specialize.

    From the H200 sweeps of 2026-12-04 (benchmarks/exp_prefill.py, bf16, 32/8 heads,
    D=128; in RESULTS.md): for prompts up to a few thousand tokens without a long cached
    context, 64-row query blocks with 64-key tiles and one warpgroup (4 warps) were fastest
    (4 x 2048: 349 us against 385-995 us for the other tilings); after a context of 2,048
    tokens or more, or for a 16k prompt, 128 x 128 tiles with two warpgroups (a chunk after
    3,072 or 12,288 cached tokens: 598 and 2,202 us, 5-20% ahead of the others; 1 x 16384:
    4,490 us against 4,687 us). New keys, the query tile and whole output tiles go through
    TMA (Hopper's copy engine; 1-5% faster than pointers). Triton's warp specialization of the
    key loop made no difference on the H200 (triton 3.6) and is off. float32 (tests,
    CPU-parity runs) takes half the key tile and two stages, so its tiles fit in shared
    memory at head size 256.
    """
    block_d = max(16, triton.next_power_of_2(head_size))
    if not on_gpu:  # the CPU interpreter: small tiles run fastest
        return dict(block_m=16, block_n=16, num_warps=4, num_stages=1, table_ahead=True, new_kv="pointers",
                    q_tma=False, o_tma=False, warp_specialize=False)
    if block_d > 128:  # head size 256: bound the registers and shared memory of a tile
        block_m, block_n, num_warps, num_stages = 64, 32, 8, 3
    elif max_context_len >= 2048 or max_query_len >= 8192:
        block_m, block_n, num_warps, num_stages = 128, 128, 8, 3
    else:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, 3
    if elem_size >= 4:
        block_n, num_stages = max(16, block_n // 2), 2
    # short prompts (decode tokens of a mixed step, small chunks) do not fill a query tile
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    return dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages, table_ahead=True,
                new_kv="tma", q_tma=True, o_tma=True, warp_specialize=False)


def _tma_ok(D, BLOCK_D, *tensors) -> bool:
    """TMA can describe each [T, H, D] tensor as [T, H * D] rows: head size a power of two, a
    head's channels and the heads of a row contiguous, 16-byte aligned row strides and bases."""
    if D != BLOCK_D or not _tma_capable(tensors[0].device):
        return False
    for t in tensors:
        if t.stride(-2) != D or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return False
    return True


def prefill_attention(
    query: torch.Tensor,  # [T, Hq, D] new tokens of all sequences
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context + new tokens
    scale: float,
    max_query_len: int,  # host int: longest q_len of the step (sizes the grid)
    max_context_len: int = 0,  # host int: longest cached context of the step (picks the tiling)
    out: torch.Tensor | None = None,  # [T, Hq, D]
    key: torch.Tensor | None = None,  # [T, Hkv, D] the step's new keys (already in the cache too)
    value: torch.Tensor | None = None,  # [T, Hkv, D] the step's new values
    new_kv: str | None = None,  # where new keys are read: "paged", "pointers", "tma" (None: the config's)
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    table_ahead: bool | None = None,
    maxnreg: int | None = None,  # registers per thread (None: no cap)
    q_tma: bool | None = None,  # the query tile by TMA (None: the config's; off where TMA cannot describe it)
    o_tma: bool | None = None,  # whole output tiles stored by TMA (same)
    warp_specialize: bool | None = None,  # warp-specialize the whole-tile loop over new keys
) -> torch.Tensor:
    """Causal varlen attention of the step's new tokens over the paged cache.

    Tiling (`prefill_config`, chosen by the H200 sweeps): for prompts below 8,192 tokens
    without a long cached context, BLOCK_M = 64 query rows and BLOCK_N = 64 keys with 4 warps
    (one Hopper warpgroup; two programs share an SM); after 2,048 or more cached tokens or for
    longer prompts, 128 x 128 tiles with 8 warps (two warpgroups of 64 rows), fewer K/V
    re-reads over the long key range. Fewer rows for short prompts, 64 x 32 for head size 256.
    3 pipeline stages: triton keeps two K/V tiles in flight. The context's keys each look up
    their own block-table entry (read one tile ahead); the step's own keys come from
    `key`/`value` by TMA, whole [BLOCK_N, D] tiles, and so do the query tile and every whole
    output tile (a sequence's partial last block is stored by pointers).
    The query blocks and heads are all independent programs: grid (Hq, B, cdiv(max_query_len,
    BLOCK_M)), heaviest blocks first.
    """
    T, Hq, D = query.shape
    _, page_size, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert v_cache.stride()[:2] == k_cache.stride()[:2], "k_cache and v_cache must share block/token strides"
    B = seq_lens.shape[0]
    if out is None:
        out = torch.empty((T, Hq, D), dtype=query.dtype, device=query.device)
    if T == 0 or B == 0 or max_query_len <= 0:
        return out
    cfg = prefill_config(max_query_len, D, query.device.type == "cuda", max_context_len, query.element_size())
    BLOCK_M = max(16, block_m or cfg["block_m"])
    BLOCK_N = max(16, block_n or cfg["block_n"])
    BLOCK_D = max(16, triton.next_power_of_2(D))
    mode = new_kv or cfg["new_kv"]
    if mode not in NEW_KV_MODES:
        raise ValueError(f"new_kv={mode!r}; allowed: {', '.join(map(repr, NEW_KV_MODES))}")
    if key is None or value is None:
        if new_kv not in (None, "paged"):
            raise ValueError(f"new_kv={new_kv!r} needs the step's key and value tensors")
        mode = "paged"
    else:
        assert key.shape == value.shape == (T, Hkv, D) and key.stride(-1) == 1 and value.stride(-1) == 1
        if mode == "tma" and not _tma_ok(D, BLOCK_D, key, value):
            if new_kv == "tma":
                raise ValueError("new_kv='tma' needs a power-of-two head size, [T, Hkv * D] rows with "
                                 "16-byte aligned strides, and a Hopper GPU (or the interpreter)")
            mode = "pointers"  # the default falls back where TMA cannot describe the tensors
    desc_k = desc_v = None
    if mode == "tma":
        desc_k, desc_v = (TensorDescriptor(t, [T, Hkv * D], [t.stride(0), 1], [BLOCK_N, D]) for t in (key, value))
    use_q_tma = cfg["q_tma"] if q_tma is None else q_tma
    use_o_tma = cfg["o_tma"] if o_tma is None else o_tma
    desc_q = desc_o = None
    if use_q_tma or use_o_tma:
        if not _tma_ok(D, BLOCK_D, query, out):
            if q_tma or o_tma:
                raise ValueError("q_tma/o_tma need a power-of-two head size, [T, Hq * D] rows with "
                                 "16-byte aligned strides, and a Hopper GPU (or the interpreter)")
            use_q_tma = use_o_tma = False
        else:
            desc_q, desc_o = (TensorDescriptor(t, [T, Hq * D], [t.stride(0), 1], [BLOCK_M, D]) for t in (query, out))
    k_new = key if key is not None else k_cache  # unused by the paged mode (any tensor will do)
    v_new = value if value is not None else v_cache
    grid = (Hq, B, triton.cdiv(max_query_len, BLOCK_M))
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, k_new, v_new, desc_k, desc_v, desc_q, desc_o,
        block_tables, query_start_loc, seq_lens,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        k_new.stride(0), k_new.stride(-2), v_new.stride(0), v_new.stride(-2),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        PAGE_SIZE=page_size,
        TABLE_AHEAD=cfg["table_ahead"] if table_ahead is None else table_ahead,
        DOT_IEEE=dot_ieee(query.dtype, query.device),
        NEW_KV=NEW_KV_MODES[mode],
        Q_TMA=use_q_tma, O_TMA=use_o_tma,
        WS=bool(cfg["warp_specialize"] if warp_specialize is None else warp_specialize) and mode != "paged",
        num_warps=num_warps or cfg["num_warps"],
        num_stages=num_stages or cfg["num_stages"],
        **(dict(maxnreg=maxnreg) if maxnreg and query.device.type == "cuda" else {}),
    )
    return out


def prefill_attention_ref(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                          compute_dtype=torch.float32):
    """PyTorch reference: per sequence, gather keys 0..seq_len-1 through the block table and
    run causal attention with the query rows offset by the context length. Returns [T, Hq, D]."""
    T, Hq, D = query.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.zeros((T, Hq, D), dtype=compute_dtype, device=query.device)
    qsl = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        s0, s1 = qsl[b], qsl[b + 1]
        q_len = s1 - s0
        if q_len == 0:
            continue
        ctx = seq_len - q_len
        pos = torch.arange(seq_len, device=query.device)
        slots = block_tables[b].long()[pos // block_size] * block_size + pos % block_size
        k = k_cache.reshape(-1, Hkv, D)[slots].to(compute_dtype)  # [L, Hkv, D]
        v = v_cache.reshape(-1, Hkv, D)[slots].to(compute_dtype)
        q = query[s0:s1].to(compute_dtype).view(q_len, Hkv, group, D)
        s = torch.einsum("qhgd,lhd->hgql", q, k) * scale
        qpos = torch.arange(q_len, device=query.device)[:, None] + ctx
        s = s.masked_fill(pos[None, :] > qpos, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[s0:s1] = torch.einsum("hgql,lhd->qhgd", p, v).reshape(q_len, Hq, D)
    return out
