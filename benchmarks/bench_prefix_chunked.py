"""Prefix caching and chunked prefill, each measured against itself switched off (issue 19).

Experiment 1, prefix caching: `--num-requests` prompts share a `--system-len`-token system
prompt, each with its own `--suffix-len`-token suffix, `--output-len` tokens each (greedy,
ignore_eos). Run with enable_prefix_caching off, then on, on the same model, each after the
same warm-up request (the system prompt once, as on a server that has been running). Printed:
prompt tokens that went through the model (deterministic: the engine counts them), the drop,
the hit rate, wall time and the throughput ratio.

Experiment 2, chunked prefill: `--num-decodes` requests decode `--decode-len` tokens; once they
all decode, a `--long-len`-token prompt arrives. Inter-token latency (ITL) of the decodes is
taken from the time each engine step returns their tokens. The window that matters is the
gaps that overlap the long prompt's prefill (its arrival to its first token): without chunking its whole prefill is one step
that every decode waits for; with chunking (max_num_batched_tokens=`--budget`) the decodes
run in every step beside a chunk. Printed: p99 (and max) ITL in that window off / on and the
ratio, and, deterministic beside the wall times, the most tokens any step computed.

On a GPU the script prints the device's free memory (torch.cuda.mem_get_info) before it builds
each LLM and says plainly when it is short: the engine sizes its KV cache as
gpu_memory_utilization x total minus everything already in use on the device, other processes
(or an earlier run that still holds memory) included. Each LLM is released (every reference
dropped, then gc + empty_cache) before the next one is built, and the script checks that it was.

CPU (default): a small random-weight Qwen3-shaped model, small sizes. GPU, as the lead runs it:
  python benchmarks/bench_prefix_chunked.py --random-qwen3 --num-requests 256 --system-len 2048 \\
      --suffix-len 128 --output-len 16 --long-len 16384 --num-decodes 64 --decode-len 256 \\
      --budget 512 --max-model-len 18432
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

QWEN3_0_6B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
    intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645)
SMALL = dict(QWEN3_0_6B, vocab_size=2000, bos_token_id=1, eos_token_id=2, hidden_size=128, intermediate_size=384,
             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def make_model(path: str, cfg: dict) -> str:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if DEV == "cuda" else torch.float32)
    model.save_pretrained(path)
    return path


GiB = 2**30


def gpu_memory_note(label: str, util: float) -> str:
    """One line on the device's memory before an LLM is built, with a plain warning when the
    share gpu_memory_utilization allows is mostly (or wholly) in use already."""
    free_b, total = torch.cuda.mem_get_info()
    used = total - free_b
    mine = torch.cuda.memory_reserved()
    room = total * util - used  # what the engine can give weights, activations and KV cache
    line = (f"    [{label}] GPU memory: {free_b / GiB:.2f} GiB free of {total / GiB:.2f} GiB; {used / GiB:.2f} GiB "
            f"in use ({mine / GiB:.2f} GiB of it by this process); gpu_memory_utilization={util} leaves "
            f"{room / GiB:.2f} GiB for this LLM")
    if room <= 0.25 * total * util:
        line += (f"\n    WARNING: GPU memory is short: {used / GiB:.2f} GiB of the device are in use before this "
                 f"LLM is built, {(used - mine) / GiB:.2f} GiB of them by other processes (or an earlier run that has not "
                 "released its memory: see nvidia-smi). The engine sizes its KV cache as gpu_memory_utilization x "
                 "total minus all memory in use, so it gets little or none (\"No available memory for the cache "
                 "blocks\"). Free the GPU, or raise --gpu-memory-utilization.")
    return line


def make_llm(path: str, args, label: str = "", **kw):
    from labengine import LLM

    extra = dict(gpu_memory_utilization=args.gpu_memory_utilization) if DEV == "cuda" else {}
    if DEV == "cuda":
        print(gpu_memory_note(label, args.gpu_memory_utilization), flush=True)
    try:
        return LLM(model=path, dtype="bfloat16" if DEV == "cuda" else "float32", skip_tokenizer_init=True,
                   max_model_len=args.max_model_len, device=DEV, seed=0, **extra, **kw)
    except ValueError as e:
        if DEV == "cuda" and "No available memory for the cache blocks" in str(e):
            raise SystemExit(f"{label}: the LLM could not get KV-cache memory ({e})\n"
                             + gpu_memory_note(label, args.gpu_memory_utilization)) from e
        raise


def kv_cache_ref(llm):
    """A weak reference to the engine's KV cache tensor: dead once the LLM is really released."""
    import weakref

    return weakref.ref(llm.llm_engine.model_runner.kv_cache)


