"""labengine.widgets driven from Python: set a slider, assert the new state.
Also the kernel tier: the browser-test notebook executed headless by nbclient."""
from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from labengine import viz  # noqa: E402
from labengine.trace import Trace, block_owners  # noqa: E402
from labengine.widgets import BlockMapExplorer, LivePanel, SamplingExplorer  # noqa: E402

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "browser_fixtures"))
from synthetic import TOY_LOGPROBS, TOY_TOKENS, simulate  # noqa: E402


@pytest.fixture
def toy():
    ex = SamplingExplorer(distribution=dict(zip(TOY_TOKENS, TOY_LOGPROBS)), max_tokens=12, plot=False)
    yield ex
    ex.close()


def test_sliders_update_on_release_only(toy):
    for s in toy.controls:
        assert s.continuous_update is False
    assert {s.description.split(" ")[0] for s in toy.controls} == {
        "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"}


def test_sampling_explorer_top_k_top_p_min_p(toy):
    assert "kept 16 tokens" in toy.summary.value and len(toy.kept_tokens) == 16
    n0 = toy.num_updates
    toy.top_k.value = 3
    assert toy.num_updates == n0 + 1 and toy.last_error is None
    assert toy.kept_tokens == [" the", " a", " cat"]
    assert (toy.probs > 0).sum() == 3 and np.isclose(toy.probs.sum(), 1)
    assert "kept 3 tokens" in toy.summary.value and "top-k: 3" in toy.summary.value
    toy.top_p.value = 0.5
    assert toy.stage_counts()["top_p"] == 2 and "kept 2 tokens" in toy.summary.value
    toy.top_k.value = -1
    toy.top_p.value = 1.0
    toy.min_p.value = 0.2
    p = np.exp(TOY_LOGPROBS) / np.exp(TOY_LOGPROBS).sum()
    assert len(toy.kept_tokens) == int((p >= 0.2 * p.max()).sum())
    toy.min_p.value = 0.0
    toy.temperature.value = 0.0
    assert toy.kept_tokens == [" the"] and "(greedy)" in toy.summary.value
    assert toy.continuation == " the" * 12


def test_sampling_explorer_temperature_and_seed(toy):
    toy.temperature.value = 0.3
    sharp = toy.probs[0]
    toy.temperature.value = 1.8
    assert toy.probs[0] < sharp
    first = toy.continuation
    toy.seed.value = 7
    assert toy.continuation != first and "seed 7" in toy.continuation_html.value
    toy.seed.value = 0
    assert toy.continuation == first  # a fixed seed regenerates the same text


def test_sampling_explorer_plot():
    ex = SamplingExplorer(distribution=dict(zip(TOY_TOKENS, TOY_LOGPROBS)))
    png = ex.image.value
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    ex.top_k.value = 2
    assert ex.image.value != png
    ex.close()


def test_sampling_explorer_needs_a_source():
    with pytest.raises(ValueError):
        SamplingExplorer()


# ------------------------------------------------------------------ BlockMapExplorer


@pytest.fixture(scope="module")
def toy_trace():
    box = {}
    simulate(num_requests=12, num_gpu_blocks=12, preemption_mode="swap", n=(1, 2), seed=2,
             listeners=[lambda eng: box.setdefault("t", Trace(eng).start())])
    return box["t"]


def test_block_map_explorer_scrubs(toy_trace):
    df = toy_trace.to_dataframe()
    bm = BlockMapExplorer(toy_trace)
    assert bm.step.continuous_update is False
    owners = block_owners(df)
    assert bm.step.min == owners.index[0] and bm.step.max == owners.index[-1]
    for s in (3, 10, bm.step.max):
        bm.step.value = s
        assert bm.last_error is None
        want = {int(b): r for b, r in owners.loc[s].items() if pd.notna(r)}
        assert bm.owners == want
        assert f"step {s}</b>: <span class='used'>{len(want)}/12 blocks in use" in bm.info.value
        assert bm.step_row is not None and int(bm.step_row["kv_blocks_used"]) == len(want)
        # the cursor moved on the map
        assert bm._cursor.get_xdata()[0] == s
    busy = max(owners.index, key=lambda s: owners.loc[s].notna().sum())
    bm.step.value = int(busy)
    rid = owners.loc[busy].dropna().iloc[0]
    bm.request.value = str(rid)
    want = viz.block_table_data(df, rid, int(busy))
    pd.testing.assert_frame_equal(bm.table.reset_index(drop=True), want.reset_index(drop=True))
    assert bm.table_image.value[:4] == b"\x89PNG"
    bm.close()


