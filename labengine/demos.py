"""The data behind the lessons' demonstrations, and the demos' settings.

A lesson says "a frequency penalty cuts repetition" or "later requests finish later" and
draws a chart. The chart's data is built here, by the function the notebook calls, so a test
can build the same data on the embedded model and check that the demo shows its point
(tests/test_lab_demos.py). The settings were chosen by measuring the embedded model: on
another model a demo may need other prompts, and its test says so.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from labengine import viz
from labengine.sampling_params import SamplingParams

# --- notebook 02: sampling parameters -------------------------------------------------------

# After "Hello, my name is" the embedded model spreads its probability thin: its 12 most likely
# next tokens hold only about a fifth of the mass. top_p = 0.3 already keeps ~20 tokens, so a
# grid that draws 12 bars needs small p values to show top-p cutting anything.
SAMPLING_GRID = [
    [dict(temperature=t) for t in (0.3, 1.0, 1.6)],
    [dict(top_p=p) for p in (0.05, 0.1, 0.15)],
    [dict(top_k=k) for k in (1, 4, 12)],
]
GRID_BARS = 12   # tokens drawn per panel

# A story prompt makes the greedy small model reuse words; "Hello, my name is" does not repeat
# within 32 tokens, so a penalty has nothing to push down there.
PENALTY_PROMPT = "Once upon a time"
PENALTY_SETTINGS = [dict(), dict(frequency_penalty=1.0), dict(presence_penalty=1.0), dict(repetition_penalty=1.5)]


def setting_name(kw: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kw.items()) or "no penalty"


def sampling_grid(tokens, logprobs, token_ids, grid=SAMPLING_GRID) -> dict:
    """{"top_p=0.1": stages DataFrame, ...}: viz.sampling_stages for every setting of the grid."""
    return {setting_name(kw): viz.sampling_stages(tokens, logprobs, token_ids, **kw)
            for row in grid for kw in row}


def removed_among_drawn(stages: pd.DataFrame, bars: int = GRID_BARS) -> int:
    """How many of the `bars` most likely tokens (those a panel draws) the setting removes."""
    drawn = stages.head(bars)   # viz.plot_sampling_stages draws the head of the ranking
    return int((~drawn["kept"]).sum())


def repeated_share(token_ids: Sequence[int]) -> float:
    """The share of generated tokens that repeat an earlier generated token."""
    return 1 - len(set(token_ids)) / len(token_ids) if len(token_ids) else 0.0


def penalty_table(llm, prompt: str = PENALTY_PROMPT, settings=PENALTY_SETTINGS, max_tokens: int = 32) -> pd.DataFrame:
    """Greedy continuations of `prompt` under each penalty setting (one batch): the share of
    repeated tokens and the text."""
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw) for kw in settings]
    outs = llm.generate([prompt] * len(settings), params, use_tqdm=False)
    return pd.DataFrame([{"setting": setting_name(kw), "repeated": repeated_share(o.outputs[0].token_ids),
                          "text": o.outputs[0].text} for kw, o in zip(settings, outs)]).set_index("setting")


# --- notebook 03: several completions -----------------------------------------------------

# "The best way to learn programming is" is a sentence the embedded model learnt almost by
# heart: at temperature 0.8 three of five samples are the same text. A story opening has many
# good continuations, so five samples differ.
N_PROMPT = "Once upon a time"


# --- notebook 05: streaming text into the notebook ----------------------------------------

class StreamLine:
    """A line of streamed text that a notebook shows as it is, without Python's quotes
    (`display(str)` shows the string's repr: 'story: ...')."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def _repr_pretty_(self, p, cycle) -> None:
        p.text(self.text)


def stream_line(request_id: str, prompt: str, text: str, finished: bool) -> StreamLine:
    """What a stream's display line shows: the request, its prompt and text so far, and a
    cursor while it is still generating."""
    return StreamLine(f"{request_id}: {prompt}{text}" + ("" if finished else " ▌"))


# --- notebook 07: metrics of a queued batch ------------------------------------------------

def latency_by_queue_position(batch) -> pd.DataFrame:
    """One row per request of an `LLM.generate` batch, in submission order: its position in the
    queue, output tokens, time in the queue, to first token, decoding, and end to end (seconds),
    and its start relative to the earliest arrival."""
    t0 = min(o.metrics.arrival_time for o in batch)
    rows = []
    for pos, o in enumerate(batch):
        m = o.metrics
        rows.append({"request": o.request_id, "position": pos, "tokens": len(o.outputs[0].token_ids),
                     "queue": m.time_in_queue, "to first token": m.first_token_time - m.first_scheduled_time,
                     "decode": m.finished_time - m.first_token_time, "end to end": m.finished_time - m.arrival_time,
                     "start": m.arrival_time - t0})
    return pd.DataFrame(rows)


def rank_correlation(x, y) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    return float(pd.Series(np.asarray(x, dtype=float)).corr(pd.Series(np.asarray(y, dtype=float)), method="spearman"))


# --- notebook 08: memory -------------------------------------------------------------------

MEMORY_PARTS = ["weights MiB", "KV cache MiB", "swap pool MiB"]


def plot_memory(memory: pd.DataFrame, ax=None):
    """Stacked horizontal bars of what each engine holds, on a linear axis (stacked lengths only
    add up on a linear one), each part labelled with its size. Returns the Axes."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.7 * len(memory) + 1.6), layout="constrained")
    left = np.zeros(len(memory))
    y = np.arange(len(memory))
    smallest_label = 0.05 * max(1e-9, memory[MEMORY_PARTS].sum(axis=1).max())  # narrower parts go unlabelled
    for part, color in zip(MEMORY_PARTS, ("#1f77b4", "#ff7f0e", "#2ca02c")):
        width = memory[part].fillna(0).to_numpy(dtype=float)
        bars = ax.barh(y, width, left=left, color=color, label=part.replace(" MiB", ""))
        ax.bar_label(bars, labels=[f"{w:.1f}" if w >= smallest_label else "" for w in width],
                     label_type="center", fontsize=9)
        left = left + width
    ax.set_yticks(y, memory.index)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    ax.set_title("memory held by each engine")
    ax.legend(loc="lower right")
    return ax
