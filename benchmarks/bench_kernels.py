"""Kernel benchmarks on a CUDA GPU: achieved bandwidth against baselines measured in the same run.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--out DIR] [--sweep] [--quick]

Prints one table of ratios (the machines are noisy; every baseline is measured here, now):
  * device-to-device copy bandwidth (torch copy_ of a 2 GiB buffer; bytes read + written)
  * decode attention, bf16, D=128, 32 query / 8 KV heads, block size 16:
      batch 64 x context 4096 and batch 1 x context 32768 (split-KV);
      achieved bandwidth = bytes of Q, K, V read + output written, over the median time;
      and torch's scaled_dot_product_attention on the same K/V laid out contiguously
  * store_kv of 4096 new tokens (bytes of K, V read + written)
  * prefill attention (informational): TFLOP/s vs SDPA causal on contiguous tensors
Every input is random (never zeros), and each timed kernel's output is checked against
SDPA / the reference on the same inputs before its time is reported.
--sweep also times a few tiling variants (splits, BLOCK_N, warps, stages) of the decode
kernel and reports the best next to the launcher's default choice.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import labengine.kernels as K  # noqa: N812
except ImportError:  # source checkout: register kernels/ as labengine.kernels
    spec = importlib.util.spec_from_file_location(
        "labengine.kernels", ROOT / "kernels/__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    K = importlib.util.module_from_spec(spec)
    sys.modules["labengine.kernels"] = K
    spec.loader.exec_module(K)

DEV = torch.device("cuda")
GB = 1e9


def bench(fn, rep=200):
    """Median time in seconds (CUDA events; triton's do_bench clears L2 before each run)."""
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e-3


def copy_bandwidth(nbytes=2 * 1024**3):
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    del src, dst
    return 2 * nbytes / t, t


def paged_decode_inputs(B, ctx, Hq=32, Hkv=8, D=128, bs=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    nblk = B * ctx // bs
    k_cache = torch.randn(nblk + 1, bs, Hkv, D, device=DEV, dtype=dtype, generator=g)
    v_cache = torch.randn(nblk + 1, bs, Hkv, D, device=DEV, dtype=dtype, generator=g)
    # shuffled physical blocks, as after a while of serving
    table = (torch.randperm(nblk, device=DEV, generator=g) + 1).view(B, ctx // bs).to(torch.int32)
    q = torch.randn(B, Hq, D, device=DEV, dtype=dtype, generator=g)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, table, lens


def contiguous_kv(k_cache, table, B, ctx, Hkv, D):
    """The same keys laid out [B, Hkv, ctx, D] contiguously (what a user would hand to SDPA)."""
    return k_cache[table.long()].reshape(B, ctx, Hkv, D).transpose(1, 2).contiguous()


def decode_section(rows, copy_bw, B, ctx, sweep, target, with_sdpa):
    Hq, Hkv, D, bs = 32, 8, 128, 16
    q, kc, vc, table, lens = paged_decode_inputs(B, ctx, Hq, Hkv, D, bs)
    scale = D**-0.5
    nbytes = q.numel() * 2 + 2 * B * ctx * Hkv * D * 2 + q.numel() * 2
    out = torch.empty_like(q)

    # correctness on these inputs, against SDPA on the contiguous layout
    k = contiguous_kv(kc, table, B, ctx, Hkv, D)
    v = contiguous_kv(vc, table, B, ctx, Hkv, D)
    q4 = q.view(B, Hq, 1, D)
    ref = F.scaled_dot_product_attention(q4.float(), k.float(), v.float(), scale=scale, enable_gqa=True).view(B, Hq, D)

    def check(o, what):
        err = ((o.float() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{what}: rel err {err:.2e} vs SDPA fp32"
        return err

    variants = [("launcher default", {})]
    if sweep:
        splits = [1, 2, 4] if B >= 16 else [32, 64, 128, 16]
        for s in splits:
            for bn in (64, 32, 128):
                for nw in (4, 8):
                    for ns in (3, 2, 4):
                        variants.append((f"S={s} BN={bn} w={nw} st={ns}", dict(num_splits=s, block_n=bn, num_warps=nw, num_stages=ns)))
    results = []
    t_start = time.time()
    for name, kw in variants:
        if time.time() - t_start > 40:
            print(f"  sweep stopped after {len(results)} variants (time box)")
            break
        fn = lambda kw=kw: K.decode_attention(q, kc, vc, table, lens, scale, max_seq_len=ctx, out=out, **kw)  # noqa: E731
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as e:  # a tiling that does not fit (shared memory): skip it
            print(f"  {name}: failed ({type(e).__name__}: {str(e)[:80]})")
            continue
        out.fill_(float("nan"))
        fn()
        err = check(out, name)
        t = bench(fn)
        results.append((name, t, err, kw))
    default = results[0]
    best = min(results, key=lambda r: r[1])
    label = f"decode B={B} ctx={ctx}"
    for tag, (name, t, err, kw) in (("default", default), ("best", best)):
        if tag == "best" and not sweep:
            continue
        bw = nbytes / t
        rows.append(dict(item=f"{label} [{tag}: {name}]", time_us=t * 1e6, gbps=bw / GB,
                         pct_copy=100 * bw / copy_bw, target=target, err=err))
    if sweep:
        with open(os.path.join(ARGS.out, f"sweep_decode_B{B}_ctx{ctx}.json"), "w") as f:
            json.dump([dict(name=n, us=t * 1e6, gbps=nbytes / t / GB, err=e) for n, t, e, _ in results], f, indent=1)
        for n, t, e, _ in sorted(results, key=lambda r: r[1])[:8]:
            print(f"  {label} {n:28s} {t*1e6:8.1f} us {nbytes/t/GB:7.0f} GB/s")

    if with_sdpa:
        qb = q4
        t_gqa = bench(lambda: F.scaled_dot_product_attention(qb, k, v, scale=scale, enable_gqa=True))
        ke = k.repeat_interleave(Hq // Hkv, dim=1)
        ve = v.repeat_interleave(Hq // Hkv, dim=1)
        t_exp = bench(lambda: F.scaled_dot_product_attention(qb, ke, ve, scale=scale))
        t_ours = default[1]
        rows.append(dict(item=f"SDPA enable_gqa=True, contiguous K/V, B={B} ctx={ctx}", time_us=t_gqa * 1e6,
                         gbps=nbytes / t_gqa / GB, pct_copy=100 * nbytes / t_gqa / copy_bw,
                         target=f"ours {t_gqa / t_ours:.2f}x faster (need > 1)"))
        rows.append(dict(item=f"SDPA on K/V pre-expanded to 32 heads, B={B} ctx={ctx}", time_us=t_exp * 1e6,
                         gbps=nbytes / t_exp / GB, pct_copy=100 * nbytes / t_exp / copy_bw,
                         target=f"ours {t_exp / t_ours:.2f}x faster"))
        del ke, ve
    del k, v, kc, vc
    torch.cuda.empty_cache()


def store_section(rows, copy_bw, T=4096, Hkv=8, D=128, bs=16, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(1)
    num_blocks = 16384  # a realistic pool: 262144 slots, 1 GiB for K+V
    key = torch.randn(T, Hkv, D, device=DEV, dtype=dtype, generator=g)
    value = torch.randn(T, Hkv, D, device=DEV, dtype=dtype, generator=g)
    kc = torch.randn(num_blocks, bs, Hkv, D, device=DEV, dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    slots = torch.randperm(num_blocks * bs, device=DEV, generator=g)[:T]
    K.store_kv(key, value, kc, vc, slots)
    assert torch.equal(kc.view(-1, Hkv, D)[slots], key) and torch.equal(vc.view(-1, Hkv, D)[slots], value)
    nbytes = 2 * 2 * T * Hkv * D * 2  # K and V, each read once and written once
    t = bench(lambda: K.store_kv(key, value, kc, vc, slots), rep=300)
    rows.append(dict(item=f"store_kv {T} tokens (Hkv={Hkv}, D={D}, bf16, random slots)", time_us=t * 1e6,
                     gbps=nbytes / t / GB, pct_copy=100 * nbytes / t / copy_bw, target=">= 70% of copy"))
    # the same number of bytes through torch: a same-size copy and the reference's index_copy_
    a = torch.randn(2 * T * Hkv * D, device=DEV, dtype=dtype, generator=g)
    b = torch.empty_like(a)
    t_copy = bench(lambda: b.copy_(a), rep=300)
    rows.append(dict(item=f"  same-size torch copy ({nbytes/2/1e6:.1f} MB read+written)", time_us=t_copy * 1e6,
                     gbps=nbytes / t_copy / GB, pct_copy=100 * nbytes / t_copy / copy_bw, target="baseline"))
    t_ref = bench(lambda: K.store_kv_ref(key, value, kc, vc, slots), rep=300)
    rows.append(dict(item="  store_kv_ref (torch indexing)", time_us=t_ref * 1e6, gbps=nbytes / t_ref / GB,
                     pct_copy=100 * nbytes / t_ref / copy_bw, target=f"ours {t_ref / t:.2f}x faster"))


def prefill_section(rows, B=4, L=2048, Hq=32, Hkv=8, D=128, bs=16, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(2)
    nblk = B * L // bs
    kc = torch.randn(nblk + 1, bs, Hkv, D, device=DEV, dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    table = (torch.randperm(nblk, device=DEV, generator=g) + 1).view(B, L // bs).to(torch.int32)
    q = torch.randn(B * L, Hq, D, device=DEV, dtype=dtype, generator=g)
    qsl = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=DEV)
    lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
    scale = D**-0.5
    out = torch.empty_like(q)
    fn = lambda: K.prefill_attention(q, kc, vc, table, qsl, lens, scale, max_query_len=L, out=out)  # noqa: E731
    fn()
    k = contiguous_kv(kc, table, B, L, Hkv, D)
    v = contiguous_kv(vc, table, B, L, Hkv, D)
    q4 = q.view(B, L, Hq, D).transpose(1, 2)
    sd = lambda: F.scaled_dot_product_attention(q4, k, v, scale=scale, is_causal=True, enable_gqa=True)  # noqa: E731
    ref = sd().transpose(1, 2).reshape(B * L, Hq, D)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 2e-2, err
    flops = 4 * B * Hq * D * L * L / 2  # causal: half the square
    t = bench(fn, rep=100)
    t_sd = bench(sd, rep=100)
    rows.append(dict(item=f"prefill B={B} x {L} causal (paged)", time_us=t * 1e6, tflops=flops / t / 1e12,
                     target=f"{t_sd / t:.2f}x SDPA's speed", err=err))
    rows.append(dict(item="  SDPA causal, enable_gqa, contiguous", time_us=t_sd * 1e6, tflops=flops / t_sd / 1e12,
                     target="baseline"))


def main():
    rows = []
    props = torch.cuda.get_device_properties(DEV)
    head = (f"{_dt.date.today()} {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
            f"triton {triton.__version__}")
    print(head)
    copy_bw, t = copy_bandwidth()
    rows.append(dict(item="device copy 2 GiB (torch copy_)", time_us=t * 1e6, gbps=copy_bw / GB, pct_copy=100.0,
                     target="baseline"))
    print(f"copy bandwidth {copy_bw/GB:.0f} GB/s")
    decode_section(rows, copy_bw, 64, 4096, ARGS.sweep, ">= 80% of copy", with_sdpa=True)
    decode_section(rows, copy_bw, 1, 32768, ARGS.sweep, ">= 60% of copy", with_sdpa=True)
    store_section(rows, copy_bw)
    if not ARGS.quick:
        prefill_section(rows)
    lines = [head, "", "| what | time (us) | GB/s | % of copy | TFLOP/s | target / ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        gb = f"{r['gbps']:.0f}" if "gbps" in r else ""
        pc = f"{r['pct_copy']:.1f}%" if "pct_copy" in r else ""
        tf = f"{r['tflops']:.0f}" if "tflops" in r else ""
        lines.append(f"| {r['item']} | {r['time_us']:.1f} | {gb} | {pc} | {tf} | {r.get('target', '')} |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(ARGS.out, "bench_kernels.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(ARGS.out, "bench_kernels.json"), "w") as f:
        json.dump(dict(header=head, rows=rows), f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--quick", action="store_true")
    ARGS = p.parse_args()
    os.makedirs(ARGS.out, exist_ok=True)
    main()
