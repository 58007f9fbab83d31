"""Decode attention over the paged KV cache (flash-decoding, grouped-query, split-KV).

One query token per sequence attends to all of its cached keys, read through the block
table. The design follows vLLM's `triton_decode_attention` (from LightLLM/SGLang):

* Stage 1, grid (batch, kv_head, num_splits). One program owns one KV head of one
  sequence and one slice ("split") of its context. It loads the query heads that share
  that KV head as one [BLOCK_H, BLOCK_D] tile (padded to >= 16 rows), so q.K^T and P.V
  are `tl.dot`s on tensor cores and every K/V byte is read exactly once per KV head.
  It walks its slice in tiles of BLOCK_N keys that are whole pages, looking up the
  physical block of each page in the block table, with an online (running-max) softmax,
  and writes a normalised partial output plus its log-sum-exp. Whole tiles run without
  masks; only the last, partial tile is masked (`_attend_tile`'s MASKED).
* Stage 2, grid (batch, q_head), merges the splits weighted by exp(lse - max lse).
  With a single split, stage 1 writes the final output directly and stage 2 is skipped.

Splitting the context (flash-decoding) matters when batch * kv_heads programs cannot
fill the GPU (batch 1 with 8 KV heads is 8 programs on a 132-SM H200) and when they
overflow the last wave only a little (batch 72: 576 programs where 528 fit at once, so 48
run alone afterwards). The launcher picks the split count from a model of the waves
(`choose_num_splits`), using host integers only (batch size and max_seq_len), so the launch
is CUDA-graph capturable; under graph capture the runner passes max_seq_len = max_model_len.

A real batch mixes lengths, and the programs that start last decide when the kernel ends:
the engine passes the sequences longest first (`order`, built by `longest_first`), so the
last programs are the shortest (a real decode step: 92% -> 95% of copy bandwidth). When the
programs fit in about one wave they all start at once and the longest one decides alone, so
the engine also passes `split_len` (balanced splits: at most that many keys per program,
chosen per step from the real lengths by `decode_split_len`; batch 64 of mixed lengths: 69%
-> 79% of copy bandwidth).

`decode_attention_ref` at the bottom is the PyTorch reference the tests compare against.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot; with IEEE, upcast to fp32 and multiply exactly (no tf32).

    IEEE is set for fp32 inputs (so fp32 results match the fp32 reference to ~1e-6) and
    for every dtype under TRITON_INTERPRET=1, whose numpy tl.dot multiplies bf16 inputs
    as raw uint16 bits (triton 3.9); the upcast is exact, so results are unchanged.
    """
    if IEEE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def dot_ieee(dtype: torch.dtype, device: torch.device) -> bool:
    """The DOT_IEEE constexpr for inputs of this dtype on this device (CPU = interpreter)."""
    return dtype == torch.float32 or device.type != "cuda"


