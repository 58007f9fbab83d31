# Source of labs/05_async_inference.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 5. Async inference: requests that arrive while the engine runs
#
# `LLM.generate` is *offline*: you hand over every prompt at once and wait for all results.
# A server works differently: requests arrive one by one, at any time, and each client wants
# its tokens **as soon as they exist**. `AsyncLLMEngine` is the engine for that case:
#
# * `engine.generate(prompt, params, request_id)` returns a stream: `async for out in ...`
#   yields the request's output after every step it took part in (the text so far);
# * a background task runs the engine step after step; a new request joins the running
#   batch at the next step, it does not wait for the others to finish.
#
# Jupyter runs an asyncio event loop already, so a cell can use `await` and `async for`
# directly (no `asyncio.run`).

# %%
import asyncio
import time

import matplotlib.pyplot as plt
from IPython.display import display

import labengine
from labengine import AsyncEngineArgs, AsyncLLMEngine, SamplingParams, demos, viz
from labengine.grading import check_same_greedy

MODEL = labengine.DEFAULT_MODEL
engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=MODEL, seed=0, disable_log_requests=True))
engine

# %% [markdown]
# ## Concurrent requests
#
# Start three requests and wait for all of them. With vLLM you would consume each stream to
# its end; labengine's stream can also be *awaited*, which gives its final output (so the
# lesson's `asyncio.gather(*tasks)` works as written).

# %%
params = SamplingParams(temperature=0.0, max_tokens=24)
prompts = ["Hello world", "How are you?", "What is AI?"]

async def final_output(prompt, request_id):
    last = None
    async for out in engine.generate(prompt, params, request_id):   # the portable way
        last = out
    return last

t0 = time.perf_counter()
results = await asyncio.gather(*(final_output(p, f"request-{i}") for i, p in enumerate(prompts)))
print(f"3 requests, concurrently, in {time.perf_counter() - t0:.2f} s")
for r in results:
    print(f"{r.request_id}: {r.prompt!r} -> {r.outputs[0].text!r}")

# the same, awaiting the streams directly (a labengine convenience)
again = await asyncio.gather(*(engine.generate(p, params, f"again-{i}") for i, p in enumerate(prompts)))
check_same_greedy("both ways give the same greedy answers", again, results, engine.engine)

# %% [markdown]
# ## Streaming into the notebook
#
# Each item a stream yields is *cumulative*: `out.outputs[0].text` is the whole text so far.
# To print only what is new, remember how much you already showed. Below, two requests
# stream at the same time, each into its own output line, and we note when each piece
# arrived. (`display("some text")` would show the string's Python repr, quotes included;
# `demos.stream_line` builds a line that shows as plain text.)

# %%
stream_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=40, seed=0)
arrivals = {}

async def stream_into(prompt, request_id, handle):
    shown, stamps = "", []
    t0 = time.perf_counter()
    async for out in engine.generate(prompt, stream_params, request_id):
        text = out.outputs[0].text
        new, shown = text[len(shown):], text
        stamps.append((time.perf_counter() - t0, len(out.outputs[0].token_ids)))
        handle.update(demos.stream_line(request_id, prompt, shown, out.finished))
    arrivals[request_id] = stamps
    return out

handles = {rid: display(demos.stream_line(rid, "", "", False), display_id=True) for rid in ("story", "intro")}
outs = await asyncio.gather(stream_into("Once upon a time", "story", handles["story"]),
                            stream_into("Hello, my name is", "intro", handles["intro"]))
for rid, stamps in arrivals.items():
    print(f"{rid}: {len(stamps)} updates, first after {stamps[0][0] * 1e3:.0f} ms, last after {stamps[-1][0]:.2f} s")
assert all(o.finished for o in outs)

# %% [markdown]
# When did each token arrive? The first one comes after the **prefill** (the whole prompt in
# one step); then one token per decode step, steadily. The gap before the first token is the
# *time to first token* (TTFT); the slope after it is the *per-token latency*. Notebook 6
# measures both properly.

