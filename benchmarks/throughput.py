"""Offline throughput on a GPU: labengine vs transformers, the small-engine benchmark.

    python benchmarks/throughput.py [--num-seqs 256] [--baselines generate,generate_batch]
                                    [--analyze] [--smoke]

The workload small engines compare on (nano-vllm's bench): 256 requests, prompt and output
lengths uniform in 100..1024 with seed 0, token ids uniform in 0..10000, temperature 0.6,
ignore_eos; Qwen3-0.6B's architecture and shapes with random bf16 weights (config below).
Prints output tokens/s for labengine, transformers `generate` (static padded batches) and
transformers continuous batching (the manager behind `generate_batch`, each request with
its own max_new_tokens), their ratios, and the roofline: the
least time implied by the KV-cache and weight bytes every decode step must read, at the
device-to-device copy bandwidth measured in the same run.

--analyze runs the workload a second time step by step and prints where the time goes:
the trace's per-step parts (schedule, prepare, forward, sample, detokenize) for prefill and
decode steps, and the GPU idle time between decode steps, from CUDA events recorded where
each step's GPU work begins (first launch) and ends (the sampled tokens are back).
--smoke: a tiny config and a short workload, on whatever device there is (checks the script).
"""
import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
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
SMOKE = dict(QWEN3_0_6B, vocab_size=12000, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def free_memory():
    import gc

    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def workload(num_seqs, lo=100, hi=1024, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(lo, hi))] for _ in range(num_seqs)]
    outputs = [rng.randint(lo, hi) for _ in range(num_seqs)]
    return prompts, outputs


def copy_bandwidth():
    n = 2 * 1024**3 if DEV == "cuda" else 64 * 1024**2
    x = torch.empty(n, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    sec = (time.perf_counter() - t0) / 10
    del x, y
    return 2 * n / sec  # bytes read + written per second


def kv_bytes_per_token(cfg):
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2  # K and V, bf16


def roofline_seconds(prompts, outputs, cfg, weight_bytes, bandwidth):
    """Every decode step reads all weights once and each running sequence's whole KV cache;
    every request runs from the first decode step (the cache holds them all), so there are
    max(outputs) - 1 decode steps (the first token comes from the prefill)."""
    kv_per_token = kv_bytes_per_token(cfg)
    kv_bytes = sum(sum(p + i for i in range(1, o)) for p, o in zip(map(len, prompts), outputs)) * kv_per_token
    steps = max(outputs) - 1
    return (kv_bytes + steps * weight_bytes) / bandwidth


def make_model(path, cfg):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def make_llm(path, max_model_len, async_scheduling=None):
    """The hand-tuned configuration (the figures in RESULTS.md since the second session)."""
    from labengine import LLM

    return LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max_model_len,
               max_num_seqs=256, max_num_batched_tokens=16384, gpu_memory_utilization=0.85, device=DEV,
               async_scheduling=async_scheduling)


def make_default_llm(path, max_model_len, **overrides):
    """What a user writes (issue 20): only the model, the dtype and a max_model_len; every other
    setting is the engine's own default for this device and model (overrides: an experiment's
    one or two changed settings, `--configs defaults+block_size=32`)."""
    from labengine import LLM

    return LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=max_model_len, **overrides)


def parse_overrides(spec):
    """"defaults+block_size=32+max_num_seqs=128" -> {"block_size": 32, "max_num_seqs": 128}."""
    out = {}
    for item in spec.split("+")[1:]:
        key, _, val = item.partition("=")
        for cast in (int, float):
            try:
                val = cast(val)
                break
            except ValueError:
                pass
        else:
            val = {"True": True, "False": False}.get(val, val)
        out[key] = val
    return out


def describe(llm):
    """The settings the engine runs with (chosen or given)."""
    engine = llm.llm_engine
    cfg, runner = engine.config, engine.model_runner
    sc, cc = cfg.scheduler_config, cfg.cache_config
    return (f"max_num_seqs {sc.max_num_seqs}, max_num_batched_tokens {sc.max_num_batched_tokens}, "
            f"max_model_len {sc.max_model_len}, gpu_memory_utilization {cc.gpu_memory_utilization}, "
            f"{cc.num_gpu_blocks} KV blocks, CUDA graph sizes "
            f"{sorted(runner.graphs) if runner.graphs else 'none'}")


