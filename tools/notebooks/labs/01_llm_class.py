# Source of labs/01_llm_class.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 1. The `LLM` class: what happens when you load a model
#
# `LLM` is the front door for **offline** inference: you hand it a model, it hands you back
# an object whose `generate()` turns a list of prompts into a list of results. One line of
# code, but a lot happens behind it. In this notebook you will:
#
# 1. create an `LLM` and read, from its own log messages, the three things it does while loading:
#    build the model and load its weights, size the **KV cache** in blocks, and warm up;
# 2. recompute the size of one KV block by hand and check it against the engine;
# 3. trace the first request through the engine, event by event;
# 4. look at the constructor's key parameters and see which of them change what.
#
# Everything runs on the lab's small embedded model, on whatever device you have: the engine
# picks the GPU (and its Triton kernels) when there is one, and the CPU otherwise.

# %%
import time

import labengine
from labengine import LLM, SamplingParams
from labengine.grading import capture_logs, check_same_greedy
from labengine.utils import is_cpu

MODEL = labengine.DEFAULT_MODEL   # the embedded model; on a GPU box try e.g. "facebook/opt-125m"
print(f"labengine {labengine.__version__}, running on {'the CPU' if is_cpu() else 'a CUDA GPU'}")
print("model:", MODEL)

# %% [markdown]
# ## Loading, as the engine reports it
#
# Like vLLM, labengine writes a few `INFO` log lines while it starts. Instead of switching on
# logging for the whole notebook we collect just the engine's messages with `capture_logs()`
# and print them.

# %%
with capture_logs() as logs:
    t0 = time.perf_counter()
    llm = LLM(model=MODEL, seed=0)
    load_s = time.perf_counter() - t0

print(f"LLM(model=...) returned after {load_s:.2f} s\n")
for message in logs.messages:
    print("INFO:", message)

# %% [markdown]
# Read the messages in order; they are the loading stages:
#
# | stage | the log line | what it did |
# |---|---|---|
# | configuration | `Initializing an LLM engine with config: ...` | read the model's `config.json`, settled `dtype`, `max_model_len`, the device, the block size |
# | weights | `Model weights loaded in ... s` | built the network from its config and copied the checkpoint's tensors into it, on the chosen device |
# | KV cache | `# GPU blocks: N, # CPU blocks: M` | decided how many KV blocks fit and allocated them all, up front |
# | warm-up | `Captured CUDA graphs for decode batch sizes ...` (GPU only) | recorded the decode step once per batch size, so later steps replay it cheaply; on a CPU there is nothing to capture, and the first call warms up instead (below) |
#
# "GPU blocks" keeps vLLM's name even when the engine runs on a CPU: it means *the device
# cache*. "CPU blocks" are the swap pool (`swap_space` GiB) that preemption by swapping uses
# (notebook 8).

# %%
engine = llm.llm_engine
runner = engine.model_runner
cache = engine.config.cache_config
model_config = engine.model_config

n_params = sum(p.numel() for p in runner.model.parameters())
weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
print(f"device: {engine.config.device}, dtype: {model_config.dtype}, attention backend: {runner.attn_backend.name}")
print(f"weights: {n_params/1e6:.2f} M parameters, {weight_bytes/2**20:.1f} MiB, loaded in {runner.load_time_s:.2f} s")
print(f"KV cache: {cache.num_gpu_blocks} device blocks + {cache.num_cpu_blocks} swap blocks, "
      f"{cache.block_size} tokens per block")
print(f"max_model_len: {model_config.max_model_len} tokens")
assert logs.find("# GPU blocks"), "the engine should log how many KV blocks it allocated"

# %% [markdown]
# ## One KV block, by hand
#
# For every token it has seen, every layer keeps one **key** and one **value** vector per KV
# head. A block holds `block_size` tokens of that, for all layers at once:
#
# $$\text{bytes per block} = 2\,(K\text{ and }V) \times \text{layers} \times \text{block\_size} \times \text{kv\_heads} \times \text{head\_size} \times \text{bytes per number}$$
#
# The embedded model uses *grouped-query attention*: fewer KV heads than query heads, so its
# cache is smaller than the head count alone suggests.

# %%
m = runner.model
by_hand = 2 * m.num_layers * cache.block_size * m.num_kv_heads * m.head_size * model_config.dtype.itemsize
print(f"2 x {m.num_layers} layers x {cache.block_size} tokens x {m.num_kv_heads} KV heads x {m.head_size} dims "
      f"x {model_config.dtype.itemsize} bytes = {by_hand:,} bytes per block")
print(f"the engine says: {runner.block_bytes:,} bytes per block")
assert by_hand == runner.block_bytes

kv = runner.kv_cache
print(f"\nthe whole device cache is one tensor {tuple(kv.shape)} "
      "= (K/V, layers, blocks, block_size, kv_heads, head_size)")
print(f"{kv.numel() * kv.element_size() / 2**20:.1f} MiB, room for {cache.num_gpu_blocks * cache.block_size:,} tokens "
      f"= {cache.num_gpu_blocks * cache.block_size // model_config.max_model_len} full-length sequences")
