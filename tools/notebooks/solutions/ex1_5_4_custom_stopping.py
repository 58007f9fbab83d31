# Source of solutions/ex1_5_4_custom_stopping.ipynb; exercises/ is generated from it.

# %% [markdown]
# # Exercise 1.5.4: custom stopping
#
# **Goal:** control where generation stops with stop sequences, `min_tokens` and
# `max_tokens`; read `finish_reason` and `stop_reason`; handle the edge cases.
#
# All requests here are greedy, so the model always writes the same text and you can
# predict exactly where each rule cuts it. Write your code in the `# YOUR CODE HERE` cells;
# the `# Check` cells test your results. Time: about 20 minutes.

# %%
import labengine
from labengine import LLM, SamplingParams
from labengine.grading import check, check_equal

MODEL = labengine.DEFAULT_MODEL
llm = LLM(model=MODEL, seed=0)
PROMPT = "Once upon a time"
reference = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0].outputs[0]
print("the greedy text, without any stop rule:")
print(repr(reference.text))

# %% [markdown]
# ## Task 1: a stop string
#
# Choose `STOP`, a word (or any string of 3+ characters) that appears in `reference.text`
# **after its first 10 characters**. Generate `PROMPT` greedily with `max_tokens=32` and
# `stop=[STOP]`; store the `CompletionOutput` in `stopped`. Then do the same with
# `include_stop_str_in_output=True` and store it in `stopped_kept`. Print both texts and their
# `finish_reason` and `stop_reason`.

# %% tags=["solution"]
### BEGIN SOLUTION
STOP = next(w for w in reference.text.split() if len(w) >= 4 and reference.text.find(w) >= 10)
stopped = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP]),
                       use_tqdm=False)[0].outputs[0]
stopped_kept = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP],
                                                     include_stop_str_in_output=True),
                            use_tqdm=False)[0].outputs[0]
for c in (stopped, stopped_kept):
    print(repr(c.text), c.finish_reason, repr(c.stop_reason))
### END SOLUTION

# %% tags=["check"]
# Check 1: the stop string ends the text where it first appears
check("STOP is a string of 3+ characters in the text after position 10",
      isinstance(STOP, str) and len(STOP) >= 3 and STOP in reference.text[10:], repr(STOP))
check_equal("finish_reason", stopped.finish_reason, "stop")
check_equal("stop_reason is the stop string", stopped.stop_reason, STOP)
check_equal("the text is the greedy text cut before STOP", stopped.text, reference.text[:reference.text.index(STOP)])
check_equal("with include_stop_str_in_output the text ends with STOP", stopped_kept.text,
            reference.text[:reference.text.index(STOP)] + STOP)

# %% [markdown]
# ## Task 2: `max_tokens` and `min_tokens`
#
# 1. `short`: generate `PROMPT` greedily with `max_tokens=7` (no stop string).
# 2. `early` and `forced`: choose `STOP2`, a string that occurs **at least twice** in
#    `reference.text` (a short word or a comma will do). `early`: generate `PROMPT` greedily
#    with `max_tokens=32` and `stop=[STOP2]`; it stops at the first occurrence. `forced`: the
#    same, plus `min_tokens=MIN_TOKENS`, with `MIN_TOKENS` larger than the number of tokens
#    `early` has, so that the first occurrence **cannot** stop it; it stops at a later one.
#    Look at `forced.text`: does it end just before a later `STOP2`? (Like vLLM, the engine
#    looks for a stop string in each new token's text *plus the few characters before it*,
#    so one token past the first occurrence may still find that first one.)
#
# Store the three `CompletionOutput`s and print their lengths, finish reasons and texts.

# %% tags=["solution"]
### BEGIN SOLUTION
short = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=7), use_tqdm=False)[0].outputs[0]
STOP2 = next(w for w in reference.text.split() if reference.text.count(w) >= 2)
early = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP2]),
                     use_tqdm=False)[0].outputs[0]
# two tokens past: one past would still see the first STOP2 in the characters before the new token
MIN_TOKENS = len(early.token_ids) + 2
forced = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP2], min_tokens=MIN_TOKENS),
                      use_tqdm=False)[0].outputs[0]
for c in (short, early, forced):
    print(len(c.token_ids), c.finish_reason, repr(c.stop_reason), repr(c.text))
### END SOLUTION

# %% tags=["check"]
# Check 2: length limits
check_equal("short: 7 tokens", len(short.token_ids), 7)
check_equal("short: finish_reason", short.finish_reason, "length")
check_equal("short: the greedy text's first 7 tokens", short.token_ids, reference.token_ids[:7])
check("STOP2 occurs at least twice in the greedy text", isinstance(STOP2, str) and len(STOP2) > 0
      and reference.text.count(STOP2) >= 2, f"{STOP2!r} occurs {reference.text.count(STOP2)} times")
_early = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP2]), use_tqdm=False)[0].outputs[0]
check_equal("early: stopped by STOP2 at its first occurrence", (early.token_ids, early.finish_reason, early.stop_reason),
            (_early.token_ids, "stop", STOP2), hint="early uses stop=[STOP2] and no min_tokens")
check("MIN_TOKENS is past where STOP2 first fired", MIN_TOKENS > len(early.token_ids),
      f"{MIN_TOKENS} > {len(early.token_ids)}")
