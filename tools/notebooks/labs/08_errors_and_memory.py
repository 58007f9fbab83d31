# Source of labs/08_errors_and_memory.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 8. Error handling and memory
#
# Two kinds of trouble:
#
# 1. **Invalid input.** A bad parameter or prompt raises a `ValueError` *before* anything
#    runs, with a message that names the problem. Nothing is left half-done.
# 2. **Not enough memory.** A KV cache that is too small for the batch is not an error: the
#    scheduler **preempts** a request (sets it aside) and resumes it later, either by
#    recomputing its KV cache or by swapping it out to CPU memory and back. You will make
#    that happen, watch it on the block map, and compare the two modes.
#
# Finally, how much memory do the model and its KV cache take on your device?

# %%
import contextlib
import gc
import io
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch

import labengine
from labengine import LLM, SamplingParams, demos, viz
from labengine.grading import check_same_greedy
from labengine.utils import is_cpu

MODEL = labengine.DEFAULT_MODEL
llm = LLM(model=MODEL, seed=0)
max_len = llm.llm_engine.model_config.max_model_len

# %% [markdown]
# ## The `ValueError` cases
#
# `SamplingParams` checks its own fields when you create it; `generate` checks each prompt
# against the model (empty, too long, unknown token ids, too many logprobs); `LLM(...)`
# checks the engine's arguments before loading anything. We try each and collect the messages.

# %%
def attempt(what, fn):
    try:
        fn()
    except ValueError as e:
        return {"case": what, "raises": "ValueError", "message": str(e)}
    except Exception as e:  # noqa: BLE001 - shown, not hidden
        return {"case": what, "raises": type(e).__name__, "message": str(e)}
    return {"case": what, "raises": "-", "message": "(accepted)"}

ok = SamplingParams(max_tokens=4)
n_heads = llm.llm_engine.model_config.hf_config.num_attention_heads
bad_tp = next(k for k in range(3, n_heads + 2) if n_heads % k)   # cannot split the attention heads
cases = [
    ("temperature=-1", lambda: SamplingParams(temperature=-1.0)),
    ("top_p=0", lambda: SamplingParams(top_p=0.0)),
    ("top_k=0", lambda: SamplingParams(top_k=0)),
    ("max_tokens=0", lambda: SamplingParams(max_tokens=0)),
    ("min_tokens > max_tokens", lambda: SamplingParams(min_tokens=10, max_tokens=5)),
    ("n=3, best_of=2", lambda: SamplingParams(n=3, best_of=2)),
    ("beam search with temperature 0.8", lambda: SamplingParams(use_beam_search=True, best_of=2, temperature=0.8)),
    ("stop=['']", lambda: SamplingParams(stop=[""])),
    ("empty prompt", lambda: llm.generate([""], ok, use_tqdm=False)),
    ("prompt longer than max_model_len", lambda: llm.generate([{"prompt_token_ids": [5] * (max_len + 1)}], ok, use_tqdm=False)),
    ("token id outside the vocabulary", lambda: llm.generate([{"prompt_token_ids": [10**9]}], ok, use_tqdm=False)),
    ("logprobs=50 (max_logprobs=20)", lambda: llm.generate(["Hi"], SamplingParams(logprobs=50), use_tqdm=False)),
    ("2 prompts, 3 SamplingParams", lambda: llm.generate(["a", "b"], [ok, ok, ok], use_tqdm=False)),
    (f"LLM(tensor_parallel_size={bad_tp}): {n_heads} heads", lambda: LLM(model=MODEL, tensor_parallel_size=bad_tp)),
    ("LLM(gpu_memory_utilization=1.2)", lambda: LLM(model=MODEL, gpu_memory_utilization=1.2)),
    ("LLM(quantization='awq')", lambda: LLM(model=MODEL, quantization="awq")),
]
errors = pd.DataFrame([attempt(what, fn) for what, fn in cases])
pd.set_option("display.max_colwidth", 120)
errors

# %%
assert (errors["raises"] == "ValueError").all(), errors[errors["raises"] != "ValueError"]
print(f"all {len(errors)} cases raised a ValueError")

# %% [markdown]
# A `generate` call is checked **as a whole** before any request starts: one bad prompt
# among good ones rejects the call, and the engine is left exactly as it was.

