"""A/B offline throughput of two source trees, alternating (issue 21 item 6: TP=1 speed before
and after tensor parallelism).

    python benchmarks/ab_throughput.py --trees before=.gl/old,after=.gl/tp [--rounds 2] [--repeats 3]

Each tree is a folder holding labengine/, kernels/ and benchmarks/throughput.py of one commit
(`git archive <commit> labengine kernels benchmarks/throughput.py | tar -x -C <folder>`).
Every round runs each tree in a process of its own, in the order given (A, B, A, B, ...), so a
drift of the machine over the minutes of the run hits both trees alike. In its process a tree
builds the engine once with its own throughput.py's hand-tuned settings and runs that
script's workload (256 requests, 100-1024 in/out, Qwen3-0.6B shapes, random bf16 weights, the
same checkpoint for both trees) --repeats times. Prints every time, each tree's median, and the
ratio of the medians. --smoke: the tiny config on whatever device there is (checks the script).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def child(args):
    """Run in a tree's own process: its labengine, its throughput.py."""
    tree = os.path.abspath(args.child)
    sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
    import throughput as T  # the tree's own script

    import labengine

    where = os.path.dirname(os.path.abspath(labengine.__file__))
    assert where.startswith(tree), f"labengine came from {where}, not from the tree {tree}"
    prompts, outputs = T.workload(16, 8, 40) if args.smoke else T.workload(256)
    llm = T.make_llm(args.model_path, 128 if args.smoke else 2048)
    times = [T.run_labengine(llm, prompts, outputs) for _ in range(args.repeats)]
    with open(args.json, "w") as f:
        json.dump(dict(times=times, output_tokens=sum(outputs), labengine=where,
                       distributed=os.path.isdir(os.path.join(where, "distributed"))), f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", default="before=.gl/old,after=.gl/tp", help="comma list of NAME=FOLDER (two or more)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    trees = [t.split("=", 1) for t in args.trees.split(",")]
    for name, folder in trees:
        if not os.path.isfile(os.path.join(folder, "benchmarks", "throughput.py")):
            raise SystemExit(f"tree {name}: {folder}/benchmarks/throughput.py not found")
    sys.path.insert(0, HERE)
    import throughput as T  # this checkout's: builds the one checkpoint both trees load

    path = os.path.join(tempfile.mkdtemp(), "qwen3-0.6b-random")
    T.make_model(path, T.SMOKE if args.smoke else T.QWEN3_0_6B)
    # the trees' processes see only what PYTHONPATH had beyond this checkout (e.g. wheels)
    root = os.path.dirname(HERE)
    pp = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
          if p and os.path.abspath(p) != root]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pp))
    times = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, folder in trees:
            out = os.path.join(tempfile.mkdtemp(), "times.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", os.path.abspath(folder), "--model-path", path,
                   "--json", out, "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
            subprocess.run(cmd, check=True, env=env, cwd=folder)
            with open(out) as f:
                got = json.load(f)
            times[name] += got["times"]
            print(f"round {r + 1}, {name}: " + ", ".join(f"{t:.3f}" for t in got["times"])
                  + f" s  (labengine from {got['labengine']}, distributed/ present: {got['distributed']})",
                  flush=True)
    tokens = got["output_tokens"]
    print("\n| tree | runs | median s | min s | max s | output tok/s (median) |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {len(ts)} | {med:.3f} | {min(ts):.3f} | {max(ts):.3f} | {tokens / med:.0f} |")
    (a, ta), (b, tb) = list(times.items())[:2]
    print(f"median time {b} / {a}: {statistics.median(tb) / statistics.median(ta):.3f} "
          f"(> 1: {b} slower)")


if __name__ == "__main__":
    main()
