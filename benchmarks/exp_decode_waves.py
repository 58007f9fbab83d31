"""Experiment (issue 5): waves, pipelining depth and split counts of the decode kernel.

    PYTHONPATH=. python benchmarks/exp_decode_waves.py [--part all|resources|tilings|splits|batches] [--out DIR]

Fifth-session questions, each answered on an H200 in one run (graph timing as in
bench_kernels.py, shuffled pages, every variant's output checked before it is timed):
  resources  each kernel's grid, registers, shared memory (from the profiler): ours and the
             cuDNN kernel SDPA picks. Ours: 128 registers x 4 warps, 39 KB, so four programs
             per SM and batch 64 x 8 KV heads = 512 programs fits one wave of 528.
  tilings    BLOCK_N x num_stages x warps x register cap x cache layout at batch 64, the best
             against SDPA in interleaved duels. With the block-table load in front of the K/V
             loads triton keeps ONE K/V buffer for num_stages 2-4 and num_stages - 3 buffers
             from 5 on ("HND": each cache block stored head-major, 4 KB runs per program).
  splits     batch 64: ours on shuffled and on in-order pages against SDPA; time against
             context (fixed cost vs streaming rate); a batch x split-count grid across the
             wave edge (batch 68-99 leave a nearly empty second wave without splits).
  batches    ours (launcher default, and forced to 1 split) against SDPA from batch 16 to
             256 at context 4096, and batch 1 x 32768.
Also measured this session and since removed from the kernel (RESULTS.md has the figures):
reading a tile's block-table entries one tile ahead (a loop-carried vector, so triton
multi-buffers the K/V loads: no faster) and one entry per key (now one per page).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_kernels as BK  # noqa: E402

K = BK.K
DEV = BK.DEV
HQ, HKV, D, BS = 32, 8, 128, 16
SCALE = D**-0.5
CTX, LONG_CTX = 4096, 32768
BATCHES = (16, 32, 48, 64, 68, 72, 80, 88, 96, 99, 112, 128, 160, 256)
GRID_BATCHES = (48, 64, 68, 72, 80, 88, 96, 99, 112, 128)
# (BLOCK_N, num_stages, num_warps, register cap (None: launcher's), cache layout)
TILINGS = [(64, 2, 4, None, "NHD"), (64, 2, 4, 0, "NHD"), (64, 2, 4, None, "HND"), (64, 2, 4, 96, "NHD"),
           (64, 5, 4, None, "NHD"), (64, 7, 4, None, "NHD"), (64, 5, 8, None, "NHD"), (64, 2, 2, 0, "NHD"),
           (32, 2, 4, None, "NHD"), (32, 5, 4, None, "NHD"), (32, 7, 4, None, "NHD"), (32, 5, 2, 0, "NHD"),
           (16, 5, 4, None, "NHD"), (128, 2, 4, None, "NHD")]


def nbytes_of(B, ctx):
    return 2 * B * HQ * D * 2 + 2 * B * ctx * HKV * D * 2  # q + out + K + V


class Case:
    """Input sets for one (batch, context), the default output, and a timer."""

    def __init__(self, B, ctx, copy_bw):
        self.B, self.ctx, self.copy_bw = B, ctx, copy_bw
        kv = 2 * B * ctx * HKV * D * 2
        n_sets = max(2, -(-3 * 60 * 10**6 // kv))  # >= 3x the L2 in total
        self.sets = [BK.paged_decode_inputs(B, ctx, HQ, HKV, D, BS, seed=i) for i in range(n_sets)]
        self.outs = [torch.empty(B, HQ, D, dtype=torch.bfloat16, device=DEV) for _ in self.sets]
        self.ref = K.decode_attention(*self.sets[0], SCALE, max_seq_len=ctx).float()
        self.nbytes = nbytes_of(B, ctx)

    def ours(self, layout="NHD", sets=None, **kw):
        sets = sets or (self.sets if layout == "NHD" else self.hnd_sets())
        return [lambda st=st, o=o: K.decode_attention(*st, SCALE, max_seq_len=self.ctx, out=o, **kw)
                for st, o in zip(sets, self.outs)]

    def hnd_sets(self):
        """The same caches stored head-major inside each block ([blocks, Hkv, block_size, D]),
        passed as a [blocks, block_size, Hkv, D] view: each (block, KV head) is one 4 KB run."""
        if not hasattr(self, "_hnd"):
            def hnd(c):
                return c.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
            self._hnd = [(q, hnd(kc), hnd(vc), table, lens) for q, kc, vc, table, lens in self.sets]
        return self._hnd

    def in_order_sets(self):
        """The same caches read through a table whose pages are physically in order."""
        table = (torch.arange(self.B * self.ctx // BS, device=DEV, dtype=torch.int32) + 1).view(self.B, -1)
        return [(q, kc, vc, table, lens) for q, kc, vc, _, lens in self.sets]

    def time(self, fns, check=True):
        if check:
            self.outs[0].fill_(float("nan"))
            fns[0]()
            torch.cuda.synchronize()
            err = ((self.outs[0].float() - self.ref).norm() / self.ref.norm()).item()
            assert err < 1e-2, f"wrong output: rel err {err:.2e}"
        return BK.bench_graph(fns)

    def sdpa(self):
        B, ctx = self.B, self.ctx
        contig = [(st[0].view(B, HQ, 1, D), BK.contiguous_kv(st[1], st[3], B, ctx, HKV, D),
                   BK.contiguous_kv(st[2], st[3], B, ctx, HKV, D)) for st in self.sets]
        out = F.scaled_dot_product_attention(*contig[0], scale=SCALE, enable_gqa=True).view(B, HQ, D).float()
        err = ((out - self.ref).norm() / self.ref.norm()).item()
        assert err < 1e-2, f"SDPA disagrees with ours: {err:.2e}"
        return [lambda c=c: F.scaled_dot_product_attention(*c, scale=SCALE, enable_gqa=True) for c in contig]

    def pct(self, t):
        return 100 * self.nbytes / t / self.copy_bw


def tiling(cfg):
    bn, st, w, regs, layout = cfg
    kw = dict(block_n=bn, num_stages=st, num_warps=w, layout=layout)
    if regs is not None:
        kw["maxnreg"] = regs
    return kw


def kernel_resources(fn, tag):
    """Grid, block, registers and shared memory of each kernel fn launches (profiler trace)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = os.path.join(ARGS.out, f"trace_{tag}.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    os.remove(path)
    return [dict(name=e["name"][:70], us=e.get("dur"), grid=e["args"].get("grid"), block=e["args"].get("block"),
                 regs=e["args"].get("registers per thread"), smem=e["args"].get("shared memory"))
            for e in events if e.get("cat") == "kernel"]


def part_resources(copy_bw, results):
    c = Case(64, CTX, copy_bw)
    sd = c.sdpa()
    rows = {}
    for tag, fn in (("ours", c.ours()[0]), ("ours_uncapped", c.ours(maxnreg=0)[0]),
                    ("ours_S4", c.ours(num_splits=4)[0]), ("sdpa", sd[0])):
        rows[tag] = kernel_resources(fn, tag)
        for r in rows[tag]:
            print(f"  [{tag}] {r['name'][:56]:56s} {r['us']} us grid {r['grid']} block {r['block']} "
                  f"regs {r['regs']} smem {r['smem']}")
    results["resources"] = rows


def part_tilings(copy_bw, results):
    c = Case(64, CTX, copy_bw)
    c.time(c.ours())  # warm-up, discarded (the first graph of a run is slow)
    rows = []
    for cfg in TILINGS:
        try:
            t = c.time(c.ours(**tiling(cfg)))
        except Exception as e:  # noqa: BLE001 - a tiling that does not fit: report and go on
            print(f"  {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
            continue
        rows.append(dict(cfg=cfg, us=t * 1e6, pct=c.pct(t)))
        print(f"  B=64 {str(cfg):32s} {t * 1e6:7.1f} us {c.pct(t):6.1f}%")
    top = [tuple(r["cfg"]) for r in sorted(rows, key=lambda r: r["us"])[:3]]
    if TILINGS[0] not in top:
        top.append(TILINGS[0])
    sd = c.sdpa()
    duel = []
    for rep in range(3):  # interleaved: each candidate, then SDPA
        for cfg in top:
            t = c.time(c.ours(**tiling(cfg)))
            t_sd = c.time(sd, check=False)
            duel.append(dict(cfg=cfg, us=t * 1e6, sdpa_us=t_sd * 1e6, ratio=t_sd / t))
            print(f"  duel {rep} {str(cfg):32s} ours {t * 1e6:6.1f} us ({c.pct(t):5.1f}%), SDPA {t_sd * 1e6:6.1f} us: "
                  f"SDPA/ours {t_sd / t:.3f}")
    results.update(tilings=rows, tiling_duel=duel)


def part_splits(copy_bw, results):
    c = Case(64, CTX, copy_bw)
    c.time(c.ours())
    sd = c.sdpa()
    in_order = c.ours(sets=c.in_order_sets())
    duel = []
    for rep in range(3):
        t_o, t_s, t_i, t_s2 = c.time(c.ours()), c.time(sd, False), c.time(in_order, False), c.time(sd, False)
        duel.append(dict(ours=t_o * 1e6, sdpa=t_s * 1e6, in_order=t_i * 1e6, sdpa2=t_s2 * 1e6))
        print(f"  duel {rep}: ours {t_o * 1e6:6.1f} us, SDPA {t_s * 1e6:6.1f} (SDPA/ours {t_s / t_o:.3f}); "
              f"pages in order {t_i * 1e6:6.1f}, SDPA {t_s2 * 1e6:6.1f} (SDPA/in-order {t_s2 / t_i:.3f})")
    del c, sd, in_order
    torch.cuda.empty_cache()
    fit = []
    for ctx in (1024, 2048, 4096, 8192):
        c = Case(64, ctx, copy_bw)
        c.time(c.ours())
        sd = c.sdpa()
        t_o, t_s = c.time(c.ours()), c.time(sd, check=False)
        fit.append(dict(ctx=ctx, bytes=c.nbytes, ours=t_o * 1e6, sdpa=t_s * 1e6))
        print(f"  B=64 ctx={ctx:5d}: ours {t_o * 1e6:7.1f} us ({c.pct(t_o):5.1f}%), SDPA {t_s * 1e6:7.1f} us "
              f"({c.pct(t_s):5.1f}%)")
        del c, sd
        torch.cuda.empty_cache()
    for who in ("ours", "sdpa"):  # time = fixed + bytes / rate, least squares
        xs = torch.tensor([f["bytes"] for f in fit], dtype=torch.float64)
        ys = torch.tensor([f[who] for f in fit], dtype=torch.float64)
        coef = torch.linalg.lstsq(torch.stack([torch.ones_like(xs), xs], 1), ys[:, None]).solution[:, 0]
        rate = 1 / coef[1].item() * 1e6  # bytes per second
        print(f"  fit {who}: {coef[0].item():.1f} us + bytes at {rate / 1e9:.0f} GB/s ({100 * rate / copy_bw:.1f}% of copy)")
    grid = []
    for B in GRID_BATCHES:
        c = Case(B, CTX, copy_bw)
        c.time(c.ours())
        line = dict(B=B, sdpa=c.pct(c.time(c.sdpa(), check=False)),
                    default_splits=K.choose_num_splits(B, HKV, CTX, torch.cuda.get_device_properties(DEV).multi_processor_count))
        for s in (1, 2, 4, 8):
            line[f"S{s}"] = c.pct(c.time(c.ours(num_splits=s)))
        line["S4 merge 4 warps"] = c.pct(c.time(c.ours(num_splits=4, merge_warps=4)))
        grid.append(line)
        print(f"  B={B:3d} ({B * HKV} programs unsplit): " + " ".join(
            f"{k} {v:5.1f}%" if isinstance(v, float) else f"{k} {v}" for k, v in line.items() if k != "B"))
        del c
        torch.cuda.empty_cache()
    results.update(split_duel=duel, fit=fit, split_grid=grid)


def part_batches(copy_bw, results):
    rows = []
    for B in BATCHES:
        c = Case(B, CTX, copy_bw)
        c.time(c.ours())
        t_d, t_1, t_s = c.time(c.ours()), c.time(c.ours(num_splits=1)), c.time(c.sdpa(), check=False)
        rows.append(dict(B=B, ours_pct=c.pct(t_d), one_split_pct=c.pct(t_1), sdpa_pct=c.pct(t_s), sdpa_over_ours=t_s / t_d))
        print(f"  B={B:3d}: ours {c.pct(t_d):5.1f}%  (1 split {c.pct(t_1):5.1f}%)  SDPA {c.pct(t_s):5.1f}%  "
              f"SDPA/ours {t_s / t_d:.3f}")
        del c
        torch.cuda.empty_cache()
    c = Case(1, LONG_CTX, copy_bw)
    c.time(c.ours())
    t_d, t_s = c.time(c.ours()), c.time(c.sdpa(), check=False)
    print(f"  B=1 x {LONG_CTX}: ours {t_d * 1e6:.1f} us ({c.pct(t_d):.1f}%), SDPA {t_s * 1e6:.1f} us ({c.pct(t_s):.1f}%)")
    results.update(batches=rows, long=dict(ours_us=t_d * 1e6, sdpa_us=t_s * 1e6, ours_pct=c.pct(t_d)))


def main():
    props = torch.cuda.get_device_properties(DEV)
    copy_bw, _ = BK.copy_bandwidth()
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}; "
          f"copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    results = dict(copy_gbps=copy_bw / 1e9, sms=props.multi_processor_count)
    parts = dict(resources=part_resources, tilings=part_tilings, splits=part_splits, batches=part_batches)
    for name, fn in parts.items():
        if ARGS.part in ("all", name):
            print(f"-- {name}")
            fn(copy_bw, results)
            torch.cuda.empty_cache()
    with open(os.path.join(ARGS.out, f"exp_decode_waves_{ARGS.part}.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--part", choices=("all", "resources", "tilings", "splits", "batches"), default="all")
    ARGS = p.parse_args()
    os.makedirs(ARGS.out, exist_ok=True)
    main()
