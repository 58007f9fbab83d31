"""Async scheduling: decode step k+1 is scheduled and launched before step k's tokens are
on the host. It must change when outputs arrive, never what they are.

On the CPU nothing actually overlaps, but the code path is the one the GPU runs: the next
step's inputs are gathered from the previous step's sampled-token tensor, each sequence
gets a slot one position ahead, finished requests ride along for one step and are
dropped. These tests run the same workloads with async scheduling on and off and demand
identical tokens, texts, logprobs and finish reasons, with the invariant checker on.
"""
import random

import pytest

from labengine import LLM, SamplingParams
from labengine.arg_utils import EngineArgs
from labengine.llm_engine import LLMEngine
from labengine.testing import make_random_model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_random_model("llama", tmp_path_factory.mktemp("async") / "llama")


def count_lookaheads(engine):
    """Wrap the scheduler's lookahead to count the steps launched ahead."""
    sched = engine.scheduler
    orig = sched.schedule_lookahead
    counter = {"launched": 0}

    def wrapped():
        out = orig()
        counter["launched"] += out is not None
        return out

    sched.schedule_lookahead = wrapped
    return counter


def mixed_params(rng, vocab):
    kinds = [
        lambda: SamplingParams(temperature=0, max_tokens=rng.randint(1, 30)),
        lambda: SamplingParams(temperature=0.8, seed=rng.randint(0, 99), max_tokens=rng.randint(1, 30)),
        lambda: SamplingParams(temperature=0.9, seed=rng.randint(0, 99), n=2, best_of=3, max_tokens=20),
        lambda: SamplingParams(temperature=0.7, seed=5, logprobs=3, max_tokens=12, stop_token_ids=[rng.randrange(vocab)]),
        lambda: SamplingParams(temperature=0, min_tokens=6, max_tokens=15, stop_token_ids=[rng.randrange(vocab)]),
        lambda: SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=10),
        lambda: SamplingParams(temperature=0, ignore_eos=True, max_tokens=25),
        lambda: SamplingParams(n=2, best_of=2, use_beam_search=True, temperature=0, max_tokens=8),
    ]
    return rng.choice(kinds)()


