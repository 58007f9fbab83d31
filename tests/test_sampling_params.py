"""SamplingParams: defaults, derived fields, clone, repr and every validation message
(vLLM v0.5.4, /work/shared/reference/vllm-api.md section 3)."""
import re

import pytest

from labengine.sampling_params import SamplingParams, SamplingType, verify_max_logprobs


def test_defaults():
    p = SamplingParams()
    assert (p.n, p.best_of, p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == \
        (1, 1, 0.0, 0.0, 1.0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1.0, 1.0, -1, 0.0, None)
    assert (p.use_beam_search, p.length_penalty, p.early_stopping) == (False, 1.0, False)
    assert (p.stop, p.stop_token_ids, p.include_stop_str_in_output, p.ignore_eos) == \
        ([], [], False, False)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert (p.detokenize, p.skip_special_tokens, p.spaces_between_special_tokens) == \
        (True, True, True)
    assert p.logits_processors is None and p.truncate_prompt_tokens is None
    assert p.output_text_buffer_length == 0
    assert p.all_stop_token_ids == set()
    assert p.sampling_type == SamplingType.RANDOM


def test_normalisation_and_derived_fields():
    p = SamplingParams(n=2, stop="ab", stop_token_ids=(5, 6), seed=-1, logprobs=True,
                       prompt_logprobs=True, max_tokens=None)
    assert p.best_of == 2
    assert p.stop == ["ab"] and p.stop_token_ids == [5, 6]
    assert p.seed is None
    assert p.logprobs == 1 and p.prompt_logprobs == 1
    assert p.max_tokens is None
    assert p.all_stop_token_ids == {5, 6}
    assert SamplingParams(stop=("x", "long")).stop == ["x", "long"]
    assert SamplingParams(stop=["abc", "de"]).output_text_buffer_length == 2
    assert SamplingParams(stop=["abc"], include_stop_str_in_output=True
                          ).output_text_buffer_length == 0


def test_sampling_type():
    assert SamplingParams(temperature=0).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=1e-6).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.5).sampling_type == SamplingType.RANDOM
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED
    assert SamplingParams(temperature=0, seed=3).sampling_type == SamplingType.GREEDY
    assert SamplingParams(use_beam_search=True, best_of=2, temperature=0
                          ).sampling_type == SamplingType.BEAM


def test_greedy_resets_truncation_silently():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.2)
    assert (p.top_p, p.top_k, p.min_p) == (1.0, -1, 0.0)
    # Non-greedy keeps them.
    q = SamplingParams(temperature=0.7, top_p=0.5, top_k=3, min_p=0.2)
    assert (q.top_p, q.top_k, q.min_p) == (0.5, 3, 0.2)


def test_clone_is_deep_but_shares_processors():
    def proc(out, row):
        return row

    p = SamplingParams(stop=["x"], stop_token_ids=[3], logits_processors=[proc])
    c = p.clone()
    c.stop.append("y")
    c.stop_token_ids.append(4)
    c.all_stop_token_ids.add(99)
    c.max_tokens = 3
    assert p.stop == ["x"] and p.stop_token_ids == [3] and p.all_stop_token_ids == {3}
    assert p.max_tokens == 16
    assert c.logits_processors is not p.logits_processors
    assert c.logits_processors[0] is proc


def test_repr():
    p = SamplingParams(n=2, temperature=0.5, stop="!", seed=1)
    assert repr(p) == (
        "SamplingParams(n=2, best_of=2, presence_penalty=0.0, frequency_penalty=0.0, "
        "repetition_penalty=1.0, temperature=0.5, top_p=1.0, top_k=-1, min_p=0.0, seed=1, "
        "use_beam_search=False, length_penalty=1.0, early_stopping=False, stop=['!'], "
        "stop_token_ids=[], include_stop_str_in_output=False, ignore_eos=False, "
        "max_tokens=16, min_tokens=0, logprobs=None, prompt_logprobs=None, "
        "skip_special_tokens=True, spaces_between_special_tokens=True, "
        "truncate_prompt_tokens=None)")


BEAM = dict(use_beam_search=True, best_of=2, temperature=0.0)

