"""The request fields that become logits processors (vLLM 0.5.4's `entrypoints/openai/logits_processors.py`).

`logit_bias` (OpenAI: token id -> bias; values clamped to [-100, 100] as vLLM 0.5.4 does,
not refused), `allowed_token_ids` (vLLM's extra on /v1/completions: every other token is set
to -inf), and the guided-decoding fields (`guided_*`, `response_format`, a named tool
choice), which become one `GuidedDecodingRequest` and its llguidance processor.
Each returns ordinary `SamplingParams.logits_processors` entries; errors are ValueErrors
with vLLM 0.5.4's messages, which the server answers as 400s.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from labengine.sampling_params import SamplingParamsValueError as _FieldError

LOGIT_BIAS_MIN, LOGIT_BIAS_MAX = -100.0, 100.0


def logit_bias_processor(logit_bias: Dict[str, float], vocab_size: int):
    """OpenAI's logit_bias: keys are token ids (as strings), values added to those logits."""
    try:
        bias = {int(token_id): min(LOGIT_BIAS_MAX, max(LOGIT_BIAS_MIN, float(value)))
                for token_id, value in logit_bias.items()}
    except (TypeError, ValueError):
        raise _FieldError("Found token_id in logit_bias that is not an integer or string representing an "
                          "integer", "logit_bias") from None
    for token_id in bias:
        if token_id < 0 or token_id >= vocab_size:
            raise _FieldError(f"token_id {token_id} in logit_bias contains out-of-vocab token id", "logit_bias")
    ids, values = list(bias), list(bias.values())

    def apply_logit_bias(output_ids, logits):
        import torch

        idx = torch.tensor(ids, dtype=torch.long, device=logits.device)
        logits[idx] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
        return logits

    apply_logit_bias.bias = bias  # what was applied after clamping (tests, curious learners)
    return apply_logit_bias


def allowed_token_ids_processor(allowed_token_ids: Iterable[int], vocab_size: int):
    """Only these tokens may be sampled: every other logit becomes -inf."""
    allowed = sorted(set(allowed_token_ids))
    if not allowed:
        raise _FieldError("Empty allowed_token_ids provided", "allowed_token_ids")
    if not all(0 <= t < vocab_size for t in allowed):
        raise _FieldError("allowed_token_ids contains out-of-vocab token id", "allowed_token_ids")

    def apply_allowed_token_ids(output_ids, logits):
        import torch

        mask = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
        mask[torch.tensor(allowed, dtype=torch.long, device=logits.device)] = False
        logits.masked_fill_(mask, float("-inf"))
        return logits

    return apply_allowed_token_ids


# ---------------------------------------------------------------------- guided decoding
_COUNTED_GUIDES = ("guided_json", "guided_regex", "guided_choice")


def check_guided_decoding_count(req) -> None:
    """vLLM 0.5.4's rule (and message): at most one of guided_json, guided_regex, guided_choice."""
    if sum(getattr(req, k, None) is not None for k in _COUNTED_GUIDES) > 1:
        second = [k for k in _COUNTED_GUIDES if getattr(req, k, None) is not None][1]
        raise _FieldError("You can only use one kind of guided decoding ('guided_json', 'guided_regex' or "
                          "'guided_choice').", second)


def guided_request_of(req, tool_parameters=None):
    """The request's output constraint as a GuidedDecodingRequest, or None.

    Explicit `guided_*` fields come first, then `response_format` ({"type": "json_object"}:
    any JSON object; {"type": "json_schema", "json_schema": {"schema": ...}}: that schema),
    as in vLLM 0.5.4's backends. `tool_parameters` is the named tool's JSON schema.
    """
    from labengine.guided_decoding import GuidedDecodingRequest

    fields = dict(guided_json=req.guided_json, guided_regex=req.guided_regex, guided_choice=req.guided_choice,
                  guided_grammar=req.guided_grammar)
    if tool_parameters is not None:
        fields["guided_json"] = tool_parameters
    if all(v is None for v in fields.values()) and req.response_format is not None:
        fmt = req.response_format
        if fmt.type == "json_object":
            fields["guided_json_object"] = True
        elif fmt.type == "json_schema":
            schema = (fmt.json_schema or {}).get("schema")
            if schema is None:
                raise _FieldError('response_format {"type": "json_schema"} needs json_schema.schema (a JSON '
                                  'schema)', "response_format")
            fields["guided_json"] = schema
    guided = GuidedDecodingRequest(guided_decoding_backend=req.guided_decoding_backend,
                                   guided_whitespace_pattern=req.guided_whitespace_pattern, **fields)
    return None if guided.is_empty else guided


def get_logits_processors(logit_bias: Optional[Dict[str, float]], allowed_token_ids: Optional[List[int]],
                          vocab_size: int) -> list:
    processors = []
    if logit_bias:
        processors.append(logit_bias_processor(logit_bias, vocab_size))
    if allowed_token_ids is not None:
        processors.append(allowed_token_ids_processor(allowed_token_ids, vocab_size))
    return processors
