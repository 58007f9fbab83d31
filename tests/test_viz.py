"""labengine.viz: every chart checked on the data it draws (not pixels), on synthetic traces
(the toy block manager in browser_fixtures/synthetic.py, whose true state we snapshot) and
on a real engine run."""
from __future__ import annotations

import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from labengine import viz  # noqa: E402
from labengine.trace import REQUEST_STATES, Trace, block_intervals, block_owners, steps  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "browser_fixtures"))
from synthetic import simulate  # noqa: E402


def run(**kw):
    """A traced toy run plus snapshots of the toy block manager at every step_finished."""
    box = {"tables": {}, "refs": {}}

    def listen(eng):
        box["trace"] = Trace(eng).start()

        def snap(e):
            if e.kind == "step_finished":
                seq_req = {q.seq_id: r.request_id for r in eng.running + eng.waiting + eng.swapped for q in r.seqs}
                swapped = {q.seq_id for r in eng.swapped for q in r.seqs}
                box["tables"][e.step] = {sid: (seq_req.get(sid), list(t), sid in swapped)
                                         for sid, t in eng.block_tables.items()}
                box["refs"][e.step] = list(eng.gpu_allocator.ref_counts)
        eng.event_bus.subscribe(snap)

    eng = simulate(listeners=[listen], **kw)
    return eng, box["trace"].to_dataframe(), box


@pytest.fixture(scope="module")
def swap_run():
    return run(num_requests=24, num_gpu_blocks=16, num_cpu_blocks=64, preemption_mode="swap", n=(1, 2, 3), seed=5)


@pytest.fixture(scope="module")
def big_run():
    return run(num_requests=100, num_gpu_blocks=40, num_cpu_blocks=256, preemption_mode="recompute",
               n=(1, 1, 2), seed=7, max_num_seqs=12)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------------------- block map


def test_block_map_data_is_the_replayed_ledger(swap_run):
    eng, df, box = swap_run
    d = viz.block_map_data(df)
    st = steps(df)
    assert d.grid.shape == (eng.num_gpu_blocks, len(st))
    assert d.requests == [str(i) for i in range(24)]
    assert d.used().tolist() == st["kv_blocks_used"].tolist()
    owners = block_owners(df)
    for s in d.steps:
        want = {int(b): r for b, r in owners.loc[s].items() if pd.notna(r)}
        assert d.owners_at(s) == want
        # and against the toy block manager itself (blocks of running / waiting seqs)
        real = {b: rid for (rid, t, swapped) in box["tables"][s].values() if not swapped for b in t}
        assert d.owners_at(s) == real
    assert (d.grid[d.grid >= 0] < len(d.requests)).all()
    # swaps are marked where the events say, and the CPU pool is drawn
    n_out = (df["event"] == "block_swapped_out").sum()
    assert n_out > 0 and len(d.swapped_out) == n_out and len(d.swapped_in) == (df["event"] == "block_swapped_in").sum()
    assert d.cpu_grid is not None and (d.cpu_grid >= 0).any()
    assert len(d.copied) == (df["event"] == "block_copied").sum() > 0


def test_shared_blocks_are_really_shared(swap_run, big_run):
    for eng, df, box in (swap_run, big_run):
        d = viz.block_map_data(df)
        truly = np.zeros_like(d.shared)
        for j, s in enumerate(d.steps):
            truly[:, j] = np.array(box["refs"][s]) > 1
        assert d.shared.any()
        assert not (d.shared & ~truly).any(), "a block marked shared has ref count 1"
        assert (d.shared & truly).sum() >= 0.5 * truly.sum(), "most shared blocks are found"


def test_no_sharing_without_forks():
    _, df, _ = run(num_requests=10, num_gpu_blocks=12, n=1)
    assert not viz.block_map_data(df).shared.any()