assert kv.shape[2] == cache.num_gpu_blocks

# %% [markdown]
# How was `N` chosen? On a **GPU** the engine runs the largest forward pass the scheduler
# allows, measures the peak memory, and gives the KV cache what is left of
# `gpu_memory_utilization` (0.9 by default) of the card. On a **CPU** there is nothing to
# profile: it takes `cpu_kv_cache_space` GiB (1 by default) but no more blocks than
# `max_num_seqs` full-length sequences could use. `num_gpu_blocks_override=N` sets the
# number exactly; later notebooks use it to make the cache small on purpose.

# %% [markdown]
# ## Warm-up: the first call pays extra
#
# The first `generate` call touches memory, caches and (on a GPU) kernels for the first time.
# Time the same tiny request three times:

# %%
params = SamplingParams(temperature=0.0, max_tokens=8)
call_s = []
for _ in range(3):
    t0 = time.perf_counter()
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)
    call_s.append(time.perf_counter() - t0)
print("three identical calls took", ", ".join(f"{s * 1e3:.0f} ms" for s in call_s))
print("the answer:", repr(out[0].outputs[0].text))

# %% [markdown]
# ## Following one request through the engine
#
# `with llm.trace() as trace:` records every event the engine publishes while the block runs;
# `trace.to_dataframe()` turns them into one table. Here is the complete life of one request:
# it is added, scheduled for its **prefill** (all prompt tokens in one step), gets KV blocks,
# then runs one **decode** step per new token, and finally gives its blocks back.

# %%
with llm.trace() as trace:
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)

df = trace.to_dataframe()
cols = ["step", "event", "request_id", "block", "logical_index", "num_batched_tokens",
        "batch_size", "kv_blocks_used", "finish_reason"]
df[cols].head(12)

# %%
counts = df["event"].value_counts()
print(counts.to_string())
prompt_len, out_len = len(out[0].prompt_token_ids), len(out[0].outputs[0].token_ids)
print(f"\nprompt: {prompt_len} tokens, output: {out_len} tokens, {counts['step_finished']} engine steps "
      f"(1 prefill + {counts['step_finished'] - 1} decodes)")
order = list(dict.fromkeys(df["event"]))
assert order.index("request_added") < order.index("scheduled") < order.index("request_finished")
assert counts["block_allocated"] == counts["block_freed"], "every block comes back when the request ends"

# %% [markdown]
# Why is the number of steps what it is? The prefill step already produces the first output
# token; each decode step produces one more. And why that many blocks? We come back to it in
# exercise 1.5.5, where you predict it before you look.
#
# ## The constructor's key parameters
#
# `LLM(...)` takes vLLM's parameters. All of them are validated in one place, `EngineArgs`,
# before anything is loaded. labengine runs one model on one device, so a few of vLLM's
# options are accepted only at their default:
#
# | parameter | what it changes here |
# |---|---|
# | `model`, `tokenizer` | a local folder (like `labengine.DEFAULT_MODEL`) or a Hugging Face name found in the local cache |
# | `dtype="auto"` | float32 on a CPU; the checkpoint's half precision on a GPU |
# | `seed` | seeds random sampling, so sampled outputs repeat from run to run |
# | `max_model_len` | longest prompt + output; default: the model's own limit |
# | `block_size`, `num_gpu_blocks_override`, `gpu_memory_utilization` | the paged KV cache (block size, exact number of blocks, GPU share) |
# | `swap_space`, `preemption_mode` | the CPU swap pool (GiB) and what happens when the cache runs out (notebook 8) |
# | `max_num_seqs`, `max_num_batched_tokens` | how many sequences / tokens one step may hold (notebook 4) |
# | `enforce_eager` | `True` turns CUDA graphs off (GPU only) |
# | `tensor_parallel_size` | how many processes (ranks) share the model: each holds a slice of every layer (below). The heads must split evenly |
# | `quantization` | only `None`: anything else raises a `ValueError` that says why |

# %%
from labengine import EngineArgs

print(len(EngineArgs.field_names()), "engine arguments:", ", ".join(EngineArgs.field_names()))

n_heads = model_config.hf_config.num_attention_heads
bad_tp = next(k for k in range(3, n_heads + 2) if n_heads % k)   # a rank count that cannot split the heads
for bad in (dict(tensor_parallel_size=bad_tp), dict(gpu_memory_utilization=1.5), dict(block_size=12)):
    try:
        LLM(model=MODEL, **bad)
    except ValueError as e:
        print(f"\nLLM(..., {', '.join(f'{k}={v!r}' for k, v in bad.items())}) -> ValueError: {e}")
    else:
        raise AssertionError(f"{bad} should have been rejected")

# %% [markdown]
# The checks above ran before any weights were read: a bad argument costs nothing. (That many
# ranks cannot share the model's attention heads evenly; two can, as the next section shows.)
# Now a second engine on the same model, with a deliberately tiny cache and small blocks:

# %%
small = LLM(model=MODEL, seed=0, block_size=8, num_gpu_blocks_override=48, max_num_seqs=4,
            max_model_len=min(256, model_config.max_model_len), swap_space=0.01)
