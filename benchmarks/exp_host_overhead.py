"""Host work per engine step, one source tree against another (issue 21 item 6, on a CPU).

    PYTHONPATH=<tree> python benchmarks/exp_host_overhead.py [--repeats 5] [--profile]
    python benchmarks/exp_host_overhead.py --compare OLD_TREE NEW_TREE [--rounds 5]

The engine runs a model so small (Qwen3 shapes scaled down: 2 layers, hidden 64, vocab 1024,
float32, one torch thread) that its matmuls are negligible; its forward still takes about 60 %
of a CPU step (the torch paged-attention reference loops over the sequences), so the forward
is timed apart and subtracted, leaving the host's Python: scheduler, block manager, input
preparation, sampling bookkeeping, output processing, events. The workload has throughput.py's shape, scaled down: 256 requests with
prompts of 16..64 random tokens and 64..128 output tokens each (seed 0), temperature 0.6,
ignore_eos, max_num_seqs 256, so almost every step is a decode step over a large batch.
Times are the CPU time of the engine's thread (time.thread_time: with one torch thread
everything runs on it), which leaves out the time other programs hold the core on a shared
machine; --wall uses the wall clock instead.

Single-tree mode imports labengine from wherever Python finds it (PYTHONPATH first; the path
is printed), runs one warm-up generate and `--repeats` timed ones, and prints the least
per-step time (total time / engine steps), the same without the time spent in the model's
forward (what a GPU runs, as a CUDA graph for decode steps), and, with --profile, a cProfile top 20 (cumulative)
of one more run (--profile-out FILE also saves the stats for pstats diffing).

--compare runs single-tree workers as subprocesses (PYTHONPATH=tree), OLD and NEW taking
turns for --rounds rounds (the order flips every round), so drift on a shared machine hits
both alike; it prints each round's figures, the NEW/OLD ratio per round and of the minima,
for the whole step and for the step without the forward.
Only EngineArgs that both trees accept are passed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

CONFIG = dict(
    architectures=["Qwen3ForCausalLM"], vocab_size=1024, hidden_size=64, intermediate_size=128,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    max_position_embeddings=512, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False, bos_token_id=1, eos_token_id=2)


def make_model(path):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**CONFIG), dtype=torch.float32)
    model.save_pretrained(path)


def workload(num_seqs, prompt_lens=(16, 64), output_lens=(64, 128), seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randint(3, CONFIG["vocab_size"] - 1) for _ in range(rng.randint(*prompt_lens))]
               for _ in range(num_seqs)]
    outputs = [rng.randint(*output_lens) for _ in range(num_seqs)]
    return prompts, outputs


def worker(args):
    import torch

    # CPU time of this thread (everything runs on it: one torch thread) or wall time: on a
    # shared machine the CPU time leaves out the time other processes hold the core.
    clock = time.perf_counter if args.wall else time.thread_time

    torch.set_num_threads(1)
    import labengine
    from labengine import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="float32", skip_tokenizer_init=True, max_model_len=256,
              max_num_seqs=256, max_num_batched_tokens=16384, device="cpu", seed=0,
              async_scheduling=args.async_scheduling)
    engine = llm.llm_engine
    steps = [0]
    step = engine.step

    def counted_step(*a, **kw):
        steps[0] += 1
        return step(*a, **kw)

    engine.step = counted_step  # an instance attribute: LLM._run_engine calls engine.step
    # The model's forward (the attention reference loop, the matmuls) is the part a GPU runs,
    # as a CUDA graph replay for decode steps; the rest of a step is host work on a GPU too.
    model = engine.model_runner.model
    forward = model.forward

    def timed_forward(*a, **kw):
        t0 = clock()
        try:
            return forward(*a, **kw)
        finally:
            forward_s[0] += clock() - t0

    forward_s = [0.0]
    model.forward = timed_forward  # nn.Module.__call__ looks forward up on the instance
    prompts, outputs = workload(args.num_seqs)
    requests = [{"prompt_token_ids": p} for p in prompts]

    def run():
        params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=o, detokenize=False) for o in outputs]
        steps[0] = 0
        forward_s[0] = 0.0
        t0 = clock()
        outs = llm.generate(requests, params, use_tqdm=False)
        dt = clock() - t0
        assert [len(o.outputs[0].token_ids) for o in outs] == outputs
        return dt, forward_s[0], steps[0]

    run()  # warm-up
    times, hosts, nsteps = [], [], None
    for _ in range(args.repeats):
        dt, fwd, nsteps = run()
        times.append(dt)
        hosts.append(dt - fwd)
    result = dict(labengine=labengine.__file__, steps=nsteps, tokens=sum(outputs),
                  best_s=min(times), median_s=statistics.median(times),
                  best_ms_per_step=1e3 * min(times) / nsteps,
                  best_host_ms_per_step=1e3 * min(hosts) / nsteps)
    if args.profile or args.profile_out or args.calls:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run()
        prof.disable()
        if args.profile_out:
            prof.dump_stats(args.profile_out)
        stats = pstats.Stats(prof)
        result["calls_per_step"] = stats.total_calls / steps[0]  # a noise-free measure of Python work
        if args.profile:
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(20)
    return result


def compare(args):
    trees = {"old": os.path.abspath(args.compare[0]), "new": os.path.abspath(args.compare[1])}
    model = args.model or tempfile.mkdtemp(prefix="host_overhead_model_")
    if not os.path.isfile(os.path.join(model, "config.json")):
        make_model(model)
    rows = {"old": [], "new": []}
    for r in range(args.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in order:
            env = dict(os.environ, PYTHONPATH=trees[name])
            cmd = [sys.executable, os.path.abspath(__file__), "--model", model, "--repeats", str(args.repeats),
                   "--num-seqs", str(args.num_seqs), "--json"]
            if args.async_scheduling:
                cmd.append("--async-scheduling")
            if args.wall:
                cmd.append("--wall")
            if r == 0:  # one profiled run per tree: Python function calls per step
                cmd.append("--calls")
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            assert res["labengine"].startswith(trees[name]), (name, res["labengine"])
            rows[name].append(res)
        o, n = rows["old"][-1], rows["new"][-1]
        print(f"round {r + 1}: step old {o['best_ms_per_step']:.3f} new {n['best_ms_per_step']:.3f} ms "
              f"(new/old {n['best_ms_per_step'] / o['best_ms_per_step']:.3f}); without the forward old "
              f"{o['best_host_ms_per_step']:.3f} new {n['best_host_ms_per_step']:.3f} ms "
              f"(new/old {n['best_host_ms_per_step'] / o['best_host_ms_per_step']:.3f}); steps {o['steps']}/{n['steps']}",
              flush=True)
    for name in ("old", "new"):
        print(f"{name}: {trees[name]} -> labengine from {rows[name][0]['labengine']}")
    co, cn = rows["old"][0]["calls_per_step"], rows["new"][0]["calls_per_step"]
    print(f"Python function calls per step (cProfile, one run each): old {co:.0f}, new {cn:.0f}, new/old {cn / co:.4f}")
    for key, label in (("best_ms_per_step", "whole step"), ("best_host_ms_per_step", "step without the forward")):
        best = {k: min(x[key] for x in v) for k, v in rows.items()}
        ratios = [n[key] / o[key] for o, n in zip(rows["old"], rows["new"])]
        print(f"{label}: min over {args.rounds} rounds old {best['old']:.3f} ms, new {best['new']:.3f} ms, "
              f"new/old {best['new'] / best['old']:.3f}; per-round ratio median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}..{max(ratios):.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs=2, metavar=("OLD_TREE", "NEW_TREE"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed generates per worker (least is kept)")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--model", help="model folder (made here if missing)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile top 20 of one more run")
    ap.add_argument("--profile-out", help="save that run's cProfile stats to this file")
    ap.add_argument("--wall", action="store_true", help="time with the wall clock instead of the thread's CPU time")
    ap.add_argument("--calls", action="store_true", help="profile one more run for its function calls per step")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--async-scheduling", action="store_true",
                    help="async_scheduling=True (the default on CUDA): the next decode step is scheduled "
                         "and launched before the previous one is processed")
    args = ap.parse_args()
    if args.compare:
        return compare(args)
    if args.model is None:
        args.model = tempfile.mkdtemp(prefix="host_overhead_model_")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        make_model(args.model)
    res = worker(args)
    if args.json:
        print(json.dumps(res))
    else:
        if "calls_per_step" in res:
            print(f"{res['calls_per_step']:.0f} Python function calls per step (cProfile)")
        print(f"labengine from {res['labengine']}: {res['steps']} steps, {res['tokens']} output tokens, "
              f"best {res['best_s']:.3f} s (median {res['median_s']:.3f} s), "
              f"{res['best_ms_per_step']:.3f} ms/step, {res['best_host_ms_per_step']:.3f} ms/step without the forward")


if __name__ == "__main__":
    main()
