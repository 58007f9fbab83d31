"""Sampler cost per step: batch of decode sequences, default SamplingParams.

    PYTHONPATH=. python benchmarks/bench_sampler.py [--batch 64] [--vocab 6144 50257]
        [--iters 50] [--threads N] [--params default|greedy|seeded|topk_topp|penalties|logprobs]

The logits are standard normal: a flat distribution, so top-p needs most of the
vocabulary and takes the full-sort path (its worst case; a trained model's peaked
distribution keeps the cut among the top TOP_P_CANDIDATES tokens).

Prints milliseconds per Sampler call (median and mean over --iters calls after warm-up),
for each vocabulary size. Compare with the engine's step time for the same batch: the
sampler should stay under 10% of it.

    PYTHONPATH=. python benchmarks/bench_sampler.py --engine [--hidden 256 --layers 8 ...]

also runs a real LLM (a random-weight Llama from labengine.testing with the given vocab,
hidden size and layers) on --batch prompts with default SamplingParams, and reports, over
the decode steps, the engine's step latency and the sampler's share of it (StepFinished's
sample_s / latency_s).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from labengine.sampler import Sampler, SamplingMetadata, SequenceGroupToSample
from labengine.sampling_params import SamplingParams
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus

PARAMS = {
    "default": lambda i: SamplingParams(),
    "greedy": lambda i: SamplingParams(temperature=0.0),
    "seeded": lambda i: SamplingParams(temperature=0.8, seed=i),
    "topk_topp": lambda i: SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
    "topp": lambda i: SamplingParams(temperature=0.8, top_p=0.9),
    "topk": lambda i: SamplingParams(temperature=0.8, top_k=50),
    "penalties": lambda i: SamplingParams(presence_penalty=0.5, frequency_penalty=0.5,
                                          repetition_penalty=1.2),
    "logprobs": lambda i: SamplingParams(logprobs=5),
}


def build_batch(batch: int, vocab: int, kind: str, prompt_len: int = 64, output_len: int = 32):
    g = torch.Generator().manual_seed(0)
    groups = []
    for i in range(batch):
        prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        seq = Sequence(i, None, prompt)
        for t in torch.randint(0, vocab, (output_len,), generator=g).tolist():
            seq.append_token_id(t, {}, 0.0)
        seq.status = SequenceStatus.RUNNING
        sg = SequenceGroup(str(i), [seq], PARAMS[kind](i), 0.0)
        groups.append(SequenceGroupToSample(sg, [i], False, [], [i]))
    return SamplingMetadata(groups=groups)


def bench(batch: int, vocab: int, kind: str, iters: int) -> tuple[float, float]:
    sampler = Sampler(vocab)
    meta = build_batch(batch, vocab, kind)
    logits = torch.randn(batch, vocab, dtype=torch.float32)
    for _ in range(5):
        sampler(logits, meta)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sampler(logits, meta)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), statistics.fmean(times)


def bench_engine(batch: int, vocab: int, args) -> None:
    import tempfile

    from labengine.events import StepFinished
    from labengine.llm import LLM
    from labengine.testing import make_random_model

    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_model("llama", tmp, vocab_size=vocab, hidden_size=args.hidden,
                                 intermediate_size=args.intermediate,
                                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                 num_key_value_heads=args.kv_heads,
                                 max_position_embeddings=1024)
        llm = LLM(str(path), max_num_seqs=max(batch, 8))
        steps = []
        llm.add_event_listener(lambda e: steps.append(e) if isinstance(e, StepFinished) else None)
        prompts = [f"Request {i}: the quick brown fox jumps over the lazy dog" for i in range(batch)]
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        steps.clear()
        llm.generate(prompts, params, use_tqdm=False)
    decode = [e for e in steps if e.num_prefill_tokens == 0 and e.batch_size == batch]
    lat = statistics.median(e.latency_s for e in decode) * 1e3
    samp = statistics.median(e.sample_s for e in decode) * 1e3
    share = statistics.median(e.sample_s / e.latency_s for e in decode) * 100
    print(f"engine vocab={vocab:>6} hidden={args.hidden} layers={args.layers}: {len(decode)} decode steps of "
          f"{batch}: step {lat:.2f} ms, sampler {samp:.2f} ms (median), share {share:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, nargs="+", default=[6144, 50257])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--params", nargs="+", default=["default"], choices=sorted(PARAMS))
    ap.add_argument("--engine", action="store_true", help="also measure inside a real engine")
    # the lab's own model (tools/embedded_model/train.py defaults)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, batch={args.batch}")
    for kind in args.params:
        for vocab in args.vocab:
            med, mean = bench(args.batch, vocab, kind, args.iters)
            print(f"params={kind:<10} vocab={vocab:>6}: {med:7.3f} ms/call (median), "
                  f"{mean:7.3f} ms (mean)")
    if args.engine:
        for vocab in args.vocab:
            bench_engine(args.batch, vocab, args)


if __name__ == "__main__":
    main()
