"""Experiment (issue 20 item 2): balanced splits for the decode kernel on a real batch's lengths.

    PYTHONPATH=. python benchmarks/exp_decode_balance.py [--batches 16,32,48,64,96,128,192,256] [--smoke]

When a decode step's (sequence, KV head) programs fit in about one wave, they all start at once
and the longest sequence's program decides the kernel's time alone (the fourth session: batch 64
of the workload's lengths at 69-78 % of copy bandwidth, against 94-99 % at batch 128-256). With
balanced splits (`split_len`) no program takes more than split_len keys: a long sequence runs
as several programs, merged afterwards. This times, on the same inputs (graph replays over input
sets several times the L2, max_seq_len = 4096 as under the engine's CUDA graphs), for the
workload's lengths mid-run (prompt 100-1,024 + part of a 100-1,024 output) and late in the run
(the longest requests, well into their outputs: 1,100-2,048 keys and a few short):

  before           longest first, splits from choose_num_splits(max_seq_len=4096): the engine
                   of the fourth session
  balanced (auto)  split_len = choose_split_len(lengths), the grid's splits from
                   balanced_num_splits: what the engine passes now
  share X: L x 8   the policy at another SLOT_SHARE (the split length it picks)
  split_len=L      BALANCED_SPLITS splits in the grid, L keys per split (the sweep the policy
                   is checked against)
  no split, 8-split grid   the split grid with one split per sequence (the idle programs' cost)

after a discarded warm-up variant (the first variant timed on fresh inputs ran ~12 % slow)

and prints each against the device's copy bandwidth (bytes: q, K, V, out). Every variant's output
is checked against the PyTorch reference first. --smoke: a small batch on whatever device there
is (checks the script).
"""
from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from exp_decode_order import (  # noqa: E402
    D, HKV, HQ, MAX_MODEL_LEN, SCALE, checked_calls, inputs, print_table, record, workload_lens,
)

SWEEP = (256, 512, 768, 1024, 1536, 2048)
SHARES = (1.0, 1.5, 2.0)


def late_lens(B, gen):
    """A late decode step: most sequences long (1,100-2,048 keys), one in eight short (100-400)."""
    long = torch.randint(1100, 2049, (B,), generator=gen)
    short = torch.randint(100, 401, (B,), generator=gen)
    pick = torch.rand(B, generator=gen) < 0.125
    return torch.where(pick, short, long).tolist()


def main():
    import bench_kernels as BK  # registers kernels/ as labengine.kernels in a source checkout
    DA = sys.modules["labengine.kernels.decode_attention"]  # the module (the package exports the launcher by that name)
    from labengine.kernels.decode_attention import (
        BALANCED_SPLITS, _decode_slots, _device_index, balanced_num_splits, choose_split_len,
        decode_attention_ref, longest_first,
    )

    dev, smoke, copy_bw, batches = BK.experiment_setup("16,32,48,64,96,128,192,256", [4])
    slots = _decode_slots(D, torch.bfloat16, _device_index(dev))[0]
    print(f"{slots} program slots", flush=True)
    rows = []
    for B in batches:
        gen = torch.Generator().manual_seed(B)
        for case, ls in (("mid-run", workload_lens(B, gen)), ("late", late_lens(B, gen))):
            if smoke:
                ls = [min(n, 300) for n in ls]
            kv = 2 * sum(ls) * HKV * D * 2
            n_sets = 1 if smoke else max(2, -(-3 * 60 * 10**6 // kv))  # >= 3x the L2 in total
            sets = [inputs(ls, dev, seed=s) for s in range(n_sets)]
            nbytes = kv + 2 * B * HQ * D * 2
            order = torch.tensor(longest_first(ls).tolist(), dtype=torch.int32, device=dev)
            auto = choose_split_len(ls, HKV, slots)
            grid_splits = balanced_num_splits(B, HKV, slots)
            # "warm-up": the first variant timed on fresh inputs ran ~12 % slow (the second session
            # of 2026-12-04: "before" and "auto" were the same kernel at batch 192/256): not reported
            variants = [("warm-up", None, None), ("before", None, None),
                        (f"balanced (auto: {auto} x {grid_splits})", auto, None)]
            for share in SHARES:  # the policy at other SLOT_SHAREs
                saved, DA.SLOT_SHARE = DA.SLOT_SHARE, share
                L = choose_split_len(ls, HKV, slots)
                DA.SLOT_SHARE = saved
                variants.append((f"share {share}: {L} x {BALANCED_SPLITS}", L, BALANCED_SPLITS))
            variants += [(f"split_len={L}", L, BALANCED_SPLITS) for L in SWEEP if L < max(ls) + 64]
            variants.append((f"no split, {BALANCED_SPLITS}-split grid", MAX_MODEL_LEN, BALANCED_SPLITS))
            q, kc, vc, table, sl = sets[0]
            ref = decode_attention_ref(q, kc, vc, table, sl, SCALE, compute_dtype=torch.float32)
            for label, L, splits in variants:
                lt = None if L is None else torch.tensor([L], dtype=torch.int32, device=dev)
                fns, _ = checked_calls(sets, ref, f"B={B} {case} {label}", order=order, num_splits=splits,
                                       split_len=lt)
                if smoke:
                    if label != "warm-up":
                        rows.append((B, case, label, float("nan"), float("nan")))
                    continue
                t = BK.bench_graph(fns)
                if label == "warm-up":
                    continue
                record(rows, B, case, label, t, nbytes, copy_bw, ls)
            del sets
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    print_table(rows, "decode kernel", "before")


if __name__ == "__main__":
    main()
