# Source of labs/02_sampling_params.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 2. `SamplingParams`: how the next token is chosen
#
# At every step the model gives a score (a *logit*) to every token of its vocabulary. The
# sampler turns those scores into one choice. `SamplingParams` tells it how, per request:
#
# * **greedy** (`temperature=0`): always the most likely token, so the output is deterministic;
# * **temperature**: divide the logits by `T` before the softmax. `T < 1` sharpens the
#   distribution, `T > 1` flattens it;
# * **top-k**: keep only the `k` most likely tokens;
# * **top-p** (nucleus): keep the smallest set of most-likely tokens whose probabilities add up to `p`;
# * **min-p**: drop tokens less likely than `min_p` times the best one;
# * **penalties** (presence, frequency, repetition): push down tokens already used.
#
# The sampler applies them in a fixed order, as vLLM does:
# penalties → temperature → top-k → top-p → min-p → draw. In this notebook you look at the
# model's *real* next-token distribution and watch each parameter reshape it.

# %%
import numpy as np
import matplotlib.pyplot as plt

import labengine
from labengine import LLM, SamplingParams, demos, viz
from labengine.grading import check_same_greedy, exact_greedy_expected
from labengine.widgets import SamplingExplorer

MODEL = labengine.DEFAULT_MODEL
# max_logprobs: let the engine return up to 8192 alternatives per token, so we can see the whole
# distribution of a small model (a real one has ~32k-150k tokens: then we see its 8192 most likely).
llm = LLM(model=MODEL, seed=0, max_logprobs=8192)
PROMPT = "Hello, my name is"   # many plausible next tokens: a good prompt to watch

# %% [markdown]
# ## The SamplingExplorer
#
# The widget below asks the engine for the next-token distribution after the prompt (one
# step, `temperature=1`, with the top tokens' log-probabilities), then runs it through the
# sampler's stages with the slider values. Bars outlined in grey are the model's raw
# probabilities; filled bars are what is left after sampling. Under the chart, the engine
# generates a continuation with the same settings and a fixed seed.
#
# Move the sliders: `temperature` to 0.2 and then 1.8, `top_k` to 3, `top_p` to 0.5. Then type
# another prompt: "The capital of France is" (the model is sure), "Once upon a time, there lived a"
# (many equally good words). (When this notebook runs outside Jupyter the widget is just not drawn.)

# %%
explorer = SamplingExplorer(llm, PROMPT, max_tokens=12)
explorer

# %% [markdown]
# The widget keeps what it shows in plain attributes, so code can drive it exactly as your
# mouse does. Setting a slider's `.value` triggers the same update:

# %%
explorer.temperature.value = 1.0
explorer.top_k.value = 3
print("top_k=3 keeps:", explorer.kept_tokens)
assert len(explorer.kept_tokens) == 3
# the engine's own first sampled step kept exactly the tokens the stages predict
kept_ids = set(explorer.stages.loc[explorer.stages["kept"], "token_id"])
print("the engine kept the same tokens:", explorer.engine_kept == kept_ids)
# in half precision (GPU) two tokens can tie for 3rd place, and either may be kept
assert explorer.engine_kept == kept_ids or not exact_greedy_expected(llm)

explorer.top_k.value = -1          # back to "off"
explorer.top_p.value = 0.5
print("top_p=0.5 keeps:", explorer.kept_tokens)
explorer.top_p.value = 1.0

# %% [markdown]
# ## The real distribution, parameter by parameter
#
# `explorer.raw_distribution()` is the model's distribution for the prompt (the most likely
# tokens, most likely first). `viz.sampling_stages` applies the sampler's stages to it; it is
# the same function the widget uses. Three rows: temperature, top-p, top-k.
#
# Look at the numbers first: after this prompt the model spreads its probability thin, and its
# 12 most likely tokens hold only about a fifth of the mass. `top_p=0.3` would keep some twenty
# tokens, more than a panel draws, so the top-p row uses small values of `p` to show the cut.

# %%
tokens, token_ids, logprobs, prompt_ids = explorer.raw_distribution()
print(f"{len(tokens)} tokens; the five most likely:",
      ", ".join(f"{t!r} {np.exp(lp):.2f}" for t, lp in zip(tokens[:5], logprobs[:5])))
print(f"the {demos.GRID_BARS} most likely hold {np.exp(logprobs[:demos.GRID_BARS]).sum():.0%} of the probability")

settings = demos.SAMPLING_GRID      # [[temperature 0.3, 1.0, 1.6], [top_p 0.05, 0.1, 0.15], [top_k 1, 4, 12]]
stages = demos.sampling_grid(tokens, logprobs, token_ids, settings)
fig, axes = plt.subplots(3, 3, figsize=(15, 12), layout="constrained")
for row, row_settings in zip(axes, settings):
    for ax, kw in zip(row, row_settings):
        name = demos.setting_name(kw)
        kept = int(stages[name]["kept"].sum())
        viz.plot_sampling_stages(stages[name], ax=ax, max_tokens=demos.GRID_BARS,
                                 title=f"{name}: {kept} tokens kept")
plt.show()

# %% [markdown]
# What the panels show, in numbers:

# %%
def entropy(p):
    p = np.asarray(p)[np.asarray(p) > 0]
    return float(-(p * np.log2(p)).sum())

