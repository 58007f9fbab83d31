# Source of solutions/ex1_5_7_prefix_reuse.ipynb; exercises/ is generated from it.

# %% [markdown]
# # Exercise 1.5.7: predict which KV blocks a request will reuse
#
# **Goal:** with prefix caching on, predict, *before running them*, which cached KV blocks new
# requests will reuse and how many prompt tokens each of them will still compute; then check
# your predictions against the engine's trace.
#
# What you need to know (lab 10, and exercise 1.5.5):
#
# * With `enable_prefix_caching=True` every **full** block of `BLOCK_SIZE` tokens whose keys and
#   values have been computed is registered under a hash of its tokens **and every token before
#   them**. A block that is only partly filled is never registered.
# * A new request looks its full prompt blocks up from the first one on and reuses the leading
#   blocks that are registered; at the first miss it stops, and computes everything from there.
# * The last prompt token is always computed, even when its block is cached: its logits give
#   the first output token. So a request never reuses the block that holds its last token.
# * Blocks that nobody holds any more stay registered (cached) until their space is needed;
#   the cache below is large enough that nothing is evicted in this exercise.
# * The cache works on **token ids**, not on text.
#
# Write your code in the `# YOUR CODE HERE` cells; the `# Check` cells test your results.
# Time: about 30 minutes.

# %%
import labengine
from labengine import LLM, SamplingParams
from labengine.grading import blocks_needed, check, check_close, check_equal

MODEL = labengine.DEFAULT_MODEL
BLOCK_SIZE = 8
llm = LLM(model=MODEL, seed=0, block_size=BLOCK_SIZE, num_gpu_blocks_override=64, max_model_len=256,
          enable_prefix_caching=True)
tokenizer = llm.get_tokenizer()
# Every request generates one token, so the keys and values stored are those of its prompt.
ONE_TOKEN = SamplingParams(temperature=0.0, max_tokens=1)

# The engine has served one unrelated request already, as a server would have.
WARMUP = "Hello there! Please tell me about the weather in the mountains today."
llm.generate(WARMUP, ONE_TOKEN, use_tqdm=False)

SYSTEM = ("You are a helpful assistant for a lab about fast inference. Answer in one short sentence, "
          "and say so when you do not know. ")
FIRST = SYSTEM + "What is a KV cache in a model?"
# the batch that arrives after FIRST has been served
PROMPTS = {
    "same_system": SYSTEM + "Why is the sky blue?",
    "part_system": "You are a helpful assistant for a lab about cooking. Give me a recipe for bread.",
    "other": "Tell me a story about a robot who learns to paint.",
    "again": FIRST,
}

# %% [markdown]
# ## Task 1: how many blocks can a prompt reuse?
#
# Write two functions:
#
# * `common_prefix_len(a, b)`: the number of leading tokens two token-id lists have in common
#   (`common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2`);
# * `reusable_blocks(served, new, block_size)`: how many leading blocks of the token-id list
#   `new` a prefix cache holding the full blocks of every token-id list in `served` would
#   give it. Remember: only full blocks, a block matches only with everything before it, and
#   the last token of `new` is always computed.