def params_for(outputs):
    from labengine import SamplingParams

    return [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=o, detokenize=False) for o in outputs]


def run_labengine(llm, prompts, outputs):
    from labengine import SamplingParams

    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8), use_tqdm=False)
    params = params_for(outputs)
    sync()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t0
    assert [len(o.outputs[0].token_ids) for o in outs] == outputs
    engine = llm.llm_engine
    layer = engine.model_runner.model.model.layers[0]
    print(f"  (attention {engine.model_runner.attn_backend.name}, fused layer kernels "
          f"{'on' if getattr(layer.mlp, 'kernels', None) is not None else 'off'}, sampler "
          f"{engine.sampler.method_for(engine.model_runner.device)}, async scheduling "
          f"{'on' if engine.async_scheduling else 'off'}, CUDA graphs {'on' if engine.model_runner.graphs else 'off'})",
          flush=True)
    return dt


def analyze_labengine(llm, prompts, outputs, roof=None):
    """Run the workload again step by step, with the trace and CUDA events per step.
    roof = (KV bytes per token, weight bytes, bandwidth): also each batch range's decode steps
    against the roofline's time for them (their KV and weight reads at copy bandwidth)."""
    engine = llm.llm_engine
    runner = engine.model_runner
    marks = []  # [is_decode, start event, end event, batch size, keys read] per step, in launch order
    sampler = engine.sampler

    def event():
        e = torch.cuda.Event(enable_timing=True) if DEV == "cuda" else None
        if e is not None:
            e.record()
        return e

    orig_exec, orig_launch, orig_meta = runner.execute_model, sampler.launch, runner._metadata

    # Events go into the stream where a step's GPU work begins (before its input copies) and
    # where it ends (after its last sampling kernel): their GPU timestamps bound its work,
    # and a later start minus an earlier end is time the GPU had nothing of ours to run.
    def execute_model(out, tables, timings, pending=None):
        marks.append([not out.is_prefill, event(), None, out.num_batched_tokens, 0])
        return orig_exec(out, tables, timings, pending)

    def metadata(is_prefill, slot_mapping, seq_lens, *rest):
        if marks:
            marks[-1][4] = sum(seq_lens)  # the keys this step's attention reads
        return orig_meta(is_prefill, slot_mapping, seq_lens, *rest)

    def launch(logits, smeta):
        result = orig_launch(logits, smeta)
        marks[-1][2] = event()
        return result

    def run(tag, traced):
        for i, (p, sp) in enumerate(zip(prompts, params_for(outputs))):
            engine.add_request(f"{tag}{i}", {"prompt_token_ids": p}, sp)
        sync()
        t0 = time.perf_counter()
        from labengine.llm import _no_full_gc  # as LLM.generate runs its loop

        with (llm.trace() if traced else contextlib.nullcontext()) as trace, _no_full_gc():
            while engine.has_unfinished_requests():
                engine.step(final_only=True)
        sync()
        return time.perf_counter() - t0, trace

    # The GPU idle comes from a run with the CUDA events only: the trace's bookkeeping adds
    # host time per step, which would show up as idle GPU time. The parts come from a second,
    # traced run (and are host times with that bookkeeping included).
    runner.execute_model, sampler.launch, runner._metadata = execute_model, launch, metadata
    try:
        wall_events, _ = run("e", traced=False)
        event_marks, marks[:] = list(marks), []
        wall, trace = run("t", traced=True)
    finally:
        runner.execute_model = orig_exec
        del sampler.launch, runner._metadata  # back to the class's methods
    marks[:] = event_marks
    print(f"\nlabengine with CUDA events at every step (no trace): {wall_events:.2f} s")
    st = trace.steps()
    parts = ["schedule_s", "prepare_s", "forward_s", "sample_s", "detokenize_s", "other_s"]
    print(f"\nlabengine step by step (trace on): {wall:.2f} s, {len(st)} steps "
          f"({int(st.is_prefill.sum())} prefill, {int((~st.is_prefill).sum())} decode)")
    print("steps | count | total s | " + " | ".join(p[:-2] + " ms/step" for p in parts))
    for name, sel in (("prefill", st[st.is_prefill]), ("decode", st[~st.is_prefill])):
        if len(sel):
            print(f"{name} | {len(sel)} | {sel.latency_s.sum():.2f} | "
                  + " | ".join(f"{1e3 * sel[p].mean():.3f}" for p in parts))
    dec = st[~st.is_prefill]
    for lo, hi in ((129, 256), (33, 128), (1, 32)):
        sel = dec[(dec.batch_size >= lo) & (dec.batch_size <= hi)]
        if len(sel):
            print(f"decode, batch {lo}-{hi} | {len(sel)} | {sel.latency_s.sum():.2f} | "
                  + " | ".join(f"{1e3 * sel[p].mean():.3f}" for p in parts))
    if DEV == "cuda":
        busy = [m[1].elapsed_time(m[2]) for m in marks]
        # (gap before decode step i+1, its batch size) for consecutive decode steps
        gaps = [(max(0.0, marks[i][2].elapsed_time(marks[i + 1][1])), marks[i + 1][3])
                for i in range(len(marks) - 1) if marks[i][0] and marks[i + 1][0]]
        dec = [(b, m[3]) for m, b in zip(marks, busy) if m[0]]
        if roof:  # ms the roofline allows each decode step: its KV bytes and the weights at copy bandwidth
            kv_per_token, weight_bytes, bw = roof
            dec_roof = [(1e3 * (m[4] * kv_per_token + weight_bytes) / bw, m[3]) for m in marks if m[0]]
        idle, dec_busy = sum(g for g, _ in gaps), sum(b for b, _ in dec)
        print(f"GPU idle between decode steps: {idle / 1e3:.2f} s of {(idle + dec_busy) / 1e3:.2f} s "
              f"= {100 * idle / (idle + dec_busy):.1f}% (median gap {statistics.median(g for g, _ in gaps):.3f} ms, "
              f"median decode step busy {statistics.median(b for b, _ in dec):.3f} ms)")
        for lo, hi in ((129, 256), (33, 128), (1, 32)):
            g = [x for x, n in gaps if lo <= n <= hi]
            b = [x for x, n in dec if lo <= n <= hi]
            if b:
                r = sum(x for x, n in dec_roof if lo <= n <= hi) if roof else 0.0
                print(f"  batch {lo}-{hi}: {len(b)} steps, busy {sum(b) / 1e3:.2f} s (median {statistics.median(b):.3f} ms), "
                      f"idle {sum(g) / 1e3:.2f} s ({100 * sum(g) / (sum(g) + sum(b)):.1f}%), "
                      f"gaps > 0.1 ms: {sum(x > 0.1 for x in g)}"
                      + (f"; roofline {r / 1e3:.2f} s = {100 * r / sum(b):.1f}% of busy" if roof else ""))
        if roof:
            pre = [b for m, b in zip(marks, busy) if not m[0]]
            print(f"  prefill: {len(pre)} steps, busy {sum(pre) / 1e3:.2f} s (the roofline counts none)")
    return st


