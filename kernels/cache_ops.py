"""Paged KV-cache operations: store new K/V by slot, copy blocks (copy-on-write), swap blocks.

* `store_kv`: grid (cdiv(num_tokens, BLOCK_T), cdiv(Hkv, BLOCK_HKV)). Token t's key and
  value rows [Hkv, D] go to cache slot slot_mapping[t] = block * block_size + offset;
  slot -1 is skipped (padding tokens, or tokens whose KV is already cached). A program
  moves BLOCK_T whole tokens (all KV heads when they fit in 4096 elements), so loads and
  stores are long contiguous runs along D.
* `copy_blocks`: grid (num_pairs, cdiv(block_numel, BLOCK)), one launch per cache
  tensor; each program copies a BLOCK-element chunk of block src[i] to block dst[i].
  Destination blocks must not also be sources in the same call (true for copy-on-write:
  the destination is a freshly allocated block).
* `swap_blocks`: between two pools (GPU <-> CPU). A Triton kernel cannot address host
  memory, so the blocks are gathered on the source device into one staging tensor, moved
  in ONE transfer per cache tensor (instead of one per block), and scattered into the
  destination pool. Synchronous: when it returns, the destination holds the data. Two
  pools on the same device use the copy kernel.

Each kernel has its PyTorch reference (`*_ref`) below it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# ---------------------------------------------------------------------------------- store


@triton.jit
def _store_kv_kernel(
    Key,  # [T, Hkv, D] new keys (may be a strided view of a fused qkv); last dim contiguous
    Value,  # [T, Hkv, D] new values
    K_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] key cache
    V_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] value cache
    Slot_mapping,  # [T] int64 cache slot of each token, -1 = skip
    num_tokens,  # T
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,  # tokens per program
    BLOCK_HKV: tl.constexpr,  # KV heads per program
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
):
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_HKV + tl.arange(0, BLOCK_HKV)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(Slot_mapping + offs_t, mask=offs_t < num_tokens, other=-1)
    valid = slot >= 0  # out-of-range tokens and slot -1 are skipped
    slot = tl.where(valid, slot, 0)
    blk = slot // PAGE_SIZE
    off = slot % PAGE_SIZE
    # [BLOCK_T, BLOCK_HKV, BLOCK_D] tiles: all loads of a program are issued before its stores
    hd = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    mask = valid[:, None, None] & hd[None, :, :]
    t3 = offs_t[:, None, None]
    h3 = offs_h[None, :, None]
    d3 = offs_d[None, None, :]
    k = tl.load(Key + t3 * stride_kt + h3 * stride_kh + d3, mask=mask)
    v = tl.load(Value + t3 * stride_vt + h3 * stride_vh + d3, mask=mask)
    kdst = (blk * stride_kcb + off * stride_kct)[:, None, None] + h3 * stride_kch + d3
    vdst = (blk * stride_vcb + off * stride_vct)[:, None, None] + h3 * stride_vch + d3
    tl.store(K_cache + kdst, k.to(K_cache.dtype.element_ty), mask=mask)
    tl.store(V_cache + vdst, v.to(V_cache.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
    block_t: int | None = None,  # tokens per program (override for benchmarks)
) -> None:
    """Write key/value into the caches at slot_mapping (in place). No host sync.

    Tiling: BLOCK_D = head size padded to a power of two; BLOCK_HKV = as many KV heads as
    fit in 4096 elements (all of them for typical models), so each token's Hkv*D elements
    move as one contiguous run; BLOCK_T tokens per program (8 when a token is <= 1024
    elements; 8 warps), so each thread has several 16-byte loads in flight before its stores.
    """
    T, Hkv, D = key.shape
    assert value.shape == key.shape and k_cache.shape[2:] == (Hkv, D) and v_cache.shape == k_cache.shape
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if T == 0:
        return
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_HKV = min(triton.next_power_of_2(Hkv), max(1, 4096 // BLOCK_D))
    elems = BLOCK_HKV * BLOCK_D
    if block_t is None:  # 8 measured best on an H200 (70% of copy bandwidth; 1, 2, 4: 68-70%)
        block_t = max(1, min(8, 8192 // elems))
    grid = (triton.cdiv(T, block_t), triton.cdiv(Hkv, BLOCK_HKV))
    _store_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping, T,
        key.stride(0), key.stride(1),
        value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=Hkv, HEAD_DIM=D, PAGE_SIZE=k_cache.shape[1],
        BLOCK_T=block_t, BLOCK_HKV=BLOCK_HKV, BLOCK_D=BLOCK_D,
        num_warps=4 if block_t * elems <= 2048 else 8,
    )


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping):
    """PyTorch reference of store_kv."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


# ----------------------------------------------------------------------------- copy/swap