temps = [0.2, 0.5, 0.8, 1.0, 1.3, 1.6, 2.0]
top_prob = [viz.sampling_stages(tokens, logprobs, token_ids, temperature=t)["p_final"].max() for t in temps]
ent = [entropy(viz.sampling_stages(tokens, logprobs, token_ids, temperature=t)["p_final"]) for t in temps]
for t, p, h in zip(temps, top_prob, ent):
    print(f"T={t:3.1f}: most likely token has p={p:.2f}, entropy {h:.2f} bits")
assert all(a >= b - 1e-6 for a, b in zip(top_prob, top_prob[1:])), "a higher T never sharpens"
assert all(a <= b + 1e-6 for a, b in zip(ent, ent[1:])), "a higher T always flattens"

for p in (0.05, 0.1, 0.15):
    s = stages[f"top_p={p}"]
    kept, removed = s[s["kept"]], s[~s["kept"]]
    # top-p keeps a head of the ranking whose raw mass reaches p, and no more than it needs
    # (tokens with exactly equal probabilities, common in half precision, stay or go together)
    assert kept["p_raw"].sum() >= p - 1e-6
    assert removed.empty or kept["p_raw"].min() >= removed["p_raw"].max() - 1e-9
    assert kept.loc[kept["p_raw"] > kept["p_raw"].min(), "p_raw"].sum() < p + 1e-6
    print(f"top_p={p}: keeps {len(kept)} tokens holding {kept['p_raw'].sum():.2f} of the mass; "
          f"removes {demos.removed_among_drawn(s)} of the {demos.GRID_BARS} drawn")
    assert demos.removed_among_drawn(s) > 0, "the panel shows top-p cutting the tail"
for k in (1, 4, 12):
    n_kept = int(stages[f"top_k={k}"]["kept"].sum())
    assert n_kept >= min(k, len(tokens)), "top-k keeps k tokens (more only when several tie for k-th place)"
    print(f"top_k={k}: keeps {n_kept} tokens")

# %% [markdown]
# ## Do the engine's samples follow that distribution?
#
# The charts are computed. The engine samples. If they agree, sampling the first token many
# times should reproduce the computed probabilities. One batch of 200 copies of the prompt,
# one token each, at `temperature=0.8`:

# %%
N, T = 200, 0.8
outs = llm.generate([PROMPT] * N, SamplingParams(temperature=T, max_tokens=1), use_tqdm=False)
drawn = [o.outputs[0].token_ids[0] for o in outs]
expected = viz.sampling_stages(tokens, logprobs, token_ids, temperature=T)
top = expected.head(8)
observed = np.array([drawn.count(int(t)) / N for t in top["token_id"]])
for tok, p, q in zip(top["token"], top["p_final"], observed):
    print(f"{tok!r:>14}: computed {p:.3f}   sampled {q:.3f}")
tv = 0.5 * np.abs(top["p_final"].to_numpy() - observed).sum()
print(f"difference on these tokens (total variation): {tv:.3f}")
assert tv < 0.2, "200 samples should land close to the computed distribution"

# %% [markdown]
# ## The lesson's strategies, on the real model
#
# Same prompt, six `SamplingParams`. A fixed `seed` in `SamplingParams` makes a sampled
# request repeatable on its own, whatever else is in the batch.

# %%
strategies = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=20),
    "nucleus": SamplingParams(temperature=0.8, top_p=0.95, max_tokens=20, seed=1),
    "top-k": SamplingParams(temperature=1.0, top_k=20, max_tokens=20, seed=1),
    "beam search": SamplingParams(use_beam_search=True, best_of=3, temperature=0.0, max_tokens=20),
    "3 completions": SamplingParams(n=3, temperature=0.8, max_tokens=20, seed=1),
    "constrained": SamplingParams(temperature=0.0, max_tokens=20, stop=[".", "!", "?"], min_tokens=3),
}
results = llm.generate([PROMPT] * len(strategies), list(strategies.values()), use_tqdm=False)
for (name, sp), res in zip(strategies.items(), results):
    for c in res.outputs:
        print(f"{name:>13}: {c.text!r}  ({c.finish_reason})")

again = llm.generate([PROMPT], strategies["greedy"], use_tqdm=False)
check_same_greedy("greedy is deterministic", again, results[:1], llm)
assert len(results[4].outputs) == 3

# %% [markdown]
# ## Penalties
#
# Penalties change the logits of tokens that already appeared. `frequency_penalty` subtracts
# a multiple of how often a token was generated, `presence_penalty` a constant once it
# appeared at all, and `repetition_penalty` divides (or multiplies) the logits of tokens from
# the prompt *and* the output. A small model under greedy decoding reuses words in a story;
# watch the share of repeated tokens fall. (The prompt matters: after "Hello, my name is" this
# model writes 32 tokens with few repeats, and a penalty then has little to push down.)

# %%
penalties = demos.penalty_table(llm, "Once upon a time", demos.PENALTY_SETTINGS, max_tokens=32)
for name, row in penalties.iterrows():
    print(f"{name:>24}: {row['repeated']:.0%} repeated tokens  {row['text'][:70]!r}")
assert (penalties["repeated"].drop("no penalty") < penalties.loc["no penalty", "repeated"]).all(), \
    "every penalty lowers the share of repeated tokens"

# %% [markdown]
# ## What to remember
#
# * `temperature=0` is greedy and deterministic; everything else draws from a distribution you
#   can compute.
# * Temperature reshapes the whole distribution; top-k, top-p and min-p cut its tail; the
#   sampler applies them in a fixed order.
# * A `seed` in `SamplingParams` makes one sampled request repeatable.
#
# Next: **3. Basic inference**, reading everything a request returns.
