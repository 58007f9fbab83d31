# Source of solutions/ex1_5_5_kv_blocks.ipynb; exercises/ is generated from it.

# %% [markdown]
# # Exercise 1.5.5: predict the KV blocks a batch needs
#
# **Goal:** predict, *before running it*, how many KV-cache blocks each request of a batch
# will hold and how many blocks the whole batch uses at each step; then check your
# predictions against the engine's trace.
#
# What you need to know (notebooks 1 and 4):
#
# * The cache is split into blocks of `BLOCK_SIZE` token slots. A sequence gets a new block
#   when the token it is about to store does not fit in its last one.
# * A token's key and value are stored when the model **processes** it: the prompt's tokens
#   in the prefill step, each generated token in the *next* decode step.
# * The step that samples a request's last token is its last: it finishes in that step and
#   its blocks return to the pool at the end of it. (So the last generated token is never
#   stored, but the one before it is stored in that last step.)
#
# Write your code in the `# YOUR CODE HERE` cells; the `# Check` cells test your results.
# Time: about 30 minutes.

# %%
import labengine
from labengine import LLM, SamplingParams
from labengine.grading import check, check_equal, max_blocks_in_use, peak_blocks_per_request

MODEL = labengine.DEFAULT_MODEL
BLOCK_SIZE = 8
llm = LLM(model=MODEL, seed=0, block_size=BLOCK_SIZE, num_gpu_blocks_override=128, max_model_len=256)
tokenizer = llm.get_tokenizer()

PROMPTS = ["Hi", "The capital of France is", "Once upon a time, in a small village by the sea,",
           "Why is the sky blue?", "Write one sentence about the moon and the stars at night:",
           "A B C D E F G"]
OUTPUT_LENS = [9, 16, 5, 24, 12, 1]
# ignore_eos: every request generates exactly its output length.
PARAMS = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in OUTPUT_LENS]

# %% [markdown]
# ## Task 1: prompt lengths
#
# Use the `tokenizer` to compute `prompt_lens`, the number of tokens of each prompt, exactly as
# the engine will count them (`tokenizer.encode(prompt)`; it may add a start token).

# %% tags=["solution"]
### BEGIN SOLUTION
prompt_lens = [len(tokenizer.encode(p)) for p in PROMPTS]
print(prompt_lens)
### END SOLUTION

# %% tags=["check"]
# Check 1: prompt lengths as the engine counts them
_engine_lens = [len(llm.llm_engine.process_request(p).prompt_token_ids) for p in PROMPTS]
check_equal("prompt_lens", list(prompt_lens), _engine_lens)

# %% [markdown]
# ## Task 2: blocks per request
#
# Write `peak_blocks(prompt_len, output_len, block_size)`: the largest number of blocks one
# request holds during its life (think about which tokens ever get stored). Then compute
# `predicted_peaks`, a list with your prediction for each request of the batch.

