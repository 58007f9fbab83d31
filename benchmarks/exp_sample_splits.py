"""Experiment (issue 20 item 2): the sampling kernel with one program per row against rows split
over several programs, at the decode batch sizes of the throughput workload.

    PYTHONPATH=. python benchmarks/exp_sample_splits.py [--batches 1,16,32,64,128,256] [--smoke]

A decode step of the throughput workload spent ~0.2 ms sampling at batch 256 (the fourth
session's profile): one program per row, each streaming its 151,936 float32 logits (600 KB)
alone. At batch 32 that is 32 programs on an H200's 132 SMs. This times kernels.sample (temperature
0.6, the workload's; CUDA graph replays) with splits=1 and with the launcher's choice
(choose_sample_splits) and a few fixed split counts, checks that every variant draws the same
tokens as splits=1 (the same tiling's log), and prints the time and the logits' bytes against the
copy bandwidth. Also: the exact outer log of the noise (before the fast one) and other chunk sizes
(the launcher's 2048 entries and 16 warps: 4 entries per thread, two programs per SM).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

VOCAB = 151936


def main():
    import bench_kernels as BK  # registers kernels/ as labengine.kernels in a source checkout
    from labengine.kernels.sampling import _num_sms, choose_sample_splits, sample

    dev, smoke, copy_bw, batches = BK.experiment_setup("1,16,32,64,128,256", [3])
    vocab = 5000 if smoke else VOCAB
    block = 1024 if smoke else 2048  # the launcher's default chunk
    sms = _num_sms(torch.cuda.current_device()) if dev.type == "cuda" else 4
    rows = []
    for B in batches:
        gen = torch.Generator(device=dev).manual_seed(B)
        n_sets = 1 if smoke else max(2, -(-3 * 60 * 10**6 // (B * vocab * 4)))  # >= 3x the L2
        sets = [torch.randn(B, vocab, device=dev, generator=gen) * 3 for _ in range(n_sets)]
        temps = torch.full((B,), 0.6, device=dev)
        auto = choose_sample_splits(B, vocab, block, sms)
        # (label, splits, keyword arguments): the launcher's tiling with its fast outer log, then
        # the exact log, then the fifth session's tiling (4096-entry chunks: 8 entries per thread,
        # ~117 registers, one program per SM) and 1024-entry chunks of 8 warps (four per SM)
        variants = [("1 program per row", 1, {}), (f"auto ({auto} per row)", None, {}),
                    (f"auto ({auto} per row), exact log", None, dict(fast_log=False))]
        variants += [(f"{k} per row", k, {}) for k in (2, 4, 8, 16) if k != auto and k * B <= 8 * sms]
        if not smoke:
            for bv, nw, per_sm in ((4096, 16, 1), (1024, 8, 4)):
                k = max(1, min(round(per_sm * sms / B), -(-vocab // bv)))
                variants.append((f"{bv}-entry chunks, {nw} warps, {k} per row", k, dict(block_v=bv, num_warps=nw)))
        ref = {False: sample(sets[0], temps, base_seed=3, block_v=block, splits=1, fast_log=False)[0],
               None: sample(sets[0], temps, base_seed=3, block_v=block, splits=1)[0]}
        for label, splits, kw in variants:
            kw = dict(dict(block_v=block), **kw)
            fns = [lambda lg=lg: sample(lg, temps, base_seed=3, splits=splits, **kw) for lg in sets]
            got = fns[0]()[0]
            assert torch.equal(got, ref[kw.get("fast_log")]), f"B={B} {label}: other tokens than one program per row"
            if smoke:
                rows.append((B, label, float("nan"), float("nan")))
                continue
            t = BK.bench_graph(fns)
            pct = 100 * B * vocab * 4 / t / copy_bw
            rows.append((B, label, t * 1e6, pct))
            print(f"B={B} {label}: {t * 1e6:.1f} us, logits at {pct:.1f} % of copy bandwidth", flush=True)
    print("\n| batch | sampling kernel | us | logits read at % of copy bandwidth | vs 1 per row |")
    print("|---|---|---|---|---|")
    base = {B: t for B, label, t, _ in rows if label == "1 program per row"}
    for B, label, t, pct in rows:
        print(f"| {B} | {label} | {t:.1f} | {pct:.1f} | {base[B] / t:.2f} |")


if __name__ == "__main__":
    main()