def run_hf_generate(path, prompts, outputs, batch_size):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(DEV)
    model.generation_config.eos_token_id = None
    model.generate(torch.tensor([prompts[0][:16]], device=DEV), max_new_tokens=4, do_sample=False, pad_token_id=0)
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, outs = prompts[i:i + batch_size], outputs[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=DEV)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=DEV)
        model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
                       max_new_tokens=max(outs), pad_token_id=0)
    sync()
    dt = time.perf_counter() - t0
    del model
    free_memory()
    return dt


def run_hf_continuous(path, prompts, outputs, max_seconds):
    """transformers' continuous batching (the manager behind generate_batch), each request with
    its own max_new_tokens, so it generates exactly the workload's tokens. Results stream, so
    the tokens generated so far are known at any time: after max_seconds the run stops and
    its rate over that window is reported (all requests are admitted from the start, so the
    window holds the batch at its widest: a generous estimate of the whole run's rate)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").to(DEV)
    gen = GenerationConfig(max_new_tokens=max(outputs), do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
                           eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=[p[:16] for p in prompts[:4]], generation_config=GenerationConfig(
        **{**gen.to_dict(), "max_new_tokens": 4}))  # warm-up
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    sync()
    t0 = time.perf_counter()
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        manager.add_request(p, request_id=f"r{i}", max_new_tokens=o, streaming=True)
    counts, done = {}, 0
    while done < len(prompts) and time.perf_counter() - t0 < max_seconds:
        r = manager.get_result(timeout=1)
        if r is None:
            if not manager.is_running():
                raise RuntimeError(f"continuous batching stopped after {done} of {len(prompts)} requests")
            continue
        counts[r.request_id] = len(r.generated_tokens)
        done += r.is_finished()
    dt = time.perf_counter() - t0
    n = sum(counts.values())
    manager.stop(block=False, hard_stop=True) if done < len(prompts) else manager.stop(block=True)
    print(f"hf continuous batching: {done} of {len(prompts)} requests finished, {n} tokens in {dt:.1f} s",
          flush=True)
    del model, manager
    free_memory()
    return dt, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--baselines", default="generate,generate_batch")
    ap.add_argument("--hf-batch-size", type=int, default=256,
                    help="static batch of transformers generate (256: the whole workload in one batch)")
    ap.add_argument("--hf-max-seconds", type=float, default=1e9,
                    help="stop transformers' continuous batching after this long and report its rate so far")
    ap.add_argument("--skip-labengine", action="store_true")
    ap.add_argument("--analyze", action="store_true")
    ap.add_argument("--compare-sync", action="store_true",
                    help="also time labengine with async_scheduling=False (the effect of the overlap)")
    ap.add_argument("--ablate", default="",
                    help="comma list of labengine runs with one optimisation switched off, timed after the main run: "
                         "fused_layers (PyTorch norm/rotary/SiLU ops on the Triton path), "
                         "sampling_kernel (the PyTorch sampler), decode_order (decode kernel in batch order, "
                         "not longest first), decode_balance (decode splits not balanced by the step's lengths), "
                         "sample_splits (one sampling program per row), fused_kv_store (the KV cache written by its own "
                         "kernel, not by the q/k norm + rotary kernel), "
                         "sample_tiling (the sampling kernel's 4096-entry chunks, one program per SM), "
                         "fast_log (the sampling noise's exact outer log)")
    ap.add_argument("--ab", default="", type=ab_choice,
                    help="time the first configuration with one optimisation on and off (a comma list: each in turn), "
                         "alternating, in the same engine (--ab-rounds rounds); the names as for --ablate (the "
                         "decode graphs are recaptured for decode_balance and fused_kv_store)")
    ap.add_argument("--ab-rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="run each configuration's engine this many times; report the first run and the median")
    ap.add_argument("--configs", default="tuned",
                    help="comma list of labengine configurations to time, in this order: tuned (the hand-tuned "
                         "settings), defaults (LLM(model, dtype='bfloat16', max_model_len=--default-max-model-len) "
                         "and nothing else), defaults+SETTING=VALUE[+...] (the defaults with a setting changed, e.g. "
                         "defaults+block_size=32); the first one is the main run (--analyze: defaults if listed, else tuned; --ablate: tuned)")
    ap.add_argument("--default-max-model-len", type=int, default=4096)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--model-path", default=None, help=argparse.SUPPRESS)  # internal: the baselines' process
    ap.add_argument("--results-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile", default=None, help="with --analyze: write cProfile's top functions here")
    args = ap.parse_args()
    cfg = SMOKE if args.smoke else QWEN3_0_6B
    prompts, outputs = workload(16, 8, 40) if args.smoke else workload(args.num_seqs)
    total_out = sum(outputs)
    path = args.model_path or tempfile.mkdtemp() + "/qwen3-0.6b-random"
    weight_bytes = make_model(path, cfg) if args.model_path is None else 0
    results, counted = {}, {}
    if args.results_json:  # the baselines' own process (below): run them, report, exit
        run_baselines(args, path, prompts, outputs, results, counted)
        with open(args.results_json, "w") as f:
            json.dump(dict(results=results, counted=counted), f)
        return
    bw = copy_bandwidth()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    print(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s; {len(prompts)} requests, "
          f"{sum(map(len, prompts))} prompt / {total_out} output tokens; weights {weight_bytes / 1e9:.2f} GB",
          flush=True)
    if args.baselines.strip() and args.baselines != "none":
        # transformers runs in a process of its own: when it exits, all of its GPU memory is
        # back (a stopped continuous-batching manager keeps its cache alive in-process, and an
        # engine sized after it got a third of its usual KV cache: measured 2026-11-28).
        out_json = os.path.join(tempfile.mkdtemp(), "baselines.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--skip-labengine", "--model-path", path,
               "--results-json", out_json, "--baselines", args.baselines, "--hf-batch-size", str(args.hf_batch_size),
               "--hf-max-seconds", str(args.hf_max_seconds), "--num-seqs", str(args.num_seqs)]
        subprocess.run(cmd + (["--smoke"] if args.smoke else []), check=True)
        with open(out_json) as f:
            got = json.load(f)
        results.update(got["results"])
        counted.update(got["counted"])
    if not args.skip_labengine:
        run_engine_part(args, path, prompts, outputs, results, counted,
                        roof=(kv_bytes_per_token(cfg), weight_bytes, bw) if weight_bytes else None)
    results = {k: results[k] for k in sorted(results, key=lambda k: k != "labengine")}
    roof = roofline_seconds(prompts, outputs, cfg, weight_bytes, bw)
    ref = results.get("labengine")
    print("\nengine | seconds | output tok/s | labengine speed-up")
    for name, sec in results.items():
        print(f"{name} | {sec:.2f} | {counted[name] / sec:.0f} | "
              + (f"{(counted['labengine'] / ref) / (counted[name] / sec):.2f}x" if ref and counted[name] else "-"))
    print(f"roofline (decode KV + weight reads at copy bandwidth): {roof:.2f} s ({total_out / roof:.0f} tok/s)"
          + (f"; labengine at {100 * roof / ref:.1f}% of it" if ref else ""))
    for name, sec in results.items():
        if name.startswith("labengine") and counted[name] == total_out:
            print(f"  {name}: {sec:.2f} s = {100 * roof / sec:.1f}% of the roofline")


def run_engine_part(args, path, prompts, outputs, results, counted, roof=None):
    total_out = sum(outputs)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c != "tuned" and c.split("+")[0] != "defaults":
            raise SystemExit(f"--configs {c!r}: allowed: tuned, defaults, defaults+SETTING=VALUE[+...]")
    for c in configs:
        if c == "tuned":
            continue
        free_memory()
        llm = make_default_llm(path, args.default_max_model_len if not args.smoke else 128, **parse_overrides(c))
        key = "labengine, defaults" + (f" ({c[len('defaults+'):]})" if "+" in c else "")
        print(f"{key}: {describe(llm)}", flush=True)
        results[key] = run_labengine(llm, prompts, outputs)
        counted[key] = total_out
        print(f"{key}: {results[key]:.2f} s, {total_out / results[key]:.0f} tok/s", flush=True)
        repeat_runs(args.repeats, llm, prompts, outputs, key, results, counted)
        if args.analyze and c == "defaults":  # where the default configuration's time goes (issue 20 item 2)
            analyze_labengine(llm, prompts, outputs, roof)
        if args.ab and c == configs[0]:
            for what in args.ab.split(","):
                ab_in_one_engine(llm, what, args.ab_rounds, prompts, outputs, key, results, counted)
        del llm
    if "tuned" not in configs:
        return
    free_memory()
    llm = make_llm(path, 2048 if not args.smoke else 128)
    print(f"labengine (tuned): {describe(llm)}", flush=True)
    results["labengine"] = run_labengine(llm, prompts, outputs)
    counted["labengine"] = total_out
    print(f"labengine: {results['labengine']:.2f} s, {total_out / results['labengine']:.0f} tok/s", flush=True)
    repeat_runs(args.repeats, llm, prompts, outputs, "labengine", results, counted)
    if args.analyze and "defaults" not in configs:
        analyze_labengine(llm, prompts, outputs, roof)
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        run_labengine(llm, prompts, outputs)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
        with open(args.profile, "w") as f:
            f.write(buf.getvalue())
    del llm
    for what in filter(None, args.ablate.split(",")):
        free_memory()
        with ablated(what):
            llm = make_llm(path, 2048 if not args.smoke else 128)
            key = f"labengine without {what}"
            results[key] = run_labengine(llm, prompts, outputs)
        counted[key] = total_out
        print(f"{key}: {results[key]:.2f} s", flush=True)
        del llm
    if args.compare_sync:
        free_memory()
        llm = make_llm(path, 2048 if not args.smoke else 128, async_scheduling=False)
        results["labengine, sync scheduling"] = run_labengine(llm, prompts, outputs)
        counted["labengine, sync scheduling"] = total_out
        print(f"labengine with async_scheduling=False: {results['labengine, sync scheduling']:.2f} s", flush=True)
        if args.analyze:
            analyze_labengine(llm, prompts, outputs, roof)
        del llm


def repeat_runs(repeats, llm, prompts, outputs, key, results, counted):
    """--repeats N: N - 1 more runs of the same engine after its first; the median of all N is
    reported beside the first run (the spread between runs is several per cent)."""
    if repeats <= 1:
        return
    import statistics

    times = [results[key]] + [run_labengine(llm, prompts, outputs) for _ in range(repeats - 1)]
    name = f"{key}, median of {repeats} runs"
    results[name], counted[name] = statistics.median(times), sum(outputs)
    print(f"{key}: {repeats} runs {', '.join(f'{t:.2f}' for t in times)} s; median {results[name]:.2f} s", flush=True)


def ab_choice(value: str) -> str:
    """--ab's value: a comma list of ablated.WHAT names."""
    bad = [w for w in value.split(",") if w and w not in ablated.WHAT]
    if bad:
        raise argparse.ArgumentTypeError(f"{', '.join(bad)}: allowed: {', '.join(ablated.WHAT)}")
    return value


