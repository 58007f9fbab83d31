# Source of labs/10_prefix_caching_and_chunked_prefill.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 10. Prefix caching and chunked prefill
#
# Two ideas that make paged KV blocks pay off, both in vLLM (`enable_prefix_caching=True`,
# `enable_chunked_prefill=True`) and in labengine:
#
# 1. **Prefix caching.** A full KV block is identified by a hash of its tokens *and every token
#    before it*. When a new request starts with the same tokens (a shared system prompt), the
#    engine reuses those blocks instead of computing them again. Blocks nobody holds stay
#    cached until the space is needed (least recently used first).
# 2. **Chunked prefill.** A long prompt is computed in chunks of at most
#    `max_num_batched_tokens` tokens per step; running decodes are scheduled first, so they keep
#    producing tokens while the long prompt is prefilled.
#
# Wall times on a shared CPU are noisy, so every claim below is backed by a count the engine
# keeps (tokens computed, tokens per step), with the wall time beside it.

# %%
import pandas as pd

import labengine
from labengine import LLM, SamplingParams, viz

MODEL = labengine.DEFAULT_MODEL
SYSTEM = ("You are a helpful assistant for a lab about language model inference. Answer in one short "
          "sentence, use simple words, and say so when you do not know. ") * 2
QUESTIONS = ["What is a KV cache?", "Why is the sky blue?", "What is a block table?", "Who wrote this story?",
             "What is greedy decoding?", "How does a computer work?", "What is attention?", "Where do birds go?"]
greedy = SamplingParams(temperature=0, max_tokens=8)

# %% [markdown]
# ## A shared system prompt, with and without prefix caching
#
# The same eight requests (system prompt + a question) run on an engine without and with prefix
# caching. One request warms the cache first, as on a server that has been running.

# %%
rows, outs = [], {}
for caching in (False, True):
    llm = LLM(model=MODEL, seed=0, block_size=16, enable_prefix_caching=caching)
    engine = llm.llm_engine
    llm.generate(SYSTEM + "Hello?", greedy, use_tqdm=False)  # warm-up
    before = engine.num_prefill_tokens_computed
    with llm.trace() as trace:
        out = llm.generate([SYSTEM + q for q in QUESTIONS], greedy, use_tqdm=False)
    req = trace.requests()
    outs[caching] = [o.outputs[0].text for o in out]
    rows.append({"prefix caching": caching,
                 "prompt tokens": sum(len(o.prompt_token_ids) for o in out),
                 "prefill tokens computed": engine.num_prefill_tokens_computed - before,
                 "hit rate": engine.get_prefix_cache_hit_rate(),
                 "mean TTFT (ms)": 1e3 * req["ttft_s"].mean()})
    if caching:
        cached_trace, cached_llm = trace, llm
pd.DataFrame(rows)

# %% [markdown]
# With caching, only the questions (and the last, partial block of the system prompt) went
# through the model: the *prefill tokens computed* column is the deterministic part of the
# story, the TTFT column the (noisier) consequence. The answers are the same:

# %%
assert outs[False] == outs[True]
print(rows[1]["prefill tokens computed"], "of", rows[0]["prefill tokens computed"], "tokens computed with caching")

# %% [markdown]
# ## What the block map shows
#
# Blocks held by several requests at once carry a white **+** (the shared system prompt); grey
# cells are blocks nobody holds any more but that stay **cached**, ready for the next request
# with that prefix. The trace records every hit (`block_reused`) and every lookup
# (`prefix_cache_lookup`: blocks looked up and found).

# %%
df = cached_trace.to_dataframe()
viz.plot_block_map(df, title="Prefix caching: the shared system prompt's blocks");

# %%
df[df["event"] == "prefix_cache_lookup"][["step", "request_id", "num_queried_blocks", "num_hit_blocks",
                                          "num_cached_tokens", "num_tokens"]]

# %% [markdown]
# ## A long prompt arriving while others decode
#
# Four requests are decoding when a long prompt arrives. Without chunking the long prompt is
# prefilled in one step, and every decode waits for that step. With chunking
# (`max_num_batched_tokens=64`), each step runs the four decodes first and a chunk of the long
# prompt in what is left of the budget.

# %%
long_prompt = " ".join(QUESTIONS * 6)
results, traces = [], {}
for chunked in (False, True):
    kw = dict(enable_chunked_prefill=True, max_num_batched_tokens=64, max_num_seqs=8) if chunked else {}
    llm = LLM(model=MODEL, seed=0, **kw)
    engine = llm.llm_engine
    with llm.trace() as trace:
        for i in range(4):
            engine.add_request(f"d{i}", QUESTIONS[i], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        for _ in range(5):
            engine.step()
        engine.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=4))
        while engine.has_unfinished_requests():
            engine.step()
    events = trace.to_dataframe()
    arrived = int(events[(events["event"] == "request_added") & (events["request_id"] == "long")]["step"].iloc[0])
    st = trace.steps()
    st = st[st.index >= arrived] if "step" not in st.columns else st[st["step"] >= arrived]
    traces[chunked] = trace
    results.append({"chunked prefill": chunked,
                    "most tokens in one step": int((st["num_prefill_tokens"] + st["num_decode_tokens"]).max()),
                    "steps the decodes waited out": int(((st["num_prefill_tokens"] > 0) &
                                                         (st["num_decode_tokens"] == 0)).sum()),
                    "slowest step (ms)": 1e3 * st["latency_s"].max(),
                    "long prompt's chunks": int(((events["event"] == "prefill_chunk")
                                                 & (events["request_id"] == "long")).sum())})
pd.DataFrame(results)

# %% [markdown]
# Without chunking one step computes the whole long prompt and the decodes skip it; with
# chunking no step computes more than the budget and the decodes run in every step, so the gap
# between two of their tokens is one (small) step. The scheduler timeline shows the long prompt
# in *prefill* for several steps while the others are in *decode* in those same steps:

# %%
viz.plot_timeline(traces[True].to_dataframe());

# %% [markdown]
# ## Your turn
#
# Exercise 1.5.7 (`exercises/ex1_5_7_prefix_reuse.ipynb`) asks you to predict, from token ids
# and the block size alone, which cached blocks new requests will reuse and how many prompt
# tokens each will still compute, and then to check your predictions against the trace.
# Grade it with `make grade EX=ex1_5_7`.
