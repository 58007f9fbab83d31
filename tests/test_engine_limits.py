"""Requests that could never run are refused when added, and the scheduler's safety net
finishes any that slip through, so one request never stops the others (issue 16, items 1
and 6): n / best_of / beam width above max_num_seqs, logprobs above the vocabulary, seeds
outside 64 bits; and every SamplingParams error names its field."""
from __future__ import annotations

import pytest

from labengine import LLM, SamplingParams
from labengine.sampling_params import SamplingParamsTypeError, SamplingParamsValueError
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus
from labengine.testing import VOCAB_SIZE, make_random_model

MAX_NUM_SEQS = 4


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_random_model("llama", tmp_path_factory.mktemp("limits") / "llama")
    # max_logprobs above the vocabulary: only the vocabulary check stands between a big
    # `logprobs` and the sampler's top-k.
    return LLM(model=str(path), max_model_len=64, num_gpu_blocks_override=32, max_num_seqs=MAX_NUM_SEQS,
               max_logprobs=VOCAB_SIZE * 4, seed=0)


def all_free(llm):
    bm = llm.llm_engine.scheduler.block_manager
    return bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks and not llm.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("kw, field", [
    (dict(n=MAX_NUM_SEQS + 1, temperature=1.0), "n"),
    (dict(n=1, best_of=MAX_NUM_SEQS + 1, temperature=1.0), "best_of"),
    (dict(n=2, best_of=MAX_NUM_SEQS + 2, use_beam_search=True, temperature=0.0), "best_of"),
])
def test_more_sequences_than_max_num_seqs_is_refused_at_add_request(llm, kw, field):
    engine = llm.llm_engine
    with pytest.raises(ValueError) as info:
        engine.add_request("too-wide", "Hello", SamplingParams(max_tokens=4, **kw))
    assert info.value.param == field
    assert f"max_num_seqs={MAX_NUM_SEQS}" in str(info.value)
    assert all_free(llm)
    # LLM.generate refuses it too, instead of looping forever
    with pytest.raises(ValueError, match="max_num_seqs"):
        llm.generate(["Hello"], SamplingParams(max_tokens=4, **kw), use_tqdm=False)
    assert all_free(llm)
    # exactly max_num_seqs is fine
    out = llm.generate(["Hello"], SamplingParams(n=MAX_NUM_SEQS, max_tokens=3, temperature=1.0, seed=1),
                       use_tqdm=False)
    assert len(out[0].outputs) == MAX_NUM_SEQS


def test_scheduler_finishes_a_group_that_can_never_fit_as_ignored(llm):
    """The safety net: a too-wide group that got past add_request is finished as ignored and
    the requests behind it still run (before the fix the engine stepped forever)."""
    engine = llm.llm_engine
    params = SamplingParams(n=MAX_NUM_SEQS + 3, temperature=1.0, max_tokens=4)
    ids = engine.tokenizer.encode("Hello")
    group = SequenceGroup("wide", [Sequence(10_000, "Hello", ids)], params, 0.0)
    engine.scheduler.add_seq_group(group)  # behind add_request's back
    engine.add_request("behind", "Hello", SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    finished = {}
    for _ in range(50):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == {"wide", "behind"}
    assert all(s.status == SequenceStatus.FINISHED_IGNORED for s in group.get_seqs())
    assert len(finished["behind"].outputs[0].token_ids) == 3
    assert all_free(llm)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_logprobs_above_the_vocabulary_is_refused_not_an_index_error(llm, field):
    params = SamplingParams(max_tokens=2, **{field: VOCAB_SIZE + 1})
    with pytest.raises(ValueError) as info:
        llm.generate(["Hello"], params, use_tqdm=False)
    assert info.value.param == field and str(VOCAB_SIZE) in str(info.value)
    assert all_free(llm)
    # the whole vocabulary is allowed
    out = llm.generate(["Hello"], SamplingParams(max_tokens=2, **{field: VOCAB_SIZE}), use_tqdm=False)
    assert out[0].finished


def test_max_logprobs_default_is_vllms():
    from labengine.arg_utils import EngineArgs

    assert EngineArgs(model="x").max_logprobs == 20  # vLLM 0.5.1+


@pytest.mark.parametrize("seed", [1 << 64, -(1 << 63) - 1, 10 ** 30])
def test_seed_outside_64_bits_is_a_value_error_naming_seed(seed):
    with pytest.raises(ValueError) as info:
        SamplingParams(seed=seed)
    assert info.value.param == "seed" and "64 bits" in str(info.value)
    SamplingParams(seed=(1 << 64) - 1)
    SamplingParams(seed=-(1 << 63))


@pytest.mark.parametrize("kw, field", [
    (dict(n=0), "n"), (dict(n=2, best_of=1), "best_of"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_k=0), "top_k"), (dict(min_p=2), "min_p"),
    (dict(presence_penalty=5), "presence_penalty"), (dict(frequency_penalty=5), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(stop=[""]), "stop"),
    (dict(temperature=0.0, best_of=2, n=1), "best_of"), (dict(use_beam_search=True, best_of=1), "best_of"),
    (dict(use_beam_search=True, best_of=2, temperature=1.0), "temperature"),
    (dict(length_penalty=2.0), "length_penalty"), (dict(early_stopping=True), "early_stopping"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
])
def test_every_sampling_params_value_error_names_its_field(kw, field):
    with pytest.raises(SamplingParamsValueError) as info:
        SamplingParams(**kw)
    assert info.value.param == field


@pytest.mark.parametrize("kw, field", [
    (dict(n="2"), "n"), (dict(temperature="hot"), "temperature"), (dict(seed=1.5), "seed"),
    (dict(top_k=1.5), "top_k"), (dict(stop=[1]), "stop"), (dict(stop_token_ids=["a"]), "stop_token_ids"),
    (dict(logits_processors=[1]), "logits_processors"),
])
def test_every_sampling_params_type_error_names_its_field(kw, field):
    with pytest.raises(SamplingParamsTypeError) as info:
        SamplingParams(**kw)
    assert info.value.param == field
