# Source of labs/06_offline_vs_online.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 6. Offline vs online: throughput against latency
#
# The same engine serves two very different jobs:
#
# | | offline (`LLM.generate`) | online (`AsyncLLMEngine`, a server) |
# |---|---|---|
# | requests | all known up front | arrive one by one, any time |
# | what matters | **throughput**: tokens per second for the whole job | **latency** per request: time to first token (TTFT), time per output token |
# | batch | as large as the budgets allow, from step one | whatever happens to be running |
#
# In this notebook you measure both on the same model and the same 16 prompts, chart TTFT and
# per-token latency for each, and finally call the engine through its OpenAI-compatible HTTP
# server from the notebook.

# %%
import asyncio
import statistics
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

import labengine
from labengine import LLM, AsyncLLMEngine, SamplingParams
from labengine.grading import check_same_greedy

MODEL = labengine.DEFAULT_MODEL
llm = LLM(model=MODEL, seed=0)
# One model in memory serves both modes: the async engine wraps the same LLMEngine.
online = AsyncLLMEngine(llm.llm_engine, log_requests=False)

prompts = [f"Tell me a fact about the number {i}." for i in range(16)]
params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
_ = llm.generate(prompts[:2], params, use_tqdm=False)   # warm-up

# This notebook times things: one PyTorch thread per free core would make a small model's
# steps wait on each other whenever anything else uses the CPU (see notebook 4).
from labengine.cpu_threads import use_lesson_threads

print(use_lesson_threads(llm))

# %% [markdown]
# ## Offline: everything at once
#
# Every request arrives at t=0. The engine's `RequestMetrics` give each request's times:
# TTFT = `first_token_time - arrival_time`; the per-token latency is the rest of its time
# divided by the remaining tokens.

# %%
def latency_rows(mode, outputs):
    rows = []
    for o in outputs:
        m, n = o.metrics, len(o.outputs[0].token_ids)
        rows.append({"mode": mode, "request": o.request_id, "ttft_ms": (m.first_token_time - m.arrival_time) * 1e3,
                     "tpot_ms": (m.finished_time - m.first_token_time) / max(n - 1, 1) * 1e3,
                     "e2e_ms": (m.finished_time - m.arrival_time) * 1e3, "tokens": n})
    return rows

runs = []
for _ in range(3):   # timed 3 times, the fastest run kept: other work on the machine only adds time
    with llm.trace() as trace:
        t0 = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        runs.append((time.perf_counter() - t0, out, trace))
offline_s, offline_out, offline_trace = min(runs, key=lambda r: r[0])
offline = pd.DataFrame(latency_rows("offline", offline_out))
step_ms = offline_trace.steps()["latency_s"].median() * 1e3
print(f"offline: {len(prompts)} requests in {offline_s:.2f} s (best of 3: "
      f"{', '.join(f'{r[0]:.2f}' for r in runs)} s), {offline['tokens'].sum() / offline_s:.0f} tokens/s; "
      f"{len(offline_trace.steps())} engine steps, median step {step_ms:.1f} ms")
offline.describe().loc[["mean", "50%", "max"], ["ttft_ms", "tpot_ms", "e2e_ms"]].round(1)

# %% [markdown]
# ## Online: requests arrive over time
#
# Now the same prompts arrive one at a time, a fixed gap apart: four decode steps of a lone
# request (measured first, on the online engine), so on any machine a few requests overlap,
# as on a lightly loaded server. Each client streams its answer and notes when the first
# token, and each later token, arrived.

# %%
with online.trace() as alone:                         # one request alone: how long is a decode step?
    await online.generate(prompts[0], params, "alone")
st = alone.steps()
gap_s = 4 * st.loc[~st["is_prefill"], "latency_s"].median()

async def client(i, prompt):
    await asyncio.sleep(i * gap_s)                       # this request arrives later
    sent = time.perf_counter()
    stamps = []
    async for out in online.generate(prompt, params, f"online-{i}"):
        stamps.append((time.perf_counter(), len(out.outputs[0].token_ids)))
    first, last, n = stamps[0][0], stamps[-1][0], stamps[-1][1]
    return {"mode": "online", "request": f"online-{i}", "ttft_ms": (first - sent) * 1e3,
            "tpot_ms": (last - first) / max(n - 1, 1) * 1e3, "e2e_ms": (last - sent) * 1e3, "tokens": n}

with online.trace() as online_trace:
    t0 = time.perf_counter()
    online_rows = await asyncio.gather(*(client(i, p) for i, p in enumerate(prompts)))
    online_s = time.perf_counter() - t0
    await online.wait_until_idle()
onl = pd.DataFrame(online_rows)
print(f"online: {len(prompts)} requests over {online_s:.2f} s (one every {gap_s * 1e3:.0f} ms), "
      f"{onl['tokens'].sum() / online_s:.0f} tokens/s")
onl.describe().loc[["mean", "50%", "max"], ["ttft_ms", "tpot_ms", "e2e_ms"]].round(1)

# %% [markdown]
# ## The comparison, charted

# %%
both = pd.concat([offline, onl])
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6), layout="constrained")
for ax, col, title in zip(axes, ["ttft_ms", "tpot_ms", "e2e_ms"],
                          ["time to first token (ms)", "time per output token (ms)", "end-to-end latency (ms)"]):
    ax.boxplot([offline[col], onl[col]], tick_labels=["offline", "online"])
    ax.set_title(title)
tput = [offline["tokens"].sum() / offline_s, onl["tokens"].sum() / online_s]
axes[3].bar(["offline", "online"], tput, color=["#1f77b4", "#ff7f0e"])
axes[3].set_title("throughput (output tokens/s)")
plt.show()

