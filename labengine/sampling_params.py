"""SamplingParams: how one request is sampled, exactly as vLLM v0.5.4 defines it.

Every field, default, derived attribute and validation message follows vLLM v0.5.4
(see /work/shared/reference/vllm-api.md, section 3). Summary for learners:

* ``n`` completions are returned out of ``best_of`` (default ``n``) generated ones; when a
  request has more than one sequence, the outputs are the top ``n`` by cumulative logprob.
* ``temperature=0`` is greedy: ``top_p``, ``top_k`` and ``min_p`` are reset to their
  defaults silently, and ``best_of`` must be 1.
* ``use_beam_search=True`` runs beam search of width ``best_of`` (temperature must be 0).
* ``stop`` strings, ``stop_token_ids``, EOS (unless ``ignore_eos``), ``max_tokens`` and the
  model's ``max_model_len`` end a sequence; ``min_tokens`` delays every stop condition.
* ``logprobs=k`` returns, per generated token, the sampled token's logprob plus the top k;
  ``prompt_logprobs=k`` does the same for the prompt tokens. Logprobs are those of the
  *processed* distribution (after penalties, temperature, top-k/top-p/min-p).
* ``logits_processors`` are callables ``fn(output_ids, logits_row) -> logits_row`` or
  ``fn(prompt_ids, output_ids, logits_row) -> logits_row``, applied first.

The engine always works on ``params.clone()``: the caller's object is never mutated.
Every refusal is a ``SamplingParamsValueError`` (a ValueError) or ``SamplingParamsTypeError``
(a TypeError) whose ``param`` names the offending field, so the server can name it too.
"""
from __future__ import annotations

import copy
import enum
import numbers
from typing import Any, Callable, List, Optional, Union

import torch

_SAMPLING_EPS = 1e-5
# What torch.Generator.manual_seed accepts (a signed or an unsigned 64-bit integer).
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1

LogitsProcessor = Union[Callable[[List[int], torch.Tensor], torch.Tensor],
                        Callable[[List[int], List[int], torch.Tensor], torch.Tensor]]


class SamplingParamsValueError(ValueError):
    """A value SamplingParams (or the engine's add_request) refuses; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


class SamplingParamsTypeError(TypeError):
    """A value of the wrong type; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


def _value_error(param: str, message: str) -> SamplingParamsValueError:
    return SamplingParamsValueError(message, param)


