"""Issue 17 item 5: each lesson demo shows its point on the embedded model.

Every test builds the data a lesson's chart or printout draws, with the function and the
settings the notebook uses (labengine.demos, labengine.widgets, labengine.viz), and asserts
what the text beside it says. The notebooks assert the same in their own cells; these tests
keep the point checked without running a notebook.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import labengine  # noqa: E402
from labengine import LLM, SamplingParams, demos, viz  # noqa: E402
from labengine.widgets import BlockMapExplorer, SamplingExplorer, opening_view  # noqa: E402


@pytest.fixture(scope="module")
def llm():
    # the notebooks' engine: the embedded model, seed 0 (02 also asks for up to 8192 logprobs)
    return LLM(model=labengine.DEFAULT_MODEL, seed=0, max_logprobs=8192)


# ------------------------------------------------------------------ 02: sampling parameters

def test_02_every_top_p_panel_removes_drawn_tokens(llm):
    explorer = SamplingExplorer(llm, "Hello, my name is", max_tokens=12)
    tokens, token_ids, logprobs, _ = explorer.raw_distribution()
    grid = demos.sampling_grid(tokens, logprobs, token_ids)
    top_p = [demos.setting_name(kw) for kw in demos.SAMPLING_GRID[1]]
    assert all(name.startswith("top_p=") for name in top_p)
    removed = [demos.removed_among_drawn(grid[name]) for name in top_p]
    assert all(r > 0 for r in removed), dict(zip(top_p, removed))
    assert removed == sorted(removed, reverse=True), "a larger p keeps more"
    # the other rows show their points too: top_k=1 keeps one, temperature 0.3 sharpens
    assert int(grid["top_k=1"]["kept"].sum()) == 1
    assert grid["temperature=0.3"]["p_final"].max() > grid["temperature=1.6"]["p_final"].max()
    explorer.close()


def test_02_penalties_lower_repetition(llm):
    table = demos.penalty_table(llm, demos.PENALTY_PROMPT, demos.PENALTY_SETTINGS, max_tokens=32)
    base = table.loc["no penalty", "repeated"]
    assert base >= 0.15, table          # the unpenalised story does repeat itself
    for name in ("frequency_penalty=1.0", "presence_penalty=1.0", "repetition_penalty=1.5"):
        # measurably: at least 3 of the 32 tokens fewer repeats
        assert table.loc[name, "repeated"] <= base - 3 / 32, table


def test_repeated_share():
    assert demos.repeated_share([1, 2, 3, 4]) == 0
    assert demos.repeated_share([1, 1, 1, 1]) == 0.75
    assert demos.repeated_share([]) == 0


# ------------------------------------------------------------------ 03: n=5

def test_03_five_completions_differ(llm):
    out = llm.generate([demos.N_PROMPT], SamplingParams(n=5, temperature=0.8, max_tokens=24, seed=0),
                       use_tqdm=False)[0]
    texts = [c.text for c in out.outputs]
    assert len(set(texts)) == 5, texts


# ------------------------------------------------------------------ 05: streamed lines

def test_05_stream_lines_show_without_quotes():
    from IPython.core.formatters import DisplayFormatter
    line = demos.stream_line("story", "Once upon a time", ", there was", finished=False)
    data, _ = DisplayFormatter().format(line)
    assert data["text/plain"] == "story: Once upon a time, there was ▌"
    done, _ = DisplayFormatter().format(demos.stream_line("story", "Once", " upon", finished=True))
    assert done["text/plain"] == "story: Once upon"
    # what the notebook used to display: a str shows its repr, quotes included
    assert DisplayFormatter().format("story: Once")[0]["text/plain"] == "'story: Once'"


# ------------------------------------------------------------------ 07: the queued batch

def test_07_later_and_longer_requests_finish_later():
    llm7 = LLM(model=labengine.DEFAULT_MODEL, seed=0, max_num_seqs=6)   # notebook 07's engine
    lengths = [6 + (5 * i) % 19 for i in range(24)]
    with llm7.trace() as trace:
        batch = llm7.generate([f"Story number {i}:" for i in range(24)],
                              [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths],
                              use_tqdm=False)
    met = demos.latency_by_queue_position(batch)
    assert met["position"].tolist() == list(range(24)) and met["tokens"].tolist() == lengths
    req = trace.requests().set_index("request_id")
    # the chart draws wall-clock latency; its order is the order of the finish steps, which is
    # deterministic, so the rank correlations below do not depend on the machine's speed
    finish = req.loc[met["request"], "finish_step"].to_numpy()
    assert demos.rank_correlation(met["end to end"], finish) > 0.99
    assert demos.rank_correlation(met["position"], met["end to end"]) > 0.7
    start = req.loc[met["request"], "first_scheduled_step"].to_numpy()
    wave = met[start == start.min()]
    assert len(wave) == 6 and demos.rank_correlation(wave["tokens"], wave["end to end"]) > 0.9


def test_rank_correlation():
    assert demos.rank_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert demos.rank_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ------------------------------------------------------------------ 08: memory chart

def test_08_memory_chart_stacks_on_a_linear_axis():
    memory = pd.DataFrame({"weights MiB": [27.0, 27.0, 27.0], "KV cache MiB": [16.0, 0.75, 0.75],
                           "swap pool MiB": [0.0, 0.0, 0.75]}, index=["default", "small", "swap"])
    ax = demos.plot_memory(memory)
    assert ax.get_xscale() == "linear"
    # each bar's segments end where the next starts, and the last ends at the row's total
    for i, (name, row) in enumerate(memory.iterrows()):
        segs = sorted((p.get_x(), p.get_x() + p.get_width()) for p in ax.patches
                      if abs(p.get_y() + p.get_height() / 2 - i) < 1e-6)
        assert len(segs) == 3
        assert segs[0][0] == 0 and all(a[1] == pytest.approx(b[0]) for a, b in zip(segs, segs[1:]))
        assert segs[-1][1] == pytest.approx(row.sum())
    plt.close(ax.figure)


# ------------------------------------------------------------------ 04: the block-map explorer

@pytest.fixture(scope="module")
def lesson4_trace():
    llm4 = LLM(model=labengine.DEFAULT_MODEL, seed=0, max_num_seqs=8, num_gpu_blocks_override=64,
               max_model_len=256)   # notebook 04's engine and workload
    topics = ["the sea", "a robot", "the moon", "Paris", "a cat", "music", "rain", "a train"]
    prompts = [f"Tell me about {topics[i % 8]}. Answer {i}:" for i in range(16)]
    lengths = [3 + (7 * i) % 17 for i in range(16)]
    with llm4.trace() as trace:
        llm4.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths],
                      use_tqdm=False)
    return trace


def test_04_explorer_opens_on_a_request_with_blocks(lesson4_trace):
    df = lesson4_trace.to_dataframe()
    data = viz.block_map_data(df)
    bm = BlockMapExplorer(lesson4_trace)
    assert bm.table is not None and len(bm.table) > 0, "the block table it opens on is not empty"
    s = int(bm.step.value)
    assert len(bm.owners) == data.used().max(), "it opens at the busiest step"
    rid = bm._rid_of[bm.request.value]
    held = pd.Series(bm.owners).value_counts()
    assert held[rid] == held.max(), "on the request holding the most blocks there"
    assert bm.table_image.value[:4] == b"\x89PNG"
    # the table's text is readable: nothing under 8 pt, the image is not scaled down by a fixed height
    fig = viz.plot_block_table(df, rid, s)
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert sizes and min(sizes) >= 8, sorted(set(sizes))
    plt.close(fig)
    assert bm.table_image.layout.height in (None, "auto")
    bm.close()


def test_04_explorer_keeps_a_chosen_request_and_step(lesson4_trace):
    data = viz.block_map_data(lesson4_trace.to_dataframe())
    rid = data.requests[-1]
    step, chosen = opening_view(data, request_id=rid)
    assert chosen == rid
    j = int(np.searchsorted(data.steps, step))
    assert (data.grid[:, j] == data.requests.index(rid)).sum() > 0, "opens where that request holds blocks"
    first = int(data.steps[0])
    assert opening_view(data, step=first)[0] == first