def test_block_table_data_matches_the_block_manager(swap_run):
    eng, df, box = swap_run
    checked = 0
    iv = block_intervals(df, None)
    for s, tables in list(box["tables"].items())[::3]:
        by_req: dict = {}
        for sid, (rid, t, swapped) in tables.items():
            by_req.setdefault(rid, {})[sid] = (t, swapped)
        for rid, seqs in by_req.items():
            tab = viz.block_table_data(df, rid, s, intervals=iv)
            real_blocks = {b for t, _ in seqs.values() for b in t}
            assert set(tab["block"]) == real_blocks, (s, rid)
            for sid, (t, swapped) in seqs.items():
                mine = tab[tab["seq_id"] == sid].sort_values("logical_index")
                if len(mine):
                    assert mine["block"].tolist() == t, (s, rid, sid)
                    assert (mine["device"] == ("cpu" if swapped else "gpu")).all()
                    checked += 1
    assert checked > 30


def test_plot_block_map(big_run):
    _, df, _ = big_run
    t0 = time.perf_counter()
    fig = viz.plot_block_map(df, step=10)
    assert time.perf_counter() - t0 < 20
    ax = fig.axes[0]
    assert "block map" in ax.get_title() and "100 requests" in ax.get_title()
    assert ax.get_xlabel() == "engine step" and "block" in ax.get_ylabel()
    img = ax.images[0].get_array()
    d = viz.block_map_data(df)
    assert img.shape[:2] == d.grid.shape
    assert np.allclose(img[d.grid < 0], 1.0)  # free = blank (white)
    legend = ax.get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert "free" in texts and any("100 requests" in t for t in texts)
    assert ax.lines and ax.lines[-1].get_xdata()[0] == 10  # the step cursor


def test_plot_block_table(swap_run):
    _, df, _ = swap_run
    cow = df[df["event"] == "block_copied"].iloc[0]
    fig = viz.plot_block_table(df, cow["request_id"], int(cow["step"]))
    assert "block table" in fig.axes[0].get_title()
    tab = viz.block_table_data(df, cow["request_id"], int(cow["step"]))
    assert tab["shared"].any() and len(tab["seq_id"].unique()) >= 2
    fig = viz.plot_block_table(df, "no-such-request", 0)
    assert "holds no blocks" in fig.axes[0].texts[0].get_text()


# ------------------------------------------------------------------------------- timeline


def test_timeline_data(swap_run):
    eng, df, _ = swap_run
    tl = viz.timeline_data(df)
    assert set(tl["state"]) <= set(REQUEST_STATES)
    assert {"waiting", "prefill", "decode", "preempted", "finished"} <= set(tl["state"])
    for rid, g in tl.groupby("request_id"):
        g = g.sort_values("start_step")
        live = g[g["state"] != "finished"]
        # contiguous from arrival to the finish
        assert (live["start_step"].iloc[1:].to_numpy() == live["end_step"].iloc[:-1].to_numpy()).all()
        fin = df[(df["event"] == "request_finished") & (df["request_id"] == rid)]["step"].iloc[0]
        # the end mark goes right after the request's last step (its finishing step)
        assert g[g["state"] == "finished"]["start_step"].tolist() in ([fin], [fin + 1])
        assert live["end_step"].max() <= fin + 1
    # prefill segments are the scheduled prefills
    pre = tl[tl["state"] == "prefill"]
    got = {(r.request_id, s) for r in pre.itertuples() for s in range(r.start_step, r.end_step)}
    want = {(rid, int(r.step)) for r in df[df["event"] == "scheduled"].itertuples() for rid in r.prefill_request_ids}
    assert got == want
    preempt = tl[tl["state"] == "preempted"]
    for r in df[df["event"] == "preempted"].itertuples():
        assert ((preempt["request_id"] == r.request_id) & (preempt["start_step"] <= r.step)
                & (preempt["end_step"] > r.step)).any()


def test_plot_timeline_100_requests(big_run):
    _, df, _ = big_run
    fig = viz.plot_timeline(df)
    ax = fig.axes[0]
    assert "100 requests" in ax.get_title() and ax.get_xlabel() == "engine step"
    assert len(ax.get_yticklabels()) <= 40  # readable at 100 requests
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"waiting", "prefill", "decode", "preempted", "finished"} <= set(labels)
    tl = viz.timeline_data(df)
    n_bars = sum(len(c.get_paths()) for c in ax.collections if hasattr(c, "get_paths"))
    assert n_bars >= len(tl[tl["state"] != "finished"])


