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
    """Median time in seconds (CUDA events; triton's do_bench clears L2 before each run by
    writing 256 MB, so the timed kernel also pays for writing those dirty lines back)."""
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e-3


def bench_graph(fns, reps=20):
    try:
        return _bench_graph(fns, reps)
    except Exception as e:  # not capturable: one launch at a time instead
        print(f"  graph capture failed ({type(e).__name__}: {str(e)[:100]}); timing with do_bench")
        torch.cuda.synchronize()
        return bench(fns[0])


def _bench_graph(fns, reps):
    """Seconds per call: capture the calls fns[0..n-1] (each on its own input set, together
    several times the 60 MB L2, so no call finds its inputs cached) back to back in one CUDA
    graph, as the engine's decode step runs; median replay time over reps, divided by n."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3 / len(fns))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(nbytes=2 * 1024**3):
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    assert torch.equal(dst, src)
    del src, dst
    return 2 * nbytes / t, t


def experiment_setup(default_batches: str, smoke_batches: list[int]):
    """The command line every exp_*.py script shares, parsed: --batches (comma list, default
    default_batches) and --smoke. Returns (device, smoke, copy bandwidth or None, batch sizes);
    a smoke run takes smoke_batches."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default=default_batches)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    dev, smoke, copy_bw = experiment_device(args.smoke)
    return dev, smoke, copy_bw, smoke_batches if smoke else [int(b) for b in args.batches.split(",")]


