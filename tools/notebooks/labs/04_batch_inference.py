# Source of labs/04_batch_inference.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 4. Batch inference: why one call beats a loop
#
# You can call `generate` once per prompt, or once with all of them. The results are the
# same; the time is not. In this notebook you measure the difference **on your own machine**,
# then use the trace to see where it comes from:
#
# * **one by one**: each engine step carries a single sequence;
# * **static batches**: groups of prompts, each group waiting for its slowest member;
# * **continuous batching** (what `generate` does with a list): the scheduler refills the batch
#   at *every* step, so a finished request's place goes to a waiting one at once.

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd

import labengine
from labengine import LLM, SamplingParams, viz
from labengine.grading import check_same_greedy
from labengine.widgets import BlockMapExplorer

MODEL = labengine.DEFAULT_MODEL
# A small cache (64 blocks) keeps the block map readable; max_num_seqs=8 caps the batch
# so that you can watch requests wait for a free place.
llm = LLM(model=MODEL, seed=0, max_num_seqs=8, num_gpu_blocks_override=64, max_model_len=256)
print(llm)

# %% [markdown]
# This notebook **times** things, so first one setting that decides what a CPU measures.
# PyTorch starts one thread per core; for a model this small, extra threads do not make a
# step faster, and while anything else keeps a core busy (a browser, a video call) they spend
# their time waiting for each other, so the loop and the batch would be timed on how badly
# the threads collide, not on batching. `use_lesson_threads` picks the count and says why (on
# a GPU it changes nothing):

# %%
from labengine.cpu_threads import use_lesson_threads

print(use_lesson_threads(llm))

# %% [markdown]
# The workload: 16 prompts with different answer lengths (3 to 19 tokens), greedy, with
# `ignore_eos=True` so every request generates exactly its `max_tokens`. The three ways of
# running it therefore do exactly the same work and must return exactly the same tokens.

# %%
topics = ["the sea", "a robot", "the moon", "Paris", "a cat", "music", "rain", "a train"]
prompts = [f"Tell me about {topics[i % 8]}. Answer {i}:" for i in range(16)]
lengths = [3 + (7 * i) % 17 for i in range(16)]
params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
print("answer lengths:", lengths)

REPEATS = 3   # each way is timed 3 times; the best time counts (anything else on the machine only adds)

def run(chunks):
    """Generate the prompts in the given chunks (lists of indices), traced, REPEATS times.
    Returns the outputs, the best wall time in seconds, and the trace of one run (every run takes
    the same steps: same prompts, greedy, fixed lengths)."""
    times = []
    for _ in range(REPEATS):
        outs = {}
        with llm.trace() as trace:
            t0 = time.perf_counter()
            for chunk in chunks:
                res = llm.generate([prompts[i] for i in chunk], [params[i] for i in chunk], use_tqdm=False)
                outs.update(zip(chunk, res))
            times.append(time.perf_counter() - t0)
    return [outs[i] for i in range(len(prompts))], min(times), trace

llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up, not measured

one_by_one = run([[i] for i in range(16)])
static = run([list(range(k, k + 8)) for k in range(0, 16, 8)])
continuous = run([list(range(16))])

# %% [markdown]
# Two kinds of evidence side by side. **Engine steps** and **tokens per step** are counted,
# not timed: they come out the same on every machine, however busy. **Seconds** (the best of
# three runs) and tokens per second are what your machine made of them.

# %%
rows = []
for name, (outs, secs, trace) in {"one by one": one_by_one, "static batches of 8": static,
                                  "continuous batching": continuous}.items():
    st = trace.steps()
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    rows.append({"mode": name, "engine steps": len(st), "output tokens per step": round(n_tokens / len(st), 2),
                 "mean batch": round(st["batch_size"].mean(), 1), "seconds": round(secs, 3),
                 "requests/s": round(len(outs) / secs, 1), "output tokens/s": round(n_tokens / secs, 1)})
summary = pd.DataFrame(rows).set_index("mode")
summary

# %%
check_same_greedy("one by one and continuous batching: same tokens", one_by_one[0], continuous[0], llm)
check_same_greedy("static and continuous batching: same tokens", static[0], continuous[0], llm)
steps = summary["engine steps"]
assert steps["continuous batching"] < steps["static batches of 8"] < steps["one by one"]
speedup = one_by_one[1] / continuous[1]
print(f"counted: continuous batching did the work in {steps['continuous batching']} engine steps, the loop in "
      f"{steps['one by one']} ({steps['one by one'] / steps['continuous batching']:.1f}x as many), static batches "
      f"in {steps['static batches of 8']}")