@triton.jit
def _tile_pages(bt_row, first, max_blocks, NP: tl.constexpr):
    """The block-table entries of NP consecutive pages from logical page `first` ([NP] int64).

    Masked by the row's length only: entries past the sequence's end are read (they exist)
    and their keys are masked by the tile's MASKED path.
    """
    idx = first + tl.arange(0, NP)
    return tl.load(bt_row + idx, mask=idx < max_blocks, other=0).to(tl.int64)


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,  # [BLOCK_H, BLOCK_D] query tile; running output, max, sum (fp32)
    n0, end,  # first key of this tile; end of this program's keys
    pages,  # [BLOCK_N // PAGE_SIZE] int64 the physical blocks of this tile's pages
    k_head, v_head,  # K/V cache pointers offset to this KV head
    sm_scale_log2,
    stride_b, stride_t,  # block and token strides, shared by the K and V caches
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IEEE: tl.constexpr,
    MASKED: tl.constexpr,  # False: the whole tile lies before `end` (no masks needed)
):
    """One tile of BLOCK_N keys (whole pages) into the online softmax; returns (acc, m_i, l_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = n0 + offs_n
    if MASKED:
        mask_n = pos < end
        mask_d = offs_d < HEAD_DIM  # HEAD_DIM is a multiple of 16: loads stay 16-byte vectors
    NP: tl.constexpr = BLOCK_N // PAGE_SIZE
    page = tl.reshape(tl.broadcast_to(pages[:, None], (NP, PAGE_SIZE)), (BLOCK_N,))  # each key's block
    tok = pos % PAGE_SIZE
    # K^T tile [BLOCK_D, BLOCK_N]; V tile [BLOCK_N, BLOCK_D]
    kv_off = page * stride_b + tok * stride_t  # [BLOCK_N] element offset of each key's row
    k_ptrs = k_head + kv_off[None, :] + offs_d[:, None]
    v_ptrs = v_head + kv_off[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
    qk = dot(q, k, DOT_IEEE)  # raw scores; the scale is folded into the exponent (one FMA)
    if MASKED:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * sm_scale_log2)  # running max, in log2 units
    p = tl.math.exp2(qk * sm_scale_log2 - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    pv = dot(p.to(v.dtype), v, DOT_IEEE)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _decode_stage1_kernel(
    Q,  # [B, Hq, D] query, last dim contiguous (may be a strided view of a fused qkv)
    K_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] key cache, last dim contiguous
    V_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] value cache, last dim contiguous
    Block_tables,  # [B, max_blocks] int32 physical block of each logical block
    Seq_lens,  # [B] int32 number of cached keys of each sequence (incl. this token)
    Order,  # [B] int32 the sequence each row of programs attends (HAS_ORDER): longest first
    Split_len,  # [1] int32 keys per split, a multiple of BLOCK_N (VAR_SPLITS)
    Out,  # [B, Hq, D] final output (written when NUM_SPLITS == 1)
    Mid_o,  # [B, Hq, NUM_SPLITS, D] fp32 normalised partial outputs (NUM_SPLITS > 1)
    Mid_lse,  # [B, Hq, NUM_SPLITS] fp32 log2-sum-exp of each split (NUM_SPLITS > 1)
    sm_scale_log2,  # float: softmax scale * log2(e)
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,  # V shares K's block and token strides
    stride_vh,
    stride_bt,
    max_blocks,  # int: length of a block-table row (the tile's page reads stay inside it)
    stride_ob, stride_oh,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,  # next_pow2(GROUP), at least 16 (tl.dot needs M >= 16)
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
    PAGE_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_N: tl.constexpr,  # keys per tile, a multiple of PAGE_SIZE
    NUM_SPLITS: tl.constexpr,
    DOT_IEEE: tl.constexpr,  # exact fp32 dots (fp32 inputs, or any input in the interpreter)
    HEAD_FASTEST: tl.constexpr,  # grid (Hkv, B, S) instead of (B, Hkv, S)
    HAS_ORDER: tl.constexpr,  # programs take their sequence from Order (else row b = sequence b)
    VAR_SPLITS: tl.constexpr,  # splits of Split_len keys: a sequence uses as many as it needs
):
    if HEAD_FASTEST:
        # the KV heads of one sequence run side by side and read neighbouring bytes of
        # the same cache rows ([block, token, Hkv, D]) at about the same time
        kvh = tl.program_id(0)
        b = tl.program_id(1)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_ORDER:
        # the GPU starts programs roughly in grid order: with the longest sequences first, the
        # last programs to start are the shortest and the SMs run out of work together
        b = tl.load(Order + b)

    seq_len = tl.load(Seq_lens + b)
    # Split boundaries are aligned to BLOCK_N so every tile is made of whole pages.
    n_splits = NUM_SPLITS  # splits this sequence uses
    if NUM_SPLITS == 1:
        start = 0  # a constant, so the first tile's block-table read need not wait for seq_len
        end = seq_len
    elif VAR_SPLITS:
        # every split but a sequence's last holds split_len keys, so all programs carry about
        # the same work whatever their sequence's length; the last split takes the rest (also
        # when the sequence would need more than NUM_SPLITS); splits past it have nothing to do
        split_len = tl.cdiv(tl.load(Split_len), BLOCK_N) * BLOCK_N  # whole tiles, whatever the caller passed
        n_splits = tl.minimum(tl.maximum(tl.cdiv(seq_len, split_len), 1), NUM_SPLITS)
        if split >= n_splits:
            return
        start = split * split_len
        end = tl.where(split == n_splits - 1, seq_len, start + split_len)
    else:
        split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM  # HEAD_DIM is a multiple of 16: loads stay 16-byte vectors
    heads = kvh * GROUP + offs_h

    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    bt_row = Block_tables + b.to(tl.int64) * stride_bt
    k_head = K_cache + kvh * stride_kh
    v_head = V_cache + kvh * stride_vh
    # whole tiles without masks (measured 2.6% faster on an H200), then the partial one with them
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    NP: tl.constexpr = BLOCK_N // PAGE_SIZE
    for n0 in range(start, full_end, BLOCK_N):
        pages = _tile_pages(bt_row, n0 // PAGE_SIZE, max_blocks, NP)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n0, end, pages, k_head, v_head, sm_scale_log2,
            stride_kb, stride_kt,
            HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, DOT_IEEE, False)
    if full_end < end:
        pages = _tile_pages(bt_row, full_end // PAGE_SIZE, max_blocks, NP)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, full_end, end, pages, k_head, v_head, sm_scale_log2,
            stride_kb, stride_kt,
            HEAD_DIM, BLOCK_D, PAGE_SIZE, BLOCK_N, DOT_IEEE, True)

    # An empty split (short sequence) has l_i == 0: write zeros and lse = -inf.
    safe_l = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / safe_l[:, None]
    lse = tl.where(l_i > 0.0, m_i + tl.math.log2(safe_l), float("-inf"))
    mask_hd = mask_h[:, None] & mask_d[None, :]
    out_ptrs = Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    mid_ptrs = Mid_o + b.to(tl.int64) * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :]
    lse_ptrs = Mid_lse + b.to(tl.int64) * stride_lb + heads * stride_lh + split
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask_hd)
    elif VAR_SPLITS:
        if n_splits == 1:  # the whole sequence in this program: the final output, no merge
            tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask_hd)
        else:
            tl.store(mid_ptrs, acc, mask=mask_hd)
            tl.store(lse_ptrs, lse, mask=mask_h)
    else:
        tl.store(mid_ptrs, acc, mask=mask_hd)
        tl.store(lse_ptrs, lse, mask=mask_h)


@triton.jit
def _decode_stage2_kernel(
    Mid_o,  # [B, Hq, NUM_SPLITS, D] fp32 partial outputs from stage 1
    Mid_lse,  # [B, Hq, NUM_SPLITS] fp32 log2-sum-exp per split (-inf = empty split)
    Out,  # [B, Hq, D] output
    Seq_lens,  # [B] int32 keys per sequence (VAR_SPLITS)
    Split_len,  # [1] int32 keys per split (VAR_SPLITS)
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,  # stage 1's key tile (split_len is rounded up to it)
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # next_pow2(NUM_SPLITS)
    VAR_SPLITS: tl.constexpr,  # only the splits a sequence used; one split wrote Out itself
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    n_splits = NUM_SPLITS
    if VAR_SPLITS:
        seq_len = tl.load(Seq_lens + b)
        split_len = tl.cdiv(tl.load(Split_len), BLOCK_N) * BLOCK_N  # as stage 1 rounds it
        n_splits = tl.minimum(tl.maximum(tl.cdiv(seq_len, split_len), 1), NUM_SPLITS)
        if n_splits == 1:
            return
    mask_s = offs_s < n_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(Mid_lse + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (seq_len 0): output 0
    w = tl.math.exp2(lse - m)  # [SPLITS_PAD]; 0 for empty splits
    o = tl.load(
        Mid_o + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    den = tl.sum(w, 0)
    num = tl.sum(w[:, None] * o, 0)
    out = num / tl.where(den > 0.0, den, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------- launcher

MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (q load, merge) dominates
MAX_SPLITS = 64
HEAD_FASTEST_DEFAULT = True  # measured on an H200: equal or slightly faster at batch 64
MAX_REGISTERS = 128  # per thread, 16-bit inputs: four 4-warp programs per SM (see the launcher)
REGISTERS_PER_SM = 65536  # every NVIDIA GPU since Volta
# The split model (choose_num_splits), fitted on an H200 (benchmarks/exp_decode_waves.py):
SATURATING_FRACTION = 0.55  # a wave with fewer programs than this share of the slots is latency-bound
MERGE_COST = 0.01  # splitting at all: partial outputs written and merged in a second launch
PROGRAM_COST_KEYS = 24  # a program's fixed cost (prologue, epilogue), in keys' worth of streaming


@functools.lru_cache(maxsize=None)
def _device_facts(device_index) -> tuple[int, int]:
    """(SMs, shared-memory bytes per SM) of a CUDA device; a tiny pretend GPU for the interpreter."""
    if device_index is None:  # CPU under TRITON_INTERPRET=1
        return 4, 228 * 1024
    props = torch.cuda.get_device_properties(device_index)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or 100 * 1024  # older torch: assume little
    return props.multi_processor_count, smem


def _device_index(device: torch.device):
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)  # called by every layer's launch (eager mode): pure in its ints
def programs_per_sm(block_n: int, block_d: int, block_h: int, elem_bytes: int, num_warps: int,
                    max_registers: int | None, smem_per_sm: int) -> int:
    """How many stage-1 programs one SM holds: the smaller of the register and shared-memory limits.

    Registers: max_registers (the launcher's cap) per thread, or the hardware's 255 when uncapped.
    Shared memory: one K and one V tile, the query tile and the probability tile (what triton
    allocates for this kernel; two-stage pipelining keeps one K/V buffer here, measured), plus
    1 KB the driver reserves per program.
    """
    regs = (max_registers or 256) * 32 * num_warps
    smem = (2 * block_n * block_d + block_h * block_d + block_h * block_n) * elem_bytes + 1024
    return max(1, min(REGISTERS_PER_SM // regs, smem_per_sm // smem))


@functools.lru_cache(maxsize=4096)  # eager decode asks once per layer with the same ints
def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, sms: int, per_sm: int = 4) -> int:
    """Split count from host integers only (CUDA-graph safe), by a small model of the waves.

    The grid has batch * kv_heads * S programs; the GPU runs them in waves of `slots` =
    sms * per_sm. A full wave keeps the memory busy; the last, partial wave does too only if
    it holds at least SATURATING_FRACTION of the slots, otherwise it costs about as much as
    that many programs would (each program is latency-bound). So the time of S splits is
    proportional to (full waves * slots + max(tail, saturating)) / S, times 1 + MERGE_COST
    (if S > 1) + PROGRAM_COST_KEYS / (keys per split). The S in {1, 2, 4, ...} with the
    smallest time wins (ties: fewer splits), never below MIN_TOKENS_PER_SPLIT keys per split.
    On an H200 (4 programs per SM) at context 4096 this picks 1 split for batch 48-66 and
    112-128 and 2-8 for batch 68-99, where one split leaves a nearly empty second wave
    (75-96% of copy bandwidth measured with 1 split, 95-101% with these); at 1 x 32768, 64.
    """
    pairs = batch * num_kv_heads
    slots = sms * per_sm
    saturating = SATURATING_FRACTION * slots
    cap = min(MAX_SPLITS, max(1, max_seq_len // MIN_TOKENS_PER_SPLIT))
    best, best_cost = 1, None
    s = 1
    while s <= cap:
        full, tail = divmod(pairs * s, slots)
        cost = (full * slots + (max(tail, saturating) if tail else 0)) / s
        cost *= 1 + MERGE_COST * (s > 1) + PROGRAM_COST_KEYS * s / max(max_seq_len, 1)
        if best_cost is None or cost < best_cost * (1 - 1e-9):
            best, best_cost = s, cost
        s *= 2
    return best


# Balanced splits (split_len): the split model above assumes every sequence is max_seq_len long.
# A real batch mixes lengths, and when its programs fit in about one wave the longest sequence's
# program decides the kernel's time alone (batch 64 at contexts 200-2000: ~70% of copy bandwidth).
# With split_len, every program takes at most split_len keys of one sequence: long sequences get
# several splits, short ones one, and the programs carry about equal work.
BALANCED_SPLITS = 8  # the grid's splits per sequence; those a sequence does not need exit at once
# Both fitted on an H200 (benchmarks/exp_decode_balance.py, 2026-12-04, in RESULTS.md): at 1.94
# waves (batch 128, 8 KV heads) the 8-split grid's idle programs cost 2-6 % and one split per
# sequence was best; at 1.45 waves (batch 96) balancing gained 0-4 %, at one wave (batch 64)
# up to 13 %. Shares of 0.5, 1, 1.5 and 2 of the average: 1 and 1.5 best (75 % of copy bandwidth
# on average over batch 16-96 against 73 % for 0.5).
BALANCED_BELOW_WAVES = 1.5  # balanced splits for grids of fewer (batch x KV head) pairs than this many waves
SLOT_SHARE = 1.0  # a split holds at most this share of the keys each slot streams on average


def balanced_num_splits(batch: int, num_kv_heads: int, slots: int) -> int:
    """The grid's split count when the launcher gets a split_len: BALANCED_SPLITS for batches of
    fewer than BALANCED_BELOW_WAVES waves of (sequence, KV head) pairs, else 1 (enough programs
    to balance the SMs by themselves, taken longest first)."""
    return BALANCED_SPLITS if batch * num_kv_heads < BALANCED_BELOW_WAVES * slots else 1


def choose_split_len(seq_lens, num_kv_heads: int, slots: int, block_n: int = 64,
                     num_splits: int = BALANCED_SPLITS) -> int:
    """Keys per split for this batch's lengths (host ints; a multiple of block_n).

    Each slot streams keys * kv_heads / slots keys on average. A program of at most SLOT_SHARE
    of that cannot hold up the kernel by much (the schedule hands the SMs equal shares; the
    last programs to finish are at most one split long), while a longer split would. So:
    SLOT_SHARE of the average, but at least MIN_TOKENS_PER_SPLIT (a split's fixed cost) and
    enough that the longest sequence needs at most num_splits splits; at most the longest
    sequence (one split each: nothing to balance)."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    longest = int(lens.max()) if lens.size else 1
    per_slot = num_kv_heads * int(lens.sum()) / slots
    length = max(SLOT_SHARE * per_slot, MIN_TOKENS_PER_SPLIT, -(-longest // num_splits))
    length = -(-int(np.ceil(length)) // block_n) * block_n
    return min(length, max(block_n, -(-longest // block_n) * block_n))


@functools.lru_cache(maxsize=None)  # asked at every decode step with the same arguments
def _decode_slots(head_size: int, dtype: torch.dtype, device_index) -> tuple[int, int]:
    """(program slots on the device, BLOCK_N) of the launcher's default tiling for this head size."""
    block_d = max(16, triton.next_power_of_2(head_size))
    block_n = 64 if block_d <= 128 else 32
    elem = dtype.itemsize
    sms, smem_per_sm = _device_facts(device_index)
    num_warps = 4 if block_d <= 128 else 8
    per_sm = programs_per_sm(block_n, block_d, 16, elem, num_warps, MAX_REGISTERS if elem == 2 else 0, smem_per_sm)
    return sms * per_sm, block_n


def decode_split_len(seq_lens, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """choose_split_len with the decode kernel's own tiling and this device's slots: what the
    engine passes (as a device tensor) with each decode step."""
    slots, block_n = _decode_slots(head_size, dtype, _device_index(device))
    if balanced_num_splits(len(seq_lens), num_kv_heads, slots) == 1:
        return max(seq_lens)  # the grid will not split (any padded batch is larger still)
    return choose_split_len(seq_lens, num_kv_heads, slots, block_n)


def decode_attention(
    query: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, keys per sequence (this token included)
    scale: float,
    max_seq_len: int,  # host int: upper bound of seq_lens (max_model_len under graph capture)
    out: torch.Tensor | None = None,  # [B, Hq, D], written in place if given
    num_splits: int | None = None,  # override the heuristic (tests, benchmarks)
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    head_fastest: bool | None = None,
    maxnreg: int | None = None,  # registers per thread (0: no cap)
    merge_warps: int | None = None,
    order: torch.Tensor | None = None,  # [B] int32 permutation: the sequences in launch order (longest first)
    split_len: torch.Tensor | None = None,  # [1] int32 keys per split (balanced splits; see choose_split_len)
) -> torch.Tensor:
    """Paged decode attention; returns out [B, Hq, D] in query's dtype.

    Tiling: BLOCK_H = the GQA group padded to >= 16 rows (tensor-core M), BLOCK_D = head
    size padded to a power of two (80 -> 128, masked), BLOCK_N = 64 keys (4 pages of 16 or
    2 of 32; a whole number of pages so each tile reads whole blocks), capped so that the
    K and V tiles stay small for head size 256. 4 warps (8 for head size 256). num_stages=2:
    the tile's K/V addresses come from a block-table load, and triton then keeps ONE K/V
    buffer (39 KB at D=128) and issues the next tile's loads after this tile's dots; more
    buffers (num_stages >= 5) were slower on an H200: the SM's other programs hide the
    latency instead. Registers are capped at 128 per thread (16-bit inputs) so that four
    programs share an SM whatever the compiler version (triton 3.6 once took 134 and fell
    to three: 80% instead of 104% of copy bandwidth at batch 64). Grid (Hkv, B, splits): the
    KV heads of a sequence run side by side (head_fastest=False gives (B, Hkv, splits)).
    Splits from choose_num_splits, given how many programs an SM holds. The merge (stage 2)
    runs one warp per (sequence, query head): its tiles are tiny. No host syncs: safe under
    CUDA graphs.

    order: the GPU starts a grid's programs roughly in order and hands each SM the next one
    as a slot frees, so when sequence lengths differ (a real batch) the programs that start
    last decide when the kernel ends. With the sequences passed longest first (`order[i]` is
    the sequence of the i-th row of programs; `longest_first` builds it on the host), the
    last programs are the shortest, the classic longest-processing-time-first schedule.
    Without it, row i attends sequence i.

    split_len: balanced splits. The grid has balanced_num_splits(...) splits per sequence
    (or num_splits), and sequence b uses cdiv(seq_lens[b], split_len) of them (at most the
    grid's), each of split_len keys but its last; a sequence of one split writes its output
    directly and the merge skips it. A device tensor, so one captured graph serves every
    step: the engine sets it per step from the real lengths (decode_split_len).
    """
    B, Hq, D = query.shape
    num_blocks, page_size, Hkv, Dk = k_cache.shape
    assert Dk == D and v_cache.shape == k_cache.shape and Hq % Hkv == 0
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert v_cache.stride()[:2] == k_cache.stride()[:2], "k_cache and v_cache must share block/token strides"
    group = Hq // Hkv
    if out is None:
        out = torch.empty((B, Hq, D), dtype=query.dtype, device=query.device)
    if B == 0:
        return out
    BLOCK_H = max(16, triton.next_power_of_2(group))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if block_n is None:
        block_n = 64 if BLOCK_D <= 128 else 32
    BLOCK_N = max(block_n, triton.next_power_of_2(page_size), 16)
    if num_warps is None:
        num_warps = 4 if BLOCK_H * BLOCK_D <= 16 * 128 else 8
    if num_stages is None:
        num_stages = 2  # measured on an H200: 2 beat 3 to 9 at both benchmark shapes
    if maxnreg is None:  # fp32 tiles need more registers than the cap (they spill either way)
        maxnreg = MAX_REGISTERS if query.element_size() == 2 else 0
    if num_splits is None:
        sms, smem_per_sm = _device_facts(_device_index(query.device))
        per_sm = programs_per_sm(BLOCK_N, BLOCK_D, BLOCK_H, query.element_size(), num_warps, maxnreg, smem_per_sm)
        if split_len is not None:
            num_splits = balanced_num_splits(B, Hkv, sms * per_sm)
        else:
            num_splits = choose_num_splits(B, Hkv, max_seq_len, sms, per_sm)
    var_splits = split_len is not None and num_splits > 1
    if split_len is not None:
        assert split_len.shape == (1,) and split_len.dtype == torch.int32, "split_len must be [1] int32"

    if num_splits > 1:
        mid_o = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=query.device)
        mid_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=query.device)
    else:
        mid_o, mid_lse = out, out  # unused placeholders
    mo_strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2)) if num_splits > 1 else (0, 0, 0)
    ml_strides = (mid_lse.stride(0), mid_lse.stride(1)) if num_splits > 1 else (0, 0)

    if head_fastest is None:
        head_fastest = HEAD_FASTEST_DEFAULT
    if order is not None:
        assert order.shape == (B,) and order.dtype == torch.int32, "order must be [B] int32"
    grid = (Hkv, B, num_splits) if head_fastest else (B, Hkv, num_splits)
    _decode_stage1_kernel[grid](
        query, k_cache, v_cache, block_tables, seq_lens, seq_lens if order is None else order,
        split_len if var_splits else seq_lens, out, mid_o, mid_lse,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(2),
        block_tables.stride(0), block_tables.shape[1],
        out.stride(0), out.stride(1),
        *mo_strides,
        *ml_strides,
        GROUP=group, HEAD_DIM=D, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        PAGE_SIZE=page_size, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits, DOT_IEEE=dot_ieee(query.dtype, query.device),
        HEAD_FASTEST=head_fastest, HAS_ORDER=order is not None, VAR_SPLITS=var_splits,
        num_warps=num_warps, num_stages=num_stages,
        **(dict(maxnreg=maxnreg) if maxnreg and query.device.type == "cuda" else {}),
    )
    if num_splits > 1:
        _decode_stage2_kernel[(B, Hq)](
            mid_o, mid_lse, out, seq_lens, split_len if var_splits else seq_lens,
            *mo_strides, *ml_strides,
            out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits), VAR_SPLITS=var_splits,
            num_warps=merge_warps or (1 if BLOCK_D <= 128 else 2),  # H200: 1 warp 1-3% faster than 4
        )
    return out


def longest_first(seq_lens, size: int | None = None) -> np.ndarray:
    """The `order` argument of decode_attention, on the host: the indices of seq_lens from the
    longest sequence to the shortest (ties in index order), then size - len(seq_lens) padding
    rows (a CUDA graph's batch bucket) last, in index order. int32 numpy array of length size."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    order = np.argsort(-lens, kind="stable").astype(np.int32)
    if size is not None and size > len(lens):
        order = np.concatenate([order, np.arange(len(lens), size, dtype=np.int32)])
    return order


# ---------------------------------------------------------------------------- reference


def decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, scale, compute_dtype=torch.float32):
    """PyTorch reference: gather each sequence's keys through its block table, softmax, sum.

    query [B, Hq, D]; k/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks];
    seq_lens [B]. Returns [B, Hq, D] in compute_dtype (the tests use float64).
    """
    B, Hq, D = query.shape
    block_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    lens = seq_lens.long()
    max_len = int(lens.max()) if B else 0
    pos = torch.arange(max_len, device=query.device)
    slots = block_tables.long()[:, pos // block_size] * block_size + pos % block_size  # [B, L]
    valid = pos[None, :] < lens[:, None]
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    k = k_cache.reshape(-1, Hkv, D)[slots].to(compute_dtype)  # [B, L, Hkv, D]
    v = v_cache.reshape(-1, Hkv, D)[slots].to(compute_dtype)
    q = query.to(compute_dtype).view(B, Hkv, group, D)
    s = torch.einsum("bhgd,blhd->bhgl", q, k) * scale
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhgl,blhd->bhgd", p, v).reshape(B, Hq, D)