def experiment_device(smoke: bool):
    """(device, smoke, copy bandwidth in bytes/s or None) for an exp_*.py script: the GPU when
    there is one and --smoke was not asked (the bandwidth measured and printed), else a smoke run
    on whatever device there is (the CPU under TRITON_INTERPRET=1), which times nothing."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = smoke or dev.type != "cuda"
    if smoke:
        return dev, True, None
    bw = copy_bandwidth()[0]
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    return dev, False, bw


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
    scale = D**-0.5
    nbytes = B * Hq * D * 2 + 2 * B * ctx * Hkv * D * 2 + B * Hq * D * 2  # q + K + V + out
    n_sets = max(2, -(-3 * 60 * 10**6 // (2 * B * ctx * Hkv * D * 2)))  # >= 3x the L2 in total
    sets = [paged_decode_inputs(B, ctx, Hq, Hkv, D, bs, seed=i) for i in range(n_sets)]
    outs = [torch.empty(B, Hq, D, dtype=torch.bfloat16, device=DEV) for _ in sets]
    label = f"decode B={B} ctx={ctx}"

    # correctness on these inputs, against SDPA (fp32) on the contiguous layout
    q, kc, vc, table, lens = sets[0]
    k = contiguous_kv(kc, table, B, ctx, Hkv, D)
    v = contiguous_kv(vc, table, B, ctx, Hkv, D)
    ref = F.scaled_dot_product_attention(q.view(B, Hq, 1, D).float(), k.float(), v.float(), scale=scale,
                                         enable_gqa=True).view(B, Hq, D)
    del k, v

    def check(o, what):
        err = ((o.float() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{what}: rel err {err:.2e} vs SDPA fp32"
        return err

    variants = [("launcher default", {})]
    if sweep:
        variants += [(f"S={s} BN={bn} w={nw} st={ns} hf={int(hf)}",
                      dict(num_splits=s, block_n=bn, num_warps=nw, num_stages=ns, head_fastest=hf))
                     for s, bn, nw, ns in (SWEEP_BIG if B >= 16 else SWEEP_SMALL) for hf in (False, True)]
    results = []
    warm = True
    for name, kw in variants:
        fns = [lambda st=st, o=o, kw=kw: K.decode_attention(st[0], st[1], st[2], st[3], st[4], scale,
                                                            max_seq_len=ctx, out=o, **kw)
               for st, o in zip(sets, outs)]
        try:
            fns[0]()
            torch.cuda.synchronize()
        except Exception as e:  # a tiling that does not fit (shared memory): skip it
            print(f"  {name}: failed ({type(e).__name__}: {str(e)[:80]})")
            continue
        outs[0].fill_(float("nan"))
        fns[0]()
        err = check(outs[0], name)
        if warm:  # the first timed graph of a section ran slow once (clocks): discard one
            bench_graph(fns)
            warm = False
        t = bench_graph(fns)
        results.append((name, t, err, fns))
        print(f"  {label} {name:28s} {t*1e6:8.1f} us {nbytes/t/GB:7.0f} GB/s {100*nbytes/t/copy_bw:5.1f}%")
    default = results[0]
    best = min(results, key=lambda r: r[1])
    t_flushed = bench(default[3][0])
    for tag, (name, t, err, _) in (("default", default), ("best", best)):
        if tag == "best" and (not sweep or best is default):
            continue
        bw = nbytes / t
        rows.append(dict(item=f"{label} [{tag}: {name}]", time_us=t * 1e6, gbps=bw / GB,
                         pct_copy=100 * bw / copy_bw, target=target, err=err))
    rows.append(dict(item=f"  same, default, timed by do_bench (L2 flushed by a 256 MB write)", time_us=t_flushed * 1e6,
                     gbps=nbytes / t_flushed / GB, pct_copy=100 * nbytes / t_flushed / copy_bw, target="info"))
    if sweep:
        with open(os.path.join(ARGS.out, f"sweep_decode_B{B}_ctx{ctx}.json"), "w") as f:
            json.dump([dict(name=n, us=t * 1e6, gbps=nbytes / t / GB, err=e) for n, t, e, _ in results], f, indent=1)

    if with_sdpa:
        contig = []
        for st in sets:
            q, kc, vc, table, _ = st
            contig.append((q.view(B, Hq, 1, D), contiguous_kv(kc, table, B, ctx, Hkv, D),
                           contiguous_kv(vc, table, B, ctx, Hkv, D)))
        sd = [lambda c=c: F.scaled_dot_product_attention(c[0], c[1], c[2], scale=scale, enable_gqa=True)
              for c in contig]
        # ours again, right before SDPA: the first timing of a section ran ~10% slow in the
        # 2026-11-28 runs (same code path measured again later was fast); the ratios use this one
        t_ours = bench_graph(default[3])
        t_gqa = bench_graph(sd)
        if sweep and best is not default:  # the sweep's best, timed again beside SDPA
            t_best = bench_graph(best[3])
            t_gqa2 = bench_graph(sd)
            rows.append(dict(item=f"  sweep's best again ({best[0]}), then SDPA again: {t_gqa2 * 1e6:.1f} us",
                             time_us=t_best * 1e6, gbps=nbytes / t_best / GB, pct_copy=100 * nbytes / t_best / copy_bw,
                             target=f"best {t_gqa2 / t_best:.2f}x SDPA's speed"))
        rows.append(dict(item=f"  ours again (launcher default), B={B} ctx={ctx}", time_us=t_ours * 1e6,
                         gbps=nbytes / t_ours / GB, pct_copy=100 * nbytes / t_ours / copy_bw,
                         target="used for the SDPA ratios"))
        rows.append(dict(item=f"SDPA enable_gqa=True, contiguous K/V, B={B} ctx={ctx}", time_us=t_gqa * 1e6,
                         gbps=nbytes / t_gqa / GB, pct_copy=100 * nbytes / t_gqa / copy_bw,
                         target=f"ours {t_gqa / t_ours:.2f}x faster (need > 1)"))
        exp = [(c[0], c[1].repeat_interleave(Hq // Hkv, dim=1), c[2].repeat_interleave(Hq // Hkv, dim=1))
               for c in contig[:2]]
        del contig
        sde = [lambda c=c: F.scaled_dot_product_attention(c[0], c[1], c[2], scale=scale) for c in exp]
        t_exp = bench_graph(sde)
        rows.append(dict(item=f"SDPA on K/V pre-expanded to 32 heads, B={B} ctx={ctx}", time_us=t_exp * 1e6,
                         gbps=nbytes / t_exp / GB, pct_copy=100 * nbytes / t_exp / copy_bw,
                         target=f"ours {t_exp / t_ours:.2f}x faster"))
        del exp
    del sets
    torch.cuda.empty_cache()


# (splits, BLOCK_N, warps, stages) tried with --sweep, each in both grid orders
SWEEP_BIG = [(1, 64, 4, 2), (2, 32, 4, 2), (1, 32, 4, 3), (1, 32, 4, 4), (1, 64, 4, 3), (1, 128, 4, 2),
             (1, 128, 8, 2), (1, 64, 8, 2), (1, 16, 4, 4), (2, 64, 4, 2), (4, 64, 4, 2)]
SWEEP_SMALL = [(64, 64, 4, 2), (32, 128, 4, 4), (128, 128, 4, 2)]


def store_section(rows, copy_bw, T=4096, Hkv=8, D=128, bs=16, dtype=torch.bfloat16, n_sets=8):
    g = torch.Generator(device=DEV).manual_seed(1)
    num_blocks = 16384  # a realistic pool: 262144 slots, 1 GiB for K+V
    kc = torch.randn(num_blocks, bs, Hkv, D, device=DEV, dtype=dtype, generator=g)
    vc = torch.randn_like(kc)
    sets = []
    for _ in range(n_sets):  # 8 x 16.8 MB of new K/V: no call finds its inputs in L2
        key = torch.randn(T, Hkv, D, device=DEV, dtype=dtype, generator=g)
        value = torch.randn(T, Hkv, D, device=DEV, dtype=dtype, generator=g)
        slots = torch.randperm(num_blocks * bs, device=DEV, generator=g)[:T]
        sets.append((key, value, slots))
    key, value, slots = sets[0]
    K.store_kv(key, value, kc, vc, slots)
    assert torch.equal(kc.view(-1, Hkv, D)[slots], key) and torch.equal(vc.view(-1, Hkv, D)[slots], value)
    nbytes = 2 * 2 * T * Hkv * D * 2  # K and V, each read once and written once
    fns = [lambda st=st: K.store_kv(st[0], st[1], kc, vc, st[2]) for st in sets]
    bench_graph(fns, reps=20)  # warm-up
    t = bench_graph(fns, reps=50)
    rows.append(dict(item=f"store_kv {T} tokens (Hkv={Hkv}, D={D}, bf16, random slots)", time_us=t * 1e6,
                     gbps=nbytes / t / GB, pct_copy=100 * nbytes / t / copy_bw, target=">= 70% of copy"))
    for bt in (1, 2, 4):  # tokens per program (the launcher's default is 8 here)
        f2 = [lambda st=st, bt=bt: K.store_kv(st[0], st[1], kc, vc, st[2], block_t=bt) for st in sets]
        t2 = bench_graph(f2, reps=50)
        rows.append(dict(item=f"  store_kv, {bt} token(s) per program", time_us=t2 * 1e6, gbps=nbytes / t2 / GB,
                         pct_copy=100 * nbytes / t2 / copy_bw, target="variant"))
    # the same bytes through torch, timed the same way: a same-size copy, and the reference
    pairs = [(torch.randn(2 * T * Hkv * D, device=DEV, dtype=dtype, generator=g),
              torch.empty(2 * T * Hkv * D, device=DEV, dtype=dtype)) for _ in range(n_sets)]
    t_copy = bench_graph([lambda p=p: p[1].copy_(p[0]) for p in pairs], reps=50)
    rows.append(dict(item=f"  same-size torch copy ({nbytes/2/1e6:.1f} MB read + written), same timing",
                     time_us=t_copy * 1e6, gbps=nbytes / t_copy / GB, pct_copy=100 * nbytes / t_copy / copy_bw,
                     target=f"ours {t_copy / t:.2f}x its speed"))
    t_flushed = bench(fns[0], rep=300)
    rows.append(dict(item="  store_kv timed by do_bench (one launch, L2 flushed by a 256 MB write)",
                     time_us=t_flushed * 1e6, gbps=nbytes / t_flushed / GB,
                     pct_copy=100 * nbytes / t_flushed / copy_bw, target="info"))
    t_ref = bench(lambda: K.store_kv_ref(key, value, kc, vc, slots), rep=100)  # syncs: no graph
    rows.append(dict(item="  store_kv_ref (torch indexing; do_bench, it syncs so no graph)", time_us=t_ref * 1e6,
                     gbps=nbytes / t_ref / GB, pct_copy=100 * nbytes / t_ref / copy_bw,
                     target=f"ours {t_ref / t:.2f}x faster"))


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