def run(model_path, async_scheduling, blocks, mode="recompute", seed=0):
    rng = random.Random(seed)
    llm = LLM(str(model_path), async_scheduling=async_scheduling, num_gpu_blocks_override=blocks, block_size=8,
              max_model_len=64, max_num_seqs=8, preemption_mode=mode, swap_space=0.002, check_invariants=True,
              skip_tokenizer_init=True, seed=1)
    counter = count_lookaheads(llm.llm_engine)
    vocab = llm.llm_engine.model_runner.vocab_size
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(rng.randint(2, 20))]} for _ in range(24)]
    params = [mixed_params(rng, vocab) for _ in prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    bm = llm.llm_engine.scheduler.block_manager
    assert bm.get_num_used_gpu_blocks() == 0 and not llm.llm_engine.has_unfinished_requests()
    exact = [[(c.index, c.token_ids, c.finish_reason, c.stop_reason,
               None if c.logprobs is None else [sorted(d) for d in c.logprobs]) for c in o.outputs] for o in outs]
    values = [lp for o in outs for c in o.outputs for lp in [c.cumulative_logprob] + (
        [] if c.logprobs is None else [x.logprob for d in c.logprobs for x in d.values()])]
    return (exact, values), counter["launched"]


@pytest.mark.parametrize("blocks,mode", [(400, "recompute"), (14, "recompute"), (14, "swap")])
def test_async_scheduling_changes_nothing_but_timing(model_path, blocks, mode):
    sync, launched_sync = run(model_path, False, blocks, mode)
    asyn, launched = run(model_path, True, blocks, mode)
    assert launched_sync == 0
    # (with 14 blocks requests wait or sit swapped out most of the time: fewer steps qualify)
    assert launched >= (15 if blocks > 100 else 5), f"only {launched} decode steps were launched ahead"
    # Tokens, finish reasons and logprob keys are identical; logprob values may differ in the
    # last float bits, because the steps batch the requests differently around preemptions.
    assert asyn[0] == sync[0]
    assert asyn[1] == pytest.approx(sync[1], abs=1e-5)


@pytest.mark.parametrize("min_tokens", [1, 2, 4])
def test_min_tokens_mask_ends_at_the_same_token_when_running_ahead(model_path, min_tokens):
    """The min_tokens mask reads how many tokens a sequence has; a step launched ahead samples
    before the previous token is appended, so running ahead must wait until the mask is off for
    good, or the first unmasked token's logprob is computed with the stop ids still masked."""
    def logprobs(async_scheduling):
        llm = LLM(str(model_path), async_scheduling=async_scheduling, skip_tokenizer_init=True, seed=0)
        engine = llm.llm_engine
        counter = count_lookaheads(engine)
        vocab = engine.model_runner.vocab_size
        # stop ids that carry real probability mass: all but the 8 largest of a random model's vocab
        params = SamplingParams(temperature=0, max_tokens=8, min_tokens=min_tokens, logprobs=0,
                                stop_token_ids=list(range(8, vocab)), ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0].outputs[0]
        return [d[t].logprob for d, t in zip(out.logprobs, out.token_ids)], counter["launched"]

    sync, _ = logprobs(False)
    asyn, launched = logprobs(True)
    assert launched > 0
    assert asyn == pytest.approx(sync, abs=1e-6)


def test_step_outputs_lag_one_step_and_nothing_is_reported_twice(model_path):
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_path), async_scheduling=True, skip_tokenizer_init=True, check_invariants=True))
    for i in range(3):
        engine.add_request(str(i), {"prompt_token_ids": [1 + i, 2, 3]},
                           SamplingParams(temperature=0, ignore_eos=True, max_tokens=4 + i))
    prefill = engine.step()
    assert [o.request_id for o in prefill] == ["0", "1", "2"]  # a prefill completes in its own call
    assert all(len(o.outputs[0].token_ids) == 1 for o in prefill)
    assert engine.step() == []  # the first decode step is launched and left running
    assert engine._inflight is not None
    seen = {o.request_id: 1 for o in prefill}
    finished = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            n = len(o.outputs[0].token_ids)
            assert n == seen[o.request_id] + 1, "each call reports exactly one new token per request"
            seen[o.request_id] = n
            if o.finished:
                assert o.request_id not in finished
                finished.append(o.request_id)
    assert seen == {"0": 4, "1": 5, "2": 6} and sorted(finished) == ["0", "1", "2"]
    assert engine.scheduler.block_manager.get_num_used_gpu_blocks() == 0


def test_abort_while_a_step_runs_ahead(model_path):
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=str(model_path), async_scheduling=True, skip_tokenizer_init=True, check_invariants=True))
    for i in range(4):
        engine.add_request(str(i), {"prompt_token_ids": [5, 6, 7 + i]},
                           SamplingParams(temperature=0, ignore_eos=True, max_tokens=30))
    for _ in range(5):
        engine.step()
    assert engine._inflight is not None
    engine.abort_request(["1", "2"])
    reported = set()
    while engine.has_unfinished_requests():
        reported.update(o.request_id for o in engine.step())
    assert reported == {"0", "3"}, "aborted requests are not reported after their abort"
    assert engine.scheduler.block_manager.get_num_used_gpu_blocks() == 0
    # still usable: a new request afterwards runs to completion
    engine.add_request("new", {"prompt_token_ids": [9, 9]}, SamplingParams(temperature=0, max_tokens=3,
                                                                          ignore_eos=True))
    last = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            last = o
    assert last.request_id == "new" and len(last.outputs[0].token_ids) == 3


def test_lookahead_never_passes_max_model_len(model_path):
    """A sequence whose pending token fills the context is left out of the step ahead."""
    outs = {}
    for a in (False, True):
        llm = LLM(str(model_path), async_scheduling=a, max_model_len=24, skip_tokenizer_init=True,
                  check_invariants=True)
        outs[a] = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": list(range(1, 1 + n))} for n in (5, 12, 20)],
            SamplingParams(temperature=0, ignore_eos=True, max_tokens=100), use_tqdm=False)]
    assert outs[True] == outs[False]
    assert [len(t) for t in outs[True]] == [20, 13, 5]  # stopped by the context, as vLLM V0 does


def test_async_scheduling_argument_is_validated():
    with pytest.raises(TypeError, match="async_scheduling"):
        EngineArgs(model="x", async_scheduling="yes")
