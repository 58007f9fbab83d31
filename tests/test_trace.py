"""Trace (events -> DataFrame, replayed block ledger, per-step / per-request frames) and the
InvariantChecker, on synthetic event streams (a toy block manager, tests/browser_fixtures/
synthetic.py) and, once the engine exists, on real runs."""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pandas as pd
import pytest

from labengine.events import (EVENT_TYPES, BlockAllocated, BlockCopied, BlockFreed, EventBus,
                              RequestAdded, RequestFinished, Scheduled, StepFinished)
from labengine.trace import (REQUEST_STATES, InvariantChecker, InvariantViolation, Trace,
                             block_owners, requests, steps)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "browser_fixtures"))
from synthetic import simulate  # noqa: E402


def traced(**kw):
    box = {}

    def listen(eng):
        box["trace"] = Trace(eng).start()
        box["checker"] = InvariantChecker(eng).attach()
        box["truth"] = truth = {}

        def snapshot(e):  # the toy block manager's real owners at the end of every step
            if e.kind == "step_finished":
                owners = {}
                for r in eng.running + eng.waiting:
                    for q in r.seqs:
                        for b in eng.block_tables.get(q.seq_id, ()):
                            owners[b] = r.request_id
                truth[e.step] = owners
        eng.event_bus.subscribe(snapshot)

    eng = simulate(listeners=[listen], **kw)
    return eng, box["trace"], box["checker"], box["truth"]


def step_finished_fields(**over):
    f = dict(latency_s=0.01, schedule_s=0.001, prepare_s=0.001, forward_s=0.005, sample_s=0.001,
             detokenize_s=0.001, batch_size=1, num_prefill_tokens=0, num_decode_tokens=1,
             kv_blocks_used=0, kv_blocks_total=8, num_running=1, num_waiting=0, num_swapped=0)
    f.update(over)
    return f


# ---------------------------------------------------------------------------------- Trace


def test_dataframe_columns_and_kinds():
    eng, tr, _, _ = traced(num_requests=10, n=2, preemption_mode="swap", num_gpu_blocks=12)
    df = tr.to_dataframe()
    assert list(df.columns[:3]) == ["event", "step", "t"]
    for cls in EVENT_TYPES:
        for name in (f.name for f in dataclasses.fields(cls)):
            assert name in df.columns
    assert set(df["event"]) >= {"request_added", "scheduled", "block_allocated", "block_freed",
                                "block_swapped_out", "block_swapped_in", "preempted",
                                "step_finished", "request_finished"}
    assert df["step"].dtype == np.int64
    assert (df["t"].diff().dropna() >= 0).all()
    sched = df[df["event"] == "scheduled"]
    assert all(isinstance(x, tuple) for x in sched["prefill_request_ids"])
    # one row per event, in order
    assert len(df) == len(tr.events)
    assert df["event"].tolist() == [e.kind for e in tr.events]


def test_empty_trace_has_columns():
    tr = Trace(EventBus())
    df = tr.to_dataframe()
    assert df.empty and {"event", "step", "t", "block", "latency_s"} <= set(df.columns)
    assert steps(df).empty and requests(df).empty
    assert block_owners(df).shape[0] == 0


def test_trace_subscribes_only_inside_with():
    bus = EventBus()
    with Trace(bus) as tr:
        assert bus.active
        bus.emit(RequestAdded, request_id="a", prompt_len=3, n=1, best_of=1, max_tokens=4,
                 temperature=0.0, use_beam_search=False)
    assert not bus.active
    bus.emit(RequestAdded, request_id="b", prompt_len=3, n=1, best_of=1, max_tokens=4,
             temperature=0.0, use_beam_search=False)
    assert tr.to_dataframe()["request_id"].tolist() == ["a"]