# %% tags=["solution"]
### BEGIN SOLUTION
def common_prefix_len(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable_blocks(served, new, block_size):
    shared = max((common_prefix_len(old, new) for old in served), default=0)
    # full shared blocks only, and never the block that holds the last token (it is computed)
    return min(shared // block_size, (len(new) - 1) // block_size)
### END SOLUTION

# %% tags=["check"]
# Check 1: common_prefix_len and reusable_blocks on cases with known answers
for _a, _b, _want in [([1, 2, 3], [1, 2, 4, 5], 2), ([1, 2], [1, 2, 3], 2), ([7], [8], 0), ([], [1], 0),
                      ([5, 6, 7], [5, 6, 7], 3)]:
    check_equal(f"common_prefix_len({_a}, {_b})", common_prefix_len(_a, _b), _want)
_cases = [
    ("nothing served", [], [1, 2, 3, 4, 5], 2, 0, "an empty cache gives nothing"),
    ("4 tokens shared, block 4", [[1, 2, 3, 4, 9, 9]], [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 1, ""),
    ("6 tokens shared, block 4: the second block is only partly shared", [[1, 2, 3, 4, 5, 6, 9, 9]],
     [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 1, "a partly shared block is not reused: it is computed again"),
    ("the same 8 tokens again, block 4", [[1, 2, 3, 4, 5, 6, 7, 8]], [1, 2, 3, 4, 5, 6, 7, 8], 4, 1,
     "the last token is always computed, so its block is not reused"),
    ("the same 9 tokens again, block 4", [[1, 2, 3, 4, 5, 6, 7, 8, 9]], [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 2, ""),
    ("a block that matches after a mismatch", [[1, 2, 3, 4, 5, 6]], [1, 2, 9, 9, 5, 6, 7], 2, 1,
     "a block's hash covers every token before it: after the first miss nothing matches"),
    ("the first token differs", [[0, 2, 3, 4, 5]], [1, 2, 3, 4, 5, 6], 2, 0, ""),
    ("the best of several served prompts", [[1, 2, 3, 9, 9, 9], [1, 2, 3, 4, 5, 9], [8, 8, 8]],
     [1, 2, 3, 4, 5, 6, 7], 2, 2, "compare the new prompt with every served prompt; the longest match counts"),
]
for _name, _served, _new, _bs, _want, _hint in _cases:
    check_equal(f"reusable_blocks: {_name}", reusable_blocks(_served, _new, _bs), _want, hint=_hint)

# %% [markdown]
# ## Task 2: serve the first request, traced
#
# Generate `FIRST` with `ONE_TOKEN` inside `with llm.trace() as first_trace:`. Then read from the
# trace `first_blocks`: the physical blocks the first request was given, in logical order (the
# `block_allocated` rows of `first_trace.to_dataframe()`, ordered by `logical_index`).

# %% tags=["solution"]
### BEGIN SOLUTION
with llm.trace() as first_trace:
    first_output = llm.generate(FIRST, ONE_TOKEN, use_tqdm=False)[0]
first_df = first_trace.to_dataframe()
allocated = first_df[first_df["event"] == "block_allocated"].sort_values("logical_index")
first_blocks = [int(b) for b in allocated["block"]]
print(f"FIRST has {len(first_output.prompt_token_ids)} tokens, held blocks {first_blocks}")
### END SOLUTION

# %% tags=["check"]
# Check 2: the first request and its blocks
_first_df = first_trace.to_dataframe()
_first_ids = list(llm.llm_engine.process_request(FIRST).prompt_token_ids)
check_equal("the trace holds one request, of FIRST's length",
            [int(_x) for _x in _first_df.loc[_first_df["event"] == "request_added", "prompt_len"]], [len(_first_ids)])
_a = _first_df[_first_df["event"] == "block_allocated"].sort_values("logical_index")
check_equal("first_blocks, in logical order", [int(b) for b in first_blocks], [int(b) for b in _a["block"]],
            hint="take the 'block' column of the block_allocated rows, sorted by 'logical_index'; the engine "
                 "served a request before, so the blocks do not start at 0")
check_equal("one block per started group of BLOCK_SIZE tokens", len(first_blocks),
            blocks_needed(len(_first_ids), BLOCK_SIZE))

# %% [markdown]
# ## Task 3: predict, before running the batch
#
# The cache now holds the full blocks of `WARMUP` and `FIRST`. The requests of `PROMPTS` will
# arrive together, in one `generate` call. **Without running them**, compute for each name of
# `PROMPTS` (tokenize with `tokenizer.encode`, as the engine does):
#
# * `predicted_reused[name]`: how many blocks it will reuse;
# * `predicted_blocks[name]`: which physical blocks, in logical order (a list; every block it can
#   reuse was computed for `FIRST`, so `first_blocks` tells you which);
# * `predicted_computed[name]`: how many of its prompt tokens will go through the model;
# * `predicted_hit_rate`: the batch's prefix-cache hit rate, i.e. the blocks reused divided by
#   the blocks looked up, where a request looks up every full block except the one holding its
#   last token (`(len - 1) // BLOCK_SIZE` blocks).
#
# Watch out: `SYSTEM` tokenized alone ends differently from `SYSTEM` followed by a question.

# %% tags=["solution"]
### BEGIN SOLUTION
served = [tokenizer.encode(WARMUP), tokenizer.encode(FIRST)]
prompt_ids = {name: tokenizer.encode(p) for name, p in PROMPTS.items()}
predicted_reused = {name: reusable_blocks(served, ids, BLOCK_SIZE) for name, ids in prompt_ids.items()}
predicted_blocks = {name: first_blocks[:k] for name, k in predicted_reused.items()}
predicted_computed = {name: len(prompt_ids[name]) - k * BLOCK_SIZE for name, k in predicted_reused.items()}
looked_up = sum((len(ids) - 1) // BLOCK_SIZE for ids in prompt_ids.values())
predicted_hit_rate = sum(predicted_reused.values()) / looked_up
for name in PROMPTS:
    print(f"{name:12s} {len(prompt_ids[name]):3d} tokens: reuses {predicted_reused[name]} blocks "
          f"{predicted_blocks[name]}, computes {predicted_computed[name]} tokens")
print(f"hit rate {predicted_hit_rate:.3f}")
### END SOLUTION

# %% tags=["check"]
# Check 3: your predictions, made before the batch ran
_engine = llm.llm_engine
_ids = {_n: list(_engine.process_request(_p).prompt_token_ids) for _n, _p in PROMPTS.items()}
_served = [list(_engine.process_request(WARMUP).prompt_token_ids), _first_ids]
check("the engine has served only WARMUP and FIRST so far",
      _engine.num_prefill_tokens_computed == sum(len(_s) for _s in _served),
      f"{_engine.num_prefill_tokens_computed} prompt tokens computed since the engine started, "
      f"{sum(len(_s) for _s in _served)} expected",
      hint="predict from token ids and BLOCK_SIZE, without running the batch (it runs in Task 4); "
           "restart the kernel and run all cells")


def _shared(_new):
    _best = 0
    for _old in _served:
        _k = 0
        while _k < min(len(_old), len(_new)) and _old[_k] == _new[_k]:
            _k += 1
        _best = max(_best, _k)
    return _best


_expect = {_n: min(_shared(_v) // BLOCK_SIZE, (len(_v) - 1) // BLOCK_SIZE) for _n, _v in _ids.items()}
check_equal("predicted_reused has one entry per prompt", sorted(predicted_reused), sorted(PROMPTS))
_system_alone = len(_engine.process_request(SYSTEM).prompt_token_ids)
for _n, _v in _ids.items():
    _got = predicted_reused[_n]
    _why = []  # the mistakes that give this wrong number
    if _got == blocks_needed(_shared(_v), BLOCK_SIZE) != _expect[_n]:
        _why.append(f"{_shared(_v)} tokens are shared, and a partly shared block is not reused")
    if _got > _expect[_n] and _shared(_v) // BLOCK_SIZE > _expect[_n]:
        _why.append("the last prompt token is always computed, so its block is not reused")
    if _got == _system_alone // BLOCK_SIZE != _expect[_n] and PROMPTS[_n].startswith(SYSTEM):
        _why.append(f"SYSTEM alone has {_system_alone} tokens, but in a prompt its end merges with the next "
                    "word: compare the whole prompts' token ids")
    check_equal(f"predicted_reused[{_n!r}]", int(_got), _expect[_n],
                hint="; or ".join(_why) or "count the leading full blocks of its token ids that a served "
                                           "prompt has, token for token from the first")
for _n in _ids:
    check_equal(f"predicted_blocks[{_n!r}]", [int(_b) for _b in predicted_blocks[_n]],
                [int(_b) for _b in _a["block"]][:_expect[_n]],
                hint="logical block i of a reused prefix is FIRST's logical block i: first_blocks[:reused]")
    check_equal(f"predicted_computed[{_n!r}]", int(predicted_computed[_n]), len(_ids[_n]) - _expect[_n] * BLOCK_SIZE,
                hint="every prompt token that is not in a reused block is computed")
_looked = sum((len(_v) - 1) // BLOCK_SIZE for _v in _ids.values())
check_close("predicted_hit_rate", predicted_hit_rate, sum(_expect.values()) / _looked,
            hint=f"the batch looks up {_looked} blocks in all")

# %% [markdown]
# ## Task 4: run the batch and compare
#
# Generate all of `PROMPTS` (their values, in order) with `ONE_TOKEN`, in **one** `generate`
# call, inside `with llm.trace() as trace:`; keep the results in `outputs` (they come back in
# prompt order, so `outputs[i]` belongs to the i-th name of `PROMPTS`). Then read from the trace,
# for each name:
#
# * `measured_reused[name]`: the number of `block_reused` rows of its request;
# * `measured_blocks[name]`: their `block` column, ordered by `logical_index` (a list);
# * `measured_computed[name]`: the prompt tokens computed for it: the `num_tokens` of its
#   `prefill_chunk` rows, summed;
#
# and `measured_hit_rate`: from the `prefix_cache_lookup` rows, the blocks found
# (`num_hit_blocks`) over the blocks looked up (`num_queried_blocks`). Print predictions and
# measurements side by side.

# %% tags=["solution"]
### BEGIN SOLUTION
with llm.trace() as trace:
    outputs = llm.generate(list(PROMPTS.values()), ONE_TOKEN, use_tqdm=False)
df = trace.to_dataframe()
request_of = {name: o.request_id for name, o in zip(PROMPTS, outputs)}
measured_reused, measured_blocks, measured_computed = {}, {}, {}
for name, rid in request_of.items():
    mine = df[df["request_id"] == rid]
    reused = mine[mine["event"] == "block_reused"].sort_values("logical_index")
    measured_reused[name] = len(reused)
    measured_blocks[name] = [int(b) for b in reused["block"]]
    measured_computed[name] = int(mine.loc[mine["event"] == "prefill_chunk", "num_tokens"].sum())
lookups = df[df["event"] == "prefix_cache_lookup"]
measured_hit_rate = float(lookups["num_hit_blocks"].sum() / lookups["num_queried_blocks"].sum())
for name in PROMPTS:
    print(f"{name:12s} reused  predicted {predicted_reused[name]} {predicted_blocks[name]}, "
          f"measured {measured_reused[name]} {measured_blocks[name]}; computed  predicted "
          f"{predicted_computed[name]}, measured {measured_computed[name]}")
print(f"hit rate predicted {predicted_hit_rate:.3f}, measured {measured_hit_rate:.3f}")
### END SOLUTION

# %% tags=["check"]
# Check 4: the trace agrees with your predictions
_df = trace.to_dataframe()
_added = _df[_df["event"] == "request_added"]
check_equal("outputs: the prompts of PROMPTS, in order", [o.prompt for o in outputs], list(PROMPTS.values()))
check_equal("the trace holds the requests of outputs, in order", list(_added["request_id"]),
            [o.request_id for o in outputs])
check_equal("one generate call: the batch arrived in one step", int(_added["step"].nunique()), 1)
_rid = dict(zip(PROMPTS, _added["request_id"]))
for _n, _r in _rid.items():
    _mine = _df[_df["request_id"] == _r]
    _ru = _mine[_mine["event"] == "block_reused"].sort_values("logical_index")
    _blocks = [int(_b) for _b in _ru["block"]]
    _computed = int(_mine.loc[_mine["event"] == "prefill_chunk", "num_tokens"].sum())
    check_equal(f"measured_reused[{_n!r}] read from the trace", int(measured_reused[_n]), len(_blocks),
                hint="count the block_reused rows of that request (not its prefix_cache_lookup or "
                     "block_allocated rows)")
    check_equal(f"measured_blocks[{_n!r}] read from the trace", [int(_b) for _b in measured_blocks[_n]], _blocks)
    check_equal(f"measured_computed[{_n!r}] read from the trace", int(measured_computed[_n]), _computed)
    check_equal(f"the engine reused what the token ids say for {_n!r}", (len(_blocks), _computed),
                (_expect[_n], len(_ids[_n]) - _expect[_n] * BLOCK_SIZE))
    check_equal(f"{_n!r}: predicted = measured (blocks reused, which, tokens computed)",
                (int(predicted_reused[_n]), [int(_b) for _b in predicted_blocks[_n]], int(predicted_computed[_n])),
                (len(_blocks), _blocks, _computed))
_lk = _df[_df["event"] == "prefix_cache_lookup"]
_rate = float(_lk["num_hit_blocks"].sum() / _lk["num_queried_blocks"].sum())
check_close("measured_hit_rate read from the trace", measured_hit_rate, _rate,
            hint="the batch's lookups only (this trace's prefix_cache_lookup rows), not the engine's rate since "
                 "its start")
check_close("predicted_hit_rate = measured", predicted_hit_rate, _rate)

# %% [markdown]
# ## Task 5: explain
#
# `"again"` is exactly `FIRST`, whose every block was computed and registered, yet it computed
# its last block again. Set `ANSWER` to one letter:
#
# * a. the block was evicted between the two requests
# * b. its last block holds its last prompt token, which must go through the model to give the
#   logits of the first output token, and a block is reused whole or not at all
# * c. the same tokens get a different hash the second time
# * d. prefix caching only shares blocks between different prompts

# %% tags=["solution"]
### BEGIN SOLUTION
ANSWER = "b"
### END SOLUTION

# %% tags=["check"]
# Check 5: why the last block is computed
check_equal("ANSWER", str(ANSWER).strip().lower(), "b")

# %% [markdown]
# ## Reflect
#
# * With `BLOCK_SIZE = 16`, which predictions change? What does a larger block cost a prefix
#   cache, and what does it save?
# * A server puts a date at the very start of its system prompt. What does that do to the hit
#   rate from one day to the next? Where should the parts of a prompt that change go?
