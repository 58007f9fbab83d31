"""The trace reads the same with async scheduling on and off.

With async scheduling (the default on CUDA) the engine decides decode step s+1, and
allocates its blocks, before step s completes. The trace still attributes those blocks to
step s+1 (labengine.events.EventBus.hold/release), so what a learner predicts from the
trace (exercise 1.5.5: blocks in use at the end of every step) holds on the GPU as on the
CPU. Both runs here are on the CPU: async scheduling is forced with async_scheduling=True.
"""
from __future__ import annotations

import pytest

import labengine
from labengine import LLM, SamplingParams

# exercise 1.5.5's workload
EX155_PROMPTS = ["Hi", "The capital of France is", "Once upon a time, in a small village by the sea,",
                 "Why is the sky blue?", "Write one sentence about the moon and the stars at night:",
                 "A B C D E F G"]
EX155_OUTPUT_LENS = [9, 16, 5, 24, 12, 1]


def _run(async_scheduling: bool, prompts, params, block_size: int):
    llm = LLM(model=labengine.DEFAULT_MODEL, seed=0, block_size=block_size, num_gpu_blocks_override=128,
              max_model_len=256, async_scheduling=async_scheduling, check_invariants=True)
    assert llm.llm_engine.async_scheduling is async_scheduling
    with llm.trace() as trace:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    df = trace.to_dataframe()
    ledger = df[df["event"].isin(["block_allocated", "block_freed"])]
    rows = [(e, int(s), r, int(li) if li == li else None, reason if isinstance(reason, str) else None)
            for e, s, r, li, reason in zip(ledger["event"], ledger["step"], ledger["request_id"],
                                           ledger["logical_index"], ledger["reason"])]
    usage = trace.steps()["kv_blocks_used"].astype(int).tolist()
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return usage, rows, tokens


def test_exercise_1_5_5_blocks_in_use_same_with_async_scheduling():
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in EX155_OUTPUT_LENS]
    sync = _run(False, EX155_PROMPTS, params, 8)
    ahead = _run(True, EX155_PROMPTS, params, 8)
    assert sync[0][:4] == [7, 7, 8, 10]  # what the exercise teaches (prefill, then one block per boundary)
    assert ahead[0] == sync[0], "per-step blocks in use"
    assert ahead[1] == sync[1], "the block ledger: each allocation and free in the same step"
    assert ahead[2] == sync[2]


def test_blocks_allocated_ahead_for_a_request_that_stopped_are_not_in_the_trace():
    """A request that ends on a stop token has already been given the next step's slot (a
    new block every block_size tokens) when async scheduling learns it stopped; a
    synchronous engine never allocates that block, and the trace must not show it. The
    request stops after 2..11 tokens, so some stops fall on a block boundary."""
    block_size, prompt = 4, "Once upon a time"
    probe = LLM(model=labengine.DEFAULT_MODEL, seed=0, block_size=block_size, num_gpu_blocks_override=128,
                max_model_len=256)
    greedy = probe.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
    firsts = [k for k in range(1, 11) if greedy[k] not in greedy[:k]]  # stop tokens that stop there
    assert len(firsts) >= block_size, greedy
    prompts = [prompt, "The capital of France is"]
    for stop_at in firsts:
        params = [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[greedy[stop_at]]),
                  SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)]
        sync = _run(False, prompts, params, block_size)
        ahead = _run(True, prompts, params, block_size)
        assert len(sync[2][0]) == stop_at + 1  # it really stopped on the stop token
        assert ahead == sync, f"stopped after {stop_at + 1} tokens"
