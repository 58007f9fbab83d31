"""Structured output (guided decoding): vLLM v0.5.4's request fields, served by a grammar engine.

A request asks for one kind of constraint, as in vLLM v0.5.4's `GuidedDecodingRequest`:
``guided_json`` (a JSON schema: dict, JSON string or pydantic model class), ``guided_regex``,
``guided_choice`` (a list of strings), ``guided_grammar`` (Lark-style EBNF) or
``guided_json_object`` (any JSON object); ``guided_whitespace_pattern`` sets the whitespace
allowed between JSON tokens. `get_guided_decoding_logits_processor` compiles the spec (cached
by spec) with the backend and returns a logits processor: an ordinary entry of
``SamplingParams.logits_processors`` that sets every token the grammar does not allow next
to -inf, EOS included until the grammar accepts. The sampler knows only "a processor".

The backend is llguidance (`llguidance_backend.py`): a maintained grammar engine with CPU
wheels that reads JSON schemas, regexes and Lark grammars natively, and computes a token
bitmask in microseconds. vLLM v0.5.4's backend names ("outlines", "lm-format-enforcer")
are refused with a message naming what labengine has.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, TypedDict, Union

from labengine.sampling_params import SamplingParamsValueError as _FieldError

__all__ = ["GuidedDecodingRequest", "LLMGuidedOptions", "GUIDED_DECODING_BACKENDS", "DEFAULT_GUIDED_DECODING_BACKEND",
           "check_guided_decoding_backend", "get_guided_decoding_logits_processor"]

GUIDED_DECODING_BACKENDS = ("llguidance",)
DEFAULT_GUIDED_DECODING_BACKEND = "llguidance"

_GUIDE_KINDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_json_object")


class LLMGuidedOptions(TypedDict, total=False):
    """The dict form accepted by `LLM.generate(..., guided_options_request=...)` (vLLM v0.5.4)."""

    guided_json: Union[dict, str, Any]
    guided_regex: str
    guided_choice: List[str]
    guided_grammar: str
    guided_decoding_backend: str
    guided_whitespace_pattern: str
    guided_json_object: bool


@dataclass
class GuidedDecodingRequest:
    """One request's output constraint (vLLM v0.5.4's dataclass of the same name).

    At most one of ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``
    and ``guided_json_object`` may be set; ``guided_decoding_backend`` and
    ``guided_whitespace_pattern`` qualify it.
    """

    guided_json: Optional[Union[dict, str, Any]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[List[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None
    guided_json_object: Optional[bool] = None

    def __post_init__(self) -> None:
        set_kinds = [k for k in _GUIDE_KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) > 1:
            raise _FieldError("You can only use one kind of guided decoding but multiple is specified: "
                              f"{', '.join(set_kinds)}", set_kinds[1])
        if self.guided_regex is not None and not isinstance(self.guided_regex, str):
            raise _FieldError(f"guided_regex must be a str, got {self.guided_regex!r}", "guided_regex")
        if self.guided_grammar is not None and not isinstance(self.guided_grammar, str):
            raise _FieldError(f"guided_grammar must be a str (Lark-style EBNF), got {self.guided_grammar!r}",
                              "guided_grammar")
        if self.guided_choice is not None:
            if (isinstance(self.guided_choice, str) or not all(isinstance(c, str) for c in self.guided_choice)
                    or not list(self.guided_choice)):
                raise _FieldError(f"guided_choice must be a non-empty list of str, got {self.guided_choice!r}",
                                  "guided_choice")
        if self.guided_whitespace_pattern is not None and not isinstance(self.guided_whitespace_pattern, str):
            raise _FieldError(f"guided_whitespace_pattern must be a str (a regex), got "
                              f"{self.guided_whitespace_pattern!r}", "guided_whitespace_pattern")
        if self.guided_decoding_backend is not None:
            check_guided_decoding_backend(self.guided_decoding_backend)

    @classmethod
    def from_options(cls, options: Union["GuidedDecodingRequest", LLMGuidedOptions, None]
                     ) -> Optional["GuidedDecodingRequest"]:
        """A GuidedDecodingRequest from the dataclass, its dict form, or None."""
        if options is None or isinstance(options, GuidedDecodingRequest):
            return options
        if isinstance(options, dict):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(options) - names)
            if unknown:
                raise ValueError(f"Unknown guided decoding option(s) {unknown}; allowed: {sorted(names)}")
            return cls(**options)
        raise TypeError("guided_options_request must be a GuidedDecodingRequest or a dict of its fields, got "
                        f"{type(options).__name__}")

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, k) in (None, False) for k in _GUIDE_KINDS)


def check_guided_decoding_backend(name: str) -> str:
    """The backend name, or a ValueError naming the allowed ones."""
    if name not in GUIDED_DECODING_BACKENDS:
        raise _FieldError(f"guided_decoding_backend={name!r} is not available: labengine's guided decoding runs on "
                         f"{', '.join(GUIDED_DECODING_BACKENDS)} (vLLM v0.5.4's 'outlines' and "
                          "'lm-format-enforcer' are not installed)", "guided_decoding_backend")
    return name


def get_guided_decoding_logits_processor(request: GuidedDecodingRequest, tokenizer, vocab_size: int,
                                         eos_token_ids=None, backend: Optional[str] = None):
    """A logits processor enforcing `request` (None when it asks for nothing).

    Args:
        request: The constraint.
        tokenizer: The engine's Hugging Face (fast) tokenizer.
        vocab_size: Width of the model's logits rows (may exceed the tokenizer's vocabulary).
        eos_token_ids: Tokens that end a sequence; allowed only where the grammar accepts.
        backend: Overrides ``request.guided_decoding_backend``; default llguidance.
    Raises:
        ValueError: an invalid schema, regex, choice list or grammar (the message says which).
    """
    if request is None or request.is_empty:
        return None
    check_guided_decoding_backend(backend or request.guided_decoding_backend or DEFAULT_GUIDED_DECODING_BACKEND)
    if tokenizer is None:
        raise ValueError("guided decoding needs the tokenizer; it is not available with skip_tokenizer_init=True")
    from labengine.guided_decoding.llguidance_backend import make_logits_processor

    return make_logits_processor(request, tokenizer, vocab_size, eos_token_ids)
