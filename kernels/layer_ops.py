"""Fused per-token operations of a decoder layer: RMSNorm (with the residual add), Qwen3's
per-head q/k RMSNorm + rotary embedding, and SiLU-and-multiply.

Why they exist: in PyTorch each of these is several tiny elementwise kernels (RMSNorm alone
is upcast, square, mean, add, rsqrt, multiply, downcast, scale). In a decode step the
tensors are small (batch 256 x hidden 1024 is half a megabyte), so every kernel costs its
launch and a round trip to memory, not its arithmetic: a Qwen3 layer was ~58 launches, and
at 28 layers they were a quarter of the step even under CUDA graphs. Each kernel here is
one launch that reads its inputs once and writes its outputs once.

Numerics follow transformers op for op (the engine's correctness bar): RMSNorm normalises
in fp32, rounds to the model dtype, then multiplies by the weight and rounds again; the
rotary products are rounded to the model dtype before they are summed, as
`q * cos + rotate_half(q) * sin` does in bf16; SiLU is rounded before the multiply. So the
fused path matches the PyTorch path up to fp32 reduction order and last-bit differences of
exp/rsqrt (`_round` below makes the intermediate roundings explicit).

* `rms_norm`: grid (T,), one program per token row (the whole row in one tile: the norm
  needs its sum of squares before it can write anything).
* `qk_norm_rope`: grid (T,), one program per token covering all of its q and k heads as one
  [heads, D] tile: the heads of q then k are adjacent in a fused qkv row, so it reads one
  contiguous run per token. Given the layer's paged KV cache and the slot mapping, the same
  program also writes the token's rotated k and its v (the qkv row's last Hkv heads) into the
  cache, skipping slot -1: store_kv's work without its launch (one fewer per layer and step;
  the attention backend is then told `kv_stored=True`). `kv_store_fits` says when it can.
* `silu_and_mul`: grid (T, cdiv(I, BLOCK)), BLOCK = 1024 channels per program.

Each launcher has its PyTorch reference (`*_ref`) below it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cache_ops import store_kv_ref


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """Round fp32 x to the nearest DTYPE value (ties to even), kept in fp32: what a PyTorch
    op in that dtype would store. Done on the bits (drop the mantissa bits DTYPE lacks,
    rounding to nearest even) because neither `.to(DTYPE).to(tl.float32)` survives as written:
    Triton's CPU interpreter truncates bf16, and on the GPU the fp16 round trip was optimised
    away (measured on an H200: 23% of rotary outputs then differed from transformers' in the
    last bit). Exact for bf16 and for fp16's normal range (|x| >= 6.1e-5; below it fp16 is
    subnormal and keeps fewer bits than this, a difference under 6e-8)."""
    if DTYPE == tl.float32:
        return x
    else:
        # drop 16 (bf16) or 13 (fp16) of fp32's 23 mantissa bits
        DROP: tl.constexpr = 16 if DTYPE == tl.bfloat16 else 13
        HALF: tl.constexpr = 0x7FFF if DTYPE == tl.bfloat16 else 0xFFF  # just under half a step
        KEEP: tl.constexpr = 0xFFFF0000 if DTYPE == tl.bfloat16 else 0xFFFFE000
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + HALF + ((bits >> DROP) & 1)) & KEEP
        return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounded to nearest on the GPU and in the interpreter alike."""
    return _round(x, DTYPE).to(DTYPE)


