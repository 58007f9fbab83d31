# Source of solutions/ex1_5_1_basic_inference.ipynb; exercises/ is generated from it.

# %% [markdown]
# # Exercise 1.5.1: basic inference
#
# **Goal:** run your first inference with the `LLM` class, compare sampling settings, and
# measure how long generation takes.
#
# Write your code in the cells that say `# YOUR CODE HERE` (delete the
# `raise NotImplementedError()` line). The cells that start with `# Check` test *your
# results* (the variables you create), print what they verified, and raise an error
# otherwise. Don't edit them: the grader (`make grade EX=ex1_5_1`) puts the original ones
# back anyway.
#
# Time: about 20 minutes.

# %%
import time

import labengine
from labengine import LLM, SamplingParams
from labengine.grading import check, check_close, check_equal, check_type

MODEL = labengine.DEFAULT_MODEL
PROMPTS = ["The capital of France is", "Once upon a time", "The meaning of life is"]
MAX_TOKENS = 16

# %% [markdown]
# ## Task 1: create the engine
#
# Create an `LLM` for `MODEL` and call it `llm`. Use `seed=0`.

# %% tags=["solution"]
### BEGIN SOLUTION
llm = LLM(model=MODEL, seed=0)
### END SOLUTION

# %% tags=["check"]
# Check 1: an LLM for MODEL
check_type("llm is a labengine LLM", llm, LLM)
check_equal("it loaded MODEL", llm.llm_engine.model_config.model, str(MODEL))

# %% [markdown]
# ## Task 2: greedy generation, timed
#
# Make `greedy_params`, a `SamplingParams` for **greedy** decoding with at most `MAX_TOKENS`
# tokens. Generate a completion for each of the `PROMPTS` in **one** call and store the list
# of results in `greedy_outputs`. Measure the wall-clock time of that call (`time.perf_counter()`)
# in `elapsed_s`, and compute `tokens_per_s`: the number of generated tokens (all prompts)
# divided by `elapsed_s`. Print each prompt with its completion.

# %% tags=["solution"]
### BEGIN SOLUTION
greedy_params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
t0 = time.perf_counter()
greedy_outputs = llm.generate(PROMPTS, greedy_params)
elapsed_s = time.perf_counter() - t0
n_generated = sum(len(o.outputs[0].token_ids) for o in greedy_outputs)
tokens_per_s = n_generated / elapsed_s
for o in greedy_outputs:
    print(f"{o.prompt!r} -> {o.outputs[0].text!r}")
print(f"{n_generated} tokens in {elapsed_s:.2f} s = {tokens_per_s:.1f} tokens/s")
### END SOLUTION

# %% tags=["check"]
# Check 2: greedy outputs, one per prompt, in order, reproducible
check("greedy_params is greedy", greedy_params.temperature == 0.0, f"temperature={greedy_params.temperature}")
check_equal("max_tokens", greedy_params.max_tokens, MAX_TOKENS)
check_equal("one output per prompt, in order", [o.prompt for o in greedy_outputs], PROMPTS)
check("every request finished", all(o.finished for o in greedy_outputs), "finished=True for all three")
_again = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
check_equal("the completions are the model's greedy ones",
            [o.outputs[0].token_ids for o in greedy_outputs], [o.outputs[0].token_ids for o in _again])

# %% tags=["check"]
# Check 3: the timing is of that call
# The engine stamps every request's arrival and finish (RequestOutput.metrics): the call
# lasts at least from the first arrival to the last finish, and little more.
_m = [o.metrics for o in greedy_outputs]
_span = max(m.finished_time for m in _m) - min(m.arrival_time for m in _m)
_slack = max(1.0, 0.5 * _span)
check("elapsed_s is a number of seconds", isinstance(elapsed_s, (int, float)) and elapsed_s > 0, repr(elapsed_s))
check("elapsed_s is the time of the generate call", _span * 0.95 <= elapsed_s <= _span + _slack,
      f"{elapsed_s:.3f} s measured; the engine's own metrics say the requests took {_span:.3f} s",
      hint="time exactly the one llm.generate call: t0 = time.perf_counter() just before it, "
           "elapsed_s = time.perf_counter() - t0 just after it")
_n = sum(len(o.outputs[0].token_ids) for o in greedy_outputs)
check_close("tokens_per_s = generated tokens / elapsed_s", tokens_per_s, _n / elapsed_s, rel=0.01)

# %% [markdown]
# ## Task 3: try different sampling parameters
#
# Build a dictionary `params_by_name` with three `SamplingParams`, each with
# `max_tokens=MAX_TOKENS` and a `seed` (so that your results repeat):
#
# * `"focused"`: temperature 0.3;
# * `"balanced"`: temperature 0.8 and top_p 0.95;
# * `"creative"`: temperature 1.3.
#
# Generate completions for `PROMPTS` with each, and store the result lists in
# `outputs_by_name` (same keys). Print them side by side. Which one reads best? Which one
# wanders?

# %% tags=["solution"]
### BEGIN SOLUTION
params_by_name = {
    "focused": SamplingParams(temperature=0.3, max_tokens=MAX_TOKENS, seed=1),
    "balanced": SamplingParams(temperature=0.8, top_p=0.95, max_tokens=MAX_TOKENS, seed=1),
    "creative": SamplingParams(temperature=1.3, max_tokens=MAX_TOKENS, seed=1),
}
outputs_by_name = {name: llm.generate(PROMPTS, p, use_tqdm=False) for name, p in params_by_name.items()}
for i, prompt in enumerate(PROMPTS):
    print(prompt)
    for name, outs in outputs_by_name.items():
        print(f"  {name:>8}: {outs[i].outputs[0].text!r}")
### END SOLUTION

# %% tags=["check"]
# Check 4: three settings, as specified, and the outputs really come from them
check_equal("three settings", sorted(params_by_name), ["balanced", "creative", "focused"])
_p = params_by_name
check("temperatures 0.3 / 0.8 / 1.3",
      [_p["focused"].temperature, _p["balanced"].temperature, _p["creative"].temperature] == [0.3, 0.8, 1.3],
      "focused < balanced < creative")
check("balanced uses top_p=0.95", abs(_p["balanced"].top_p - 0.95) < 1e-9, f"top_p={_p['balanced'].top_p}")
check("every setting has a seed and max_tokens=MAX_TOKENS",
      all(p.seed is not None and p.max_tokens == MAX_TOKENS for p in _p.values()), f"seeded, {MAX_TOKENS} tokens")
for _name, _params in _p.items():
    _mine = [o.outputs[0].token_ids for o in outputs_by_name[_name]]
    _ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, _params, use_tqdm=False)]
    check(f"outputs_by_name[{_name!r}] was generated with its params", _mine == _ref,
          "regenerating with the same seed gives the same tokens")

# %% [markdown]
# ## Reflect
#
# * Run Task 3 again with another seed: which setting changes the most?
# * Why is `"focused"` often identical to greedy? (Look at notebook 2's temperature chart.)
