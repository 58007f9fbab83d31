"""Batched vs one-at-a-time generation on the CPU, same model, same prompts, same run.

    python benchmarks/bench_batch_cpu.py [--model PATH] [--prompts 64] [--tokens 32] [--threads 2]

Prints the wall time of each and the ratio (target: batched at least 5x faster on 2 cores).
Greedy with ignore_eos, so both runs generate exactly prompts x tokens tokens; the
one-at-a-time run is the same engine called once per prompt.
"""
import argparse
import time

import torch

import labengine
from labengine import LLM, SamplingParams


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or labengine.DEFAULT_MODEL
    llm = LLM(model=model, device="cpu", max_num_seqs=max(64, args.prompts))
    prompts = [f"Question {i}: What is the meaning of life?" for i in range(args.prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up

    def batched():
        return llm.generate(prompts, params, use_tqdm=False)

    def one_by_one():
        return [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]

    results = {}
    for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = fn()
            times.append(time.perf_counter() - t0)
        assert sum(len(o.outputs[0].token_ids) for o in outs) == args.prompts * args.tokens
        results[name] = (sorted(times)[len(times) // 2], outs)
    (tb, ob), (ts, os_) = results["batched"], results["one_by_one"]
    same = all(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(ob, os_))
    n = args.prompts * args.tokens
    print(f"model: {model}")
    print(f"{args.prompts} prompts x {args.tokens} tokens, {args.threads} threads, median of {args.repeats}")
    print(f"{'mode':<12}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'batched':<12}{tb:>10.3f}{n / tb:>12.1f}")
    print(f"{'one_by_one':<12}{ts:>10.3f}{n / ts:>12.1f}")
    print(f"speed-up (one_by_one / batched): {ts / tb:.1f}x   greedy outputs identical: {same}")


if __name__ == "__main__":
    main()