# %%
bm = llm.llm_engine.scheduler.block_manager
free_before = bm.get_num_free_gpu_blocks()
try:
    llm.generate(["A good prompt", "", "Another good one"], ok, use_tqdm=False)
except ValueError as e:
    print("rejected:", e)
print("unfinished requests:", llm.llm_engine.get_num_unfinished_requests(),
      "| free blocks before/after:", free_before, bm.get_num_free_gpu_blocks())
assert llm.llm_engine.get_num_unfinished_requests() == 0 and bm.get_num_free_gpu_blocks() == free_before

# %% [markdown]
# In application code, catch `ValueError` where you build requests from user input, and tell
# the user what to fix; the message says it. A model that cannot be found, or (on a GPU) a
# cache that does not fit, fails when the `LLM` is created, so create it once, at start-up,
# where such a failure is loud.
#
# ## A cache too small: preemption
#
# Eight requests, each generating 32 tokens. With `block_size=8`, one needs about
# `ceil((prompt + 31) / 8)` ≈ 6 blocks at its longest, eight need ~48, and we give the engine
# **24**. The scheduler admits what fits; when a running request needs a new block and none
# is free, it preempts the **newest** running request (the one that arrived last loses the
# least work), frees its blocks, and puts it back at the front of the queue.

# %%
prompts = [f"Request {i}: tell me a long story." for i in range(8)]
params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
reference = llm.generate(prompts, params, use_tqdm=False)      # ample cache: no preemption

def tight(mode):
    return LLM(model=MODEL, seed=0, block_size=8, num_gpu_blocks_override=24, max_model_len=min(192, max_len),
               preemption_mode=mode, swap_space=0.05)

recompute_llm = tight("recompute")
with recompute_llm.trace() as rc_trace:
    t0 = time.perf_counter()
    rc_out = recompute_llm.generate(prompts, params, use_tqdm=False)
    rc_s = time.perf_counter() - t0
rc_df = rc_trace.to_dataframe()
pre = rc_df[rc_df["event"] == "preempted"]
print(f"{len(pre)} preemptions, of requests {sorted(set(pre['request_id']), key=int)}, in {rc_s:.2f} s")
assert len(pre) > 0, "24 blocks are not enough for this batch: preemption must happen"
check_same_greedy("preemption changes when a request runs, not what it generates", rc_out, reference, llm)

# %% [markdown]
# On the timeline, red triangles mark the preemptions: the preempted request goes back to
# waiting (red band), then runs a **prefill again** over its prompt *and* the tokens it had
# already generated (that is the recomputation), then continues decoding. On the block map,
# its blocks vanish at the preemption and are taken by the requests that keep running.

# %%
fig, axes = plt.subplots(2, 1, figsize=(12, 10), layout="constrained")
viz.plot_timeline(rc_df, ax=axes[0])
viz.plot_block_map(rc_df, ax=axes[1])
plt.show()
print(rc_df.loc[rc_df["event"] == "block_freed", "reason"].value_counts().to_string())

# %% [markdown]
# ## Swap instead of recompute
#
# With `preemption_mode="swap"` the engine copies the preempted request's blocks to a CPU
# pool (`swap_space` GiB) and copies them back later, instead of recomputing them. Which is
# cheaper depends on the hardware: recomputing costs a forward pass over the request's tokens;
# swapping costs two memory copies (over PCIe on a GPU; within RAM on a CPU).

# %%
swap_llm = tight("swap")
with swap_llm.trace() as sw_trace:
    t0 = time.perf_counter()
    sw_out = swap_llm.generate(prompts, params, use_tqdm=False)
    sw_s = time.perf_counter() - t0
sw_df = sw_trace.to_dataframe()
check_same_greedy("swap too: same tokens", sw_out, reference, llm)

def profile(name, df, secs):
    st = viz.step_latency_data(df)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in reference)
    return {"mode": name, "seconds": round(secs, 2), "steps": len(st),
            "preemptions": int((df["event"] == "preempted").sum()),
            "blocks swapped out": int((df["event"] == "block_swapped_out").sum()),
            "blocks swapped in": int((df["event"] == "block_swapped_in").sum()),
            "prefill tokens": int(st["num_prefill_tokens"].sum()),
            "recomputed tokens": int(st["num_prefill_tokens"].sum()) - prompt_tokens}

comparison = pd.DataFrame([profile("recompute", rc_df, rc_s), profile("swap", sw_df, sw_s)]).set_index("mode")
comparison

