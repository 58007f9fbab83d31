# Source of labs/03_basic_inference.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 3. Basic inference: generating, and reading what comes back
#
# `llm.generate(prompts, sampling_params)` returns one `RequestOutput` per prompt, **in the
# order of the prompts**. Each holds one or more `CompletionOutput`s (one per completion).
# This notebook walks through the four everyday uses:
#
# 1. simple generation;
# 2. detailed inspection: token ids, log-probabilities, the alternatives the model considered;
# 3. several completions for one prompt;
# 4. stopping: stop strings, stop tokens, minimum and maximum lengths, and the finish reason.

# %%
import math

import pandas as pd

import labengine
from labengine import LLM, SamplingParams, demos

MODEL = labengine.DEFAULT_MODEL
llm = LLM(model=MODEL, seed=0)
tokenizer = llm.get_tokenizer()

# %% [markdown]
# ## 1. Simple generation

# %%
prompts = [
    "The future of AI is",
    "Once upon a time",
    "The meaning of life is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=0)
outputs = llm.generate(prompts, sampling_params)

for output in outputs:
    print(f"Prompt:    {output.prompt!r}")
    print(f"Generated: {output.outputs[0].text!r}")
    print("-" * 80)
assert [o.prompt for o in outputs] == prompts, "outputs come back in the order of the prompts"

# %% [markdown]
# The progress bar is `tqdm`; pass `use_tqdm=False` to hide it (the rest of the lab does).
#
# ## 2. Looking inside one output
#
# With `logprobs=5` every generated token comes with a dictionary: the sampled token's
# log-probability plus the five most likely tokens at that step, each a `Logprob(logprob,
# rank, decoded_token)`. `rank` 1 is the model's favourite.

# %%
detail = llm.generate(["Hello, my name is"], SamplingParams(temperature=0.0, max_tokens=12, logprobs=5),
                      use_tqdm=False)[0]
c = detail.outputs[0]
print("prompt token ids:  ", detail.prompt_token_ids)
print("generated text:    ", repr(c.text))
print("generated token ids:", c.token_ids)
print("cumulative logprob:", round(c.cumulative_logprob, 4))
print("finish reason:     ", c.finish_reason)

# %% [markdown]
# A table is easier to read than nested dictionaries: one row per generated token, with the
# runner-up beside it.

# %%
rows = []
for token_id, step in zip(c.token_ids, c.logprobs):
    chosen = step[token_id]
    others = sorted((lp for tid, lp in step.items() if tid != token_id), key=lambda lp: -lp.logprob)
    rows.append({
        "token": chosen.decoded_token, "id": token_id, "logprob": round(chosen.logprob, 3),
        "prob": round(math.exp(chosen.logprob), 3), "rank": chosen.rank,
        "runner-up": others[0].decoded_token if others else None,
        "runner-up prob": round(math.exp(others[0].logprob), 3) if others else None,
    })
table = pd.DataFrame(rows)
table

# %% [markdown]
# Two facts you can check yourself: greedy decoding always takes the rank-1 token, and the
# cumulative log-probability is the sum of the chosen tokens' log-probabilities (so
# `exp(cumulative_logprob)` is the probability of the whole completion).

# %%
assert (table["rank"] == 1).all(), "greedy picks the most likely token every time"
total = sum(step[tid].logprob for tid, step in zip(c.token_ids, c.logprobs))
print(f"sum of the chosen logprobs: {total:.4f}   cumulative_logprob: {c.cumulative_logprob:.4f}")
print(f"probability of this exact completion: {math.exp(c.cumulative_logprob):.2e}")
assert math.isclose(total, c.cumulative_logprob, rel_tol=1e-5, abs_tol=1e-5)
assert tokenizer.decode(c.token_ids, skip_special_tokens=True) == c.text

# %% [markdown]
# `prompt_logprobs=k` does the same for the prompt: how surprising each prompt token was to
# the model. The first token has nothing before it, so its entry is `None`.

# %%
scored = llm.generate(["The capital of France is Paris."],
                      SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
for tid, entry in zip(scored.prompt_token_ids, scored.prompt_logprobs):
    lp = None if entry is None else entry[tid].logprob
    print(f"{tokenizer.decode([tid])!r:>12}  {'-' if lp is None else f'{lp:7.2f}'}")

# %% [markdown]
# ## 3. Several completions per prompt
#
# `n=5` asks for five completions of the same prompt. They share the prompt's KV blocks
# (notebook 4 shows the block map), so this costs much less than five separate requests.
# The completions differ only by sampling; compare their cumulative log-probabilities:
# the higher, the more likely the model found that completion.
#
# Sampling can only differ where the model hesitates. A story opening has many good
# continuations. (Try "The best way to learn programming is": the small model learnt that
# sentence almost by heart, and most of the five samples come out word for word the same.)

# %%
multi = llm.generate([demos.N_PROMPT],     # "Once upon a time"
                     SamplingParams(n=5, temperature=0.8, max_tokens=24, seed=0), use_tqdm=False)[0]
for comp in sorted(multi.outputs, key=lambda x: -x.cumulative_logprob):
    print(f"[{comp.index}] logprob {comp.cumulative_logprob:7.2f} | {comp.text!r}")
assert len(multi.outputs) == 5
distinct = len({comp.text for comp in multi.outputs})
print(f"\n{distinct} different texts among the 5 completions")
assert distinct == 5, "five samples of a story opening differ"
best = max(multi.outputs, key=lambda x: x.cumulative_logprob)
print("\nmost likely completion:", repr(best.text))

# %% [markdown]
# Longer completions collect more negative log-probability, so comparing raw sums favours
# short answers. Dividing by the number of tokens is a common fix (the average log-probability
# per token). `best_of=8, n=2` lets the engine generate eight and return the two best.

# %%
for comp in multi.outputs:
    print(f"[{comp.index}] {len(comp.token_ids):2d} tokens, per-token logprob "
          f"{comp.cumulative_logprob / len(comp.token_ids):6.2f}")
two = llm.generate([demos.N_PROMPT],
                   SamplingParams(n=2, best_of=8, temperature=0.8, max_tokens=24, seed=0), use_tqdm=False)[0]
print("best 2 of 8:", [round(x.cumulative_logprob, 2) for x in two.outputs])
assert len(two.outputs) == 2

# %% [markdown]
# ## 4. When does generation stop?
#
# A completion ends at the first of:
#
# | cause | `finish_reason` | `stop_reason` |
# |---|---|---|
# | the end-of-sequence token (unless `ignore_eos=True`) | `"stop"` | `None` |
# | one of the `stop` strings appears in the text | `"stop"` | that string |
# | one of the `stop_token_ids` is generated | `"stop"` | that id |
# | `max_tokens` tokens were generated | `"length"` | `None` |
# | the sequence reaches `max_model_len` | `"length"` | `None` |
#
# `min_tokens` holds every stop condition back until that many tokens exist. A stop string
# is cut from the text unless `include_stop_str_in_output=True`.

# %%
prompt = "Once upon a time"
base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)[0].outputs[0]
print("no stop strings:", repr(base.text), base.finish_reason)

# pick a stop string that really occurs: the first whole word of 4+ letters that starts after the 10th character
words = [w.strip(".,;:!?\"'") for w in base.text.split()]
stop_word = next((w for w in words if len(w) >= 4 and base.text.find(w) >= 10), None) or "the"
print("stop string:", repr(stop_word))

cases = {
    "stop string": SamplingParams(temperature=0.0, max_tokens=40, stop=[stop_word]),
    "stop string, kept": SamplingParams(temperature=0.0, max_tokens=40, stop=[stop_word],
                                         include_stop_str_in_output=True),
    "max_tokens=5": SamplingParams(temperature=0.0, max_tokens=5),
    "stop token id": SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[base.token_ids[3]]),
    "min_tokens=12, stop ' '": SamplingParams(temperature=0.0, max_tokens=40, stop=[" "], min_tokens=12),
}
results = llm.generate([prompt] * len(cases), list(cases.values()), use_tqdm=False)
rows = []
for (name, sp), r in zip(cases.items(), results):
    comp = r.outputs[0]
    rows.append({"case": name, "tokens": len(comp.token_ids), "finish_reason": comp.finish_reason,
                 "stop_reason": comp.stop_reason, "text": comp.text})
stops = pd.DataFrame(rows)
stops

# %%
by = {row["case"]: row for row in rows}
assert by["max_tokens=5"]["finish_reason"] == "length" and by["max_tokens=5"]["tokens"] == 5
if stop_word in base.text:
    assert by["stop string"]["finish_reason"] == "stop" and by["stop string"]["stop_reason"] == stop_word
    assert stop_word not in by["stop string"]["text"] and by["stop string, kept"]["text"].endswith(stop_word)
    assert base.text.startswith(by["stop string"]["text"]), "stopping early never changes what came before"
assert by["stop token id"]["stop_reason"] == base.token_ids[3]
assert by["min_tokens=12, stop ' '"]["tokens"] >= 12
print("every stopping rule behaved as the table says")

# %% [markdown]
# ## What to remember
#
# * One `RequestOutput` per prompt, in order; one `CompletionOutput` per completion.
# * `logprobs` / `prompt_logprobs` show the model's confidence token by token;
#   `cumulative_logprob` is their sum.
# * `finish_reason` says *why* a completion ended, `stop_reason` *which* rule ended it.
#
# Next: **4. Batch inference**, and why it is so much faster than a loop.
