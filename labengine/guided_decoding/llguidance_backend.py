"""The llguidance adapter: compiles a GuidedDecodingRequest, yields a per-sequence logits processor.

Three caches, each keyed by what determines its value:

* the llguidance view of a tokenizer (built once per tokenizer, vocabulary width and EOS set;
  ~50 ms for a 32k vocabulary),
* compiled grammars, an LRU keyed by the spec (kind, text, whitespace pattern) and the
  tokenizer view: a matcher in its initial state that every new request copies,
* inside one processor, the matcher state of each output prefix it has seen.

Why key the state by the output prefix: a request's sequences share one processor (the
engine shares a request's logits processors between its ``n``/``best_of`` sequences), and a
fork's child has the same output as its parent up to the forking token. So the state of
``output_ids`` is the state of ``output_ids[:-1]`` (a copy, since a sibling may continue it
differently) with the last token consumed; forks copy their parent's state without the
sampler or the sequence knowing about grammars. A state whose grandchildren exist is dropped
(siblings advance in the same step); if a prefix is ever missing, the state is rebuilt by
consuming the whole output again, which is correct, only slower.

The mask: llguidance fills one bit per token (the grammar's next allowed tokens, EOS only
where the grammar accepts, only EOS once it is complete); the bits become a bool row that
sets every forbidden logit to -inf before the rest of sampling.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict

import numpy as np
import torch

from labengine.sampling_params import SamplingParamsValueError as _FieldError

_GRAMMAR_CACHE_SIZE = 64
# outlines' default (vLLM v0.5.4): at most one space between JSON tokens, so a weak model
# cannot fill max_tokens with whitespace.
DEFAULT_JSON_WHITESPACE = r"[ ]?"

_lock = threading.Lock()  # the server compiles on its event loop thread, the engine runs on another
_tokenizer_views: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_grammar_cache: "OrderedDict[tuple, object]" = OrderedDict()


def _llg():
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError as e:  # pragma: no cover - llguidance is a core dependency
        raise ImportError("guided decoding needs the llguidance package: pip install llguidance") from e
    return llguidance


def _tokenizer_view(tokenizer, vocab_size: int, eos_token_ids):
    """llguidance's tokenizer for (tokenizer, logits width, EOS ids), cached per tokenizer."""
    llg = _llg()
    eos = sorted(eos_token_ids) if eos_token_ids else [tokenizer.eos_token_id]
    eos = [e for e in eos if e is not None]
    if not eos:
        raise ValueError("guided decoding needs an EOS token: the tokenizer has none")
    n_vocab = max(int(vocab_size), len(tokenizer))
    key = (n_vocab, tuple(eos))
    with _lock:
        per_tok = _tokenizer_views.setdefault(tokenizer, {})
        view = per_tok.get(key)
        if view is None:
            try:
                view = llg.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos if len(eos) > 1 else eos[0])
            except ValueError as e:
                raise ValueError(f"guided decoding needs a fast (tokenizer.json) tokenizer: {e}") from e
            per_tok[key] = view
    return view, n_vocab


def grammar_for(request) -> tuple[str, str, str]:
    """(kind, spec text, llguidance grammar) of a request; ValueError when the spec is malformed."""
    llg = _llg()
    M = llg.LLMatcher
    if request.guided_json is not None or request.guided_json_object:
        if request.guided_json_object:
            schema = {"type": "object"}
        else:
            schema = request.guided_json
            if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
                schema = schema.model_json_schema()
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise _FieldError(f"guided_json is not valid JSON: {e}", "guided_json") from e
            if not isinstance(schema, dict):
                raise _FieldError(f"guided_json must be a JSON schema object (dict, JSON string or pydantic model), "
                                  f"got {request.guided_json!r}", "guided_json")
        spec = json.dumps(schema, sort_keys=True)
        ws = request.guided_whitespace_pattern
        ws = DEFAULT_JSON_WHITESPACE if ws is None else ws
        options = {"whitespace_flexible": False}
        if ws:  # "" means no whitespace between JSON tokens
            options["whitespace_pattern"] = ws
        try:
            grammar = M.grammar_from_json_schema(schema, overrides=options)
        except ValueError as e:
            raise _FieldError(f"guided_json is not a valid JSON schema: {e}", "guided_json") from e
        return "guided_json", spec + "\0" + ws, grammar
    if request.guided_regex is not None:
        return "guided_regex", request.guided_regex, M.grammar_from_regex(request.guided_regex)
    if request.guided_choice is not None:
        choices = list(request.guided_choice)
        lark = "start: " + " | ".join(json.dumps(c) for c in choices)
        return "guided_choice", json.dumps(choices), M.grammar_from_lark(lark)
    if request.guided_grammar is not None:
        return "guided_grammar", request.guided_grammar, M.grammar_from_lark(request.guided_grammar)
    raise ValueError("the guided decoding request sets no constraint")