# %%
fig, ax = plt.subplots(figsize=(8, 3.2), layout="constrained")
for rid, stamps in arrivals.items():
    ax.step([s for s, _ in stamps], [n for _, n in stamps], where="post", label=rid)
ax.set_xlabel("seconds since the request was sent")
ax.set_ylabel("tokens received")
ax.legend()
plt.show()

# %% [markdown]
# ## Late arrivals join the running batch
#
# Now the important part: a request that arrives while another is generating does **not**
# wait for it. We start a long request, let it produce 8 tokens, then send two more. The
# trace records every step; the scheduler timeline shows the newcomers' prefill slotted in
# between the first request's decode steps, after which all three decode together.

# %%
long_params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
short_params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

async def consume(stream):
    last = None
    async for last in stream:
        pass
    return last

with engine.trace() as trace:
    first = engine.generate("A long story about the sea:", long_params, "early")
    late = []
    async for out in first:                    # read the first request's stream ...
        if len(out.outputs[0].token_ids) == 8 and not late:   # ... after its 8th token, send two more
            late = [asyncio.ensure_future(consume(engine.generate(p, short_params, rid)))
                    for p, rid in (("Why is the sky blue?", "late-1"), ("Name a city:", "late-2"))]
    late_outs = await asyncio.gather(*late)
    await engine.wait_until_idle()

df = trace.to_dataframe()
viz.plot_timeline(df)
plt.show()

# %%
req = trace.requests().set_index("request_id")
early, l1, l2 = req.loc["early"], req.loc["late-1"], req.loc["late-2"]
print(req[["arrival_step", "first_scheduled_step", "finish_step", "output_len", "ttft_s"]])
assert early.first_scheduled_step < l1.first_scheduled_step < early.finish_step, "late-1 joined a running batch"
assert early.first_scheduled_step < l2.first_scheduled_step < early.finish_step, "late-2 joined a running batch"
steps = trace.steps()
print(f"\nbatch size by step: {steps['batch_size'].tolist()}")
assert steps["batch_size"].max() == 3, "at some step all three decoded together"

# %% [markdown]
# Read the picture: `early` decodes alone; at the step the two new requests arrive, one
# prefill step runs for both of them (the `early` row shows "running, not in batch" for that
# step), then all three decode together until the short ones finish, and `early` carries on
# alone. The same continuous batching as in notebook 4, now with requests that arrive over time.
#
# ## Cancelling
#
# A client that goes away should not keep using the GPU. Breaking out of the `async for`, or
# `await engine.abort(request_id)`, ends the request and frees its KV blocks at once:

# %%
with engine.trace() as abort_trace:
    stream = engine.generate("Count to a hundred:", SamplingParams(max_tokens=200, ignore_eos=True), "chatty")
    async for out in stream:
        if len(out.outputs[0].token_ids) >= 5:
            await engine.abort("chatty")
    await engine.wait_until_idle()
ad = abort_trace.to_dataframe()
fin = ad[ad["event"] == "request_finished"].iloc[0]
print(f"stopped after {len(out.outputs[0].token_ids)} of 200 tokens; finish_reason={fin.finish_reason!r}; "
      f"blocks freed: {int((ad['event'] == 'block_freed').sum())} of {int((ad['event'] == 'block_allocated').sum())}")
assert fin.finish_reason == "abort"
assert (ad["event"] == "block_freed").sum() == (ad["event"] == "block_allocated").sum()

# %% [markdown]
# ## What to remember
#
# * `AsyncLLMEngine.generate` streams cumulative outputs; `await` / `async for` work directly in a notebook.
# * New requests join the running batch at the next step; nobody waits for a whole batch to finish.
# * Aborting a request frees its place and its KV blocks immediately.
#
# Next: **6. Offline vs online**, throughput against latency, measured.
