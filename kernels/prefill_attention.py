"""Prefill attention over the paged KV cache: causal, variable-length, with cached context.

Each sequence b of the step has q_len = query_start_loc[b+1] - query_start_loc[b] new
tokens and ctx = seq_lens[b] - q_len tokens already in the cache (a cached prefix, or
the earlier chunks of a chunked prompt). The new keys/values have already been written
into the cache, so every key, old or new, is read the same way: through the block table.
Query token i sits at absolute position ctx + i and attends keys 0 .. ctx + i.

Kernel: grid (num_seqs, cdiv(max_query_len, BLOCK_M), num_q_heads). A program takes
BLOCK_M query tokens of one head of one sequence, walks the keys in BLOCK_N tiles of
whole pages up to the causal limit of its last row (tiles past it are never loaded),
masks the diagonal tile(s) causally, and keeps an online softmax (as flash-attention).
Programs whose query block lies past the sequence's q_len return at once (the grid is
sized by the longest prompt). The query heads of one KV head run as separate programs
and share K/V tiles through the L2 cache; correctness and clarity come first here.

`prefill_attention_ref` is the PyTorch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_attention import LOG2E, dot, dot_ieee


@triton.jit
def _prefill_kernel(
    Q,  # [T, Hq, D] new query tokens of all sequences, flattened; last dim contiguous
    K_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] key cache (new keys already stored)
    V_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] value cache
    Out,  # [T, Hq, D] output
    Block_tables,  # [B, max_blocks] int32
    Query_start_loc,  # [B + 1] int32 cumulative query lengths
    Seq_lens,  # [B] int32 context + new tokens
    sm_scale_log2,  # float: softmax scale * log2(e)
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query tokens per program
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
    PAGE_SIZE: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    mblk = tl.program_id(1)
    h = tl.program_id(2)

    q_start = tl.load(Query_start_loc + b)
    q_len = tl.load(Query_start_loc + b + 1) - q_start
    if mblk * BLOCK_M >= q_len:
        return
    seq_len = tl.load(Seq_lens + b)
    ctx = seq_len - q_len
    kvh = h // GROUP

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = ctx + offs_m  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # keys past the last row's causal limit are never needed
    end = tl.minimum(seq_len, ctx + (mblk + 1) * BLOCK_M)
    bt_row = Block_tables + b.to(tl.int64) * stride_bt
    k_head = K_cache + kvh * stride_kh
    v_head = V_cache + kvh * stride_vh
    for n0 in range(0, end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < end
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        tok = pos % PAGE_SIZE
        k = tl.load(  # K^T tile [BLOCK_D, BLOCK_N]
            k_head + page[None, :] * stride_kb + tok[None, :] * stride_kt + offs_d[:, None],
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        qk = dot(q, k, DOT_IEEE) * sm_scale_log2
        # causal + bounds; key 0 is visible to every row, so no row is all -inf
        keep = (pos[None, :] <= q_pos[:, None]) & mask_n[None, :]
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(  # V tile [BLOCK_N, BLOCK_D]
            v_head + page[:, None] * stride_vb + tok[:, None] * stride_vt + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_IEEE)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(
        Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        acc.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def prefill_attention(
    query: torch.Tensor,  # [T, Hq, D] new tokens of all sequences
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context + new tokens
    scale: float,
    max_query_len: int,  # host int: longest q_len of the step (sizes the grid)
    out: torch.Tensor | None = None,  # [T, Hq, D]
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal varlen attention of the step's new tokens over the paged cache.

    Tiling: BLOCK_M = 64 query rows (32 for head size 256, to bound registers; 16 on the
    CPU interpreter), BLOCK_N = 64 keys (whole pages: 4 of 16 or 2 of 32), BLOCK_D = head
    size padded to a power of two, masked. 4 warps, 2 pipeline stages.
    """
    T, Hq, D = query.shape
    _, page_size, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    B = seq_lens.shape[0]
    if out is None:
        out = torch.empty((T, Hq, D), dtype=query.dtype, device=query.device)
    if T == 0 or B == 0:
        return out
    on_gpu = query.device.type == "cuda"
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if block_m is None:
        block_m = (64 if BLOCK_D <= 128 else 32) if on_gpu else 16
    if block_n is None:
        block_n = (64 if BLOCK_D <= 128 else 32) if on_gpu else 16
    BLOCK_N = max(block_n, triton.next_power_of_2(page_size), 16)
    BLOCK_M = max(block_m, 16)
    grid = (B, triton.cdiv(max_query_len, BLOCK_M), Hq)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        PAGE_SIZE=page_size, DOT_IEEE=dot_ieee(query.dtype, query.device),
        num_warps=num_warps or (4 if BLOCK_M * BLOCK_D <= 64 * 128 else 8),
        num_stages=num_stages or 2,
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