@triton.jit
def _copy_blocks_kernel(
    Src_cache,  # [num_src_blocks, block_numel] (a block's elements are contiguous)
    Dst_cache,  # [num_dst_blocks, block_numel] (may be the same tensor as Src_cache)
    Src_idx,  # [N] int64 source block of each pair
    Dst_idx,  # [N] int64 destination block of each pair
    stride_sb, stride_db,
    BLOCK_NUMEL: tl.constexpr,  # block_size * Hkv * D
    BLOCK: tl.constexpr,  # elements per program
):
    i = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(Src_idx + i).to(tl.int64)
    d = tl.load(Dst_idx + i).to(tl.int64)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < BLOCK_NUMEL
    x = tl.load(Src_cache + s * stride_sb + offs, mask=mask)
    tl.store(Dst_cache + d * stride_db + offs, x, mask=mask)


def _block_numel(cache: torch.Tensor) -> int:
    n = 1
    for x in cache.shape[1:]:
        n *= x
    return n


def _copy_blocks_one(src_cache, dst_cache, src_idx, dst_idx) -> None:
    # Each block (block_size, Hkv, D) must be contiguous; blocks may be strided.
    numel = _block_numel(src_cache)
    assert src_cache[0].is_contiguous() and dst_cache[0].is_contiguous() and _block_numel(dst_cache) == numel
    BLOCK = min(4096, triton.next_power_of_2(numel))
    grid = (src_idx.shape[0], triton.cdiv(numel, BLOCK))
    _copy_blocks_kernel[grid](
        src_cache, dst_cache, src_idx, dst_idx, src_cache.stride(0), dst_cache.stride(0),
        BLOCK_NUMEL=numel, BLOCK=BLOCK, num_warps=8 if BLOCK >= 4096 else 4,
    )


def _pairs_to_tensors(src_to_dst, device):
    if isinstance(src_to_dst, torch.Tensor):  # [N, 2]
        pairs = src_to_dst.to(device=device, dtype=torch.int64)
        return pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    pairs = torch.tensor(list(src_to_dst), dtype=torch.int64).view(-1, 2)
    return pairs[:, 0].contiguous().to(device), pairs[:, 1].contiguous().to(device)


def copy_blocks(
    kv_caches,  # list over layers of (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]
    src_to_dst,  # list[(src_block, dst_block)] or an int64 tensor [N, 2]
) -> None:
    """Copy-on-write: block dst <- block src in every layer's K and V cache.

    Tiling: one program per (pair, chunk of <= 4096 elements); one launch per cache tensor.
    """
    if len(src_to_dst) == 0 or not kv_caches:
        return
    src, dst = _pairs_to_tensors(src_to_dst, kv_caches[0][0].device)
    for k_cache, v_cache in kv_caches:
        _copy_blocks_one(k_cache, k_cache, src, dst)
        _copy_blocks_one(v_cache, v_cache, src, dst)


def copy_blocks_ref(kv_caches, src_to_dst):
    """PyTorch reference of copy_blocks."""
    for k_cache, v_cache in kv_caches:
        for s, d in src_to_dst:
            k_cache[d] = k_cache[s]
            v_cache[d] = v_cache[s]


def swap_blocks(
    src_caches,  # list over layers of (k, v), each [num_src_blocks, block_size, Hkv, D]
    dst_caches,  # list over layers of (k, v), each [num_dst_blocks, block_size, Hkv, D]
    src_to_dst,  # list[(src_block, dst_block)] or an int64 tensor [N, 2]
) -> None:
    """Move blocks between pools (GPU -> CPU on swap-out, CPU -> GPU on swap-in).

    Same device: the copy kernel. Across devices: gather on the source device, one transfer
    per cache tensor, scatter on the destination device. Synchronous.
    """
    if len(src_to_dst) == 0 or not src_caches:
        return
    src_dev, dst_dev = src_caches[0][0].device, dst_caches[0][0].device
    src_idx_s, dst_idx_s = _pairs_to_tensors(src_to_dst, src_dev)
    if src_dev == dst_dev:
        for (sk, sv), (dk, dv) in zip(src_caches, dst_caches):
            _copy_blocks_one(sk, dk, src_idx_s, dst_idx_s)
            _copy_blocks_one(sv, dv, src_idx_s, dst_idx_s)
        return
    dst_idx_d = dst_idx_s.to(dst_dev)
    for (sk, sv), (dk, dv) in zip(src_caches, dst_caches):
        for s_cache, d_cache in ((sk, dk), (sv, dv)):
            staged = s_cache.index_select(0, src_idx_s).to(dst_dev)  # one transfer
            d_cache.index_copy_(0, dst_idx_d, staged.to(d_cache.dtype))


def swap_blocks_ref(src_caches, dst_caches, src_to_dst):
    """PyTorch reference of swap_blocks: one copy per block."""
    for (sk, sv), (dk, dv) in zip(src_caches, dst_caches):
        for s, d in src_to_dst:
            dk[d].copy_(sk[s])
            dv[d].copy_(sv[s])
