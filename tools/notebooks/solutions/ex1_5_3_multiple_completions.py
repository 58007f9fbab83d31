# Source of solutions/ex1_5_3_multiple_completions.ipynb; exercises/ is generated from it.

# %% [markdown]
# # Exercise 1.5.3: multiple completions
#
# **Goal:** generate several completions of one prompt, measure how diverse they are at
# different temperatures, and pick the best one by log-probability.
#
# Write your code in the `# YOUR CODE HERE` cells; the `# Check` cells test your results.
# Time: about 20 minutes.

# %%
import labengine
from labengine import LLM, SamplingParams
from labengine.grading import check, check_close, check_equal

MODEL = labengine.DEFAULT_MODEL
llm = LLM(model=MODEL, seed=0)
PROMPT = "Once upon a time"
N, MAX_TOKENS, SEED = 5, 16, 0
TEMPERATURES = [0.2, 0.7, 1.2]

# %% [markdown]
# ## Task 1: five completions
#
# Generate `N` completions of `PROMPT` in **one request** (`SamplingParams(n=...)`), with
# temperature 0.8, `max_tokens=MAX_TOKENS` and `seed=SEED`. Store the `RequestOutput` (not the
# list!) in `five` and print each completion with its cumulative log-probability.

# %% tags=["solution"]
### BEGIN SOLUTION
five = llm.generate([PROMPT], SamplingParams(n=N, temperature=0.8, max_tokens=MAX_TOKENS, seed=SEED),
                    use_tqdm=False)[0]
for c in five.outputs:
    print(f"[{c.index}] {c.cumulative_logprob:7.2f}  {c.text!r}")
### END SOLUTION

# %% tags=["check"]
# Check 1: one request, five completions
check("five is one RequestOutput, not the list generate returns", type(five).__name__ == "RequestOutput",
      f"a {type(five).__name__}", hint="llm.generate returns a list with one RequestOutput per prompt: take its [0]")
check_equal("five.prompt is PROMPT", five.prompt, PROMPT)
check_equal("N completions", len(five.outputs), N)
_ref = llm.generate([PROMPT], SamplingParams(n=N, temperature=0.8, max_tokens=MAX_TOKENS, seed=SEED), use_tqdm=False)[0]
check("generated with temperature 0.8, MAX_TOKENS and SEED",
      sorted(c.token_ids for c in five.outputs) == sorted(c.token_ids for c in _ref.outputs),
      "the same five completions as the reference request",
      hint="one request: SamplingParams(n=N, temperature=0.8, max_tokens=MAX_TOKENS, seed=SEED)")

# %% [markdown]
# ## Task 2: a diversity score
#
# Write `diversity(token_lists)`: given a list of completions as lists of token ids, return
# the number of **distinct** token ids over all of them divided by the **total** number of
# tokens (a number in (0, 1]; 1 means no token is ever repeated). For example
# `diversity([[1, 2], [1, 3]]) == 0.75`. Return `0.0` when there are no tokens at all.

# %% tags=["solution"]
### BEGIN SOLUTION
def diversity(token_lists):
    total = sum(len(t) for t in token_lists)
    if total == 0:
        return 0.0
    return len({tok for t in token_lists for tok in t}) / total
### END SOLUTION

# %% tags=["check"]
# Check 2: diversity() on known inputs
for _args, _want in [([[1, 2], [1, 3]], 0.75), ([[5, 5, 5, 5]], 0.25), ([[1], [2], [3]], 1.0),
                     ([[7, 8, 9], [9, 8, 7], [7, 7, 7]], 3 / 9), ([], 0.0), ([[], []], 0.0)]:
    check_close(f"diversity({_args})", diversity(_args), _want)

# %% [markdown]
# ## Task 3: diversity against temperature
#
# For each temperature in `TEMPERATURES`, generate `N` completions of `PROMPT` (one request,
# `max_tokens=MAX_TOKENS`, `seed=SEED`). Store the `RequestOutput`s in a dict
# `by_temperature = {T: output}` and their diversity scores in `diversity_by_temperature =
# {T: score}`. Print the scores, and one completion per temperature.

# %% tags=["solution"]
### BEGIN SOLUTION
by_temperature = {
    t: llm.generate([PROMPT], SamplingParams(n=N, temperature=t, max_tokens=MAX_TOKENS, seed=SEED),
                    use_tqdm=False)[0]
    for t in TEMPERATURES
}
diversity_by_temperature = {t: diversity([c.token_ids for c in out.outputs]) for t, out in by_temperature.items()}
for t in TEMPERATURES:
    print(f"T={t}: diversity {diversity_by_temperature[t]:.2f}  e.g. {by_temperature[t].outputs[0].text!r}")
### END SOLUTION

# %% tags=["check"]
# Check 3: the right requests, the right scores, and the trend
check_equal("one entry per temperature", sorted(by_temperature), sorted(TEMPERATURES))
for _t in TEMPERATURES:
    _r = llm.generate([PROMPT], SamplingParams(n=N, temperature=_t, max_tokens=MAX_TOKENS, seed=SEED), use_tqdm=False)[0]
    check(f"T={_t}: N completions generated at that temperature",
          sorted(c.token_ids for c in by_temperature[_t].outputs) == sorted(c.token_ids for c in _r.outputs),
          "matches the reference request")
    check_close(f"T={_t}: diversity score", diversity_by_temperature[_t],
                diversity([c.token_ids for c in by_temperature[_t].outputs]))
_lo, _hi = diversity_by_temperature[min(TEMPERATURES)], diversity_by_temperature[max(TEMPERATURES)]
check("hotter is more diverse", _hi > _lo, f"{_lo:.2f} at T={min(TEMPERATURES)} < {_hi:.2f} at T={max(TEMPERATURES)}")

# %% [markdown]
# ## Task 4: the best completion
#
# From `five` (Task 1), pick `best`: the `CompletionOutput` with the highest cumulative
# log-probability. Then pick `best_per_token`: the one with the highest log-probability
# **per generated token**. Print both. Are they the same one?

# %% tags=["solution"]
### BEGIN SOLUTION
best = max(five.outputs, key=lambda c: c.cumulative_logprob)
best_per_token = max(five.outputs, key=lambda c: c.cumulative_logprob / len(c.token_ids))
print(f"best overall:   [{best.index}] {best.cumulative_logprob:.2f}  {best.text!r}")
print(f"best per token: [{best_per_token.index}] "
      f"{best_per_token.cumulative_logprob / len(best_per_token.token_ids):.2f}/token  {best_per_token.text!r}")
### END SOLUTION

# %% tags=["check"]
# Check 4: the best completions
check("best is one of five's completions", any(best is c for c in five.outputs), f"index {best.index}")
check_close("best has the highest cumulative logprob", best.cumulative_logprob,
            max(c.cumulative_logprob for c in five.outputs))
check("best_per_token is one of five's completions", any(best_per_token is c for c in five.outputs),
      f"index {best_per_token.index}")
check_close("best_per_token has the highest logprob per token",
            best_per_token.cumulative_logprob / len(best_per_token.token_ids),
            max(c.cumulative_logprob / len(c.token_ids) for c in five.outputs))

# %% [markdown]
# ## Reflect
#
# * vLLM can do Task 4 for you: `SamplingParams(n=1, best_of=5, ...)`. Which of your two
#   criteria does it use?
# * At T=0.2, are the five completions identical? Why can they still differ?
