# Source of labs/07_request_response.ipynb (build with `python tools/build_notebooks.py`).

# %% [markdown]
# # 7. Request and response objects, field by field
#
# What goes in: a prompt (text, or token ids) and a `SamplingParams`. What comes out: a
# `RequestOutput` holding `CompletionOutput`s, `Logprob`s and a `RequestMetrics`. This
# notebook opens every one of them, says what each field means, and checks that the fields
# agree with each other and with the engine's trace. Then it charts the metrics.

# %%
import dataclasses
import math

import matplotlib.pyplot as plt
import pandas as pd

import labengine
from labengine import LLM, SamplingParams, demos
from labengine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput

MODEL = labengine.DEFAULT_MODEL
# at most 6 sequences per step: the batch at the end of the notebook has to queue
llm = LLM(model=MODEL, seed=0, max_num_seqs=6)
tokenizer = llm.get_tokenizer()

# %% [markdown]
# ## The request side
#
# A prompt can be a string, a `{"prompt": ...}` dict, or token ids
# (`{"prompt_token_ids": [...]}`); all three are the same request to the engine. The
# `SamplingParams` you pass is copied, never modified.

# %%
text = "The capital of France is"
ids = tokenizer.encode(text)
params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, prompt_logprobs=1)
as_text, as_dict, as_ids = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}], params, use_tqdm=False)
print("token ids:", ids)
print("same tokens from all three forms:",
      as_text.outputs[0].token_ids == as_dict.outputs[0].token_ids == as_ids.outputs[0].token_ids)
print("prompt text is kept when given:", repr(as_text.prompt), repr(as_ids.prompt))
assert as_text.outputs[0].token_ids == as_ids.outputs[0].token_ids and as_ids.prompt is None

print("\nthe params, as the engine saw them:")
print(params)

# %% [markdown]
# ### The lesson's `access_outputs.py` raises
#
# The lesson's example asks for two completions (`n=2`) with `temperature=0.0`. Greedy decoding
# has only one answer, so two greedy completions would be the same text twice: vLLM refuses
# the combination when the `SamplingParams` is created, and so does labengine, with vLLM's message.

# %%
try:
    SamplingParams(temperature=0.0, max_tokens=20, logprobs=1, n=2)   # as in the lesson
    lesson_error = None
except ValueError as e:
    lesson_error = e
    print(f"{type(e).__name__}: {e}")
assert isinstance(lesson_error, ValueError) and "greedy" in str(lesson_error)

# %% [markdown]
# What works: sample (any `temperature > 0`) to get different completions, or ask beam search
# for the 2 most likely continuations (deterministic, `temperature=0`, `best_of` beams).

# %%
sampled, beams = llm.generate(["Hello, my name is"] * 2, [
    SamplingParams(temperature=0.8, max_tokens=20, logprobs=1, n=2, seed=0),
    SamplingParams(use_beam_search=True, best_of=2, n=2, temperature=0.0, max_tokens=20),
], use_tqdm=False)
for name, res in (("n=2, temperature=0.8", sampled), ("beam search, n=2", beams)):
    for i, completion in enumerate(res.outputs):
        print(f"{name:>20} #{i + 1}: {completion.text!r} (cumulative logprob {completion.cumulative_logprob:.2f})")
assert len(sampled.outputs) == len(beams.outputs) == 2

# %% [markdown]
# ## `RequestOutput`

# %%
out = llm.generate([text], SamplingParams(n=2, best_of=3, temperature=0.8, max_tokens=10, logprobs=2,
                                          prompt_logprobs=1, seed=0), use_tqdm=False)[0]
fields = {
    "request_id": "the engine's id for this request (a string; LLM numbers them 0, 1, 2 ...)",
    "prompt": "the prompt text (None when you passed token ids)",
    "prompt_token_ids": "the prompt after tokenization",
    "prompt_logprobs": "per prompt token {id: Logprob}, if prompt_logprobs was set; the first is None",
    "outputs": "the completions: the best n of best_of, by cumulative logprob",
    "finished": "True once every completion has stopped (streams show False until then)",
    "metrics": "timestamps and engine time of this request (below)",
}
pd.DataFrame([{"field": f, "value": repr(getattr(out, f))[:60], "meaning": m} for f, m in fields.items()])

# %%
assert len(out.outputs) == 2 and len(out.prompt_logprobs) == len(out.prompt_token_ids)
assert out.prompt_logprobs[0] is None
assert out.outputs[0].cumulative_logprob >= out.outputs[1].cumulative_logprob, "best first"
print("two of three completions returned, best first:", [round(c.cumulative_logprob, 2) for c in out.outputs])

# %% [markdown]
# ## `CompletionOutput`

# %%
c = out.outputs[0]
cfields = {
    "index": "which of the request's sequences this is (creation order, not rank)",
    "text": "the generated text (stop string removed unless include_stop_str_in_output)",
    "token_ids": "every generated token id, the stopping token included",
    "cumulative_logprob": "sum of the chosen tokens' logprobs",
    "logprobs": "per generated token {id: Logprob}: the chosen one plus the top `logprobs`",
    "finish_reason": "'stop', 'length' or 'abort' (None while running)",
    "stop_reason": "the stop string or token id that ended it; None for EOS or length",
}
pd.DataFrame([{"field": f, "value": repr(getattr(c, f))[:60], "meaning": m} for f, m in cfields.items()])