# ------------------------------------------------------------------ LivePanel


def test_live_panel_follows_the_engine():
    box = {}

    def listen(eng):
        box["panel"] = LivePanel(eng, update_every_s=0.0).attach()
        box["trace"] = Trace(eng).start()
        box["eng"] = eng

    simulate(num_requests=10, num_gpu_blocks=12, listeners=[listen])
    panel, trace, eng = box["panel"], box["trace"], box["eng"]
    st = trace.steps()
    hist = panel.to_dataframe()
    assert len(hist) == len(st)
    assert hist["num_running"].tolist() == st["num_running"].tolist()
    assert hist["kv_blocks_used"].tolist() == st["kv_blocks_used"].tolist()
    last = st.iloc[-1]
    assert panel.kv.value == pytest.approx(100 * last["kv_blocks_used"] / last["kv_blocks_total"])
    assert panel.num_finished == 10 and "finished 10" in panel.requests_html.value
    assert (hist["tokens_per_s"] > 0).all()
    with panel:
        pass  # re-entrant: attach / detach
    panel.detach()
    trace.stop()
    assert not eng.event_bus.active


def test_live_panel_throttles():
    box = {}
    simulate(num_requests=6, num_gpu_blocks=12,
             listeners=[lambda eng: box.setdefault("p", LivePanel(eng, update_every_s=3600).attach())])
    panel = box["p"]
    assert len(panel.history) > 5
    assert panel.steps_html.value == "0 steps"  # throttled: drawn once at creation only
    panel.detach()  # the final draw
    assert panel.steps_html.value.startswith(f"{len(panel.history)} steps")


# ------------------------------------------------------------------ the real engine


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from labengine.testing import make_random_model
    path = make_random_model("llama", tmp_path_factory.mktemp("model"))
    from labengine import LLM
    return LLM(model=str(path), max_model_len=64, num_gpu_blocks_override=24, block_size=4, seed=0,
               max_logprobs=8192)


def test_sampling_explorer_on_the_model(llm):
    ex = SamplingExplorer(llm, "hello world", max_tokens=6, plot=False)
    V = len(llm.get_tokenizer())
    assert ex.num_logprobs >= V and len(ex.stages) == V
    assert np.isclose(np.exp(ex.stages["logprob"]).sum(), 1, atol=1e-3)  # the whole vocabulary
    for name, value in (("top_k", 5), ("top_p", 0.3), ("min_p", 0.2), ("temperature", 0.5)):
        getattr(ex, name).value = value
        assert ex.last_error is None, ex.error.value
        kept = set(ex.stages.loc[ex.stages["kept"], "token_id"])
        assert ex.engine_kept == kept, name  # our stages agree with the engine's sampler
        assert f"kept {len(kept)} token" in ex.summary.value
    text = ex.continuation
    ex.seed.value = 1
    ex.seed.value = 0
    assert ex.continuation == text
    ex.close()


def test_live_panel_during_generate(llm):
    from labengine import SamplingParams
    panel = LivePanel(llm, update_every_s=0.0)
    with panel:
        llm.generate([f"prompt {i}" for i in range(6)], SamplingParams(max_tokens=5, ignore_eos=True),
                     use_tqdm=False)
    assert not llm.llm_engine.event_bus.active
    h = panel.to_dataframe()
    assert len(h) >= 5 and h["kv_blocks_total"].eq(24).all()
    assert panel.num_finished == 6 and h["num_running"].max() >= 1


def test_block_map_explorer_on_a_real_trace(llm):
    from labengine import SamplingParams
    with llm.trace() as trace:
        llm.generate(["a b c d e f g h"] * 4, SamplingParams(max_tokens=8, n=2, seed=0, ignore_eos=True),
                     use_tqdm=False)
    bm = BlockMapExplorer(trace, plot=False)
    df = trace.to_dataframe()
    owners = block_owners(df)
    s = int(owners.notna().sum(axis=1).idxmax())
    bm.step.value = s
    assert len(bm.owners) == owners.loc[s].notna().sum() > 0
    bm.close()


# ------------------------------------------------------------------ kernel tier


def test_widget_notebook_runs_in_a_kernel(tmp_path):
    import nbclient
    import nbformat

    nb = nbformat.read(os.path.join(HERE, "browser_fixtures", "sampling_widget.ipynb"), as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "ex.top_k.value = 3\n"
        "assert 'kept 3 tokens' in ex.summary.value, ex.summary.value\n"
        "print('checked:', ex.kept_tokens)"))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    out = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "checked: [' the', ' a', ' cat']" in out