def test_trace_accepts_engine_llm_and_async_shapes():
    bus = EventBus()

    class Eng:
        event_bus = bus

    class Llm:
        llm_engine = Eng()

    class Async:
        engine = Eng()

    for src in (bus, Eng(), Llm(), Async()):
        assert Trace(src).bus is bus
    with pytest.raises(TypeError):
        Trace(object())


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("n", [1, 3])
def test_block_owners_replays_the_ledger(mode, n):
    eng, tr, _, truth = traced(num_requests=16, n=n, preemption_mode=mode, num_gpu_blocks=14, seed=3)
    owners = tr.block_owners()
    st = tr.steps()
    assert owners.shape == (len(st), eng.num_gpu_blocks)
    used = owners.notna().sum(axis=1)
    assert used.tolist() == st["kv_blocks_used"].tolist()
    for step, real in truth.items():
        row = owners.loc[step]
        got = {b: rid for b, rid in row.items() if pd.notna(rid)}
        assert got == real, f"step {step}"
    if mode == "swap":
        cpu = tr.block_owners("cpu")
        assert cpu.notna().to_numpy().any()
    assert (tr.block_ledger()["device"] == "gpu").all()


def test_steps_frame():
    eng, tr, _, _ = traced(num_requests=12, num_gpu_blocks=10)
    st = tr.steps()
    assert st["step"].tolist() == list(range(eng.event_bus.step))
    assert st["kv_usage"].between(0, 1).all()
    assert (st["other_s"] >= 0).all()
    parts = st[["schedule_s", "prepare_s", "forward_s", "sample_s", "detokenize_s", "other_s"]].sum(axis=1)
    assert np.allclose(parts, st["latency_s"])
    pre = tr.to_dataframe().query("event == 'preempted'").groupby("step").size()
    assert st.set_index("step")["num_preempted"].loc[pre.index].tolist() == pre.tolist()


def test_requests_frame():
    eng, tr, _, _ = traced(num_requests=20, num_gpu_blocks=10, seed=1)
    rq = tr.requests()
    assert rq["request_id"].tolist() == [str(i) for i in range(20)]
    assert rq["finish_step"].notna().all() and rq["ttft_s"].notna().all()
    assert (rq["arrival_step"] <= rq["first_scheduled_step"]).all()
    assert (rq["first_scheduled_step"] <= rq["first_token_step"]).all()
    assert (rq["first_token_step"] <= rq["finish_step"]).all()
    assert (rq["ttft_s"] <= rq["latency_s"]).all()
    df = tr.to_dataframe()
    npre = df.query("event == 'preempted'").groupby("request_id").size()
    assert npre.sum() > 0, "workload should preempt"
    assert rq.set_index("request_id")["num_preemptions"].loc[npre.index].tolist() == npre.tolist()
    assert (rq["max_gpu_blocks"] >= 1).all()


def test_request_states_match_the_schedule():
    eng, tr, _, _ = traced(num_requests=14, num_gpu_blocks=10, preemption_mode="swap", seed=2)
    states = tr.request_states()
    df = tr.to_dataframe()
    assert set(states.stack().dropna().unique()) <= set(REQUEST_STATES)
    for r in df[df["event"] == "scheduled"].itertuples():
        row = states.loc[r.step]
        assert set(row[row == "prefill"].index) == set(r.prefill_request_ids)
        assert set(row[row == "decode"].index) == set(r.decode_request_ids)
    for r in df[df["event"] == "preempted"].itertuples():
        assert states.loc[r.step, r.request_id] == "preempted"
    for r in df[df["event"] == "request_finished"].itertuples():
        after = states.loc[r.step + 1:, r.request_id]
        assert (after == "finished").all()
    assert (states == "waiting").to_numpy().any() and (states == "idle").to_numpy().any()


# ----------------------------------------------------------------------- InvariantChecker


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_checker_passes_randomized_workloads(seed, mode):
    import random
    rng = random.Random(seed)
    eng, tr, checker, _ = traced(num_requests=rng.randint(10, 40), num_gpu_blocks=rng.randint(8, 30),
                                 num_cpu_blocks=64, block_size=rng.choice([2, 4, 8]),
                                 n=(1, 2, 3), preemption_mode=mode, seed=seed,
                                 max_num_seqs=rng.randint(2, 10))
    assert checker.num_steps_checked == eng.event_bus.step > 0
    assert not checker.owner  # everything returned