# ------------------------------------------------------------------------------- latency


def test_step_latency_data_and_plot(swap_run):
    _, df, _ = swap_run
    d = viz.step_latency_data(df)
    st = steps(df)
    parts = d[["schedule_ms", "prepare_ms", "forward_ms", "sample_ms", "detokenize_ms", "other_ms"]].sum(axis=1)
    assert np.allclose(parts, d["latency_ms"])
    assert np.allclose(d["kv_usage_pct"], 100 * st["kv_blocks_used"] / st["kv_blocks_total"])
    assert d["batch_size"].tolist() == st["batch_size"].tolist()
    fig = viz.plot_step_latency(df)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "step latency (ms)"
    assert {a.get_ylabel() for a in fig.axes} >= {"batch size (sequences)", "KV cache usage (%)"}
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"forward", "sample", "batch size (seqs)", "KV cache usage (%)"} <= set(labels)
    # the bars stack to the latency
    tops = {}
    for rect in ax.patches:
        x = round(rect.get_x() + rect.get_width() / 2)
        tops[x] = max(tops.get(x, 0), rect.get_y() + rect.get_height())
    assert np.allclose([tops[s] for s in d["step"]], d["latency_ms"])


def test_latency_distributions(big_run):
    _, df, _ = big_run
    d = viz.latency_distribution_data(df)
    fin = df[df["event"] == "request_finished"]
    assert len(d) == len(fin) == 100
    assert np.allclose(d.set_index("request_id").loc[fin["request_id"], "latency_s"], fin["latency_s"])
    fig = viz.plot_latency_distributions(df)
    a, b = fig.axes
    assert "TTFT" in a.get_title() and "end-to-end" in b.get_title()
    assert sum(p.get_height() for p in a.patches) == d["ttft_s"].notna().sum()
    med = np.median(d["latency_s"] * 1e3)
    assert any(abs(l.get_xdata()[0] - med) < 1e-6 for l in b.lines)


def test_plots_on_an_empty_trace():
    df = Trace().to_dataframe()
    for f in (viz.plot_block_map, viz.plot_timeline, viz.plot_step_latency, viz.plot_latency_distributions):
        assert f(df) is not None


# ------------------------------------------------------------------------------- sampling stages


def test_sampling_stages_semantics():
    toks = list("abcdef")
    lp = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    d = viz.sampling_stages(toks, lp, top_k=3)
    assert d["kept"].tolist() == [True] * 3 + [False] * 3 and set(d["removed_by"].dropna()) == {"top_k"}
    assert np.isclose(d["p_final"].sum(), 1) and np.isclose(d["p_final"][0], 0.4 / 0.8)
    d = viz.sampling_stages(toks, lp, top_p=0.6)  # 0.4 + 0.25 >= 0.6
    assert d["kept"].sum() == 2
    d = viz.sampling_stages(toks, lp, min_p=0.3)  # >= 0.12
    assert d["kept"].sum() == 3
    d = viz.sampling_stages(toks, lp, temperature=0.0)
    assert d["kept"].tolist() == [True] + [False] * 5
    d = viz.sampling_stages(toks, lp, temperature=0.5)
    assert d["p_final"][0] > 0.4 and d["kept"].all()
    d = viz.sampling_stages(toks, lp, token_ids=range(6), repetition_penalty=2.0, prompt_token_ids=[0])
    assert d.set_index("token").loc["a", "p_penalties"] < 0.4
    d = viz.sampling_stages(toks, lp, token_ids=range(6), presence_penalty=1.0, prompt_token_ids=[0])
    assert np.allclose(d["p_penalties"], d["p_raw"])  # presence counts generated tokens only
    fig = viz.plot_sampling_stages(viz.sampling_stages(toks, lp, top_k=2))
    assert "2 of 6 tokens kept" in fig.axes[0].get_title()