# The engine's answer to the request the task describes: forced must be that output.
_forced = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP2], min_tokens=MIN_TOKENS),
                       use_tqdm=False)[0].outputs[0]
check_equal("forced was generated with stop=[STOP2] and min_tokens=MIN_TOKENS",
            (forced.token_ids, forced.finish_reason, forced.stop_reason),
            (_forced.token_ids, _forced.finish_reason, _forced.stop_reason),
            hint="generate PROMPT greedily with max_tokens=32, stop=[STOP2] and min_tokens=MIN_TOKENS")
_cut = len(forced.text)
check("forced stopped at a later STOP2", forced.finish_reason == "stop" and forced.stop_reason == STOP2
      and len(forced.token_ids) >= MIN_TOKENS and _cut > reference.text.find(STOP2)
      and reference.text.startswith(forced.text + STOP2),
      f"finish_reason={forced.finish_reason!r} after {len(forced.token_ids)} tokens (min_tokens={MIN_TOKENS}), "
      f"text {forced.text!r}; the first {STOP2!r} is at character {reference.text.find(STOP2)}",
      hint="forced.text must end just before a later STOP2; if it stopped at the first one, raise MIN_TOKENS "
           "(a later occurrence must still lie within the 32 tokens)")

# %% [markdown]
# ## Task 3: counting finish reasons
#
# Write `finish_counts(outputs)`: given a list of `RequestOutput`s, return a dict that maps
# each `finish_reason` to how many **completions** ended that way (look at every completion
# of every output). Example: `{"stop": 2, "length": 1}`.

# %% tags=["solution"]
### BEGIN SOLUTION
def finish_counts(outputs):
    counts = {}
    for out in outputs:
        for c in out.outputs:
            counts[c.finish_reason] = counts.get(c.finish_reason, 0) + 1
    return counts
### END SOLUTION

# %% tags=["check"]
# Check 3: finish_counts on real outputs
_outs = llm.generate([PROMPT, PROMPT, "The capital of France is"],
                     [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                      SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP]),
                      SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=0, ignore_eos=True)], use_tqdm=False)
check_equal("finish_counts", finish_counts(_outs), {"length": 4, "stop": 1})
check_equal("finish_counts([])", finish_counts([]), {})

# %% [markdown]
# ## Task 4: edge cases
#
# Write `safe_generate(llm, prompt, **kwargs)`: build `SamplingParams(**kwargs)` and generate
# `prompt`; return `(output, None)` on success (the `RequestOutput`) and `(None, message)`
# when the parameters or the prompt are invalid (a `ValueError`; `message` is its text). It
# must never raise a `ValueError`. Then try it on: an empty prompt, `max_tokens=0`,
# `min_tokens` larger than `max_tokens`, an empty stop string `stop=[""]`, and a stop string
# that never appears (which is *not* an error: what is its finish reason?).

# %% tags=["solution"]
### BEGIN SOLUTION
def safe_generate(llm, prompt, **kwargs):
    try:
        params = SamplingParams(**kwargs)
        return llm.generate([prompt], params, use_tqdm=False)[0], None
    except ValueError as e:
        return None, str(e)

for prompt, kw in [("", {}), (PROMPT, dict(max_tokens=0)), (PROMPT, dict(min_tokens=10, max_tokens=5)),
                   (PROMPT, dict(stop=[""])), (PROMPT, dict(temperature=0.0, max_tokens=8, stop=["@@@"]))]:
    out, err = safe_generate(llm, prompt, **kw)
    print(f"{prompt!r:20} {kw}: " + (f"error: {err}" if err else f"ok, {out.outputs[0].finish_reason}"))
### END SOLUTION

# %% tags=["check"]
# Check 4: safe_generate catches what is invalid and only that
def _safe_generate(_prompt, **_kw):
    try:
        return safe_generate(llm, _prompt, **_kw)
    except ValueError as _e:
        check(f"safe_generate({_prompt!r}, **{_kw}) returns the error", False, f"it raised ValueError: {_e}",
              hint="SamplingParams(**kwargs) raises the ValueError of invalid parameters: build it inside the try too")

for _prompt, _kw, _word in [("", {}, "empty"), (PROMPT, dict(max_tokens=0), "max_tokens"),
                            (PROMPT, dict(min_tokens=10, max_tokens=5), "min_tokens"),
                            (PROMPT, dict(stop=[""]), "stop"), (PROMPT, dict(top_p=0.0), "top_p")]:
    _out, _err = _safe_generate(_prompt, **_kw)
    check(f"safe_generate({_prompt!r}, **{_kw}) returns the error",
          _out is None and isinstance(_err, str) and _word in _err.lower(), repr(_err))
_out, _err = _safe_generate(PROMPT, temperature=0.0, max_tokens=8, stop=["@@@"], ignore_eos=True)
check("a stop string that never appears is fine", _err is None and _out is not None, "no error")
check("on success it returns the RequestOutput", type(_out).__name__ == "RequestOutput", f"a {type(_out).__name__}",
      hint="return llm.generate([prompt], params)[0], the RequestOutput (not one of its completions)")
check_equal("... and the request ends by length", (_out.outputs[0].finish_reason, len(_out.outputs[0].token_ids)),
            ("length", 8))
check_equal("... with the greedy tokens", _out.outputs[0].token_ids, reference.token_ids[:8])