# ---------------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    X,  # [T, N] input rows, last dim contiguous
    Residual,  # [T, N] residual rows (read only when HAS_RESIDUAL)
    Weight,  # [N] scale
    Out,  # [T, N] normalised rows
    Res_out,  # [T, N] x + residual, the next residual (written only when HAS_RESIDUAL)
    stride_x, stride_r, stride_o, stride_ro,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,  # next_pow2(N): the whole row in one tile
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < N
    dtype = Out.dtype.element_ty
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = _round(x + r, dtype)  # `residual + hidden` in the model dtype
        tl.store(Res_out + row * stride_ro + offs, _cast(x, dtype), mask=mask)
    var = tl.sum(x * x, axis=0) / N
    y = _round(x * tl.math.rsqrt(var + eps), dtype)
    w = tl.load(Weight + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs, _cast(w * y, dtype), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [T, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
):
    """RMSNorm of x; with a residual, of (x + residual), returning (normed, x + residual).

    The second form is the decoder layer's "add the sublayer's output to the residual
    stream, then normalise": one kernel instead of an add plus a norm.
    """
    T, N = x.shape
    assert x.stride(-1) == 1 and weight.shape == (N,)
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    res_out = out
    if residual is not None:
        assert residual.shape == x.shape and residual.stride(-1) == 1
        res_out = torch.empty_like(out)
    if T > 0:
        BLOCK_N = triton.next_power_of_2(N)
        r = residual if residual is not None else x
        _rms_norm_kernel[(T,)](
            x, r, weight, out, res_out,
            x.stride(0), r.stride(0), out.stride(0), res_out.stride(0),
            N, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=BLOCK_N,
            num_warps=min(16, max(1, BLOCK_N // 256)),
        )
    return out if residual is None else (out, res_out)


def rms_norm_ref(x, weight, eps, residual=None):
    """transformers' LlamaRMSNorm (after `residual + x` in the model dtype when a residual is given)."""
    if residual is not None:
        x = residual + x
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


# ----------------------------------------------------------------- q/k norm + rotary embedding


@triton.jit
def _qk_norm_rope_kernel(
    QKV,  # [T, >= (Hq + Hkv) * D] fused projection rows: q heads, then k heads, (then v); last dim contiguous
    Cos,  # [T, ROT // 2] cos of each token's angles, in the model dtype
    Sin,  # [T, ROT // 2] sin, same
    Q_norm_w,  # [D] q_norm weight (read only when HAS_NORM)
    K_norm_w,  # [D] k_norm weight (read only when HAS_NORM)
    Q_out,  # [T, Hq, D] rotated queries, contiguous
    K_out,  # [T, Hkv, D] rotated keys, contiguous
    K_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] key cache, last dim contiguous (written only when STORE_KV)
    V_cache,  # [num_blocks, PAGE_SIZE, Hkv, D] value cache, same (written only when STORE_KV)
    Slot_mapping,  # [T] int64 cache slot of each token, -1 = skip (read only when STORE_KV)
    stride_t, stride_cos, stride_sin,
    stride_kcb, stride_kct, stride_kch,
    stride_vcb, stride_vct, stride_vch,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_HALF: tl.constexpr,  # rotary_dim // 2 (rotary_dim <= HEAD_DIM: partial rotary leaves the rest as is)
    PAGE_SIZE: tl.constexpr,  # the caches' block_size (1 when not STORE_KV)
    BLOCK_H: tl.constexpr,  # next_pow2(Hq + Hkv)
    BLOCK_HALF: tl.constexpr,  # next_pow2(ROT_HALF)
    BLOCK_REST: tl.constexpr,  # next_pow2(HEAD_DIM - 2 * ROT_HALF), 0 when rotary covers the head
    BLOCK_KV: tl.constexpr,  # next_pow2(Hkv): the v tile (STORE_KV)
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM): the v tile (STORE_KV)
    HAS_NORM: tl.constexpr,
    STORE_KV: tl.constexpr,  # also write k and v of the token into the paged caches at Slot_mapping[t]
):
    t = tl.program_id(0).to(tl.int64)
    dtype = Q_out.dtype.element_ty
    if STORE_KV:
        # issued first so their latency overlaps the loads below; v is copied as is (after the
        # k heads in the qkv row), k is written below from the same registers as K_out
        slot = tl.load(Slot_mapping + t)
        # KV heads to store: all, or none for slot -1 (padding, or a token whose KV is already
        # cached). A count rather than a scalar mask: Triton's interpreter cannot AND a scalar
        # mask into a tensor mask ("mask has unsupported dtype")
        store_heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)
        slot = tl.where(slot >= 0, slot, 0)
        k_row = K_cache + (slot // PAGE_SIZE) * stride_kcb + (slot % PAGE_SIZE) * stride_kct
        v_row = V_cache + (slot // PAGE_SIZE) * stride_vcb + (slot % PAGE_SIZE) * stride_vct
        offs_v = tl.arange(0, BLOCK_KV)
        offs_d = tl.arange(0, BLOCK_D)
        mask_v = (offs_v < store_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
        v_src = QKV + t * stride_t + (NUM_Q_HEADS + NUM_KV_HEADS) * HEAD_DIM + offs_v[:, None] * HEAD_DIM
        v = tl.load(v_src + offs_d[None, :], mask=mask_v, other=0.0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_HALF)
    mask_h = offs_h < NUM_Q_HEADS + NUM_KV_HEADS
    mask_c = offs_c < ROT_HALF
    is_q = offs_h < NUM_Q_HEADS
    mask = mask_h[:, None] & mask_c[None, :]
    # the two rotated halves of every head: columns [0, ROT_HALF) and [ROT_HALF, 2 * ROT_HALF)
    base = QKV + t * stride_t + offs_h[:, None] * HEAD_DIM + offs_c[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + ROT_HALF, mask=mask, other=0.0).to(tl.float32)
    if BLOCK_REST > 0:
        offs_r = tl.arange(0, BLOCK_REST)
        mask_r = mask_h[:, None] & (offs_r < HEAD_DIM - 2 * ROT_HALF)[None, :]
        rest_off = offs_h[:, None] * HEAD_DIM + 2 * ROT_HALF + offs_r[None, :]
        x3 = tl.load(QKV + t * stride_t + rest_off, mask=mask_r, other=0.0).to(tl.float32)
    if HAS_NORM:
        ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
        if BLOCK_REST > 0:
            ss += tl.sum(x3 * x3, axis=1)
        r = tl.math.rsqrt(ss / HEAD_DIM + eps)[:, None]
        wq1 = tl.load(Q_norm_w + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        wk1 = tl.load(K_norm_w + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        wq2 = tl.load(Q_norm_w + ROT_HALF + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        wk2 = tl.load(K_norm_w + ROT_HALF + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        x1 = _round(tl.where(is_q[:, None], wq1[None, :], wk1[None, :]) * _round(x1 * r, dtype), dtype)
        x2 = _round(tl.where(is_q[:, None], wq2[None, :], wk2[None, :]) * _round(x2 * r, dtype), dtype)
        if BLOCK_REST > 0:
            mr = offs_r < HEAD_DIM - 2 * ROT_HALF
            wq3 = tl.load(Q_norm_w + 2 * ROT_HALF + offs_r, mask=mr, other=0.0).to(tl.float32)
            wk3 = tl.load(K_norm_w + 2 * ROT_HALF + offs_r, mask=mr, other=0.0).to(tl.float32)
            x3 = _round(tl.where(is_q[:, None], wq3[None, :], wk3[None, :]) * _round(x3 * r, dtype), dtype)
    cos = tl.load(Cos + t * stride_cos + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Sin + t * stride_sin + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    o1 = _round(_round(x1 * cos, dtype) - _round(x2 * sin, dtype), dtype)
    o2 = _round(_round(x2 * cos, dtype) + _round(x1 * sin, dtype), dtype)
    # q heads go to Q_out[t, h], k heads to K_out[t, h - Hq]
    is_k = mask_h & ~is_q
    q_dst = Q_out + t * (NUM_Q_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_c[None, :]
    k_dst = K_out + t * (NUM_KV_HEADS * HEAD_DIM) + (offs_h[:, None] - NUM_Q_HEADS) * HEAD_DIM + offs_c[None, :]
    mq = is_q[:, None] & mask_c[None, :]
    mk = is_k[:, None] & mask_c[None, :]
    tl.store(q_dst, o1.to(dtype), mask=mq)
    tl.store(q_dst + ROT_HALF, o2.to(dtype), mask=mq)
    tl.store(k_dst, o1.to(dtype), mask=mk)
    tl.store(k_dst + ROT_HALF, o2.to(dtype), mask=mk)
    if BLOCK_REST > 0:
        q_rest = Q_out + t * (NUM_Q_HEADS * HEAD_DIM) + rest_off
        k_rest = K_out + t * (NUM_KV_HEADS * HEAD_DIM) + rest_off - NUM_Q_HEADS * HEAD_DIM
        rmask = offs_r < HEAD_DIM - 2 * ROT_HALF
        tl.store(q_rest, x3.to(dtype), mask=is_q[:, None] & rmask[None, :])
        tl.store(k_rest, x3.to(dtype), mask=is_k[:, None] & rmask[None, :])
    if STORE_KV:
        # cast to the cache's dtype as store_kv does (`key.to(k_cache.dtype)`): o1/o2/x3 hold
        # model-dtype values, so _cast rounds once, like PyTorch, and is exact when the dtypes match
        cdtype = K_cache.dtype.element_ty
        store_k = (offs_h >= NUM_Q_HEADS) & (offs_h < NUM_Q_HEADS + store_heads)
        k_dst = k_row + (offs_h[:, None] - NUM_Q_HEADS) * stride_kch + offs_c[None, :]
        mkc = store_k[:, None] & mask_c[None, :]
        tl.store(k_dst, _cast(o1, cdtype), mask=mkc)
        tl.store(k_dst + ROT_HALF, _cast(o2, cdtype), mask=mkc)
        if BLOCK_REST > 0:
            k_rest = k_row + (offs_h[:, None] - NUM_Q_HEADS) * stride_kch + 2 * ROT_HALF + offs_r[None, :]
            tl.store(k_rest, _cast(x3, cdtype), mask=store_k[:, None] & rmask[None, :])
        v_dst = v_row + offs_v[:, None] * stride_vch + offs_d[None, :]
        tl.store(v_dst, _cast(v.to(tl.float32), V_cache.dtype.element_ty), mask=mask_v)


_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # those _cast rounds to


def kv_store_fits(
    qkv: torch.Tensor,  # [T, >= (Hq + 2 * Hkv) * D]
    kv_cache,  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D], or None
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> bool:
    """Can `qk_norm_rope(..., kv_cache=kv_cache)` store this step's k and v itself?

    False where store_kv still has to: no cache (or an empty one), another layout or
    device, a dtype `_cast` does not round to, or a qkv row without its v columns. The
    caller then leaves the store to the attention backend, as before the fusion.
    """
    if kv_cache is None or len(kv_cache) != 2 or kv_cache[0] is None or kv_cache[1] is None:
        return False
    k_cache, v_cache = kv_cache
    return (
        k_cache.dim() == 4 and k_cache.numel() > 0
        and tuple(k_cache.shape[2:]) == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
        and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        and k_cache.device == qkv.device and v_cache.device == qkv.device
        and k_cache.dtype in _CACHE_DTYPES and v_cache.dtype in _CACHE_DTYPES
        and qkv.dim() == 2 and qkv.shape[1] >= (num_q_heads + 2 * num_kv_heads) * head_dim
    )


def qk_norm_rope(
    qkv: torch.Tensor,  # [T, >= (Hq + Hkv) * D]: q heads, then k heads, then (read only to store them) v heads
    cos: torch.Tensor,  # [T, rotary_dim // 2] (any middle singleton dims are squeezed), model dtype
    sin: torch.Tensor,  # [T, rotary_dim // 2]
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm_weight: torch.Tensor | None = None,  # [D]: Qwen3's per-head RMSNorm before the rotation
    k_norm_weight: torch.Tensor | None = None,  # [D]
    eps: float = 1e-6,
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # (k, v) caches, [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor | None = None,  # [T] int64 cache slot of each token, -1 = skip
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (and, given the weights, first RMS-normalised) q [T, Hq, D] and k [T, Hkv, D].

    Neox-style rotation of the first rotary_dim = 2 * cos.shape[-1] channels of every head;
    the remaining channels (partial rotary) pass through (normalised when HAS_NORM).

    Given kv_cache and slot_mapping (check `kv_store_fits` first), the same launch also does
    store_kv's work: token t's rotated k and its v (qkv's columns (Hq + Hkv) * D onwards) go
    to cache slot slot_mapping[t], cast to the cache's dtype; slot -1 is skipped. k is still
    returned (the prefill kernel reads the step's own keys from it).
    """
    T = qkv.shape[0]
    cos = cos.reshape(T, -1)
    sin = sin.reshape(T, -1)
    half = cos.shape[1]
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and 2 * half <= head_dim
    assert qkv.shape[1] >= (num_q_heads + num_kv_heads) * head_dim
    store = kv_cache is not None
    assert store == (slot_mapping is not None), "kv_cache and slot_mapping go together"
    if store:
        assert kv_store_fits(qkv, kv_cache, num_q_heads, num_kv_heads, head_dim), "see kv_store_fits"
        assert slot_mapping.dim() == 1 and slot_mapping.shape[0] >= T  # as store_kv reads it
        k_cache, v_cache = kv_cache
    else:  # unused pointers (STORE_KV is off)
        k_cache = v_cache = slot_mapping = qkv
    q = torch.empty((T, num_q_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((T, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q, k
    has_norm = q_norm_weight is not None
    rest = head_dim - 2 * half
    cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3]) if store else (0,) * 6
    _qk_norm_rope_kernel[(T,)](
        qkv, cos, sin,
        q_norm_weight if has_norm else qkv, k_norm_weight if has_norm else qkv,
        q, k, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        *cache_strides,
        eps,
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, ROT_HALF=half,
        PAGE_SIZE=k_cache.shape[1] if store else 1,
        BLOCK_H=triton.next_power_of_2(num_q_heads + num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_REST=triton.next_power_of_2(rest) if rest > 0 else 0,
        BLOCK_KV=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        HAS_NORM=has_norm, STORE_KV=store,
        num_warps=4,
    )
    return q, k


def qk_norm_rope_ref(qkv, cos, sin, num_q_heads, num_kv_heads, head_dim,
                     q_norm_weight=None, k_norm_weight=None, eps=1e-6, kv_cache=None, slot_mapping=None):
    """PyTorch reference: transformers' Qwen3 q_norm/k_norm then apply_rotary_pos_emb; given
    kv_cache and slot_mapping, then store_kv_ref of the rotated k and the v heads."""
    T = qkv.shape[0]
    q = qkv[:, : num_q_heads * head_dim].reshape(T, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].reshape(T, num_kv_heads, head_dim)
    if q_norm_weight is not None:
        q, k = rms_norm_ref(q, q_norm_weight, eps), rms_norm_ref(k, k_norm_weight, eps)
    cos = cos.reshape(T, 1, -1)
    sin = sin.reshape(T, 1, -1)
    rot = 2 * cos.shape[-1]

    def rotate(x):
        x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest), dim=-1)

    q, k = rotate(q), rotate(k)
    if kv_cache is not None:
        start = (num_q_heads + num_kv_heads) * head_dim
        v = qkv[:, start : start + num_kv_heads * head_dim].reshape(T, num_kv_heads, head_dim)
        store_kv_ref(k, v, kv_cache[0], kv_cache[1], slot_mapping)
    return q, k


# ------------------------------------------------------------------------------ SiLU and mul


@triton.jit
def _silu_and_mul_kernel(
    X,  # [T, 2 * I] fused gate/up projection rows: gate = X[:, :I], up = X[:, I:]; last dim contiguous
    Out,  # [T, I] silu(gate) * up, contiguous
    stride_x,
    I,
    BLOCK: tl.constexpr,  # channels per program
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    dtype = Out.dtype.element_ty
    g = tl.load(X + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + t * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = _round(g / (1.0 + tl.exp(-g)), dtype)  # F.silu in the model dtype
    tl.store(Out + t * I + offs, _cast(s * u, dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x [T, 2 * I] -> [T, I]
    """silu(x[:, :I]) * x[:, I:], the SwiGLU MLP's activation on its fused gate/up output."""
    T, two_i = x.shape
    assert two_i % 2 == 0 and x.stride(-1) == 1
    inter = two_i // 2
    out = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T > 0:
        BLOCK = min(1024, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(T, triton.cdiv(inter, BLOCK))](x, out, x.stride(0), inter, BLOCK=BLOCK, num_warps=4)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
