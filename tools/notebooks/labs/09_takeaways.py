# Source of labs/09_takeaways.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 9. Key takeaways and a quick reference
#
# ## What you saw
#
# 1. **`LLM`** is the offline front door. Creating it loads the weights, sizes and allocates
#    the paged KV cache, and warms up; do it once and reuse it. (notebook 1)
# 2. **`SamplingParams`** decides how each next token is chosen: temperature reshapes the
#    distribution, top-k / top-p / min-p cut its tail, penalties discourage repeats, and
#    `temperature=0` is greedy and deterministic. (notebook 2)
# 3. **`generate`** returns one `RequestOutput` per prompt, in order; `logprobs` show the
#    model's confidence; `n` and `best_of` give several completions; `stop`, `stop_token_ids`,
#    `min_tokens` and `max_tokens` decide where it ends, and `finish_reason` / `stop_reason`
#    say why it did. (notebooks 3 and 7)
# 4. **Batching is automatic**: pass all prompts in one call. Continuous batching refills the
#    batch at every step, which was several times faster than a loop on your machine. (notebook 4)
# 5. **`AsyncLLMEngine`** serves requests as they arrive and streams tokens; late requests
#    join the running batch at the next step. (notebook 5)
# 6. **Offline** maximises throughput; **online** is judged by latency (TTFT, time per output
#    token); the HTTP server is the async engine behind an OpenAI-compatible API. (notebook 6)
# 7. **Invalid input raises `ValueError` early**, with a message naming the field. A KV cache
#    that is too small causes **preemption** (recompute or swap): slower, same results. The KV
#    cache is the memory you choose, and it bounds how many sequences run at once. (notebook 8)
#
# ## Quick reference

# %% [markdown]
# ```python
# from labengine import LLM, SamplingParams               # in vLLM: from vllm import ...
#
# llm = LLM(model=MODEL, seed=0)                           # + max_model_len, block_size, num_gpu_blocks_override,
#                                                          #   max_num_seqs, preemption_mode, swap_space, dtype ...
# params = SamplingParams(temperature=0.8, top_p=0.95, top_k=-1, min_p=0.0,
#                         max_tokens=64, min_tokens=0, stop=["\n\n"], stop_token_ids=[],
#                         n=1, best_of=None, seed=None, logprobs=None, prompt_logprobs=None,
#                         presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
#                         ignore_eos=False, include_stop_str_in_output=False)
# outputs = llm.generate(prompts, params)                  # or a list of params, one per prompt
# out = outputs[0]
# out.request_id, out.prompt, out.prompt_token_ids, out.prompt_logprobs, out.finished, out.metrics
# c = out.outputs[0]
# c.text, c.token_ids, c.cumulative_logprob, c.logprobs, c.finish_reason, c.stop_reason
#
# with llm.trace() as trace:                               # labengine: watch the engine
#     llm.generate(prompts, params)
# trace.to_dataframe(); trace.steps(); trace.requests()
# from labengine import viz                                # plot_timeline, plot_block_map, plot_step_latency ...
#
# from labengine import AsyncLLMEngine, AsyncEngineArgs    # online
# engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=MODEL))
# async for out in engine.generate(prompt, params, request_id="r1"):
#     print(out.outputs[0].text)
# ```
#
# From a terminal: `python -m labengine.serve --port 8000` serves the same engine over an
# OpenAI-compatible HTTP API.

# %% [markdown]
# ## The minimal example, once more

# %%
import labengine
from labengine import LLM, SamplingParams

MODEL = labengine.DEFAULT_MODEL
llm = LLM(model=MODEL)
outputs = llm.generate(prompts=["Hello, world!"], sampling_params=SamplingParams(temperature=0.0, max_tokens=20))
print(outputs[0].outputs[0].text)
assert outputs[0].finished and outputs[0].outputs[0].finish_reason in ("stop", "length")

# %% [markdown]
# ## Where next
#
# * The exercises, in `exercises/`: 1.5.1 basic inference, 1.5.2 batch processing, 1.5.3
#   multiple completions, 1.5.4 custom stopping, and two that use the instrumentation:
#   1.5.5 predict the KV blocks a batch needs, 1.5.6 make preemption happen and explain it,
#   and, after lab 10 (prefix caching and chunked prefill), 1.5.7 predict which cached blocks
#   a request reuses.
#   Check your work with `make grade EX=ex1_5_1` (see docs/LAB_GUIDE.md).
# * The engine itself: `labengine/` is small enough to read in an afternoon. Start with
#   `llm_engine.py` (one step), then `scheduler.py` and `block_manager.py`.
# * On a GPU box, run the same notebooks with a real checkpoint: set `MODEL = "facebook/opt-125m"`
#   (it must be in your Hugging Face cache) at the top of any notebook.
