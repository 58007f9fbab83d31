"""Experiment (issue 5): can decode attention beat SDPA(enable_gqa) at batch 64 x 4096?

    PYTHONPATH=. python benchmarks/exp_decode_tma.py [--tma] [--tilings]

Times, in one run on the same inputs as bench_kernels.py (graph timing, shuffled pages):
  * our decode kernel (launcher default), on shuffled and on in-order pages;
  * 2 warps, BLOCK_N 128, and with --tilings unpipelined tilings (fourth-session runs also
    timed load hints, .cg / evict_first, within noise and since removed, and whole tiles
    without masks, then an option, now the kernel's only path);
  * with --tma: a variant that loads each page's K/V tile with a Hopper TMA descriptor (one page of
    16 keys per loop iteration, the block-table lookup as its only address arithmetic);
  * two read-only kernels with the same access pattern (plain loads / TMA), no math:
    the ceiling the paged layout allows;
  * SDPA enable_gqa on contiguous K/V.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
import bench_kernels as BK  # noqa: E402

K = BK.K


@triton.jit
def _decode_tma_kernel(
    Q,  # [B, Hq, D]
    K_desc,  # descriptor over K cache viewed [num_blocks * PAGE_SIZE, Hkv * D], box [PAGE_SIZE, BLOCK_D]
    V_desc,  # same for V
    Block_tables,  # [B, max_blocks] int32
    Seq_lens,  # [B] int32
    Out,  # [B, Hq, D]
    sm_scale_log2,
    stride_qb, stride_qh, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PAGES: tl.constexpr, IEEE: tl.constexpr,
):
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(Seq_lens + b)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, PAGE_SIZE)
    mask_h = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    bt_row = Block_tables + b.to(tl.int64) * stride_bt
    n_pages = tl.cdiv(seq_len, PAGE_SIZE)
    col = kvh * HEAD_DIM
    for i0 in range(0, n_pages, PAGES):
        for j in tl.static_range(PAGES):
            i = i0 + j
            if i < n_pages:
                page = tl.load(bt_row + i)
                k = K_desc.load([page * PAGE_SIZE, col])  # [PAGE_SIZE, BLOCK_D]
                if IEEE:
                    qk = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
                else:
                    qk = tl.dot(q, tl.trans(k))
                pos = i * PAGE_SIZE + offs_n
                qk = tl.where(pos[None, :] < seq_len, qk * sm_scale_log2, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(qk, 1))
                p = tl.math.exp2(qk - m_new[:, None])
                alpha = tl.math.exp2(m_i - m_new)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = V_desc.load([page * PAGE_SIZE, col])
                if IEEE:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(Out + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(Out.dtype.element_ty), mask=mask_h[:, None])


def decode_tma(q, k_cache, v_cache, table, lens, scale, out, pages=1, num_warps=4, num_stages=3):
    B, Hq, D = q.shape
    nb, bs, Hkv, _ = k_cache.shape
    kd = TensorDescriptor(k_cache.view(nb * bs, Hkv * D), [nb * bs, Hkv * D], [Hkv * D, 1], [bs, D])
    vd = TensorDescriptor(v_cache.view(nb * bs, Hkv * D), [nb * bs, Hkv * D], [Hkv * D, 1], [bs, D])
    _decode_tma_kernel[(Hkv, B)](
        q, kd, vd, table, lens, out, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), table.stride(0), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_H=max(16, Hq // Hkv), BLOCK_D=D, PAGE_SIZE=bs, PAGES=pages,
        IEEE=q.dtype == torch.float32 or INTERP, num_warps=num_warps, num_stages=num_stages)
    return out


@triton.jit
def _read_only_kernel(K_cache, V_cache, K_desc, V_desc, Block_tables, Seq_lens, Out,
                      stride_kb, stride_kt, stride_kh, stride_bt, stride_ob,
                      HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):
    """Sum every cached K and V element of one (sequence, KV head): the paged layout's read ceiling."""
    kvh = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(Seq_lens + b)
    offs_d = tl.arange(0, HEAD_DIM)
    bt_row = Block_tables + b.to(tl.int64) * stride_bt
    if TMA:
        acc = tl.zeros([PAGE_SIZE, HEAD_DIM], dtype=tl.float32)
        for i in range(0, tl.cdiv(seq_len, PAGE_SIZE)):
            page = tl.load(bt_row + i)
            acc += K_desc.load([page * PAGE_SIZE, kvh * HEAD_DIM]).to(tl.float32)
            acc += V_desc.load([page * PAGE_SIZE, kvh * HEAD_DIM]).to(tl.float32)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for n0 in range(0, seq_len, BLOCK_N):
            pos = n0 + offs_n
            page = tl.load(bt_row + pos // PAGE_SIZE).to(tl.int64)
            off = page[:, None] * stride_kb + (pos % PAGE_SIZE)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            acc += tl.load(K_cache + off).to(tl.float32)
            acc += tl.load(V_cache + off).to(tl.float32)
    tl.store(Out + b.to(tl.int64) * stride_ob + kvh * HEAD_DIM + offs_d, tl.sum(acc, 0))


def read_only(k_cache, v_cache, table, lens, out, tma, num_stages=3):
    nb, bs, Hkv, D = k_cache.shape
    B = table.shape[0]
    kd = TensorDescriptor(k_cache.view(nb * bs, Hkv * D), [nb * bs, Hkv * D], [Hkv * D, 1], [bs, D])
    vd = TensorDescriptor(v_cache.view(nb * bs, Hkv * D), [nb * bs, Hkv * D], [Hkv * D, 1], [bs, D])
    _read_only_kernel[(Hkv, B)](k_cache, v_cache, kd, vd, table, lens, out,
                                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0), out.stride(0),
                                HEAD_DIM=D, PAGE_SIZE=bs, BLOCK_N=64, TMA=tma, num_warps=4, num_stages=num_stages)
    return out


