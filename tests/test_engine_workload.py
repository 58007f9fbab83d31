"""A randomized workload through the real engine, with the invariant checker switched on.

Hundreds of requests of random lengths, random n / best_of, random aborts, on a cache so
small that preemption happens, by recompute and by swap. At every step the checker verifies
free + used == total, that no block is owned twice and no ref count is negative; at the end
every block is free.
"""
import random

import pytest

from labengine import SamplingParams
from labengine.arg_utils import EngineArgs
from labengine.llm_engine import LLMEngine
from labengine.testing import make_random_model

TOTAL = 300


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_random_model("llama", tmp_path_factory.mktemp("wl") / "llama")


def ledger_check(events, bm):
    """Replay block_allocated / block_freed: nothing allocated twice, nothing freed twice, ends empty."""
    owned = {}
    for e in events:
        if e.kind not in ("block_allocated", "block_freed"):
            continue
        key = (e.device, e.block)
        if e.kind == "block_allocated":
            assert key not in owned, f"step {e.step}: {key} allocated while owned by {owned[key]}"
            owned[key] = e.request_id
        elif e.kind == "block_freed":
            assert owned.pop(key, None) == e.request_id, f"step {e.step}: {key} freed by a non-owner"
    assert not owned, f"blocks still owned at the end: {owned}"


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_randomized_workload_frees_every_block(model_path, mode):
    rng = random.Random(7 if mode == "swap" else 11)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_path), max_model_len=96, num_gpu_blocks_override=14, block_size=8,
        max_num_seqs=12, preemption_mode=mode, swap_space=0.002, check_invariants=True, seed=3))
    events = []
    engine.add_event_listener(events.append)
    bm = engine.scheduler.block_manager
    vocab = engine.model_runner.vocab_size
    total, added, aborted, finished = TOTAL, 0, set(), {}
    live = []
    steps = 0
    while added < total or engine.has_unfinished_requests():
        for _ in range(rng.choice([0, 0, 1, 3])):
            if added == total:
                break
            n = rng.choice([1, 1, 1, 2, 3])
            params = SamplingParams(n=n, best_of=n + rng.choice([0, 0, 1]), temperature=rng.choice([0.7, 1.0]),
                                    max_tokens=rng.randint(1, 24), seed=rng.choice([None, rng.randint(0, 99)]),
                                    ignore_eos=rng.random() < 0.5)
            prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(1, 40))]
            engine.add_request(str(added), {"prompt_token_ids": prompt}, params)
            live.append(str(added))
            added += 1
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            engine.abort_request(victim)
            aborted.add(victim)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
                if out.request_id in live:
                    live.remove(out.request_id)
        steps += 1
        assert bm.get_num_free_gpu_blocks() + bm.get_num_used_gpu_blocks() == bm.num_gpu_blocks
        assert steps < 20000
    kinds = [e.kind for e in events]
    assert kinds.count("preempted") > 0
    assert any(e.kind == "preempted" and e.mode == mode for e in events)
    assert kinds.count("block_copied") > 0, "n > 1 should have triggered copy-on-write"
    if mode == "swap":
        assert kinds.count("block_swapped_out") > 0 and kinds.count("block_swapped_in") > 0
    assert bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks
    assert bm.get_num_free_cpu_blocks() == bm.num_cpu_blocks
    assert not bm.block_tables
    ledger_check(events, bm)
    # every request that was not aborted came back finished, with n outputs
    for rid, out in finished.items():
        if rid not in aborted:
            assert out.finished and out.outputs
    assert set(finished) | aborted == {str(i) for i in range(total)}