def compiled_matcher(request, tokenizer, vocab_size: int, eos_token_ids):
    """A matcher in the grammar's initial state (cached by spec; callers copy it)."""
    llg = _llg()
    view, n_vocab = _tokenizer_view(tokenizer, vocab_size, eos_token_ids)
    kind, spec, grammar = grammar_for(request)
    key = (id(view), kind, spec)
    with _lock:
        base = _grammar_cache.get(key)
        if base is not None:
            _grammar_cache.move_to_end(key)
            return base, n_vocab
    base = llg.LLMatcher(view, grammar, log_level=0)
    if base.is_error():
        raise _FieldError(f"Invalid {kind} {_short(request, kind)}: {base.get_error().strip()}", kind)
    with _lock:
        _grammar_cache[key] = base
        while len(_grammar_cache) > _GRAMMAR_CACHE_SIZE:
            _grammar_cache.popitem(last=False)
    return base, n_vocab


def _short(request, kind: str) -> str:
    text = repr(getattr(request, kind, None))
    return text if len(text) <= 200 else text[:197] + "..."


def make_logits_processor(request, tokenizer, vocab_size: int, eos_token_ids=None) -> "GuidedLogitsProcessor":
    base, n_vocab = compiled_matcher(request, tokenizer, vocab_size, eos_token_ids)
    return GuidedLogitsProcessor(base, n_vocab)


class GuidedLogitsProcessor:
    """``fn(output_ids, logits_row) -> logits_row``: forbidden tokens set to -inf.

    One per request (shared by its sequences); the state of each output prefix is kept as
    described in the module docstring. Raises RuntimeError when a token the grammar forbids
    was appended anyway (e.g. a stop token id the grammar does not allow), which fails that
    request only.
    """

    def __init__(self, base_matcher, n_vocab: int) -> None:
        self._base = base_matcher
        self._n_vocab = n_vocab
        self._states: dict[tuple, object] = {(): base_matcher.deep_copy()}
        self._masks: dict[tuple, torch.Tensor] = {}

    def _state(self, key: tuple):
        m = self._states.get(key)
        if m is not None:
            return m
        parent = self._states.get(key[:-1])
        if parent is not None:
            m = parent.deep_copy()
            ok = m.consume_token(key[-1])
        else:  # an unseen prefix: rebuild from the initial state
            m = self._base.deep_copy()
            ok = m.consume_tokens(list(key))
        if not ok:
            raise RuntimeError(f"guided decoding: the output {list(key)[-8:]} (last 8 tokens) breaks the grammar: "
                               f"{m.get_error().strip()}")
        self._states[key] = m
        if len(key) >= 2:  # the grandparent's children all exist by now
            self._states.pop(key[:-2], None)
            self._masks.pop(key[:-2], None)
        return m

    def forbidden(self, output_ids) -> torch.Tensor:
        """Bool row [n_vocab]: True where the grammar forbids the token next."""
        key = tuple(output_ids)
        mask = self._masks.get(key)
        if mask is None:
            m = self._state(key)
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = bits[:self._n_vocab]
            if allowed.shape[0] < self._n_vocab:  # the tokenizer view may be narrower: the rest is forbidden
                allowed = np.pad(allowed, (0, self._n_vocab - allowed.shape[0]))
            if not allowed.any():
                raise RuntimeError("guided decoding: the grammar allows no next token"
                                   + (f" ({m.get_error().strip()})" if m.is_error() else ""))
            mask = torch.from_numpy(allowed == 0)
            self._masks[key] = mask
        return mask

    def is_accepting(self, output_ids) -> bool:
        """Whether the grammar is satisfied by `output_ids` (EOS allowed next)."""
        return self._state(tuple(output_ids)).is_accepting()

    def __call__(self, output_ids, logits_row: torch.Tensor) -> torch.Tensor:
        forbidden = self.forbidden(output_ids)
        width = logits_row.shape[-1]
        if forbidden.device != logits_row.device:
            forbidden = forbidden.to(logits_row.device, non_blocking=True)
        return logits_row.masked_fill_(forbidden[:width], float("-inf"))
