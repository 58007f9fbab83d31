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


def shared_ledger_check(events):
    """The ledger with prefix caching: a block may be held by several requests at once
    (block_reused); each request lets go of it once; nothing is held at the end."""
    holders: dict = {}
    cached_free: set = set()
    for e in events:
        if e.kind == "block_allocated":
            key = (e.device, e.block)
            assert not holders.get(key), f"step {e.step}: {key} allocated while held by {holders[key]}"
            assert e.device != "gpu" or e.block not in cached_free, f"step {e.step}: cached block {e.block} reallocated without eviction"
            holders[key] = {e.request_id}
        elif e.kind == "block_reused":
            key = ("gpu", e.block)
            if e.from_evictor:
                assert e.block in cached_free and not holders.get(key)
                cached_free.discard(e.block)
            else:
                assert holders.get(key) and e.request_id not in holders[key]
            holders.setdefault(key, set()).add(e.request_id)
        elif e.kind == "block_evicted":
            assert e.block in cached_free and not holders.get(("gpu", e.block))
            cached_free.discard(e.block)
        elif e.kind == "block_freed":
            key = (e.device, e.block)
            assert e.request_id in holders.get(key, ()), f"step {e.step}: {key} freed by a non-holder"
            holders[key].discard(e.request_id)
            if not holders[key]:
                del holders[key]
                if e.cached:
                    cached_free.add(e.block)
    assert not holders, f"blocks still held at the end: {holders}"
    return cached_free


PREFIX_TOTAL = 1000


@pytest.mark.parametrize("mode,chunked", [("recompute", True), ("swap", False)])
def test_randomized_shared_prefix_workload(model_path, mode, chunked):
    """>= 1000 requests drawn over a few shared system prompts, prefix caching on (and chunked
    prefill in one run), a cache small enough for preemption and eviction, random aborts and
    n / best_of / beam search: the invariant checker passes at every step (hashes, cached and
    evicted blocks, exact ref counts) and at the end nothing is held, the cached free blocks
    are exactly the evictor's and every block is free."""
    rng = random.Random(5 if chunked else 9)
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_path), max_model_len=96, num_gpu_blocks_override=24, block_size=4,
        max_num_seqs=8, preemption_mode=mode, swap_space=0.002, check_invariants=True, seed=3,
        enable_prefix_caching=True, enable_chunked_prefill=chunked,
        max_num_batched_tokens=24 if chunked else None))
    events = []
    engine.add_event_listener(events.append)
    bm = engine.scheduler.block_manager
    vocab = engine.model_runner.vocab_size
    systems = [[rng.randrange(4, vocab) for _ in range(rng.randint(6, 30))] for _ in range(5)]
    added, aborted, finished, live, steps = 0, set(), {}, [], 0
    while added < PREFIX_TOTAL or engine.has_unfinished_requests():
        for _ in range(rng.choice([0, 1, 2, 4])):
            if added == PREFIX_TOTAL:
                break
            kind = rng.random()
            if kind < 0.06:
                params = SamplingParams(n=2, best_of=2, use_beam_search=True, temperature=0.0,
                                        max_tokens=rng.randint(1, 8), ignore_eos=True)
            else:
                n = rng.choice([1, 1, 1, 1, 2, 3])
                temperature = 0.0 if n == 1 and rng.random() < 0.5 else 0.8
                params = SamplingParams(n=n, best_of=n + rng.choice([0, 0, 1]) * (temperature > 0),
                                        temperature=temperature,
                                        max_tokens=rng.randint(1, 10), ignore_eos=rng.random() < 0.5,
                                        seed=rng.choice([None, 1]))
            prompt = list(rng.choice(systems)) + [rng.randrange(4, vocab) for _ in range(rng.randint(0, 12))]
            engine.add_request(str(added), {"prompt_token_ids": prompt}, params)
            live.append(str(added))
            added += 1
        if live and rng.random() < 0.04:
            victim = rng.choice(live)
            engine.abort_request(victim)
            aborted.add(victim)
            live.remove(victim)
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
                if out.request_id in live:
                    live.remove(out.request_id)
        steps += 1
        assert steps < 30000
    kinds = [e.kind for e in events]
    assert any(e.kind == "preempted" and e.mode == mode for e in events)
    assert kinds.count("block_copied") > 0
    assert kinds.count("block_evicted") > 0, "the cache is small: cached blocks must have been evicted"
    reused = [e for e in events if e.kind == "block_reused"]
    assert any(e.from_evictor for e in reused) and any(not e.from_evictor for e in reused)
    if chunked:
        assert any(e.kind == "prefill_chunk" and not e.is_last for e in events)
    if mode == "swap":
        assert kinds.count("block_swapped_out") > 0 and kinds.count("block_swapped_in") > 0
    assert 0.2 < engine.get_prefix_cache_hit_rate() <= 1.0
    assert bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks
    assert bm.get_num_free_cpu_blocks() == bm.num_cpu_blocks
    assert not bm.block_tables and not bm.holders
    cached_free = shared_ledger_check(events)
    assert cached_free == set(bm.gpu_allocator.evictor) and cached_free
    for rid, out in finished.items():
        if rid not in aborted:
            assert out.finished and out.outputs
    assert set(finished) | aborted == {str(i) for i in range(PREFIX_TOTAL)}