@pytest.mark.parametrize("fault, needle", [
    ("double_alloc", "owned twice"),
    ("leak_count", "free"),
    ("negative_ref", "negative ref count"),
    ("finished_owner", "has finished but still owns"),
])
def test_checker_catches_faults(fault, needle):
    with pytest.raises(InvariantViolation) as info:
        traced(num_requests=12, num_gpu_blocks=12, fault=fault, fault_step=4)
    err = info.value
    assert isinstance(err, AssertionError)
    assert needle in str(err)
    assert err.step is not None and f"step {err.step}" in str(err)
    if fault != "leak_count":
        assert err.block is not None and f"block {err.block}" in str(err)


def _emit_alloc(bus, rid, sid, block, device="gpu", li=0):
    bus.emit(BlockAllocated, request_id=rid, seq_id=sid, block=block, logical_index=li, device=device)


def test_checker_events_only():
    bus = EventBus()
    checker = InvariantChecker(bus).attach()
    bus.step = 3
    _emit_alloc(bus, "a", 0, 5)
    with pytest.raises(InvariantViolation, match=r"step 3, gpu block 5: .*owned twice"):
        _emit_alloc(bus, "b", 1, 5)
    with pytest.raises(InvariantViolation, match=r"gpu block 6: freed .* not allocated"):
        bus.emit(BlockFreed, request_id="a", seq_id=0, block=6, device="gpu", reason="finished")
    with pytest.raises(InvariantViolation, match="owned by request 'a'"):
        bus.emit(BlockFreed, request_id="b", seq_id=1, block=5, device="gpu", reason="finished")
    with pytest.raises(InvariantViolation, match="copy-on-write destination .* free block"):
        bus.emit(BlockCopied, request_id="a", seq_id=0, src=5, dst=7)
    with pytest.raises(InvariantViolation, match="kv_blocks_used=0"):  # ledger holds 1
        bus.emit(StepFinished, **step_finished_fields(kv_blocks_used=0))
    bus.emit(StepFinished, **step_finished_fields(kv_blocks_used=1))
    bus.emit(RequestFinished, request_id="a", finish_reason="stop", prompt_len=3, output_len=2,
             ttft_s=0.1, latency_s=0.2)
    bus.step = 4
    with pytest.raises(InvariantViolation, match=r"step 4, gpu block 5: request 'a' has finished"):
        bus.emit(StepFinished, **step_finished_fields(kv_blocks_used=1))
    checker.detach()
    assert not bus.active


def test_checker_attached_mid_run_is_lenient_about_earlier_blocks():
    eng = simulate(num_requests=0)
    eng.add_request("x", 9, 3)
    eng.step()  # allocate without anyone watching
    checker = InvariantChecker(eng).attach()
    assert checker._lenient_frees
    eng.run()
    assert checker.num_steps_checked >= 1