# %%
assert comparison.loc["swap", "blocks swapped out"] > 0 and comparison.loc["swap", "recomputed tokens"] == 0
assert comparison.loc["recompute", "recomputed tokens"] > 0 and comparison.loc["recompute", "blocks swapped out"] == 0
print("recompute re-ran", comparison.loc["recompute", "recomputed tokens"], "tokens; swap moved",
      comparison.loc["swap", "blocks swapped out"], "blocks out and", comparison.loc["swap", "blocks swapped in"], "back")
viz.plot_block_map(sw_df)
plt.show()

# %% [markdown]
# The swap run's block map has a second panel: the CPU swap pool, where the preempted
# request's blocks wait. Both modes return the same tokens; they differ in what they pay.
#
# ## Memory on this device
#
# What takes memory: the **weights** (fixed), the **KV cache** (allocated up front, as many
# blocks as configured), the **swap pool** (allocated on first use), and the activations of
# the step being run (temporary). On a GPU, `torch.cuda.memory_allocated()` reports what
# PyTorch holds; a CPU has no CUDA memory to report, and the lesson's `print_gpu_memory()` prints
# nothing at all (try it below). So we add the tensors up ourselves. Note that a CPU tensor created with
# `torch.empty` takes address space at once but physical RAM only when it is first written,
# so the operating system may report less than this.

# %%
def print_gpu_memory():
    """The lesson's memory_management.py helper, as written there."""
    if torch.cuda.is_available():
        allocated = torch.cuda.memory_allocated() / 1e9
        reserved = torch.cuda.memory_reserved() / 1e9
        print(f"GPU Memory - Allocated: {allocated:.2f}GB, Reserved: {reserved:.2f}GB")

captured = io.StringIO()
with contextlib.redirect_stdout(captured):
    print_gpu_memory()
print(f"the lesson's print_gpu_memory() printed: {captured.getvalue().strip()!r}")
if is_cpu():
    # no CUDA device: its `if` is False and the function prints nothing at all
    assert captured.getvalue() == ""
    print("nothing: on a CPU torch.cuda has no memory to report. The table below counts the tensors instead.")

# %% [markdown]
# What works on any device: ask the engine's tensors how big they are.

# %%
def tensor_mib(t):
    return 0.0 if t is None else t.numel() * t.element_size() / 2**20

rows = []
for name, engine_llm in (("default cache", llm), ("24-block recompute", recompute_llm), ("24-block swap", swap_llm)):
    r = engine_llm.llm_engine.model_runner
    rows.append({"engine": name,
                 "weights MiB": sum(tensor_mib(p) for p in r.model.parameters()),
                 "KV cache MiB": tensor_mib(r.kv_cache),
                 "swap pool MiB": tensor_mib(getattr(r, "cpu_kv_cache", None)),
                 "KV blocks": engine_llm.llm_engine.config.cache_config.num_gpu_blocks,
                 "tokens of KV": engine_llm.llm_engine.config.cache_config.num_gpu_blocks * r.block_size})
memory = pd.DataFrame(rows).set_index("engine").round(2)
if not is_cpu():
    print(f"CUDA: {torch.cuda.memory_allocated() / 2**20:.0f} MiB allocated, "
          f"{torch.cuda.memory_reserved() / 2**20:.0f} MiB reserved by PyTorch")
memory

# %%
ax = demos.plot_memory(memory)   # stacked bars on a linear axis: lengths add up
plt.show()
assert memory.loc["24-block recompute", "KV cache MiB"] < memory.loc["default cache", "KV cache MiB"]

# %% [markdown]
# Free an engine by dropping every reference to it; on a GPU, also return PyTorch's cached
# memory to the driver:

# %%
del recompute_llm, swap_llm
gc.collect()
if not is_cpu():
    torch.cuda.empty_cache()
    print(f"after freeing: {torch.cuda.memory_allocated() / 2**20:.0f} MiB allocated")
print("two engines freed")

# %% [markdown]
# ## What to remember
#
# * Invalid input raises `ValueError` with a message that names the field, before anything runs.
# * A small KV cache slows a batch down (preemption) but never changes its results.
# * Recompute pays in compute, swap pays in memory copies; the trace shows which you paid.
# * Weights are fixed; the KV cache is the memory you choose, and it decides how many
#   sequences can run at once.
#
# Next: **9. Key takeaways** and a quick reference.