def test_sampling_stages_agree_with_the_engine_sampler():
    import torch

    from labengine import sampler
    g = torch.Generator().manual_seed(0)
    V = 64
    for trial in range(20):
        logits = torch.randn(1, V, generator=g) * 3
        prompt = torch.randint(0, V, (8,), generator=g).tolist()
        out = torch.randint(0, V, (5,), generator=g).tolist()
        k, p, mp = int(torch.randint(1, V, (1,), generator=g)), float(torch.rand(1, generator=g)) * 0.9 + 0.1, 0.05
        pres, freq, rep = 0.5, 0.3, 1.3
        ref = sampler.apply_penalties(logits.clone(), [prompt], [out], torch.tensor([pres]), torch.tensor([freq]),
                                      torch.tensor([rep]))
        ref = ref / 0.8
        ref = sampler.apply_top_k_top_p(ref, torch.tensor([k]), torch.tensor([p]))
        ref = sampler.apply_min_p(ref, torch.tensor([mp]))
        d = viz.sampling_stages([str(i) for i in range(V)], logits[0].numpy(), token_ids=range(V), temperature=0.8,
                                top_k=k, top_p=p, min_p=mp, presence_penalty=pres, frequency_penalty=freq,
                                repetition_penalty=rep, prompt_token_ids=prompt, output_token_ids=out)
        kept_ref = set(torch.nonzero(torch.isfinite(ref[0])).flatten().tolist())
        assert set(d.loc[d["kept"], "token_id"]) == kept_ref, trial
        pr = torch.softmax(ref[0], -1).numpy()
        assert np.allclose(d.set_index("token_id")["p_final"].sort_index().to_numpy(), pr, atol=1e-5)


# ------------------------------------------------------------------------------- a real trace


@pytest.fixture(scope="module")
def real_df(tmp_path_factory):
    from labengine.testing import make_random_model
    path = make_random_model("llama", tmp_path_factory.mktemp("model"))
    from labengine import LLM, SamplingParams
    llm = LLM(model=str(path), num_gpu_blocks_override=14, block_size=4, max_model_len=48,
              preemption_mode="swap", swap_space=0.01, check_invariants=True, seed=0, max_num_seqs=6)
    with llm.trace() as trace:
        llm.generate([f"request {i} " * (1 + i % 3) for i in range(10)],
                     SamplingParams(max_tokens=10, temperature=1.0, seed=3, ignore_eos=True, n=1 + (0 % 2)),
                     use_tqdm=False)
        llm.generate(["forked prompt"], SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=1, ignore_eos=True),
                     use_tqdm=False)
    return trace.to_dataframe()


def test_real_trace_charts(real_df):
    df = real_df
    d = viz.block_map_data(df)
    st = steps(df)
    assert d.used()[np.isin(d.steps, st["step"])].tolist() == st["kv_blocks_used"].tolist()
    assert d.num_blocks == 14
    tl = viz.timeline_data(df)
    assert tl["request_id"].nunique() == 11
    assert (viz.step_latency_data(df)["latency_ms"] > 0).all()
    assert len(viz.latency_distribution_data(df)) == 11
    for f in (viz.plot_block_map, viz.plot_timeline, viz.plot_step_latency, viz.plot_latency_distributions):
        assert f(df).axes
    forked = df[(df["event"] == "request_added") & (df["n"] == 3)]["request_id"].iloc[0]
    k = d.requests.index(forked)
    held = d.steps[(d.grid == k).any(axis=0)]
    s = int(held[-1])  # its last step holding blocks: the forks have written their own by now
    tab = viz.block_table_data(df, forked, s)
    assert len(tab) and set(tab["block"]) == set(np.flatnonzero(d.grid[:, list(d.steps).index(s)] == k))
    assert tab["seq_id"].nunique() >= 2 and tab["shared"].any()
    assert viz.plot_block_table(df, forked, s).axes