# %% [markdown]
# Each `logprobs` entry holds the chosen token and up to `logprobs` alternatives, so 2 or 3
# entries: 2 when the chosen token is itself among the top 2. A `Logprob` has three fields:

# %%
step0 = c.logprobs[0]
for tid, lp in step0.items():
    print(f"token {tid:5d} {lp.decoded_token!r:>12}: logprob {lp.logprob:7.3f}, rank {lp.rank}"
          + ("   <- chosen" if tid == c.token_ids[0] else ""))
print([f.name for f in dataclasses.fields(Logprob)])
assert all(2 <= len(d) <= 3 for d in c.logprobs)
assert math.isclose(sum(d[t].logprob for t, d in zip(c.token_ids, c.logprobs)), c.cumulative_logprob, abs_tol=1e-4)

# %% [markdown]
# ## `RequestMetrics`
#
# Times are wall-clock `time.time()` stamps; the last three fields are engine time (seconds)
# summed over the steps the request took part in.

# %%
m = out.metrics
base = m.arrival_time
for f in dataclasses.fields(RequestMetrics):
    v = getattr(m, f.name)
    shown = f"+{(v - base) * 1e3:8.2f} ms" if f.name.endswith("_time") and f.name not in (
        "scheduler_time", "model_forward_time", "model_execute_time") and v is not None else f"{v * 1e3:8.2f} ms"
    print(f"{f.name:>20}: {shown}")
assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
assert math.isclose(m.time_in_queue, m.first_scheduled_time - m.arrival_time, abs_tol=1e-6)
assert m.model_forward_time <= m.model_execute_time <= m.finished_time - m.arrival_time + 1e-3

# %% [markdown]
# ## Metrics of a batch, charted
#
# 24 requests with different lengths, at most 6 running at once (`max_num_seqs=6`, set when
# the engine was created). For each request: time in the queue, time to its first token, then
# decoding until it finished. On the right, each request's end-to-end latency against its
# place in the batch, coloured by its length: the engine takes requests first come, first
# served, so a later request waits for a free place, and among requests that start together
# the longer ones take more steps. We also check the metrics against the trace, which measures
# the same things from the engine's events.

# %%
lengths = [6 + (5 * i) % 19 for i in range(24)]
with llm.trace() as trace:
    batch = llm.generate([f"Story number {i}:" for i in range(24)],
                          [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths],
                          use_tqdm=False)
met = demos.latency_by_queue_position(batch)   # one row per request, in submission order

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.5), layout="constrained")
left = met["start"].to_numpy()
for part, color in (("queue", "#d9d9d9"), ("to first token", "#ff7f0e"), ("decode", "#1f77b4")):
    ax.barh(met.index, met[part] * 1e3, left=left * 1e3, color=color, label=part)
    left = left + met[part].to_numpy()
ax.invert_yaxis()
ax.set_xlabel("ms since the batch was submitted")
ax.set_ylabel("request")
ax.legend()
ax.set_title("each request's life, from RequestMetrics")
points = ax2.scatter(met["position"], met["end to end"] * 1e3, c=met["tokens"], cmap="viridis", s=45)
fig.colorbar(points, ax=ax2, label="output tokens")
ax2.set_xlabel("position in the batch (submission order)")
ax2.set_ylabel("end-to-end latency (ms)")
ax2.set_title("later and longer requests finish later")
plt.show()

# %%
req = trace.requests().set_index("request_id")
# the chart's two claims, in numbers: latency rises with the position in the queue, and among
# the first six (they start together) it rises with the number of tokens
by_position = demos.rank_correlation(met["position"], met["end to end"])
first_wave = met[(req.loc[met["request"], "first_scheduled_step"] == req["first_scheduled_step"].min()).to_numpy()]
by_length = demos.rank_correlation(first_wave["tokens"], first_wave["end to end"])
print(f"rank correlation of latency with queue position: {by_position:.2f}; "
      f"with tokens among the {len(first_wave)} that started at once: {by_length:.2f}")
assert by_position > 0.7 and by_length > 0.9
queued = met[met["queue"] > 0.001]
print(f"{len(queued)} requests waited in the queue (max_num_seqs=6 lets only 6 run at once)")
assert len(queued) >= 12
ttft = pd.Series({o.request_id: o.metrics.first_token_time - o.metrics.arrival_time for o in batch})
diff = (ttft - req.loc[ttft.index, "ttft_s"]).abs().max()
print(f"TTFT from RequestMetrics and from the trace agree to {diff * 1e3:.3f} ms")
assert diff < 1e-3
assert (req.loc[[o.request_id for o in batch], "output_len"].to_numpy() == met["tokens"].to_numpy()).all()

# %% [markdown]
# ## What to remember
#
# * `RequestOutput` = the request (id, prompt, prompt tokens, prompt logprobs) + its
#   completions + its metrics; `CompletionOutput` = one completion's text, tokens, logprobs and why it stopped.
# * The metrics are timestamps: subtract them to get queue time, TTFT and decode time.
# * The trace and the metrics measure the same events and agree.
#
# Next: **8. Error handling and memory**.
