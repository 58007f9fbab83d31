"""Soak test: minutes of mixed, careless and hostile load on the OpenAI-compatible server.

    python benchmarks/soak_server.py                 # 10 minutes, embedded model, 6 clients
    python benchmarks/soak_server.py --minutes 2 --concurrency 4

Starts `python -m labengine.serve` (embedded model unless --model) on a free loopback port
with the engine's invariant checker on (--check-invariants: a KV-cache bookkeeping error
kills the engine, and so the server, which this script reports), tight limits, and a
trusted request chat template (so hostile templates reach the sandbox). Then --concurrency
client loops pick, at random, one of:

  complete / stream / chat-stream     normal requests (n 1-3, 4-40 tokens), read to the end
  vanish-mid-stream                   read a few chunks, then hang up
  vanish-while-queued                 a burst of requests whose clients leave at once
                                      (most are still queued; some get 429, the queue is small)
  bad-input                           each hostile or careless input of issue 16: n / best_of
                                      above max_num_seqs, oversized body, too many prompts,
                                      too many / too long stop strings, 64-bit overflowing seed,
                                      max_tokens past the context, stream_options without
                                      stream, unknown field, too many logprobs, malformed JSON,
                                      looping / escaping chat templates
  health                              GET /health and /metrics

Every request has a client timeout (--request-timeout); one that runs past it is "stuck".
After the run the script waits for the server to drain and reports from /metrics and the
server process: KV blocks still in use (leaked), requests still running or waiting
(stuck), whether the server is alive, and its resident memory (VmRSS) at the end against
after warm-up (the first --warmup-minutes). Outcomes that differ from what each scenario
expects (e.g. a bad input that is not refused with its status) are counted as unexpected.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MAX_NUM_SEQS = 16
MAX_QUEUED = 12
MAX_MODEL_LEN = 256

WORDS = "the model reads a prompt and writes the next token one at a time with a cache of keys and values".split()
LOOP_FOREVER = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
ESCAPE = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"

# name -> (method, path, body or raw bytes, expected status)
BAD_INPUTS = {
    "n_above_max_num_seqs": ("/v1/completions", {"prompt": "Hi", "n": MAX_NUM_SEQS + 1, "max_tokens": 2}, 400),
    "best_of_above_max_num_seqs": ("/v1/completions", {"prompt": "Hi", "best_of": 300, "max_tokens": 2}, 400),
    "beam_too_wide": ("/v1/completions", {"prompt": "Hi", "n": 2, "best_of": 257, "use_beam_search": True,
                                          "temperature": 0, "max_tokens": 2}, 400),
    "body_too_large": ("/v1/completions", {"prompt": "x" * (300 * 1024), "max_tokens": 2}, 413),
    "too_many_prompts": ("/v1/completions", {"prompt": ["a"] * 40, "max_tokens": 2}, 400),
    "too_many_stops": ("/v1/completions", {"prompt": "Hi", "stop": [str(i) for i in range(40)]}, 400),
    "stop_too_long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                               "stop": "s" * 5000}, 400),
    "seed_overflow": ("/v1/completions", {"prompt": "Hi", "seed": 1 << 70, "max_tokens": 2}, 400),
    "max_tokens_past_context": ("/v1/completions", {"prompt": "Hi", "max_tokens": MAX_MODEL_LEN * 4}, 400),
    "stream_options_without_stream": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                               "stream_options": {"include_usage": True}}, 400),
    "unknown_field": ("/v1/completions", {"prompt": "Hi", "max_tokenz": 3}, 400),
    "too_many_logprobs": ("/v1/completions", {"prompt": "Hi", "logprobs": 1000, "max_tokens": 2}, 400),
    "malformed_json": ("/v1/completions", b'{"prompt": "Hi", ', 400),
    "template_loops_forever": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                        "chat_template": LOOP_FOREVER}, 400),
    "template_escapes_sandbox": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                          "chat_template": ESCAPE}, 400),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


class Soak:
    def __init__(self, url: str, args) -> None:
        self.url, self.args = url, args
        self.outcomes: Counter = Counter()  # scenario:outcome -> count
        self.unexpected: Counter = Counter()
        self.stuck = 0
        self.rng = random.Random(args.seed)

    def prompt(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 30))).capitalize()

    def note(self, scenario: str, outcome: str, ok: bool = True) -> None:
        self.outcomes[f"{scenario}:{outcome}"] += 1
        if not ok:
            self.unexpected[f"{scenario}:{outcome}"] += 1

    async def complete(self, http):
        body = {"prompt": self.prompt(), "max_tokens": self.rng.randint(4, 40), "n": self.rng.randint(1, 3),
                "temperature": self.rng.choice([0.0, 0.8]) or 0.0, "ignore_eos": self.rng.random() < 0.5}
        if body["temperature"] == 0.0:
            body["n"] = 1
        r = await http.post("/v1/completions", json=body)
        self.note("complete", str(r.status_code),
                  r.status_code == 429 or (r.status_code == 200 and len(r.json()["choices"]) == body["n"]))

    async def stream(self, http, chat: bool, vanish_after=None):
        if chat:
            path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": self.prompt()}]}
        else:
            path, body = "/v1/completions", {"prompt": self.prompt()}
        body.update(stream=True, max_tokens=self.rng.randint(4, 40), stream_options={"include_usage": True})
        name = "vanish-mid-stream" if vanish_after is not None else ("chat-stream" if chat else "stream")
        chunks, done = 0, False
        async with http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                self.note(name, str(r.status_code), r.status_code == 429)
                return
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    if '"error"' in line:
                        self.note(name, "in-band-error", False)
                    chunks += 1
                    if vanish_after is not None and chunks >= vanish_after:
                        break  # hang up mid-stream
        if vanish_after is not None:
            self.note(name, "left" if not done else "finished-first")
        else:
            self.note(name, "done" if done else "truncated", done)

    async def vanish_while_queued(self, http):
        body = {"prompt": self.prompt(), "max_tokens": 40, "ignore_eos": True}
        timeout = httpx.Timeout(10, read=0.05)

        async def one():
            try:
                r = await http.post("/v1/completions", json=body, timeout=timeout)
                self.note("vanish-while-queued", str(r.status_code), r.status_code in (200, 429))
            except httpx.ReadTimeout:
                self.note("vanish-while-queued", "left")

        await asyncio.gather(*(one() for _ in range(self.rng.randint(4, MAX_QUEUED * 2))))

    async def bad_input(self, http):
        name = self.rng.choice(sorted(BAD_INPUTS))
        path, body, expected = BAD_INPUTS[name]
        if isinstance(body, bytes):
            r = await http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = await http.post(path, json=body)
        ok = r.status_code == expected or r.status_code == 429
        if ok and r.status_code != 413:
            ok = "error" in r.json() and "Traceback" not in r.text
        self.note(f"bad:{name}", str(r.status_code), ok)

    async def health(self, http):
        r = await http.get("/health")
        m = await http.get("/metrics")
        self.note("health", str(r.status_code), r.status_code == 200 and m.status_code == 200)

    async def client(self, i: int, deadline: float) -> None:
        limits = httpx.Limits(max_connections=MAX_QUEUED * 2 + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.args.request_timeout, limits=limits) as http:
            scenarios = [(self.complete, 3), (lambda h: self.stream(h, False), 3), (lambda h: self.stream(h, True), 2),
                         (lambda h: self.stream(h, False, vanish_after=self.rng.randint(1, 4)), 2),
                         (self.vanish_while_queued, 1), (self.bad_input, 3), (self.health, 1)]
            funcs, weights = zip(*scenarios)
            while time.monotonic() < deadline:
                fn = self.rng.choices(funcs, weights)[0]
                try:
                    await fn(http)
                except (httpx.ReadTimeout, httpx.PoolTimeout):
                    self.stuck += 1
                    self.note("client", "timeout", False)
                except httpx.HTTPError as e:
                    self.note("client", type(e).__name__, False)


async def run_load(soak: Soak, seconds: float, concurrency: int) -> None:
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(soak.client(i, deadline) for i in range(concurrency)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup-minutes", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--model", default=None, help="model for the server (default: the embedded one)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "labengine.serve", "--port", str(port), "--check-invariants",
           "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-queued-requests", str(MAX_QUEUED), "--max-prompts-per-request", "16",
           "--max-request-body-bytes", str(256 * 1024), "--trust-request-chat-template",
           "--chat-template-timeout-s", "0.5", "--disable-log-requests", "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                print(server.stderr.read().decode()[-3000:])
                print(f"server exited with status {server.returncode} during start-up")
                return 1
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("server did not start")
                return 1
            time.sleep(0.5)
        print(f"server pid {server.pid} on {url}; {args.minutes:g} min, concurrency {args.concurrency}, "
              f"warm-up {args.warmup_minutes:g} min", flush=True)
        soak = Soak(url, args)
        t0 = time.monotonic()
        warm = args.warmup_minutes * 60
        asyncio.run(run_load(soak, warm, args.concurrency))
        rss_warm = rss_kib(server.pid)
        print(f"after warm-up ({time.monotonic() - t0:.0f} s): RSS {rss_warm / 1024:.1f} MiB", flush=True)
        asyncio.run(run_load(soak, max(args.minutes * 60 - warm, 0), args.concurrency))
        load_s = time.monotonic() - t0
        # drain: every request the clients left must end on the server
        drained_at = None
        t_drain = time.monotonic()
        while time.monotonic() - t_drain < 60 and server.poll() is None:
            text = httpx.get(url + "/metrics", timeout=10).text
            busy = metric(text, "labengine:num_requests_running") + metric(text, "labengine:num_requests_waiting")
            if busy == 0 and metric(text, "labengine:kv_cache_usage_perc") == 0:
                drained_at = time.monotonic() - t_drain
                break
            time.sleep(0.5)
        alive = server.poll() is None
        text = httpx.get(url + "/metrics", timeout=10).text if alive else ""
        health = httpx.get(url + "/health", timeout=10).status_code if alive else None
        rss_end = rss_kib(server.pid) if alive else -1
        total_blocks = metric(text, "labengine:num_gpu_blocks")
        leaked = round(metric(text, "labengine:kv_cache_usage_perc") * total_blocks) if alive else None
        stuck_server = (metric(text, "labengine:num_requests_running")
                        + metric(text, "labengine:num_requests_waiting")) if alive else None
        finished = sum(float(ln.split()[-1]) for ln in text.splitlines()
                       if ln.startswith("labengine:request_success_total"))

        print(f"\nload ran {load_s:.0f} s with {args.concurrency} clients; drained in "
              f"{'%.1f s' % drained_at if drained_at is not None else 'NOT within 60 s'}")
        print(f"requests by scenario:outcome ({sum(soak.outcomes.values())} in all):")
        for key, n in sorted(soak.outcomes.items()):
            print(f"  {key:45s} {n}")
        print(f"engine-finished sequences (request_success_total): {finished:.0f}")
        print(f"server alive: {alive}; /health: {health}; invariant checker on (a violation kills the engine)")
        print(f"leaked KV blocks: {leaked} of {total_blocks:.0f}")
        print(f"stuck requests: server {stuck_server}, client timeouts {soak.stuck}")
        print(f"unexpected outcomes: {sum(soak.unexpected.values())} {dict(soak.unexpected)}")
        if rss_end > 0:
            print(f"resident memory: {rss_warm / 1024:.1f} MiB after warm-up, {rss_end / 1024:.1f} MiB at the end "
                  f"({(rss_end / rss_warm - 1) * 100:+.1f}%)")
        ok = (alive and health == 200 and leaked == 0 and stuck_server == 0 and soak.stuck == 0
              and not soak.unexpected and rss_end <= rss_warm * 1.10)
        print("RESULT:", "PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        err = server.stderr.read().decode(errors="replace") if server.stderr else ""
        tail = [ln for ln in err.splitlines() if "InvariantViolation" in ln or "died" in ln]
        if tail:
            print("server log:", *tail[-10:], sep="\n  ")


if __name__ == "__main__":
    sys.exit(main())