def _type_error(param: str, message: str) -> SamplingParamsTypeError:
    return SamplingParamsTypeError(message, param)


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2
    BEAM = 3


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_int(name: str, v: Any, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not _is_int(v):
        raise SamplingParamsTypeError(f"{name} must be an int{' or None' if optional else ''}, "
                                      f"got {v!r} of type {type(v).__name__}.", name)


def _check_real(name: str, v: Any) -> None:
    if not _is_real(v):
        raise SamplingParamsTypeError(f"{name} must be a number, got {v!r} of type {type(v).__name__}.", name)


class SamplingParams:
    """Sampling parameters for text generation (vLLM v0.5.4 semantics).

    Args:
        n: Number of output sequences to return for the prompt.
        best_of: Number of output sequences generated from the prompt; the top ``n`` are
            returned. Must be >= n; defaults to n. With beam search it is the beam width.
        presence_penalty: Penalises tokens that already appear in the generated text
            (``logit -= presence_penalty`` once per present token), in [-2, 2].
        frequency_penalty: Penalises tokens by their count in the generated text
            (``logit -= frequency_penalty * count``), in [-2, 2].
        repetition_penalty: Penalises tokens present in the prompt or the generated text:
            positive logits are divided by it, negative ones multiplied, in (0, 2].
        temperature: Randomness of sampling; 0 means greedy.
        top_p: Cumulative probability of the top tokens kept, in (0, 1].
        top_k: Number of top tokens kept; -1 keeps them all.
        min_p: Drops tokens whose probability is below ``min_p * max_prob``, in [0, 1].
        seed: Per-request random seed (reproducible whatever else is in the batch).
            -1 means None.
        use_beam_search: Whether to use beam search instead of sampling.
        length_penalty: Beam search only: scores are ``cum_logprob / len**length_penalty``.
        early_stopping: Beam search only: True, False or "never".
        stop: String(s) that stop generation; they are not in the output unless
            ``include_stop_str_in_output``.
        stop_token_ids: Token ids that stop generation (``stop_reason`` = the id).
        include_stop_str_in_output: Keep the stop string (or the stop token's text).
        ignore_eos: Continue past EOS.
        max_tokens: Maximum number of generated tokens; None = up to max_model_len.
        min_tokens: Minimum number of generated tokens before EOS or a stop may end it.
        logprobs: Number of top logprobs returned per generated token (True means 1).
        prompt_logprobs: Number of top logprobs returned per prompt token (True means 1).
        detokenize: Whether to detokenize the output (stop strings need it).
        skip_special_tokens: Drop special tokens from the output text.
        spaces_between_special_tokens: Put spaces between special tokens in the text.
        logits_processors: Callables applied to each logits row before anything else.
        truncate_prompt_tokens: Keep only the last k prompt tokens (OpenAI server only).
    """

    def __init__(
        self,
        n: int = 1,
        best_of: Optional[int] = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        seed: Optional[int] = None,
        use_beam_search: bool = False,
        length_penalty: float = 1.0,
        early_stopping: Union[bool, str] = False,
        stop: Optional[Union[str, List[str]]] = None,
        stop_token_ids: Optional[List[int]] = None,
        include_stop_str_in_output: bool = False,
        ignore_eos: bool = False,
        max_tokens: Optional[int] = 16,
        min_tokens: int = 0,
        logprobs: Optional[int] = None,
        prompt_logprobs: Optional[int] = None,
        detokenize: bool = True,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        logits_processors: Optional[List[LogitsProcessor]] = None,
        truncate_prompt_tokens: Optional[int] = None,
    ) -> None:
        self.n = n
        self.best_of = best_of if best_of is not None else n
        self.presence_penalty = presence_penalty
        self.frequency_penalty = frequency_penalty
        self.repetition_penalty = repetition_penalty
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p
        self.seed = None if seed == -1 else seed
        self.use_beam_search = use_beam_search
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        if stop is None:
            self.stop = []
        elif isinstance(stop, str):
            self.stop = [stop]
        else:
            self.stop = list(stop)
        if stop_token_ids is None:
            self.stop_token_ids = []
        else:
            self.stop_token_ids = list(stop_token_ids)
        self.ignore_eos = ignore_eos
        self.max_tokens = max_tokens
        self.min_tokens = min_tokens
        self.logprobs = 1 if logprobs is True else logprobs
        self.prompt_logprobs = 1 if prompt_logprobs is True else prompt_logprobs
        self.detokenize = detokenize
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.logits_processors = logits_processors
        self.include_stop_str_in_output = include_stop_str_in_output
        self.truncate_prompt_tokens = truncate_prompt_tokens
        if not all(isinstance(s, str) for s in self.stop):
            raise _type_error("stop", f"stop must be a string or a list of strings, got {self.stop!r}.")
        # Number of characters held back from streamed (unfinished) text, so that a stop
        # string that is still being completed never shows and the text never backtracks.
        if self.stop and not include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        else:
            self.output_text_buffer_length = 0

        self._verify_args()
        if self.use_beam_search:
            self._verify_beam_search()
        else:
            self._verify_non_beam_search()
            if self.temperature < _SAMPLING_EPS:
                # Zero temperature means greedy sampling: truncation is meaningless.
                self.top_p = 1.0
                self.top_k = -1
                self.min_p = 0.0
                self._verify_greedy_sampling()
        # The engine adds the EOS token id(s) to this set (used by the min_tokens mask).
        self.all_stop_token_ids = set(self.stop_token_ids)

    # ------------------------------------------------------------------ validation
    def _verify_args(self) -> None:
        _check_int("n", self.n)
        if self.n < 1:
            raise _value_error("n", f"n must be at least 1, got {self.n}.")
        _check_int("best_of", self.best_of)
        if self.best_of < self.n:
            raise _value_error("best_of", f"best_of must be greater than or equal to n, "
                                          f"got n={self.n} and best_of={self.best_of}.")
        _check_real("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise _value_error("presence_penalty", "presence_penalty must be in [-2, 2], got "
                                                   f"{self.presence_penalty}.")
        _check_real("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise _value_error("frequency_penalty", "frequency_penalty must be in [-2, 2], got "
                                                    f"{self.frequency_penalty}.")
        _check_real("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise _value_error("repetition_penalty", "repetition_penalty must be in (0, 2], got "
                                                     f"{self.repetition_penalty}.")
        _check_real("temperature", self.temperature)
        if self.temperature < 0.0:
            raise _value_error("temperature", f"temperature must be non-negative, got {self.temperature}.")
        _check_real("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise _value_error("top_p", f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int):  # vLLM 0.5.5 wording
            raise _type_error("top_k", f"top_k must be an integer, got {type(self.top_k).__name__}")
        if self.top_k < -1 or self.top_k == 0:
            raise _value_error("top_k", f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        _check_real("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise _value_error("min_p", f"min_p must be in [0, 1], got {self.min_p}.")
        _check_int("seed", self.seed, optional=True)
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise _value_error("seed", f"seed must fit in 64 bits (between {_SEED_MIN} and {_SEED_MAX}), "
                                       f"got {self.seed}.")
        _check_int("max_tokens", self.max_tokens, optional=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _value_error("max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}.")
        _check_int("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise _value_error("min_tokens", f"min_tokens must be greater than or equal to 0, "
                                             f"got {self.min_tokens}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _value_error("min_tokens", f"min_tokens must be less than or equal to "
                                             f"max_tokens={self.max_tokens}, got {self.min_tokens}.")
        _check_int("logprobs", self.logprobs, optional=True)
        if self.logprobs is not None and self.logprobs < 0:
            raise _value_error("logprobs", f"logprobs must be non-negative, got {self.logprobs}.")
        _check_int("prompt_logprobs", self.prompt_logprobs, optional=True)
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise _value_error("prompt_logprobs", f"prompt_logprobs must be non-negative, got "
                                                  f"{self.prompt_logprobs}.")
        _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, optional=True)
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise _value_error("truncate_prompt_tokens", f"truncate_prompt_tokens must be >= 1, "
                                                         f"got {self.truncate_prompt_tokens}")
        _check_real("length_penalty", self.length_penalty)
        if any(not stop_str for stop_str in self.stop):
            raise _value_error("stop", "stop cannot contain an empty string.")
        if not all(_is_int(t) for t in self.stop_token_ids):
            raise _type_error("stop_token_ids", f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}.")
        if self.stop and not self.detokenize:
            raise _value_error("stop", "stop strings are only supported when detokenize is True. "
                                       "Set detokenize=True to use stop.")
        if self.logits_processors is not None:
            if not all(callable(fn) for fn in self.logits_processors):
                raise _type_error("logits_processors", "logits_processors must be a list of callables, got "
                                                       f"{self.logits_processors!r}.")

    def _verify_beam_search(self) -> None:
        if self.best_of == 1:
            raise _value_error("best_of", "best_of must be greater than 1 when using beam "
                                          f"search. Got {self.best_of}.")
        if self.temperature > _SAMPLING_EPS:
            raise _value_error("temperature", "temperature must be 0 when using beam search.")
        if self.top_p < 1.0 - _SAMPLING_EPS:
            raise _value_error("top_p", "top_p must be 1 when using beam search.")
        if self.top_k != -1:
            raise _value_error("top_k", "top_k must be -1 when using beam search.")
        if self.early_stopping not in [True, False, "never"]:
            raise _value_error("early_stopping", f"early_stopping must be True, False, or 'never', "
                                                 f"got {self.early_stopping}.")

    def _verify_non_beam_search(self) -> None:
        if self.early_stopping is not False:
            raise _value_error("early_stopping", "early_stopping is not effective and must be "
                                                 "False when not using beam search.")
        if (self.length_penalty < 1.0 - _SAMPLING_EPS
                or self.length_penalty > 1.0 + _SAMPLING_EPS):
            raise _value_error("length_penalty", "length_penalty is not effective and must be the "
                                                 "default value of 1.0 when not using beam search.")

    def _verify_greedy_sampling(self) -> None:
        if self.best_of > 1:
            # (sic) the missing space is vLLM's.
            raise _value_error("best_of", "best_of must be 1 when using greedy sampling."
                                          f"Got {self.best_of}.")

    # ------------------------------------------------------------------ derived
    @property
    def sampling_type(self) -> SamplingType:
        if self.use_beam_search:
            return SamplingType.BEAM
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def clone(self) -> "SamplingParams":
        """A deep copy; the logits processors are shared (copied by reference)."""
        memo = None if self.logits_processors is None else {
            id(lp): lp for lp in self.logits_processors}
        return copy.deepcopy(self, memo=memo)

    def __repr__(self) -> str:
        return (f"SamplingParams(n={self.n}, "
                f"best_of={self.best_of}, "
                f"presence_penalty={self.presence_penalty}, "
                f"frequency_penalty={self.frequency_penalty}, "
                f"repetition_penalty={self.repetition_penalty}, "
                f"temperature={self.temperature}, "
                f"top_p={self.top_p}, "
                f"top_k={self.top_k}, "
                f"min_p={self.min_p}, "
                f"seed={self.seed}, "
                f"use_beam_search={self.use_beam_search}, "
                f"length_penalty={self.length_penalty}, "
                f"early_stopping={self.early_stopping}, "
                f"stop={self.stop}, "
                f"stop_token_ids={self.stop_token_ids}, "
                f"include_stop_str_in_output={self.include_stop_str_in_output}, "
                f"ignore_eos={self.ignore_eos}, "
                f"max_tokens={self.max_tokens}, "
                f"min_tokens={self.min_tokens}, "
                f"logprobs={self.logprobs}, "
                f"prompt_logprobs={self.prompt_logprobs}, "
                f"skip_special_tokens={self.skip_special_tokens}, "
                "spaces_between_special_tokens="
                f"{self.spaces_between_special_tokens}, "
                f"truncate_prompt_tokens={self.truncate_prompt_tokens})")


def verify_max_logprobs(params: SamplingParams, max_logprobs: int) -> None:
    """The engine's add_request check: logprobs and prompt_logprobs are bounded."""
    num_logprobs = params.logprobs or 0
    num_prompt_logprobs = params.prompt_logprobs or 0
    if num_logprobs > max_logprobs or num_prompt_logprobs > max_logprobs:
        raise _value_error("logprobs" if num_logprobs > max_logprobs else "prompt_logprobs",
                           f"Cannot request more than {max_logprobs} logprobs.")
