"""Experiment (issue 20 item 2): the decode step's projection GEMMs, cuBLAS against a Triton GEMM
tiled for few rows.

    PYTHONPATH=. python benchmarks/exp_decode_gemm.py [--batches 256,128,64] [--smoke]

A Qwen3-0.6B decode step at batch 256 spends ~0.79 ms in its four projection GEMMs per step
(28 layers; the fourth session's profile): cuBLAS picks 64x32 .. 128x64 tiles and runs them at
~280 TFLOP/s, where the weights alone (the bytes the roofline counts) would take a quarter of
that time. This times y = x @ W^T (nn.Linear's layout, bf16) for the step's shapes (qkv
1024->4096, o 2048->1024, gate_up 1024->6144, down 3072->1024) at M = batch rows, with the
weights rotated over copies 3x the L2 (as in the step, where 28 layers' weights stream from HBM):
cuBLAS (F.linear) against a plain Triton GEMM over a few tilings, with and without split-K
(fp32 partial sums added atomically, then cast: both kernels timed). Every variant is checked
against F.linear first. Measurement only: the engine does not use this kernel. Also: F.linear with
cuBLASLt preferred and under PyTorch's TunableOp, cuBLAS over K slices as one batched GEMM plus a
sum, and a one-launch Triton split-K. On the H200 (RESULTS.md, seventh session) none of them beat
cuBLAS's pick at M = 64-256: TunableOp keeps it, splitting K is slower on every path.
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

SHAPES = {"qkv": (1024, 4096), "o": (2048, 1024), "gate_up": (1024, 6144), "down": (3072, 1024)}  # (K, N)
TILINGS = [(64, 64, 128, 1, 4, 4), (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (64, 64, 128, 2, 4, 4),
           (64, 128, 64, 2, 4, 4), (128, 64, 64, 2, 4, 4), (64, 64, 64, 4, 4, 4), (128, 128, 64, 4, 8, 3)]
# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
# seventh session (2026-12-04, written without a GPU): the one-launch split-K kernel's tilings
FIXUP_TILINGS = [(64, 64, 128, 2, 4, 4), (64, 64, 128, 4, 4, 4), (64, 64, 64, 8, 4, 4), (128, 64, 64, 4, 4, 4),
                 (128, 64, 128, 2, 4, 3), (64, 128, 64, 4, 4, 4), (128, 128, 64, 4, 8, 3), (64, 64, 128, 3, 4, 4)]


@triton.jit
def _partial_tile(X, W, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    """This program's fp32 tile of X @ W^T over its K split: (acc, offs_m, offs_n). Grid (N tiles,
    M tiles, SPLIT_K), N fastest: the programs of one row block share the activations."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k0 = tl.program_id(2) * k_per
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(k0, tl.minimum(k0 + k_per, K), BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        x = tl.load(X + offs_m[:, None] * K + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = tl.load(W + offs_n[None, :] * K + offs_k[:, None], mask=offs_n[None, :] < N, other=0.0)
        if IEEE:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
    return acc, offs_m, offs_n


@triton.jit
def _gemm_kernel(
    X,  # [M, K] activations, row-major
    W,  # [N, K] weights (nn.Linear), row-major
    Y,  # [M, N] output (SPLIT_K == 1: x.dtype; else fp32, zeroed, partial sums added)
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,  # the interpreter (--smoke on a CPU): exact fp32 dots, as labengine's kernels
):
    acc, offs_m, offs_n = _partial_tile(X, W, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, IEEE)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = Y + offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")


@triton.jit
def _gemm_splitk_fixup_kernel(
    X,  # [M, K] activations, row-major
    W,  # [N, K] weights (nn.Linear), row-major
    Y,  # [M, N] output, x.dtype
    Part,  # [SPLIT_K, M, N] fp32 workspace: each split's partial sums
    Count,  # [tiles] int32, zero between calls: splits of each output tile done so far
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Split-K in one launch: each split stores its fp32 partial tile, counts itself in the
    tile's counter (release/acquire), and the split that comes last sums the others' partials into
    its own, writes the output and resets the counter (so CUDA-graph replays find it at zero)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    acc, offs_m, offs_n = _partial_tile(X, W, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, IEEE)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    offs = offs_m[:, None] * N + offs_n[None, :]
    tl.store(Part + pid_k * M * N + offs, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial stored before the tile is counted
    tile = pid_m * tl.num_programs(0) + pid_n
    done = tl.atomic_add(Count + tile, 1, sem="acq_rel", scope="gpu")
    if done == SPLIT_K - 1:
        for s in range(SPLIT_K):
            if s != pid_k:
                acc += tl.load(Part + s * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)
        tl.atomic_xchg(Count + tile, 0, sem="relaxed", scope="gpu")


def gemm_fixup(x, w, bm, bn, bk, split, warps, stages, part, count):
    """y = x @ w^T by the one-launch split-K kernel (part, count: its workspace; count zeroed once)."""
    M, K = x.shape
    N = w.shape[0]
    assert K % (bk * split) == 0
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemm_splitk_fixup_kernel[grid](x, w, y, part, count, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                    SPLIT_K=split, IEEE=x.device.type != "cuda", num_warps=warps,
                                    num_stages=stages)
    return y


def bmm_split_linear(x, w, split):
    """F.linear as `split` cuBLAS GEMMs over slices of K in one batched call, then their sum: more
    thread blocks for the few output tiles of N = 1024 (o, down)."""
    M, K = x.shape
    N = w.shape[0]
    xs = x.view(M, split, K // split).transpose(0, 1)  # [split, M, K/split]
    ws = w.view(N, split, K // split).permute(1, 2, 0)  # [split, K/split, N]
    return torch.bmm(xs, ws).sum(0, dtype=torch.float32).to(x.dtype)


def gemm(x, w, bm, bn, bk, split, warps, stages, acc=None):
    M, K = x.shape
    N = w.shape[0]
    assert K % (bk * split) == 0
    grid = (triton.cdiv(N, bn), triton.cdiv(M, bm), split)
    if split == 1:
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        _gemm_kernel[grid](x, w, y, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1,
                           IEEE=x.device.type != "cuda", num_warps=warps, num_stages=stages)
        return y
    acc.zero_()
    _gemm_kernel[grid](x, w, acc, M, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split,
                       IEEE=x.device.type != "cuda", num_warps=warps, num_stages=stages)
    return acc.to(x.dtype)


def with_blas_library(lib, x, w):
    """F.linear with torch's BLAS backend preference set to lib ("cublas" or "cublaslt") for this
    call (does cuBLASLt's heuristic pick better tiles at M <= 256? On the H200: within 0.5 us)."""
    prev = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(lib)
    try:
        return F.linear(x, w)
    finally:
        torch.backends.cuda.preferred_blas_library(prev)


def tuned_linear(x, w):
    """F.linear under PyTorch's TunableOp (torch.cuda.tunable): the first call for a shape times
    the BLAS solutions it can enumerate and keeps the fastest (results written to a file in the
    temporary folder at exit; on the H200 it kept cuBLAS's pick for every shape)."""
    tunable = torch.cuda.tunable
    was = tunable.is_enabled()
    tunable.enable(True)
    tunable.tuning_enable(True)
    tunable.set_filename(os.path.join(tempfile.gettempdir(), f"tunableop_{os.getpid()}.csv"))
    try:
        return F.linear(x, w)
    finally:
        tunable.enable(was)


def main():
    import bench_kernels as BK

    dev, smoke, copy_bw, batches = BK.experiment_setup("256,128,64", [16])
    shapes = {"qkv": (128, 256)} if smoke else SHAPES
    tilings = [(16, 32, 32, 1, 4, 1), (16, 32, 32, 2, 4, 1)] if smoke else TILINGS
    print("| M | shape | kernel | us | TFLOP/s | weight bytes at % of copy | cuBLAS / this |")
    print("|---|---|---|---|---|---|---|")
    for M in batches:
        for name, (K, N) in shapes.items():
            copies = 1 if smoke else max(2, -(-3 * 60 * 2**20 // (N * K * 2)))
            ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * K**-0.5 for _ in range(copies)]
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, ws[0]).float()
            acc = torch.empty(M, N, device=dev, dtype=torch.float32)
            flops, wbytes = 2 * M * N * K, N * K * 2
            variants = [("cuBLAS (F.linear)", lambda w: F.linear(x, w))]
            if not smoke:
                variants += [("cuBLASLt preferred (F.linear)", lambda w: with_blas_library("cublaslt", x, w)),
                             ("TunableOp-tuned (F.linear)", lambda w: tuned_linear(x, w))]
                variants += [(f"cuBLAS bmm split{sp} + sum", lambda w, sp=sp: bmm_split_linear(x, w, sp))
                             for sp in (2, 4) if K % sp == 0]
            fixups = [(16, 32, 32, 2, 4, 1)] if smoke else FIXUP_TILINGS
            part = torch.empty(max(t[3] for t in fixups), M, N, device=dev, dtype=torch.float32)
            count = torch.zeros(4096, device=dev, dtype=torch.int32)
            for t in fixups:
                if K % (t[2] * t[3]) == 0:
                    variants.append((f"triton one-launch split-K M{t[0]} N{t[1]} K{t[2]} split{t[3]} w{t[4]} s{t[5]}",
                                     lambda w, t=t: gemm_fixup(x, w, *t, part=part, count=count)))
            for t in tilings:
                bm, bn, bk, split, warps, stages = t
                if K % (bk * split):
                    continue
                variants.append((f"triton M{bm} N{bn} K{bk} split{split} w{warps} s{stages}",
                                 lambda w, t=t: gemm(x, w, *t, acc=acc)))
            base = None
            for label, fn in variants:
                try:
                    got = fn(ws[0]).float()
                    err = ((got - ref).norm() / ref.norm()).item()
                    assert err < 2e-2, f"rel err {err:.1e}"
                    if smoke:
                        print(f"| {M} | {name} | {label} | - | - | - | - |")
                        continue
                    t_s = BK.bench_graph([lambda w=w, fn=fn: fn(w) for w in ws])
                    # again after the replays (the one-launch split-K must have reset its counters)
                    err2 = ((fn(ws[0]).float() - ref).norm() / ref.norm()).item()
                    assert err2 < 2e-2 and int(count.sum()) == 0, f"after timing: rel err {err2:.1e}, counters {int(count.sum())}"
                except Exception as e:  # a tiling that does not compile: say so and go on
                    print(f"| {M} | {name} | {label} | failed: {type(e).__name__}: {str(e)[:60]} | | | |")
                    continue
                base = base or t_s
                print(f"| {M} | {name} | {label} | {t_s * 1e6:.1f} | {flops / t_s / 1e12:.0f} | "
                      f"{100 * wbytes / t_s / copy_bw:.0f} | {base / t_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