VALUE_ERRORS = [
    (dict(n=0), "n must be at least 1, got 0."),
    (dict(n=3, best_of=2), "best_of must be greater than or equal to n, got n=3 and best_of=2."),
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2], got 2.5."),
    (dict(presence_penalty=-2.1), "presence_penalty must be in [-2, 2], got -2.1."),
    (dict(frequency_penalty=-3), "frequency_penalty must be in [-2, 2], got -3."),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in (0, 2], got 0.0."),
    (dict(repetition_penalty=2.5), "repetition_penalty must be in (0, 2], got 2.5."),
    (dict(temperature=-0.1), "temperature must be non-negative, got -0.1."),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0."),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5."),
    (dict(top_k=0), "top_k must be -1 (disable), or at least 1, got 0."),
    (dict(top_k=-2), "top_k must be -1 (disable), or at least 1, got -2."),
    (dict(min_p=1.5), "min_p must be in [0, 1], got 1.5."),
    (dict(min_p=-0.1), "min_p must be in [0, 1], got -0.1."),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0."),
    (dict(min_tokens=-1), "min_tokens must be greater than or equal to 0, got -1."),
    (dict(max_tokens=3, min_tokens=4), "min_tokens must be less than or equal to max_tokens=3, got 4."),
    (dict(logprobs=-1), "logprobs must be non-negative, got -1."),
    (dict(prompt_logprobs=-1), "prompt_logprobs must be non-negative, got -1."),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be >= 1, got 0"),
    (dict(stop=["a", ""]), "stop cannot contain an empty string."),
    (dict(stop="a", detokenize=False),
     "stop strings are only supported when detokenize is True. Set detokenize=True to use stop."),
    # beam search
    (dict(use_beam_search=True, best_of=1, temperature=0.0),
     "best_of must be greater than 1 when using beam search. Got 1."),
    (dict(use_beam_search=True, best_of=2, temperature=0.5),
     "temperature must be 0 when using beam search."),
    (dict(BEAM, top_p=0.5), "top_p must be 1 when using beam search."),
    (dict(BEAM, top_k=3), "top_k must be -1 when using beam search."),
    (dict(BEAM, early_stopping="sometimes"),
     "early_stopping must be True, False, or 'never', got sometimes."),
    # not beam search
    (dict(early_stopping=True),
     "early_stopping is not effective and must be False when not using beam search."),
    (dict(early_stopping="never"),
     "early_stopping is not effective and must be False when not using beam search."),
    (dict(length_penalty=0.5),
     "length_penalty is not effective and must be the default value of 1.0 when not using "
     "beam search."),
    # greedy
    (dict(temperature=0.0, n=2), "best_of must be 1 when using greedy sampling.Got 2."),
    (dict(temperature=0.0, best_of=3), "best_of must be 1 when using greedy sampling.Got 3."),
]


@pytest.mark.parametrize("kwargs,message", VALUE_ERRORS)
def test_value_errors(kwargs, message):
    with pytest.raises(ValueError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message


def test_valid_edge_values():
    SamplingParams(presence_penalty=-2, frequency_penalty=2, repetition_penalty=2, top_p=1,
                   min_p=1, top_k=1, min_tokens=16, max_tokens=16, logprobs=0, prompt_logprobs=0)
    SamplingParams(max_tokens=None, min_tokens=1000)
    SamplingParams(detokenize=False)
    for es in (True, False, "never"):
        SamplingParams(**BEAM, early_stopping=es, length_penalty=0.3)


def test_top_k_type_error():
    with pytest.raises(TypeError, match=re.escape("top_k must be an integer, got float")):
        SamplingParams(top_k=1.5)


@pytest.mark.parametrize("field,value", [
    ("n", 1.0), ("n", "2"), ("n", True), ("best_of", 2.0), ("max_tokens", 3.5),
    ("min_tokens", "1"), ("logprobs", 1.5), ("prompt_logprobs", "3"), ("seed", 1.5),
    ("temperature", "hot"), ("top_p", None), ("min_p", "0.1"), ("presence_penalty", None),
    ("frequency_penalty", "1"), ("repetition_penalty", None), ("truncate_prompt_tokens", 2.0),
])
def test_type_errors_name_field_and_value(field, value):
    with pytest.raises(TypeError) as e:
        SamplingParams(**{field: value})
    assert str(e.value).startswith(f"{field} must be")
    assert repr(value) in str(e.value)


def test_other_type_errors():
    with pytest.raises(TypeError, match="stop must be"):
        SamplingParams(stop=["a", 3])
    with pytest.raises(TypeError, match="stop_token_ids must be"):
        SamplingParams(stop_token_ids=[1.5])
    with pytest.raises(TypeError, match="logits_processors must be"):
        SamplingParams(logits_processors=[3])


def test_verify_max_logprobs():
    verify_max_logprobs(SamplingParams(logprobs=20, prompt_logprobs=20), 20)
    verify_max_logprobs(SamplingParams(), 0)
    for kw in (dict(logprobs=21), dict(prompt_logprobs=21)):
        with pytest.raises(ValueError) as e:
            verify_max_logprobs(SamplingParams(**kw), 20)
        assert str(e.value) == "Cannot request more than 20 logprobs."