def release(kv_ref, label: str) -> None:
    """After the caller has dropped every reference to an LLM: collect it and hand its memory
    back to the device, and say so if something still holds its KV cache."""
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    if kv_ref() is not None:
        print(f"    WARNING: [{label}] the LLM's KV cache is still referenced after release: its memory stays held")


def prefix_run(path: str, args, prompts, warm, params, on: bool, label: str):
    """One LLM, warmed up, runs the prompts; returns plain results (no engine objects) and a
    weak reference to its KV cache, so the LLM dies when this returns."""
    llm = make_llm(path, args, label, enable_prefix_caching=on)
    engine = llm.llm_engine
    llm.generate([{"prompt_token_ids": warm}], params, use_tqdm=False)
    before = engine.num_prefill_tokens_computed
    bm = engine.scheduler.block_manager
    q0, h0 = bm.num_queried_blocks, bm.num_hit_blocks
    sync()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    q, h = bm.num_queried_blocks - q0, bm.num_hit_blocks - h0
    result = dict(computed=engine.num_prefill_tokens_computed - before, s=dt, tokens=tokens,
                  hit=h / q if q else float("nan"))
    return result, kv_cache_ref(llm)


def prefix_experiment(path: str, args, vocab: int) -> None:
    from labengine import SamplingParams

    rng = random.Random(0)
    system = [rng.randrange(10, vocab) for _ in range(args.system_len)]
    prompts = [system + [rng.randrange(10, vocab) for _ in range(args.suffix_len)] for _ in range(args.num_requests)]
    warm = system + [rng.randrange(10, vocab) for _ in range(args.suffix_len)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    res = {}
    for on in (False, True):
        label = f"prefix caching {'on' if on else 'off'}"
        res[on], kv_ref = prefix_run(path, args, prompts, warm, params, on, label)
        release(kv_ref, label)  # prefix_run has returned: nothing refers to its LLM any more
    off, on = res[False], res[True]
    total = sum(map(len, prompts))
    print(f"\n[1] prefix caching: {args.num_requests} requests = {args.system_len}-token shared system prompt "
          f"+ {args.suffix_len}-token suffix, {args.output_len} output tokens each (greedy)")
    print(f"    prompt tokens in the requests:           {total}")
    print(f"    prefill tokens computed, caching off:    {off['computed']}")
    print(f"    prefill tokens computed, caching on:     {on['computed']}")
    print(f"    drop:                                    {100 * (1 - on['computed'] / off['computed']):.1f} %")
    print(f"    hit rate (full prompt blocks found):     {on['hit']:.3f}")
    print(f"    wall time off / on:                      {off['s']:.3f} s / {on['s']:.3f} s")
    n_out = args.num_requests * args.output_len
    print(f"    throughput off / on:                     {(total + n_out) / off['s']:.0f} / "
          f"{(total + n_out) / on['s']:.0f} tokens/s (prompt + output)")
    print(f"    throughput ratio on / off:               {off['s'] / on['s']:.2f}x")
    same = off["tokens"] == on["tokens"]
    print(f"    greedy outputs identical on / off:       {same}")


def _percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def chunked_run(path: str, args, vocab: int, chunked: bool):
    from labengine import SamplingParams

    rng = random.Random(1)
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=args.budget) if chunked else {}
    # the same max_num_seqs both ways (it must fit in the chunked budget)
    llm = make_llm(path, args, f"chunked prefill {'on' if chunked else 'off'}", max_num_seqs=min(256, args.budget),
                   **kw)
    engine = llm.llm_engine
    # warm-up (kernels, graphs): one short request
    llm.generate([{"prompt_token_ids": [5] * 16}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    events = []
    engine.add_event_listener(lambda e: events.append(e) if e.kind == "step_finished" else None)
    dec = SamplingParams(temperature=0, max_tokens=args.decode_len, ignore_eos=True, detokenize=False)
    for i in range(args.num_decodes):
        engine.add_request(f"d{i}", {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(32)]}, dec)
    last: dict[str, tuple[int, float]] = {}
    itl: list[tuple[float, float, float]] = []  # (previous token's time, this token's time, gap per token)
    arrival = first_token = None
    steps = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        sync()
        now = time.perf_counter()
        steps += 1
        for o in outs:
            if o.request_id == "long":
                if first_token is None and o.outputs[0].token_ids:
                    first_token = now
                continue
            n = len(o.outputs[0].token_ids)
            prev = last.get(o.request_id)
            if prev is not None and n > prev[0]:
                itl.append((prev[1], now, (now - prev[1]) / (n - prev[0])))
            if prev is None or n > prev[0]:
                last[o.request_id] = (n, now)
        if arrival is None and len(last) == args.num_decodes and min(v[0] for v in last.values()) >= 8:
            long_prompt = [rng.randrange(10, vocab) for _ in range(args.long_len)]
            engine.add_request("long", {"prompt_token_ids": long_prompt},
                               SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, detokenize=False))
            arrival = time.perf_counter()
    assert arrival is not None and first_token is not None, "the long prompt never ran: raise --decode-len"
    # the gaps that overlap the long prompt's prefill (from its arrival to its first token)
    window = [g for t0, t1, g in itl if t1 > arrival and t0 < first_token]
    most_tokens = max(e.num_prefill_tokens + e.num_decode_tokens for e in events)
    result = dict(window=window, all=[g for _, _, g in itl], ttft=first_token - arrival, most_tokens=most_tokens)
    return result, kv_cache_ref(llm)


