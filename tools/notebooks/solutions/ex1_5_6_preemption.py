# Source of solutions/ex1_5_6_preemption.ipynb; exercises/ is generated from it.

# %% [markdown]
# # Exercise 1.5.6: make preemption happen, then explain it from the trace
#
# **Goal:** give the engine a KV cache that is too small for your batch, on purpose; find in
# the trace which request was preempted, when, and why that one; count what the preemption
# cost; and show that it did not change any result.
#
# The engine below has only `NUM_BLOCKS` blocks of `BLOCK_SIZE` tokens and preempts by
# **recompute** (notebook 8). Write your code in the `# YOUR CODE HERE` cells; the `# Check`
# cells test your results. Time: about 30 minutes.

# %%
import matplotlib.pyplot as plt

import labengine
from labengine import LLM, SamplingParams, viz
from labengine.grading import (blocks_needed, check, check_equal, check_same_greedy, intervals_overlap,
                               preempted_request_ids, preemptions)

MODEL = labengine.DEFAULT_MODEL
BLOCK_SIZE, NUM_BLOCKS = 8, 16
llm = LLM(model=MODEL, seed=0, block_size=BLOCK_SIZE, num_gpu_blocks_override=NUM_BLOCKS, max_model_len=128,
          preemption_mode="recompute")
tokenizer = llm.get_tokenizer()

# %% [markdown]
# ## Task 1: a workload that cannot fit
#
# Choose `prompts` (at least 4) and one **greedy** `params` with `ignore_eos=True`, such that
# each request alone fits in the cache, but all of them together would need more than
# `NUM_BLOCKS` blocks at their peak. Compute `peak_total`, the sum of your requests' peak
# block counts (exercise 1.5.5: a request stores all but its last generated token), and print
# it next to `NUM_BLOCKS`.

# %% tags=["solution"]
### BEGIN SOLUTION
prompts = [f"Story {i}: the robot and the sea." for i in range(4)]
params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
peak_total = sum(blocks_needed(len(tokenizer.encode(p)) + params.max_tokens - 1, BLOCK_SIZE) for p in prompts)
print(f"together the requests need {peak_total} blocks at their peaks; the cache has {NUM_BLOCKS}")
### END SOLUTION

# %% tags=["check"]
# Check 1: the workload overflows the cache, but each request fits alone
_peaks = [blocks_needed(len(tokenizer.encode(p)) + params.max_tokens - 1, BLOCK_SIZE) for p in prompts]
check("at least 4 prompts", len(prompts) >= 4, f"{len(prompts)} prompts")
check("greedy, ignore_eos", params.temperature == 0.0 and params.ignore_eos and params.n == 1,
      f"temperature={params.temperature}, ignore_eos={params.ignore_eos}")
check_equal("peak_total", peak_total, sum(_peaks))
check("together they need more than the cache", sum(_peaks) > NUM_BLOCKS, f"{sum(_peaks)} > {NUM_BLOCKS}")
check("each fits alone", max(_peaks) <= NUM_BLOCKS, f"the largest needs {max(_peaks)}")

# %% [markdown]
# ## Task 2: run it, traced
#
# Generate all `prompts` with `params` in one call inside `with llm.trace() as trace:`; keep
# the results in `outputs`. Then draw the scheduler timeline and the block map of the run
# (`viz.plot_timeline`, `viz.plot_block_map`, from `trace.to_dataframe()`).

# %% tags=["solution"]
### BEGIN SOLUTION
with llm.trace() as trace:
    outputs = llm.generate(prompts, params, use_tqdm=False)
df = trace.to_dataframe()
fig, axes = plt.subplots(2, 1, figsize=(12, 9), layout="constrained")
viz.plot_timeline(df, ax=axes[0])
viz.plot_block_map(df, ax=axes[1])
plt.show()
### END SOLUTION