print(f"timed:   continuous batching ran {speedup:.1f}x as fast as the loop and "
      f"{static[1] / continuous[1]:.2f}x as fast as static batches, on this machine")
assert speedup > 1, ("the loop was timed faster than one batched call: something else took this machine's cores "
                     "during the measurement; run the cells again")

fig, ax = plt.subplots(figsize=(7, 2.8), layout="constrained")
ax.barh(summary.index, summary["output tokens/s"], color=["#999999", "#ff7f0e", "#1f77b4"])
ax.set_xlabel("output tokens per second (higher is better)")
ax.set_title(f"throughput of the same 16 requests, best of {REPEATS} runs")
ax.invert_yaxis()
plt.show()

# %% [markdown]
# ## Where the time goes: one step
#
# Why is a batch so much cheaper? Look at the step latency of the continuous run. A decode
# step with 8 sequences costs barely more than a step with 1: the expensive part of a step
# is reading the model's weights (and, on a GPU, launching its kernels), and that is done once
# per step however many sequences ride along. Batching divides that fixed cost among them.

# %%
cont_df = continuous[2].to_dataframe()
viz.plot_step_latency(cont_df)
plt.show()
lat = viz.step_latency_data(cont_df)
decode = lat[~lat["is_prefill"]]
by_size = decode.groupby("batch_size")["latency_ms"].median()
print("median decode step latency by batch size (ms):")
print(by_size.round(2).to_string())
small, large = int(by_size.index.min()), int(by_size.index.max())
print(f"\na decode step with {large} sequences took {by_size[large] / by_size[small]:.1f}x as long as one with "
      f"{small}, for {large / small:.0f}x the tokens")

# %% [markdown]
# ## The scheduler timeline
#
# One row per request, one column per engine step. Grey: waiting for a place; orange: the
# prefill step; blue: decoding; light blue: running but not in this step (a prefill step
# pauses the decodes, because a step is all prefill or all decode); the black tick: finished.
# Notice how a new request starts as soon as another finishes: the batch never waits for its
# slowest member. Compare with the static run below it, where each group of 8 drains down
# to its longest request before the next group may start.

# %%
fig, axes = plt.subplots(2, 1, figsize=(12, 9), layout="constrained")
viz.plot_timeline(cont_df, ax=axes[0])
axes[0].set_title("continuous batching (one generate call)")
viz.plot_timeline(static[2].to_dataframe(), ax=axes[1])
axes[1].set_title("static batches of 8 (two generate calls)")
plt.show()

# %% [markdown]
# The same story in numbers: in the continuous run, requests joined the batch while others
# were still decoding.

# %%
req = continuous[2].requests()
first = req["first_scheduled_step"].min()
late = req[req["first_scheduled_step"] > first]
joined = [r.request_id for r in late.itertuples()
          if ((req["first_scheduled_step"] < r.first_scheduled_step) & (req["finish_step"] > r.first_scheduled_step)).any()]
print(f"{len(late)} of {len(req)} requests started after the first step; {len(joined)} of them joined "
      "while other requests were still decoding")
print(f"the batch never held more than {int(continuous[2].steps()['batch_size'].max())} sequences (max_num_seqs=8)")
assert len(joined) > 0 and int(continuous[2].steps()["batch_size"].max()) <= 8

# %% [markdown]
# ## The block map
#
# Every request holds KV blocks while it runs: `ceil(tokens / block_size)` of them, growing by
# one each time its last block fills up. Rows are the 64 physical blocks, columns the engine
# steps, colours the requests. Blocks are returned the step a request finishes and handed to
# the next one; a request's blocks need not be next to each other (that is the point of paging).

# %%
viz.plot_block_map(cont_df)
plt.show()
bm = viz.block_map_data(cont_df)
print(f"at most {bm.used().max()} of {bm.num_blocks} blocks in use at once")
assert bm.used().max() <= 64

# %% [markdown]
# Scrub through the run step by step (drag the slider; pick a request to see its block table):

# %%
BlockMapExplorer(continuous[2])

# %% [markdown]
# ## What to remember
#
# * Give `generate` the whole list. The engine batches for you: it needed a fraction of the
#   loop's engine steps, and the time followed (the measured speed-up is printed above).
# * A step's cost barely grows with the batch, so more sequences per step means more tokens per second.
# * Continuous batching refills the batch at every step; static batches wait for their slowest member.
#
# Next: **5. Async inference**, where requests arrive while the engine is already running.