def ab_in_one_engine(llm, what, rounds, prompts, outputs, key, results, counted):
    """One optimisation on and off in the same engine (no rebuild, the same memory and graphs),
    alternating ON OFF, OFF ON, ... so a drift of the machine hits both alike; medians."""
    import statistics

    times = {"on": [], "off": []}
    for r in range(rounds):
        for state in (("on", "off") if r % 2 == 0 else ("off", "on")):
            recapture = what in ablated.RECAPTURE and (r, state) != (0, "on")
            if state == "on":
                if recapture:
                    recapture_graphs(llm)
                times["on"].append(run_labengine(llm, prompts, outputs))
            else:
                with ablated(what):
                    if recapture:
                        recapture_graphs(llm)
                    times["off"].append(run_labengine(llm, prompts, outputs))
            print(f"A/B {what} {state}: {times[state][-1]:.2f} s", flush=True)
    for state in ("on", "off"):
        name = f"{key}, A/B median, {what} {state}"
        results[name] = statistics.median(times[state])
        counted[name] = sum(outputs)
    print(f"A/B {what}: median on {results[f'{key}, A/B median, {what} on']:.2f} s, "
          f"off {results[f'{key}, A/B median, {what} off']:.2f} s", flush=True)


class ablated:
    """Build the engine with one optimisation off (a benchmark-only switch, for measuring it):
    "fused_layers": the models keep PyTorch's norm/rotary/SiLU ops on the Triton path;
    "sampling_kernel": the sampler uses its PyTorch methods;
    "decode_order": the decode kernel takes the sequences in batch order, not longest first;
    "decode_balance": the decode kernel's splits from the batch size and max_seq_len alone (one
    program per sequence and KV head in most steps), not balanced by the step's real lengths;
    "sample_splits": the sampling kernel with one program per row, however small the batch;
    "sample_tiling": the sampling kernel's fifth-session tiling (4096-entry chunks, one program per SM);
    "fast_log": the sampling noise's outer log exact (libdevice), not lg2.approx;
    "fused_kv_store": the Triton backend stores the KV cache with its own kernel (store_kv), not the
    models' q/k norm + rotary kernel."""

    WHAT = ("fused_layers", "sampling_kernel", "decode_order", "decode_balance", "sample_splits",
            "sample_tiling", "fast_log", "fused_kv_store")
    RECAPTURE = ("decode_balance", "fused_kv_store")  # decided when the CUDA graphs are captured: A/B recaptures them

    def __init__(self, what):
        if what not in self.WHAT:
            raise SystemExit(f"--ablate {what!r}: allowed: {', '.join(self.WHAT)}")
        self.what = what

    def __enter__(self):
        import labengine.llm_engine as le
        import labengine.models.llama as llama
        from labengine.attention.triton_backend import TritonAttentionBackend as TAB

        sampling = sys.modules["labengine.kernels.sampling"]
        self.saved = (llama.use_fused_kernels, le.Sampler, TAB.decode_launch_order, TAB.decode_split_len,
                      sampling.choose_sample_splits, sampling.TARGET_PROGRAMS_PER_SM,
                      sys.modules["labengine.kernels"].sample, TAB.stores_kv_in_rope)
        if self.what == "fused_layers":
            llama.use_fused_kernels = lambda model, backend: None
        elif self.what == "sampling_kernel":
            base = le.Sampler
            le.Sampler = lambda *a, kernels=None, **kw: base(*a, **kw)
        elif self.what == "decode_balance":
            TAB.decode_split_len = lambda self, *args: None
        elif self.what == "sample_splits":
            sampling.choose_sample_splits = lambda *args: 1
        elif self.what in ("sample_tiling", "fast_log"):
            import functools

            kw = dict(block_v=4096) if self.what == "sample_tiling" else dict(fast_log=False)
            if self.what == "sample_tiling":
                sampling.TARGET_PROGRAMS_PER_SM = 1
            sys.modules["labengine.kernels"].sample = functools.partial(sampling.sample, **kw)
        elif self.what == "fused_kv_store":
            TAB.stores_kv_in_rope = False
        else:
            TAB.decode_launch_order = lambda self, seq_lens: None

    def __exit__(self, *exc):
        import labengine.llm_engine as le
        import labengine.models.llama as llama
        from labengine.attention.triton_backend import TritonAttentionBackend as TAB

        sampling = sys.modules["labengine.kernels.sampling"]
        (llama.use_fused_kernels, le.Sampler, TAB.decode_launch_order, TAB.decode_split_len,
         sampling.choose_sample_splits,
         sampling.TARGET_PROGRAMS_PER_SM, sys.modules["labengine.kernels"].sample, TAB.stores_kv_in_rope) = self.saved