def chunked_experiment(path: str, args, vocab: int) -> None:
    off, kv_ref = chunked_run(path, args, vocab, chunked=False)
    release(kv_ref, "chunked prefill off")  # chunked_run has returned: nothing refers to its LLM any more
    on, kv_ref = chunked_run(path, args, vocab, chunked=True)
    release(kv_ref, "chunked prefill on")
    print(f"\n[2] chunked prefill: a {args.long_len}-token prompt arrives while {args.num_decodes} requests decode "
          f"({args.decode_len} tokens each); budget {args.budget} tokens per step with chunking")
    print(f"    most tokens in one step, off / on:       {off['most_tokens']} / {on['most_tokens']}")
    print(f"    decode ITL samples in the window:        {len(off['window'])} / {len(on['window'])} "
          "(gaps overlapping the long prompt's prefill)")
    p_off, p_on = _percentile(off["window"], 99), _percentile(on["window"], 99)
    print(f"    p99 ITL in the window, off / on:         {1e3 * p_off:.2f} ms / {1e3 * p_on:.2f} ms")
    print(f"    p99 ITL ratio off / on:                  {p_off / p_on:.2f}x")
    print(f"    max ITL in the window, off / on:         {1e3 * max(off['window']):.2f} ms / "
          f"{1e3 * max(on['window']):.2f} ms")
    print(f"    p99 ITL over the whole run, off / on:    {1e3 * _percentile(off['all'], 99):.2f} ms / "
          f"{1e3 * _percentile(on['all'], 99):.2f} ms")
    print(f"    long prompt's TTFT, off / on:            {1e3 * off['ttft']:.1f} ms / {1e3 * on['ttft']:.1f} ms")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random-qwen3", action="store_true", help="a random-weight Qwen3-0.6B-shaped model "
                   "(default: a small Qwen3-shaped one, for the CPU)")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--system-len", type=int, default=256)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=4)
    p.add_argument("--long-len", type=int, default=1024)
    p.add_argument("--num-decodes", type=int, default=8)
    p.add_argument("--decode-len", type=int, default=64)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=1152)
    p.add_argument("--experiment", choices=["both", "prefix", "chunked"], default="both")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="the share of the GPU's memory each LLM may use (GPU only; default 0.85)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    cfg = QWEN3_0_6B if args.random_qwen3 else SMALL
    if args.random_qwen3 and DEV == "cpu":
        print("note: --random-qwen3 on the CPU is slow; the GPU is what it is meant for")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)) if DEV == "cpu" else torch.get_num_threads())
    print(f"device {DEV}, model {'Qwen3-0.6B-shaped' if args.random_qwen3 else 'small Qwen3-shaped'} "
          f"(random weights, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']})")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(tmp, dict(cfg, max_position_embeddings=max(cfg["max_position_embeddings"],
                                                                     args.max_model_len)))
        if args.experiment in ("both", "prefix"):
            prefix_experiment(path, args, cfg["vocab_size"])
        if args.experiment in ("both", "chunked"):
            chunked_experiment(path, args, cfg["vocab_size"])


if __name__ == "__main__":
    main()