traces = {"offline": offline_trace, "online": online_trace}
steps = {mode: len(t.steps()) for mode, t in traces.items()}
mean_batch = {mode: t.steps()["batch_size"].mean() for mode, t in traces.items()}
tokens = {"offline": offline["tokens"].sum(), "online": onl["tokens"].sum()}
summary = both.groupby("mode")[["ttft_ms", "tpot_ms", "e2e_ms"]].median().round(1)
summary["engine steps"] = [steps["offline"], steps["online"]]
summary["output tokens per step"] = [round(tokens[m] / steps[m], 1) for m in ("offline", "online")]
summary["mean batch"] = [round(mean_batch["offline"], 1), round(mean_batch["online"], 1)]
summary["tokens/s"] = [round(tput[0]), round(tput[1])]
summary

# %% [markdown]
# Read the counted columns first (engine steps, tokens per step, mean batch: the same on any
# machine, however busy), then the timed ones.

# %%
per_step = summary["output tokens per step"]
print(f"counted: the same {tokens['offline']} output tokens took {steps['offline']} engine steps offline "
      f"({per_step['offline']} tokens per step) and {steps['online']} online ({per_step['online']} per step)")
print(f"timed:   offline {tput[0]:.0f} tokens/s, online {tput[1]:.0f} tokens/s: "
      f"offline got {tput[0] / tput[1]:.1f}x the throughput; online, a request waited "
      f"{summary.loc['online', 'ttft_ms']:.0f} ms for its first token (median), offline "
      f"{summary.loc['offline', 'ttft_ms']:.0f} ms")
assert mean_batch["offline"] > mean_batch["online"] and per_step["offline"] > per_step["online"]
assert tput[0] > tput[1], ("online was timed above offline: something else took this machine's cores "
                           "during the offline runs; run the cells again")

# %% [markdown]
# What the numbers say:
#
# * **Throughput** is higher offline: every step carries all 16 sequences, so the fixed cost
#   of a step is shared 16 ways and the job needs a fraction of the steps. Online, the batch is
#   only as large as the number of requests that happen to overlap, and the engine cannot
#   finish before the last request has even arrived.
# * **TTFT** online is about one prefill step plus however long the request waits for the
#   step in progress. Offline, all 16 prefills share one step, so TTFT is that (larger) step.
# * **Per-token latency** grows with the batch: a step with 16 sequences takes a little
#   longer than one with 2. That is the price of throughput, and a server's `max_num_seqs`
#   decides how much of it to pay.
#
# ## The HTTP server, from the notebook
#
# `labengine.serve` puts the async engine behind an OpenAI-compatible API (the same routes as
# `vllm serve`). From a terminal you would run `python -m labengine.serve --port 8000`. Here we
# start it inside the notebook's own event loop, on a free local port, around the engine we
# already have. (uvicorn normally installs Ctrl-C handlers; in a notebook the kernel owns
# those, so we switch that off.)

# %%
import contextlib
import socket

import httpx
import uvicorn
from labengine.serve import build_app

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(build_app(online, "lab-model"), host="127.0.0.1", port=port,
                                      log_level="warning"))
server.capture_signals = contextlib.nullcontext     # leave the kernel's signal handlers alone
server_task = asyncio.ensure_future(server.serve())
while not server.started:
    await asyncio.sleep(0.05)
base = f"http://127.0.0.1:{port}"
print("serving on", base)

# %% [markdown]
# A plain completion request, the JSON an OpenAI client would send. The client must be
# asynchronous (`httpx.AsyncClient`): the server runs in this same event loop, so a blocking
# call would wait for an answer that can never be produced.

# %%
async with httpx.AsyncClient(base_url=base, timeout=60) as http:
    print((await http.get("/v1/models")).json())
    r = await http.post("/v1/completions", json={"model": "lab-model", "prompt": "The capital of France is",
                                                  "max_tokens": 16, "temperature": 0})
    body = r.json()
print(r.status_code, body["choices"][0])
print("usage:", body["usage"])
direct = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
assert r.status_code == 200
check_same_greedy("the server answers as the engine does", [body["choices"][0]["text"]], [direct.outputs[0].text], llm)

# %% [markdown]
# With `"stream": true` the answer arrives as server-sent events, one chunk per step; we
# measure the TTFT a real HTTP client sees:

# %%
chunks, t0 = [], time.perf_counter()
async with httpx.AsyncClient(base_url=base, timeout=60) as http:
    async with http.stream("POST", "/v1/completions",
                           json={"model": "lab-model", "prompt": "Once upon a time", "max_tokens": 24,
                                 "temperature": 0, "stream": True}) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append((time.perf_counter() - t0, line[6:]))
import json
text = "".join(json.loads(c)["choices"][0]["text"] for _, c in chunks)
print(f"{len(chunks)} chunks; first after {chunks[0][0] * 1e3:.0f} ms, last after {chunks[-1][0] * 1e3:.0f} ms")
print(repr(text))
assert len(chunks) > 1

# %%
# Errors come back as HTTP status codes with OpenAI's error body:
async with httpx.AsyncClient(base_url=base, timeout=60) as http:
    bad = await http.post("/v1/completions", json={"model": "lab-model", "prompt": "Hi", "temperature": -1})
print(bad.status_code, bad.json()["error"]["message"])
assert bad.status_code == 400

server.should_exit = True
await server_task
print("server stopped")

# %% [markdown]
# ## What to remember
#
# * Offline maximises throughput: all requests are batched from the first step.
# * Online minimises each request's wait: TTFT and per-token latency are what users feel,
#   and larger batches trade a little of both for throughput.
# * The server is the async engine behind HTTP; the notebook can be its client.
#
# Next: **7. Request and response objects**, every field.