def recapture_graphs(llm):
    """Capture the engine's decode graphs again (after an A/B switch that the capture decides)."""
    runner = llm.llm_engine.model_runner
    if not runner.graphs:
        return
    runner.graphs.clear()
    runner._graph_io = None
    free_memory()
    runner.capture_graphs()
    # the sampling kernel runs outside the graphs and may need a new variant after the switch:
    # compile it here, untimed
    llm.llm_engine.sampler.warm_up(runner.device, runner.dtype)


def run_baselines(args, path, prompts, outputs, results, counted):
    total_out = sum(outputs)
    # The static-batch baseline generates max(outputs) tokens for every request of a batch (it
    # cannot stop each request at its own length); only the requested tokens are counted, as a
    # user would count them. Continuous batching stops each request at its own length.
    if "generate" in args.baselines.split(","):
        try:
            results["hf generate"] = run_hf_generate(path, prompts, outputs, args.hf_batch_size)
            counted["hf generate"] = total_out
            print(f"hf generate: {results['hf generate']:.2f} s", flush=True)
        except Exception as e:  # report and go on: one failing baseline must not hide the others
            print(f"hf generate failed: {e!r}", flush=True)
    if "generate_batch" in args.baselines.split(","):
        try:
            results["hf generate_batch"], n = run_hf_continuous(path, prompts, outputs, args.hf_max_seconds)
            counted["hf generate_batch"] = n
            print(f"hf generate_batch: {results['hf generate_batch']:.2f} s, {n} tokens", flush=True)
        except Exception as e:
            print(f"hf generate_batch failed: {e!r}", flush=True)


if __name__ == "__main__":
    main()
