"""Experiment (issue 20 item 2): the decode kernel on a real batch's lengths, in batch order and
longest first.

    PYTHONPATH=. python benchmarks/exp_decode_order.py [--batches 256,128,64] [--smoke]

On the throughput workload's decode steps the kernel reached 87 % of copy bandwidth (the fifth
session's profile), against 98-104 % on benchmark batches where every sequence has the same
length. A real batch mixes lengths (prompts of 100-1,024 tokens, each at its own point of a
100-1,024-token output), and the GPU starts a grid's programs in about grid order, giving each
SM the next one as a slot frees: the programs that start last decide when the kernel ends.
This times, for the same inputs (graph replays over input sets several times the L2, as in
bench_kernels.py; max_seq_len = 4096 as under the engine's CUDA graphs):

  batch order      row i = sequence i (the kernel before 2026-12-04, fourth session)
  longest first    `order = longest_first(lens)` (the launcher's default in the engine)
  shortest first   the worst order, for scale
  ... x splits     the same with num_splits=2 (the launcher picks 1 at these batches)
  batch order, X   other tilings (BLOCK_N, stages, warps) on the real lengths
  equal lengths    every sequence at the batch's mean length: the balanced case, same bytes

and prints each against the device's copy bandwidth (bytes: q, K, V, out). Every variant's
output is checked against the PyTorch reference first (the orders give identical bits).
--smoke: a small batch on whatever device there is (checks the script).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

HQ, HKV, D, BS = 32, 8, 128, 16
SCALE = D**-0.5
MAX_MODEL_LEN = 4096


def workload_lens(B, gen):
    """Lengths of one decode step of throughput.py's workload, mid-run: a prompt of 100-1024
    tokens plus a point of its 100-1024-token output."""
    prompt = torch.randint(100, 1025, (B,), generator=gen)
    out = torch.randint(100, 1025, (B,), generator=gen)
    done = (torch.rand(B, generator=gen) * out).long()
    return (prompt + done + 1).tolist()


def inputs(lens, dev, seed):
    """q, k_cache, v_cache, table (shuffled physical pages), seq_lens for these lengths."""
    g = torch.Generator(device=dev).manual_seed(seed)
    pages = [-(-n // BS) for n in lens]
    total = sum(pages)
    kc = torch.randn(total + 1, BS, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    vc = torch.randn(total + 1, BS, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    perm = torch.randperm(total, device=dev, generator=g).to(torch.int32) + 1
    table = torch.zeros(len(lens), MAX_MODEL_LEN // BS, dtype=torch.int32, device=dev)
    at = 0
    for i, p in enumerate(pages):
        table[i, :p] = perm[at:at + p]
        at += p
    q = torch.randn(len(lens), HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32, device=dev)


def checked_calls(sets, ref, what, **kw):
    """One decode_attention call per input set (each with its own output), the first run once
    and checked against ref; returns (calls, outputs). Also used by exp_decode_balance.py."""
    from labengine.kernels.decode_attention import decode_attention

    outs = [torch.empty(st[0].shape, dtype=torch.bfloat16, device=st[0].device) for st in sets]
    fns = [lambda st=st, o=o: decode_attention(*st, SCALE, max_seq_len=MAX_MODEL_LEN, out=o, **kw)
           for st, o in zip(sets, outs)]
    fns[0]()
    if outs[0].is_cuda:
        torch.cuda.synchronize()
    err = ((outs[0].float() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, f"{what}: rel err {err:.2e}"
    return fns, outs


def record(rows, B, case, label, t, nbytes, copy_bw, lens):
    """Append (B, case, label, us, % of copy bandwidth) for a variant timed at t seconds per call,
    and print it (also used by exp_decode_balance.py)."""
    pct = 100 * nbytes / t / copy_bw
    rows.append((B, case, label, t * 1e6, pct))
    print(f"B={B} {case} (mean len {sum(lens) / B:.0f}, max {max(lens)}) {label}: {t * 1e6:.1f} us, "
          f"{pct:.1f} % of copy bandwidth", flush=True)


def print_table(rows, column, vs_label, base_case=None):
    """rows as a markdown table; the last column is the time of the row labelled vs_label (in the
    same case, or in base_case) over each row's (also used by exp_decode_balance.py)."""
    print(f"\n| batch | lengths | {column} | us | % of copy bandwidth | vs {vs_label} |")
    print("|---|---|---|---|---|---|")
    base = {(B, case): t for B, case, label, t, _ in rows if label == vs_label}
    for B, case, label, t, pct in rows:
        ref = base.get((B, base_case or case), float("nan"))
        print(f"| {B} | {case} | {label} | {t:.1f} | {pct:.1f} | {ref / t if t == t else float('nan'):.3f} |")


def main():
    import bench_kernels as BK  # registers kernels/ as labengine.kernels in a source checkout
    from labengine.kernels.decode_attention import decode_attention_ref, longest_first

    dev, smoke, copy_bw, batches = BK.experiment_setup("256,128,64", [4])
    rows = []
    for B in batches:
        gen = torch.Generator().manual_seed(B)
        lens = workload_lens(B, gen)
        mean = round(sum(lens) / B)
        cases = {"workload": lens, "equal lengths": [mean] * B}
        for case, ls in cases.items():
            kv = 2 * sum(ls) * HKV * D * 2
            n_sets = 1 if smoke else max(2, -(-3 * 60 * 10**6 // kv))  # >= 3x the L2 in total
            sets = [inputs(ls, dev, seed=s) for s in range(n_sets)]
            nbytes = kv + 2 * B * HQ * D * 2
            asc = sorted(range(B), key=lambda i: (ls[i], i))
            orders = {"batch order": None, "longest first": longest_first(ls).tolist(), "shortest first": asc}
            variants = []
            for name, order in orders.items():
                if case == "equal lengths" and name != "batch order":
                    continue
                for splits in (None, 2):
                    variants.append((f"{name}" + ("" if splits is None else f", {splits} splits"), order, splits, {}))
            if case == "workload":  # other tilings on the real lengths, batch order
                for kw in (dict(block_n=128), dict(block_n=32), dict(block_n=32, num_stages=3),
                           dict(num_warps=8), dict(num_stages=3)):
                    variants.append(("batch order, " + " ".join(f"{k}={v}" for k, v in kw.items()), None, None, kw))
                for kw in (dict(num_stages=3), dict(block_n=128), dict(block_n=128, num_stages=3)):
                    variants.append(("longest first, " + " ".join(f"{k}={v}" for k, v in kw.items()),
                                     orders["longest first"], None, kw))
                variants.append(("longest first, 2 splits, num_stages=3", orders["longest first"], 2,
                                 dict(num_stages=3)))
            q, kc, vc, table, sl = sets[0]
            ref = decode_attention_ref(q, kc, vc, table, sl, SCALE, compute_dtype=torch.float32)
            first = None
            for label, order, splits, kw in variants:
                ot = None if order is None else torch.tensor(order, dtype=torch.int32, device=dev)
                fns, outs = checked_calls(sets, ref, f"{case} {label}", num_splits=splits, order=ot, **kw)
                if splits is None and first is None:
                    first = outs[0].clone()
                elif splits is None and not kw:
                    assert torch.equal(outs[0], first), f"{case} {label}: the order changed the bits"
                t = fns[0]() if smoke else BK.bench_graph(fns)
                if smoke:
                    rows.append((B, case, label, float("nan"), float("nan")))
                    continue
                record(rows, B, case, label, t, nbytes, copy_bw, ls)
            del sets
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, "programs take sequences", "batch order", base_case="workload")


if __name__ == "__main__":
    main()
