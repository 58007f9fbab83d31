"""Online serving benchmark: Poisson arrivals against the OpenAI-compatible server,
then the same workload through the offline LLM for comparison.

    python benchmarks/bench_serving.py                       # embedded model (or a random one)
    python benchmarks/bench_serving.py --request-rate 20 --num-prompts 200 --max-tokens 32
    python benchmarks/bench_serving.py --base-url http://127.0.0.1:8000   # an already running server
    python benchmarks/bench_serving.py --request-rates 16,64,256,inf --chart serving.png   # a sweep

Without --base-url it starts `python -m labengine.serve` on a free loopback port, waits
for /health, runs the workload, stops the server, and only then runs the offline LLM (so the
two never compete for the CPU). Every request uses ignore_eos, so each produces exactly
--max-tokens tokens and both modes do the same work.

Reported (streaming over SSE, measured by the client):
  TTFT  time from sending the request to the first streamed token
  ITL   inter-token latency: gaps between consecutive streamed chunks (one per engine step)
  E2E   request latency; throughput in requests/s and output tokens/s over the whole run
  TPOT  time per output token after the first: (E2E - TTFT) / (output tokens - 1), per request
Offline: wall time of one `LLM.generate` over all prompts, tokens/s.

--request-rates R1,R2,...: one server, the same prompts sent at each rate in turn (rising rates
until saturation: throughput stops following the offered rate while TTFT grows); prints one
table row per rate (throughput, TTFT and TPOT p50/p99) and, with --chart, saves a PNG of it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

WORDS = ("the model reads a prompt and writes the next token then the next one at a time each new token "
         "depends on every token before it so the cache keeps keys and values of earlier tokens").split()


@dataclass
class Result:
    ok: bool = False
    ttft: Optional[float] = None
    itl: List[float] = field(default_factory=list)
    latency: float = 0.0
    output_tokens: int = 0
    error: str = ""


def make_prompts(n: int, min_words: int, max_words: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))).capitalize()
            for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_model() -> str:
    try:
        import labengine

        model = getattr(labengine, "DEFAULT_MODEL", None)
        if model and (not Path(str(model)).is_dir() or (Path(str(model)) / "config.json").is_file()):
            return str(model)
    except Exception:  # no embedded model in this checkout
        pass
    from labengine.testing import make_random_model

    path = Path(tempfile.gettempdir()) / "labengine_bench_random_llama"
    print(f"(no embedded model: using a random-weight Llama at {path})")
    return str(make_random_model("llama", path))


def random_qwen3() -> str:
    """A random-weight checkpoint of Qwen3-0.6B's shapes (the vocabulary is the test tokenizer's)."""
    from labengine.testing import make_random_model

    path = Path(tempfile.gettempdir()) / "labengine_bench_random_qwen3_0.6b_shapes"
    print(f"(a random-weight model of Qwen3-0.6B's shapes at {path})")
    return str(make_random_model("qwen3", path, weight_std=None, hidden_size=1024, intermediate_size=3072,
                                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                 head_dim=128, max_position_embeddings=4096))


def percentiles(xs: List[float], ps=(50, 90, 99)) -> str:
    if not xs:
        return "n/a"
    xs = sorted(xs)
    parts = []
    for p in ps:
        k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
        parts.append(f"p{p} {xs[k] * 1000:8.1f}")
    return f"mean {statistics.fmean(xs) * 1000:8.1f}  " + "  ".join(parts) + "  (ms)"


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      headers: dict) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    res = Result()
    t0 = time.perf_counter()
    last = None
    try:
        async with http.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
        res.latency = time.perf_counter() - t0
        res.ok = True
    except Exception as e:  # report, don't crash the run
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_online(base_url: str, model: str, prompts: List[str], rate: float, max_tokens: int, seed: int,
                     api_key: Optional[str]):
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(prompts) + 10, max_keepalive_connections=len(prompts) + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        url = base_url.rstrip("/") + "/v1/completions"
        await one_request(http, url, model, "Warm up", 2, headers)  # first-step warm-up, not measured
        tasks = []
        t0 = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(one_request(http, url, model, prompt, max_tokens, headers)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))  # Poisson process: exponential gaps
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return results, wall


def pct(xs: List[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))]


def tpots(results: List[Result]) -> List[float]:
    return [(r.latency - r.ttft) / (r.output_tokens - 1) for r in results
            if r.ok and r.ttft is not None and r.output_tokens > 1]


def sweep_row(results: List[Result], wall: float, rate: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tp = tpots(ok)
    return dict(rate=rate, completed=len(ok), failed=len(results) - len(ok), req_s=len(ok) / wall,
                tok_s=sum(r.output_tokens for r in ok) / wall, ttft_p50=pct(ttft, 50), ttft_p99=pct(ttft, 99),
                tpot_p50=pct(tp, 50), tpot_p99=pct(tp, 99))


SWEEP_HEADER = ("| rate (req/s) | completed | failed | req/s | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) "
                "| TPOT p50 (ms) | TPOT p99 (ms) |")


def print_sweep(rows: List[dict]) -> None:
    print("\n" + SWEEP_HEADER + "\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rate']:g} | {r['completed']} | {r['failed']} | {r['req_s']:.1f} | {r['tok_s']:.0f} | "
              f"{1e3 * r['ttft_p50']:.1f} | {1e3 * r['ttft_p99']:.1f} | {1e3 * r['tpot_p50']:.2f} | "
              f"{1e3 * r['tpot_p99']:.2f} |")


def save_chart(rows: List[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [r["rate"] for r in rows if r["rate"] != float("inf")]
    inf_x = 2 * max(finite) if finite else 1.0  # "all at once" drawn right of the largest rate
    xs = [r["rate"] if r["rate"] != float("inf") else inf_x for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(xs, [r["tok_s"] for r in rows], "o-")
    a.set(xscale="log", xlabel="offered rate (req/s; rightmost = all at once)", ylabel="output tok/s",
          title="throughput")
    for key, style in (("ttft_p50", "o-"), ("ttft_p99", "o--"), ("tpot_p50", "s-"), ("tpot_p99", "s--")):
        b.plot(xs, [1e3 * r[key] for r in rows], style, label=key.replace("_", " "))
    b.set(xscale="log", yscale="log", xlabel="offered rate (req/s)", ylabel="ms", title="latency")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart saved to {path}")


def report_online(results: List[Result], wall: float, rate: float) -> float:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    tokens = sum(r.output_tokens for r in ok)
    print(f"\n== online: {len(results)} requests, Poisson rate {rate}/s ==")
    print(f"  completed {len(ok)}, failed {len(failed)}" + (f" (first error: {failed[0].error})" if failed else ""))
    print(f"  wall time        {wall:8.2f} s")
    print(f"  throughput       {len(ok) / wall:8.2f} req/s   {tokens / wall:9.1f} output tok/s")
    print(f"  TTFT             {percentiles([r.ttft for r in ok if r.ttft is not None])}")
    print(f"  ITL              {percentiles([x for r in ok for x in r.itl])}")
    print(f"  TPOT             {percentiles(tpots(ok))}")
    print(f"  E2E latency      {percentiles([r.latency for r in ok])}")
    return tokens / wall if wall else 0.0


def run_offline(model: str, prompts: List[str], max_tokens: int, engine_kwargs: dict) -> float:
    from labengine import LLM, SamplingParams

    llm = LLM(model=model, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(["Warm up"], SamplingParams(max_tokens=2), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"\n== offline: LLM.generate on the same {len(prompts)} prompts (all at once) ==")
    print(f"  wall time        {wall:8.2f} s")
    print(f"  throughput       {len(prompts) / wall:8.2f} req/s   {tokens / wall:9.1f} output tok/s")
    return tokens / wall


def start_server(model: str, port: int, engine_kwargs: dict, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "labengine.serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--disable-log-requests", "--log-level", "warning"]
    for k, v in engine_kwargs.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))


def wait_healthy(base_url: str, proc: Optional[subprocess.Popen], timeout: float, log_path: Optional[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-2000:] if log_path else ""
            raise SystemExit(f"server exited with code {proc.returncode}:\n{tail}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server at {base_url} not healthy after {timeout:.0f} s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: labengine.DEFAULT_MODEL, else a random-weight Llama")
    p.add_argument("--base-url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--served-model-name", default=None, help="model name to send (with --base-url)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=10.0, help="requests/s (Poisson); inf = all at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--min-words", type=int, default=4)
    p.add_argument("--max-words", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--random-qwen3", action="store_true",
                   help="serve a random-weight model of Qwen3-0.6B's shapes (28 layers, hidden 1024, 16/8 heads "
                        "of 128, MLP 3072) with the test tokenizer's small vocabulary, in bfloat16: a sweep that "
                        "measures the GPU's work, not only the server loop")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads for the server and the offline run (OMP_NUM_THREADS); "
                        "1 is steadier on a small, busy machine")
    p.add_argument("--request-rates", default=None,
                   help="comma list of rates (req/s, 'inf' = all at once) sent in turn to one server: a sweep")
    p.add_argument("--chart", default=None, help="with --request-rates: save the sweep's chart (PNG) here")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--server-timeout", type=float, default=300.0, help="seconds to wait for the server to start")
    args = p.parse_args(argv)
    rates = ([float(x) for x in args.request_rates.split(",")] if args.request_rates else [args.request_rate])

    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # inherited by the server process
        import torch

        torch.set_num_threads(args.torch_threads)
    engine_kwargs = {k: v for k, v in dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                                           num_gpu_blocks_override=args.num_gpu_blocks_override,
                                           device=args.device, dtype=args.dtype).items() if v is not None}
    if args.random_qwen3:
        args.model = random_qwen3()
        engine_kwargs.setdefault("dtype", "bfloat16")
    prompts = make_prompts(args.num_prompts, args.min_words, args.max_words, args.seed)
    import torch

    print(f"torch intra-op threads: {args.torch_threads or torch.get_num_threads()} "
          f"(on a small shared CPU, --torch-threads 1 is much steadier)")
    print(f"{args.num_prompts} prompts of {args.min_words}-{args.max_words} words, {args.max_tokens} output tokens "
          f"each, Poisson arrivals at {', '.join(f'{r:g}' for r in rates)}/s")

    proc = None
    log_path = None
    if args.base_url:
        base_url = args.base_url.rstrip("/")
        model = args.served_model_name or args.model
        if model is None:
            model = httpx.get(base_url + "/v1/models", timeout=10,
                              headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
                              ).json()["data"][0]["id"]
    else:
        model = args.model or default_model()
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = Path(tempfile.gettempdir()) / f"labengine_bench_server_{port}.log"
        print(f"starting server: model {model} on {base_url} (log {log_path})")
        proc = start_server(model, port, engine_kwargs, log_path)
    try:
        t_start = time.perf_counter()
        wait_healthy(base_url, proc, args.server_timeout, log_path)
        print(f"server healthy after {time.perf_counter() - t_start:.1f} s", flush=True)
        rows = []
        for rate in rates:
            results, wall = asyncio.run(run_online(base_url, model, prompts, rate, args.max_tokens,
                                                   args.seed, args.api_key))
            online_tps = report_online(results, wall, rate)
            rows.append(sweep_row(results, wall, rate))
            print(f"sweep so far: {rows[-1]}", flush=True)  # a timeout keeps what was measured
        print_sweep(rows)
        if args.chart:
            try:
                import torch

                where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
            except Exception:
                where = "?"
            save_chart(rows, args.chart, f"labengine.serve, {Path(str(model)).name}, {args.num_prompts} requests x "
                                         f"{args.max_tokens} tokens per rate, {where}")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if not args.skip_offline and not args.base_url:
        offline_tps = run_offline(model, prompts, args.max_tokens, engine_kwargs)
        print(f"\noffline / online output-token throughput: {offline_tps / online_tps:.2f}x" if online_tps else "")
        print("(online throughput is bounded by the arrival rate when the server keeps up; raise --request-rate "
              "or use inf to compare peak throughput)")


if __name__ == "__main__":
    main()
