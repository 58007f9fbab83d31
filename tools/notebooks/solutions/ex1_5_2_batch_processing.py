# Source of solutions/ex1_5_2_batch_processing.ipynb; exercises/ is generated from it.

# %% [markdown]
# # Exercise 1.5.2: batch processing
#
# **Goal:** process 50+ prompts in one batch, measure the throughput, and compare it with
# processing them one by one, on your machine.
#
# Write your code in the `# YOUR CODE HERE` cells; the `# Check` cells test your results.
# Time: about 30 minutes.

# %%
import time

import labengine
from labengine import LLM, SamplingParams
from labengine.grading import check, check_close, check_equal, check_same_greedy, intervals_overlap

MODEL = labengine.DEFAULT_MODEL
llm = LLM(model=MODEL, seed=0)
# Greedy, fixed length: both runs do exactly the same work.
params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
llm.generate(["warm-up"], params, use_tqdm=False);  # the first call pays one-time costs

# %% [markdown]
# ## Task 1: the prompts
#
# Make a list `prompts` of **at least 50 different** prompts (strings). Generate them with a
# loop or a comprehension; for example questions about different numbers, animals or cities.

# %% tags=["solution"]
### BEGIN SOLUTION
animals = ["cat", "dog", "fox", "owl", "bee", "cow", "eel", "ant", "bat", "elk"]
prompts = [f"Question {i}: what does a {animals[i % 10]} eat?" for i in range(50)]
### END SOLUTION

# %% tags=["check"]
# Check 1: 50+ different prompts
check("at least 50 prompts", isinstance(prompts, list) and len(prompts) >= 50, f"{len(prompts)} prompts")
check("all strings, all different", all(isinstance(p, str) and p for p in prompts) and len(set(prompts)) == len(prompts),
      f"{len(set(prompts))} distinct")

# %% [markdown]
# ## Task 2: one batch
#
# Generate all `prompts` with `params` in **one** `llm.generate` call. Store the results in
# `batch_outputs` and the call's wall-clock time in `batch_s`. Compute the throughput
# `batch_rps` in requests per second.

# %% tags=["solution"]
### BEGIN SOLUTION
t0 = time.perf_counter()
batch_outputs = llm.generate(prompts, params, use_tqdm=False)
batch_s = time.perf_counter() - t0
batch_rps = len(prompts) / batch_s
print(f"batch: {len(prompts)} prompts in {batch_s:.2f} s = {batch_rps:.1f} requests/s")
### END SOLUTION

# %% tags=["check"]
# Check 2: one output per prompt, run together
check_equal("one output per prompt, in order", [o.prompt for o in batch_outputs], prompts)
_iv = [(o.metrics.first_scheduled_time, o.metrics.finished_time) for o in batch_outputs]
check("the requests ran at the same time (one batch)", intervals_overlap(_iv),
      "their [scheduled, finished] intervals overlap")
_span = max(o.metrics.finished_time for o in batch_outputs) - min(o.metrics.arrival_time for o in batch_outputs)
check("batch_s is the time of that call", _span * 0.95 <= batch_s <= _span + max(1.0, 0.5 * _span),
      f"{batch_s:.2f} s measured; the engine's own metrics say the batch took {_span:.2f} s",
      hint="time exactly the one llm.generate call with time.perf_counter()")
check_close("batch_rps = len(prompts) / batch_s", batch_rps, len(prompts) / batch_s, rel=0.01)

# %% [markdown]
# ## Task 3: one by one
#
# Now generate the same prompts **one per call** (a loop). Store the results, in prompt order,
# in `single_outputs`, the total time in `single_s` and the throughput in `single_rps`.
# Finally compute `speedup = batch_rps / single_rps` and print both throughputs.

# %% tags=["solution"]
### BEGIN SOLUTION
single_outputs = []
t0 = time.perf_counter()
for p in prompts:
    single_outputs.extend(llm.generate([p], params, use_tqdm=False))
single_s = time.perf_counter() - t0
single_rps = len(prompts) / single_s
speedup = batch_rps / single_rps
print(f"one by one: {single_rps:.1f} requests/s; batch: {batch_rps:.1f} requests/s; speedup {speedup:.1f}x")
### END SOLUTION

# %% tags=["check"]
# Check 3: one by one really was one by one, and did the same work
check_equal("one output per prompt, in order", [o.prompt for o in single_outputs], prompts)
_iv = [(o.metrics.first_scheduled_time, o.metrics.finished_time) for o in single_outputs]
check("no two requests ran at the same time", not intervals_overlap(_iv), "their intervals never overlap")
check_same_greedy("same tokens as the batch (greedy)", single_outputs, batch_outputs, llm)
_span = max(o.metrics.finished_time for o in single_outputs) - min(o.metrics.arrival_time for o in single_outputs)
check("single_s is the time of the loop", _span * 0.95 <= single_s <= _span + max(1.0, 0.5 * _span),
      f"{single_s:.2f} s measured; the engine's own metrics say the loop took {_span:.2f} s "
      "(first arrival to last finish)",
      hint="start the clock just before the loop and stop it just after it")
check_close("single_rps = len(prompts) / single_s", single_rps, len(prompts) / single_s, rel=0.01)
check_close("speedup = batch_rps / single_rps", speedup, batch_rps / single_rps, rel=0.01)
check("the speedup is a measurement", speedup > 0, f"{speedup:.1f}x on this machine")
if speedup <= 1.0:  # a fact about the machine at that moment, not about your code: it is not graded
    print("  note: the batch was not faster this time; the machine was probably busy. Run both again.")

# %% [markdown]
# ## Reflect
#
# * Double `max_tokens`. Does the speedup grow or shrink? Why? (Hint: notebook 4, step latency.)
# * Where would the speedup stop growing? Try `LLM(..., max_num_seqs=8)`.
