"""Guided decoding's cost: JSON-schema-constrained vs unconstrained decode steps, same run.

    PYTHONPATH=. python benchmarks/bench_guided.py [--model tinylab] [--batch 32] [--max-tokens 48]
        [--rounds 3] [--threads N]

Runs `--batch` prompts through `LLM.generate` twice per round, once plain and once with
`guided_options_request={"guided_json": SCHEMA}` (a schema whose outputs are long, so the
batch stays full), alternating the two to share the machine's noise. From the engine's
StepFinished events it takes the latency of each decode step that ran the full batch and
prints the median per variant and the ratio guided / plain (the target: <= 1.5x on CPU).
It also prints the sampler's share (sample_s) of those steps, where the mask is applied.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from labengine import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "people": {"type": "array", "items": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
            "required": ["name", "age", "city"]}},
    },
    "required": ["title", "year", "people"],
}


def decode_steps(llm: LLM, prompts, params, options, batch: int):
    latencies, samples = [], []

    def on_event(ev):
        if ev.kind == "step_finished" and ev.num_prefill_tokens == 0 and ev.batch_size == batch:
            latencies.append(ev.latency_s)
            samples.append(ev.sample_s)

    llm.add_event_listener(on_event)
    try:
        outs = llm.generate(prompts, params, guided_options_request=options, use_tqdm=False)
    finally:
        llm.remove_event_listener(on_event)
    return latencies, samples, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tinylab")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(model=args.model, seed=0)
    prompts = [f"Record {i}: the story of" for i in range(args.batch)]
    params = SamplingParams(temperature=0.8, max_tokens=args.max_tokens, ignore_eos=False, seed=None)
    plain_params = SamplingParams(temperature=0.8, max_tokens=args.max_tokens, ignore_eos=True)
    # Warm-up (first compilation of the grammar, allocator warm-up).
    decode_steps(llm, prompts[:2], params, {"guided_json": SCHEMA}, 2)
    decode_steps(llm, prompts[:2], plain_params, None, 2)
    lat = {"plain": [], "guided": []}
    samp = {"plain": [], "guided": []}
    finished_early = 0
    round_ratios = []
    for r in range(args.rounds):
        med = {}
        for name, p, opts in (("plain", plain_params, None), ("guided", params, {"guided_json": SCHEMA})):
            la, sa, outs = decode_steps(llm, prompts, p, opts, args.batch)
            lat[name] += la
            samp[name] += sa
            med[name] = statistics.median(la)
            if name == "guided":
                finished_early += sum(c.finish_reason == "stop" for o in outs for c in o.outputs)
        round_ratios.append(med["guided"] / med["plain"])
        print(f"round {r}: plain {1e3 * med['plain']:.2f} ms, guided {1e3 * med['guided']:.2f} ms, "
              f"ratio {round_ratios[-1]:.2f}x")
    print(f"model={args.model} batch={args.batch} max_tokens={args.max_tokens} threads={torch.get_num_threads()} "
          f"rounds={args.rounds}")
    print(f"{'variant':8} {'steps':>6} {'median step ms':>15} {'median sample ms':>17}")
    for name in ("plain", "guided"):
        print(f"{name:8} {len(lat[name]):>6} {1e3 * statistics.median(lat[name]):>15.2f} "
              f"{1e3 * statistics.median(samp[name]):>17.2f}")
    ratio = statistics.median(lat["guided"]) / statistics.median(lat["plain"])
    overhead = statistics.median(samp["guided"]) - statistics.median(samp["plain"])
    print(f"guided / plain decode step time: {ratio:.2f}x over all steps, {statistics.median(round_ratios):.2f}x "
          f"median of the rounds (target <= 1.5x); the mask's cost in the sampler: {1e3 * overhead:.2f} ms/step "
          f"= {overhead / statistics.median(lat['plain']):.1%} of a plain step; "
          f"guided sequences that completed their JSON before max_tokens: {finished_early}")


if __name__ == "__main__":
    main()