# %% tags=["solution"]
### BEGIN SOLUTION
def peak_blocks(prompt_len, output_len, block_size):
    stored = prompt_len + output_len - 1     # every token but the last one generated
    return -(-stored // block_size)

predicted_peaks = [peak_blocks(p, o, BLOCK_SIZE) for p, o in zip(prompt_lens, OUTPUT_LENS)]
print(predicted_peaks)
### END SOLUTION

# %% tags=["check"]
# Check 2: peak_blocks on cases with known answers
for _args, _want in [((1, 1, 16), 1), ((16, 1, 16), 1), ((16, 2, 16), 2), ((17, 1, 16), 2),
                     ((10, 7, 16), 1), ((10, 8, 16), 2), ((3, 14, 8), 2), ((8, 9, 8), 2), ((8, 10, 8), 3)]:
    check_equal(f"peak_blocks{_args}", peak_blocks(*_args), _want)

# %% [markdown]
# ## Task 3: blocks in use, step by step
#
# All six requests arrive together and fit in one batch, so they are all prefilled in the
# same first step (step 0 of the run), and each decode step after it produces one more token
# for every request still running.
#
# Write `blocks_in_use(step, prompt_lens, output_lens, block_size)`: the number of blocks held
# **at the end of** engine step `step` (0 = the prefill step). Remember that a request that
# finishes in a step has already given its blocks back at the end of that step. Then compute
# `predicted_usage`, a list with your prediction for steps `0 .. max(OUTPUT_LENS) - 1`.

# %% tags=["solution"]
### BEGIN SOLUTION
def blocks_in_use(step, prompt_lens, output_lens, block_size):
    total = 0
    for p, o in zip(prompt_lens, output_lens):
        # step s samples the request's token number s+1; it finishes in step o-1
        if step < o - 1:
            stored = p + step                  # the prompt plus the tokens processed by decode steps 1..step
            total += -(-stored // block_size)
    return total

predicted_usage = [blocks_in_use(s, prompt_lens, OUTPUT_LENS, BLOCK_SIZE) for s in range(max(OUTPUT_LENS))]
print(predicted_usage)
### END SOLUTION

# %% tags=["check"]
# Check 3: blocks_in_use on a case with a known answer
check_equal("one request, prompt 8, 3 tokens, block 4: steps 0..2",
            [blocks_in_use(s, [8], [3], 4) for s in range(3)], [2, 3, 0])
check_equal("two requests", [blocks_in_use(s, [3, 5], [2, 4], 4) for s in range(4)], [3, 2, 2, 0])

# %% [markdown]
# ## Task 4: run it and compare
#
# Run the batch (`PROMPTS` with `PARAMS`, one `generate` call) inside `with llm.trace() as
# trace:`. Then read from the trace:
#
# * `measured_peaks`: the peak number of blocks each request held, in prompt order. (Hint:
#   `labengine.grading.peak_blocks_per_request(trace)` replays the block ledger and returns
#   `{request_id: peak}`; the outputs tell you each prompt's request id.)
# * `measured_usage`: the `kv_blocks_used` column of `trace.steps()`, as a list.
#
# Print predictions and measurements side by side.

# %% tags=["solution"]
### BEGIN SOLUTION
with llm.trace() as trace:
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
peaks = peak_blocks_per_request(trace)
measured_peaks = [peaks[o.request_id] for o in outputs]
measured_usage = trace.steps()["kv_blocks_used"].astype(int).tolist()
print("peaks    predicted", predicted_peaks, "\n         measured ", measured_peaks)
print("usage    predicted", predicted_usage, "\n         measured ", measured_usage)
### END SOLUTION

# %% tags=["check"]
# Check 4: your predictions match the engine
_df = trace.to_dataframe()
check_equal("the trace holds the six requests", sorted(_df.loc[_df["event"] == "request_added", "request_id"].tolist()),
            sorted(o.request_id for o in outputs))
_st = _df[_df["event"] == "step_finished"]
check_equal("the six requests ran as one batch: the first step prefilled all of them", int(_st.iloc[0]["batch_size"]),
            len(PROMPTS), hint="run all of PROMPTS with PARAMS in one llm.generate call inside the `with` block")
check_equal("each request generated its OUTPUT_LENS tokens", [len(o.outputs[0].token_ids) for o in outputs],
            OUTPUT_LENS, hint="generate with PARAMS, the list of one SamplingParams per prompt")
_peaks = peak_blocks_per_request(_df)
check_equal("measured_peaks read from the trace", list(measured_peaks), [_peaks[o.request_id] for o in outputs])
check_equal("predicted peaks = measured peaks", list(predicted_peaks), list(measured_peaks))
_used = [int(x) for x in _df.loc[_df["event"] == "step_finished", "kv_blocks_used"]]
check_equal("measured_usage read from the trace", [int(x) for x in measured_usage], _used)
check_equal("predicted usage = measured usage, step by step", [int(x) for x in predicted_usage], _used)
check_equal("the largest number of blocks in use", max(predicted_usage), max_blocks_in_use(_df))

# %% [markdown]
# ## Reflect
#
# * The cache has 128 blocks. How many copies of the longest request could run at once?
# * With `block_size=16`, which predictions change? Is a larger block better or worse for
#   wasted slots? For bookkeeping?