# %% tags=["check"]
# Check 2: the traced run preempted
_df = trace.to_dataframe()
check_equal("the trace holds your requests", sorted(_df.loc[_df["event"] == "request_added", "request_id"]),
            sorted(o.request_id for o in outputs))
check("preemption happened", len(preemptions(_df)) > 0, f"{len(preemptions(_df))} preempted events")

# %% [markdown]
# ## Task 3: read the preemption from the trace
#
# From `trace.to_dataframe()` (the `preempted`, `block_allocated`, `block_freed`,
# `request_added` and `step_finished` rows), compute:
#
# * `num_preemptions`: how many times a request was preempted; `preempted_ids`: the set of
#   request ids that were preempted at least once;
# * `victim` and `preempt_step`: the request id and the engine step of the **first** preemption;
# * `holders`: the set of request ids that held at least one device block just before that
#   first preemption (replay the `block_allocated` / `block_freed` rows that come before it;
#   rows with `device == "gpu"`);
# * `arrived_last(df, request_id, among)`: a function that returns `True` if `request_id`
#   arrived after every other request of the set `among` (arrival order = the order of the
#   `request_added` rows of `df`), and `victim_is_newest = arrived_last(df, victim, holders)`;
# * `freed_by_preemption`: how many blocks were freed with `reason == "preempted"` in the whole run;
# * `recomputed_tokens`: the prefill tokens the run processed (`num_prefill_tokens` of the
#   `step_finished` rows, summed) minus the tokens of the prompts themselves: the work that
#   preemption made the engine do twice.

# %% tags=["solution"]
### BEGIN SOLUTION
pre = df[df["event"] == "preempted"]
num_preemptions = len(pre)
preempted_ids = set(pre["request_id"])
first = pre.index[0]
victim, preempt_step = pre.loc[first, "request_id"], int(pre.loc[first, "step"])

held = {}
ledger = df.loc[:first - 1]
ledger = ledger[ledger["event"].isin(["block_allocated", "block_freed"]) & (ledger["device"] == "gpu")]
for ev, rid in zip(ledger["event"], ledger["request_id"]):
    held[rid] = held.get(rid, 0) + (1 if ev == "block_allocated" else -1)
holders = {rid for rid, n in held.items() if n > 0}

def arrived_last(df, request_id, among):
    arrival = list(df.loc[df["event"] == "request_added", "request_id"])
    return all(arrival.index(request_id) > arrival.index(r) for r in among if r != request_id)

victim_is_newest = arrived_last(df, victim, holders)

freed_by_preemption = int(((df["event"] == "block_freed") & (df["reason"] == "preempted")).sum())
prefill = int(df.loc[df["event"] == "step_finished", "num_prefill_tokens"].sum())
recomputed_tokens = prefill - sum(len(o.prompt_token_ids) for o in outputs)
print(f"{num_preemptions} preemptions of {sorted(preempted_ids)}; first: request {victim} at step {preempt_step}")
print(f"holding blocks then: {sorted(holders)}; the victim was the newest: {victim_is_newest}")
print(f"{freed_by_preemption} blocks freed by preemption, {recomputed_tokens} tokens recomputed")
### END SOLUTION

# %% tags=["check"]
# Check 3: the facts of the preemption
_pre = _df[_df["event"] == "preempted"]
check_equal("num_preemptions", num_preemptions, len(_pre))
check_equal("preempted_ids", set(preempted_ids), preempted_request_ids(_df))
check_equal("victim, preempt_step", (victim, int(preempt_step)), (_pre.iloc[0]["request_id"], int(_pre.iloc[0]["step"])))
_pos = _df.index.get_loc(_pre.index[0])
_led = _df.iloc[:_pos]
_led = _led[_led["event"].isin(["block_allocated", "block_freed"]) & (_led["device"] == "gpu")]
_held = _led.assign(d=(_led["event"] == "block_allocated").map({True: 1, False: -1})).groupby("request_id")["d"].sum()
_holders = set(_held[_held > 0].index)
check_equal("holders", set(holders), _holders)
_order = list(_df.loc[_df["event"] == "request_added", "request_id"])
_newest = max(_holders, key=_order.index)
check_equal("victim_is_newest", bool(victim_is_newest), _newest == _pre.iloc[0]["request_id"])
# arrived_last on every request that held blocks: True for the newest only
check_equal("arrived_last(df, r, holders) for each holder r, in arrival order",
            [bool(arrived_last(_df, _r, _holders)) for _r in sorted(_holders, key=_order.index)],
            [_r == _newest for _r in sorted(_holders, key=_order.index)],
            hint="compare the positions of the request_added rows")