# ----------------------------------------------------------------------- the real engine

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small random-weight model for real runs."""
    from labengine.testing import make_random_model

    path = tmp_path_factory.mktemp("model")
    make_random_model("llama", str(path))
    return str(path)


def _params(**kw):
    from labengine import SamplingParams
    return SamplingParams(**kw)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_real_engine_trace_and_checker(tiny_model, mode):
    from labengine import LLM
    llm = LLM(model=tiny_model, num_gpu_blocks_override=12, block_size=4, preemption_mode=mode,
              swap_space=0.01, check_invariants=True, seed=0, max_num_seqs=8, max_model_len=48)
    prompts = [f"prompt number {i} " * (1 + i % 3) for i in range(10)]
    with llm.trace() as trace:
        outs = llm.generate(prompts, _params(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True),
                            use_tqdm=False)
    assert len(outs) == 10
    df = trace.to_dataframe()
    assert set(df["event"]) >= {"request_added", "scheduled", "block_allocated", "block_freed",
                                "step_finished", "request_finished"}
    st = trace.steps()
    owners = trace.block_owners()
    assert owners.loc[st["step"]].notna().sum(axis=1).tolist() == st["kv_blocks_used"].tolist()
    assert st["kv_blocks_total"].eq(12).all()
    rq = trace.requests()
    assert len(rq) == 10 and rq["ttft_s"].notna().all()
    assert (rq["output_len"] == 12).all()
    # and again with the checker over an independent trace
    checker = InvariantChecker(llm.llm_engine).attach()
    llm.generate(prompts[:4], _params(max_tokens=5, n=2, temperature=1.0, seed=2), use_tqdm=False)
    checker.detach()
    assert checker.num_steps_checked > 0 and not checker.owner


def test_real_engine_listeners(tiny_model):
    from labengine import LLM
    llm = LLM(model=tiny_model, num_gpu_blocks_override=32, block_size=4, seed=0, max_model_len=64)
    seen = []
    llm.add_event_listener(seen.append)
    llm.generate(["hello there"], _params(max_tokens=3), use_tqdm=False)
    llm.remove_event_listener(seen.append)
    n = len(seen)
    assert n > 0 and not llm.llm_engine.event_bus.active
    llm.generate(["hello there"], _params(max_tokens=3), use_tqdm=False)
    assert len(seen) == n
    sf = [e for e in seen if e.kind == "step_finished"]
    assert sf and all(e.latency_s >= e.forward_s >= 0 for e in sf)


def test_overhead_benchmark_compiles_publishing_out(tiny_model):
    """benchmarks/bench_overhead.py's baseline: with the `.active` tests compiled out the
    engine publishes nothing and generates the same tokens; swapping back restores events."""
    import importlib.util
    from labengine import LLM
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "bench_overhead.py")
    spec = importlib.util.spec_from_file_location("bench_overhead", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    llm = LLM(model=tiny_model, num_gpu_blocks_override=32, block_size=4, seed=0, max_model_len=64)
    params = _params(max_tokens=4, temperature=0.0, ignore_eos=True)
    base = llm.generate(["a b c", "d e"], params, use_tqdm=False)
    patches, sites = bench.compiled_out_patches()
    assert sum(sites.values()) >= 5 and patches
    seen = []
    llm.add_event_listener(seen.append)
    bench.apply(patches, True)
    try:
        out = llm.generate(["a b c", "d e"], params, use_tqdm=False)
    finally:
        bench.apply(patches, False)
    assert not seen
    assert [o.outputs[0].token_ids for o in out] == [o.outputs[0].token_ids for o in base]
    llm.generate(["a b c"], params, use_tqdm=False)
    llm.remove_event_listener(seen.append)
    assert {e.kind for e in seen} >= {"request_added", "step_finished", "block_allocated"}


def test_checker_catches_a_leak_in_the_real_block_manager(tiny_model):
    """LLM(check_invariants=True) names the step and the block when the block manager
    forgets to free a finished request's block."""
    from labengine import LLM
    llm = LLM(model=tiny_model, num_gpu_blocks_override=16, block_size=4, seed=0, max_model_len=48,
              check_invariants=True)
    bm = llm.llm_engine.scheduler.block_manager
    real_release = bm._release
    skipped = []

    def leaky_release(allocator, block, seq_id, reason):
        if reason == "finished" and not skipped:
            skipped.append(block)  # the block stays referenced: a leak
            return
        real_release(allocator, block, seq_id, reason)

    bm._release = leaky_release
    with pytest.raises(InvariantViolation) as info:
        llm.generate(["one two three", "four five"], _params(max_tokens=3, ignore_eos=True), use_tqdm=False)
    err = info.value
    assert err.block == skipped[0] and err.step is not None
    assert f"block {skipped[0]}" in str(err) and "finished" in str(err)