sc = small.llm_engine.config
print(f"block_size={sc.cache_config.block_size}, blocks={sc.cache_config.num_gpu_blocks} "
      f"({sc.cache_config.num_gpu_blocks * sc.cache_config.block_size} tokens), swap blocks={sc.cache_config.num_cpu_blocks}, "
      f"max_num_seqs={sc.scheduler_config.max_num_seqs}, max_model_len={small.llm_engine.model_config.max_model_len}")
assert sc.cache_config.num_gpu_blocks == 48
a = llm.generate(["Once upon a time"], params, use_tqdm=False)
b = small.generate(["Once upon a time"], params, use_tqdm=False)
print(repr(a[0].outputs[0].text), "|", repr(b[0].outputs[0].text))
check_same_greedy("the cache layout does not change what a greedy request generates", a, b, llm)
del small

# %% [markdown]
# ## Tensor parallelism: one model, two processes
#
# `tensor_parallel_size=2` splits every layer over two **ranks**, one process each: each rank
# holds half of the query and KV heads and half of the MLP, computes its half of every layer,
# and the ranks add up their partial results with an **all-reduce** after each attention and
# MLP block. Between GPUs that goes over NVLink (NCCL); on a CPU the ranks are two processes
# that talk through `gloo`, which is how it runs here unless you have two GPUs. The answer
# must not change: greedy outputs are the same as with one process.

# %%
import torch

tp_device = "auto" if torch.cuda.device_count() >= 2 else "cpu"   # two GPUs, else two CPU processes
t0 = time.perf_counter()
tp = LLM(model=MODEL, seed=0, tensor_parallel_size=2, device=tp_device)
print(f"LLM(tensor_parallel_size=2) on {tp.llm_engine.config.device}: ready after {time.perf_counter() - t0:.1f} s")

tp_prompts = ["The capital of France is", "Once upon a time", "The little dog"]
with tp.trace() as tp_trace:
    tp_out = tp.generate(tp_prompts, params, use_tqdm=False)
for o in tp_out:
    print(repr(o.prompt), "->", repr(o.outputs[0].text))
print("\none rank's KV cache:", tuple(tp.llm_engine.model_runner.kv_cache.shape),
      "\nthe single process's:", tuple(runner.kv_cache.shape), "(K/V, layers, blocks, block_size, kv_heads, head_size)")
assert tp.llm_engine.model_runner.kv_cache.shape[4] * 2 == runner.kv_cache.shape[4], "each rank keeps half the KV heads"
if tp.llm_engine.config.device == engine.config.device:   # same device and dtype: same greedy tokens
    check_same_greedy("two ranks generate what one process generates",
                      tp_out, llm.generate(tp_prompts, params, use_tqdm=False), llm)

# %% [markdown]
# Where does a rank's time go? Every step's event records, per rank, how long its forward pass
# took (`forward_s`) and how much of that was spent in collectives (`comm_s`: the broadcast
# of the batch from rank 0, the all-reduces, gathering the logits on rank 0); the rest is
# `compute_s`. `trace.rank_timings()` tabulates them, one row per step and rank:

# %%
rt = tp_trace.rank_timings()
print(rt.head(4).to_string(index=False), "\n")
per_rank = rt.groupby("rank")[["forward_s", "comm_s", "compute_s"]].sum()
per_rank["comm_share"] = per_rank["comm_s"] / per_rank["forward_s"]
print(per_rank.round(4).to_string())
assert sorted(rt["rank"].unique()) == [0, 1] and len(rt) == 2 * rt["step"].nunique()
assert (rt["comm_s"] > 0).all() and ((rt["compute_s"] - (rt["forward_s"] - rt["comm_s"])).abs() < 1e-9).all()
share = per_rank["comm_s"].sum() / per_rank["forward_s"].sum()
print(f"\nmeasured: {share:.0%} of the ranks' forward time went to communication, "
      f"{1 - share:.0%} to computing their halves of the layers")
del tp   # stops the second process

# %% [markdown]
# `comm_s` counts the time a rank waits inside a collective, including waiting for the other
# rank to arrive. With a model this small each rank's half of a layer is a few microseconds of
# arithmetic, while every all-reduce is a round trip between processes: read the measured
# share above. Splitting a small model costs more than it saves; tensor parallelism pays off
# when the model does not fit on one device, or when each rank's share of the compute is large
# next to a fast link between the devices (NVLink between GPUs).

# %% [markdown]
# ## What to remember
#
# * `LLM(model=...)` does its expensive work once: weights, KV cache, warm-up. Create it once
#   per notebook and reuse it.
# * The KV cache is allocated up front, as blocks of `block_size` tokens; its size in bytes
#   follows from the model's shape, and you can compute it.
# * The trace shows every step of a request's life; the next notebooks build on it.
# * `tensor_parallel_size=N` splits every layer over N processes; the outputs stay the same,
#   and the trace shows what the collectives between them cost.
#
# Next: **2. SamplingParams**, how the next token is chosen.
