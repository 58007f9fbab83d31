"""Experiment (issue 20 item 2, not yet run on a GPU): what programmatic dependent launch (PDL)
saves per kernel boundary inside a CUDA graph, on Hopper.

    PYTHONPATH=. python benchmarks/exp_pdl.py [--kernels 280] [--smoke]

A decode step of the throughput workload is ~280 kernels (28 layers of RMSNorm, QKV GEMM, q/k
norm + rotary, KV store, attention, O GEMM, RMSNorm, gate-up GEMM, SiLU-and-multiply, down
GEMM) plus logits and sampling, replayed as one CUDA graph. At batch 1-32 the step is
launch-bound (2.3 ms against 0.9 ms of memory traffic) and each small kernel costs ~2 us for
well under 1 us of work. With PDL (`launch_pdl=True`; the kernel calls `gdc_launch_dependents`
early and `gdc_wait` before it reads its input) the next kernel is launched while the previous
one drains, and its prologue overlaps the previous one's tail. This times, as graph replays:

  small chain     N tiny Triton kernels (y = x * a + b on a [256, 1024] bf16 tile), each
                  reading the previous one's output: plain launches, then with PDL
  with GEMMs      the same kernels alternating with cuBLAS GEMMs (F.linear, M = 256,
                  1024 -> 1024): PDL on the Triton kernels only (cuBLAS launches as torch does)

and prints microseconds per kernel and the projected saving for a decode step's boundaries.
Every variant's result is checked against the plain chain's. --smoke: a short chain on
whatever device there is, plain launches only (the interpreter has no PDL).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

try:  # triton >= 3.4 on NVIDIA
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _axpb_kernel(
    X,  # [n] input (the previous kernel's output)
    Y,  # [n] output
    n, a, b,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with launch_pdl=True: let the next kernel launch, wait for the previous
):
    if PDL:
        gdc_launch_dependents()  # the next kernel may launch now; its gdc_wait holds it until we finish
        gdc_wait()  # the previous kernel's writes are visible after this
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x * a + b).to(Y.dtype.element_ty), mask=mask)


def axpb(x, y, pdl: bool, block=1024):
    n = x.numel()
    kw = dict(launch_pdl=True) if pdl else {}
    _axpb_kernel[(triton.cdiv(n, block),)](x, y, n, 0.999, 0.001, BLOCK=block, PDL=pdl, num_warps=4, **kw)
    return y


def chain(bufs, n_kernels, pdl, weight=None):
    """n_kernels launches ping-ponging between two buffers (a GEMM before each when weight is given)."""
    x, y = bufs
    for _ in range(n_kernels):
        if weight is not None:
            x = F.linear(x, weight)
        axpb(x, y, pdl)
        x, y = y, (bufs[0] if y is bufs[1] else bufs[1])
    return x


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", type=int, default=280)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    import bench_kernels as BK

    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    smoke = dev.type != "cuda"
    n = 4 if smoke else args.kernels
    cap = torch.cuda.get_device_capability() if dev.type == "cuda" else (0, 0)
    can_pdl = gdc_wait is not None and cap[0] >= 9
    print(f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, triton {triton.__version__}, "
          f"PDL {'available' if can_pdl else 'not available'}", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(256, 1024, device=dev, dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16, generator=gen) / 32).contiguous()
    rows = []
    for label, weight in (("small chain", None), ("with GEMMs", w)):
        results = {}
        for pdl in ((False, True) if can_pdl else (False,)):
            bufs = (x0.clone(), torch.empty_like(x0))
            out = chain(bufs, n, pdl, weight)
            results[pdl] = out.clone()
            if smoke:
                continue
            bufs = (x0.clone(), torch.empty_like(x0))
            t = BK.bench_graph([lambda: chain(bufs, n, pdl, weight)]) * 1e6  # us per graph replay
            rows.append((label, pdl, t, t / n))
            print(f"{label}, {'PDL' if pdl else 'plain'}: {t:.1f} us for {n} kernels ({t / n:.2f} us each)", flush=True)
        if True in results:
            assert torch.equal(results[True], results[False]), f"{label}: PDL changed the result"
    if smoke:
        print("smoke: chains ran (no timing)")
        return
    print("\n| chain | launches | us per kernel (incl. GEMM) | PDL saves per boundary |")
    print("|---|---|---|---|")
    for label in ("small chain", "with GEMMs"):
        plain = [r for r in rows if r[0] == label and not r[1]][0]
        pdl = [r for r in rows if r[0] == label and r[1]]
        save = plain[3] - pdl[0][3] if pdl else float("nan")
        print(f"| {label} | plain | {plain[3]:.2f} | - |")
        if pdl:
            print(f"| {label} | PDL | {pdl[0][3]:.2f} | {save:.2f} us (x 280 per decode step: {280 * save / 1e3:.3f} ms) |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