_all = sorted(set(_order), key=_order.index)
check_equal("arrived_last(df, r, all requests) for each request r", [bool(arrived_last(_df, _r, set(_all))) for _r in _all],
            [_r == _all[-1] for _r in _all])
check_equal("arrived_last(df, r, among) with among = every request but the last, for each r in it",
            [bool(arrived_last(_df, _r, set(_all[:-1]))) for _r in _all[:-1]], [_r == _all[-2] for _r in _all[:-1]],
            hint="arrived_last compares request_id with the requests in `among` only")
check_equal("freed_by_preemption",
            int(freed_by_preemption), int(((_df["event"] == "block_freed") & (_df["reason"] == "preempted")).sum()))
_pf = int(_df.loc[_df["event"] == "step_finished", "num_prefill_tokens"].sum())
check_equal("recomputed_tokens", int(recomputed_tokens), _pf - sum(len(o.prompt_token_ids) for o in outputs))
check("preemption cost recomputation", recomputed_tokens > 0, f"{recomputed_tokens} tokens prefilled twice")

# %% [markdown]
# ## Task 4: same results?
#
# Run each prompt **alone** (one `generate` call per prompt, same `params`): alone, a request
# always fits, so nothing is preempted. Keep the results in `alone`, in prompt order.

# %% tags=["solution"]
### BEGIN SOLUTION
alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
same = [a.outputs[0].token_ids == o.outputs[0].token_ids for a, o in zip(alone, outputs)]
print(f"{sum(same)} of {len(same)} requests generated the same tokens with and without preemption")
### END SOLUTION

# %% tags=["check"]
# Check 4: preemption changed when, not what
check_equal("alone: one output per prompt, in order", [a.prompt for a in alone], list(prompts))
check("alone are new runs, not the traced ones",
      not {a.request_id for a in alone} & {o.request_id for o in outputs},
      "their request ids differ from the traced run's",
      hint="call llm.generate once per prompt; don't reuse `outputs`")
check("the traced run (outputs) is the one that was preempted",
      bool(preempted_request_ids(_df) & {o.request_id for o in outputs}), "some of its requests were preempted")
check("alone ran one request at a time", not intervals_overlap(
      [(a.metrics.first_scheduled_time, a.metrics.finished_time) for a in alone]),
      "no two of them ran at the same time (so nothing had to be preempted)")
check("every alone request generated max_tokens tokens",
      all(a.finished and len(a.outputs[0].token_ids) == params.max_tokens for a in alone), f"{params.max_tokens} each")
check_same_greedy("every request generated the same tokens, preempted ones included", alone, outputs, llm)

# %% [markdown]
# ## Task 5: explain
#
# Why does the scheduler preempt the **newest** running request? Set `ANSWER` to one letter:
#
# * a. because it always holds the most blocks
# * b. because it has done the least work, so recomputing it wastes the least, and the
#   requests that came first keep their place (first come, first served)
# * c. because it is always the shortest request
# * d. it does not: the victim is chosen at random

# %% tags=["solution"]
### BEGIN SOLUTION
ANSWER = "b"
### END SOLUTION

# %% tags=["check"]
# Check 5: the policy
check_equal("ANSWER", str(ANSWER).strip().lower(), "b")