def check_small():
    """Correctness on small shapes (interpreter or GPU), ragged lengths, against the reference."""
    dev = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        B, Hq, Hkv, D, bs = 3, 8, 2, 64, 16
        lens = torch.tensor([1, 37, 80], dtype=torch.int32, device=dev)
        nb = 20
        kc = torch.randn(nb, bs, Hkv, D, dtype=dtype, device=dev)
        vc = torch.randn(nb, bs, Hkv, D, dtype=dtype, device=dev)
        table = torch.randperm(nb, device=dev)[:15].view(3, 5).to(torch.int32)
        q = torch.randn(B, Hq, D, dtype=dtype, device=dev)
        ref = K.decode_attention_ref(q, kc, vc, table, lens, D**-0.5, torch.float64)
        for pages in (1, 2):
            out = torch.full((B, Hq, D), float("nan"), dtype=dtype, device=dev)
            decode_tma(q, kc, vc, table, lens, D**-0.5, out, pages=pages)
            err = (out.double() - ref).abs().max().item()
            print(f"check {dtype} pages={pages}: max err {err:.2e}")
            assert err < (1e-5 if dtype == torch.float32 else 3e-2)


def main():
    check_small()
    if INTERP:
        return
    dev = BK.DEV
    copy_bw, _ = BK.copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    B, ctx, Hq, Hkv, D, bs = 64, 4096, 32, 8, 128, 16
    scale = D**-0.5
    nbytes = B * Hq * D * 2 + 2 * B * ctx * Hkv * D * 2 + B * Hq * D * 2
    kv_bytes = 2 * B * ctx * Hkv * D * 2
    sets = [BK.paged_decode_inputs(B, ctx, Hq, Hkv, D, bs, seed=i) for i in range(4)]
    outs = [torch.empty(B, Hq, D, dtype=torch.bfloat16, device=dev) for _ in sets]
    q, kc, vc, table, lens = sets[0]
    ref = K.decode_attention(q, kc, vc, table, lens, scale, max_seq_len=ctx).float()
    rows = []

    def timeit(name, fn_of_set, check=True, nb=nbytes):
        fns = [lambda st=st, o=o: fn_of_set(st, o) for st, o in zip(sets, outs)]
        try:
            outs[0].fill_(float("nan"))
            fns[0]()
            torch.cuda.synchronize()
        except Exception as e:
            print(f"  {name}: failed {type(e).__name__}: {str(e)[:300]}")
            return None
        if check:
            err = ((outs[0].float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                print(f"  {name}: WRONG rel err {err:.2e}")
                return None
        t = BK.bench_graph(fns)
        rows.append((name, t))
        print(f"  {name:48s} {t * 1e6:8.1f} us {nb / t / 1e9:7.0f} GB/s {100 * nb / t / copy_bw:6.1f}% of copy")
        return t

    dflt = lambda st, o: K.decode_attention(st[0], st[1], st[2], st[3], st[4], scale, max_seq_len=ctx, out=o)
    timeit("warm-up (ours, discarded)", dflt)
    t_ours = timeit("ours, launcher default", dflt)
    variants = [dict(num_warps=2), dict(block_n=128)]
    if "--tilings" in sys.argv:
        variants += [dict(block_n=bn, num_warps=w, num_stages=1) for bn, w in ((64, 4), (128, 4), (128, 8), (32, 4))]
        variants += [dict(block_n=64, num_warps=2, num_stages=2), dict(block_n=32, num_warps=2, num_stages=2),
                     dict(block_n=64, num_warps=4, num_stages=2, head_fastest=False)]
    for kw in variants:
        timeit("ours " + " ".join(f"{k}={v!r}" for k, v in kw.items()),
               lambda st, o, kw=kw: K.decode_attention(st[0], st[1], st[2], st[3], st[4], scale, max_seq_len=ctx, out=o, **kw))
    if "--tma" in sys.argv:
        for pages, nw, ns in ((1, 4, 3), (4, 4, 3)):
            timeit(f"TMA per page, unroll {pages}, w={nw} st={ns}",
                   lambda st, o, p=pages, w=nw, s=ns: decode_tma(st[0], st[1], st[2], st[3], st[4], scale, o, p, w, s))
        ro = [torch.empty(B, Hkv * D, dtype=torch.float32, device=dev) for _ in sets]
        for tma, ns in ((False, 2), (True, 3)):
            fns = [lambda st=st, o=o, tma=tma, ns=ns: read_only(st[1], st[2], st[3], st[4], o, tma, ns) for st, o in zip(sets, ro)]
            fns[0]()
            torch.cuda.synchronize()
            exp = (kc.float()[table.long()].sum((1, 2)) + vc.float()[table.long()].sum((1, 2))).view(B, Hkv * D)
            assert torch.allclose(ro[0], exp, rtol=1e-3, atol=1e-1), "read-only sum wrong"
            t = BK.bench_graph(fns)
            print(f"  {'read-only ' + ('TMA' if tma else 'plain loads') + f' st={ns}':48s} {t * 1e6:8.1f} us "
                  f"{kv_bytes / t / 1e9:7.0f} GB/s {100 * kv_bytes / t / copy_bw:6.1f}% of copy")
    # in-order pages: the same kernel when each sequence's blocks are physically consecutive
    seq_sets = [(st[0], st[1], st[2], (torch.arange(B * ctx // bs, device=dev, dtype=torch.int32) + 1).view(B, -1), st[4])
                for st in sets]
    fns = [lambda st=st, o=o: K.decode_attention(st[0], st[1], st[2], st[3], st[4], scale, max_seq_len=ctx, out=o)
           for st, o in zip(seq_sets, outs)]
    t = BK.bench_graph(fns)
    print(f"  {'ours, pages in order (not shuffled)':48s} {t * 1e6:8.1f} us {nbytes / t / 1e9:7.0f} GB/s {100 * nbytes / t / copy_bw:6.1f}% of copy")
    contig = [(st[0].view(B, Hq, 1, D), BK.contiguous_kv(st[1], st[3], B, ctx, Hkv, D), BK.contiguous_kv(st[2], st[3], B, ctx, Hkv, D))
              for st in sets]
    del seq_sets
    sd = [lambda c=c: F.scaled_dot_product_attention(c[0], c[1], c[2], scale=scale, enable_gqa=True) for c in contig]
    t_ours2 = BK.bench_graph([lambda st=st, o=o: dflt(st, o) for st, o in zip(sets, outs)])
    t_sdpa = BK.bench_graph(sd)
    print(f"  {'ours again':48s} {t_ours2 * 1e6:8.1f} us {100 * nbytes / t_ours2 / copy_bw:6.1f}% of copy")
    print(f"  {'SDPA enable_gqa, contiguous':48s} {t_sdpa * 1e6:8.1f} us {100 * nbytes / t_sdpa / copy_bw:6.1f}% of copy")
    best = min(rows[1:], key=lambda r: r[1])
    print(f"best: {best[0]} {best[1] * 1e6:.1f} us; SDPA/ours-default {t_sdpa / t_ours2:.3f}, SDPA/best {t_sdpa / best[1]:.3f}")


if __name__ == "__main__":
    main()
