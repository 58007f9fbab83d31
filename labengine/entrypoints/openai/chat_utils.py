"""Chat messages -> prompt text: the chat template (vLLM's `entrypoints/chat_utils.py`).

Which template: the request's `chat_template` (only when the operator passed
`--trust-request-chat-template`; otherwise such a request is refused), else the server's
`--chat-template`, else the tokenizer's own, else DEFAULT_CHAT_TEMPLATE below, the
question/answer format the embedded model (labengine/tinylab) was trained on: a system
message as a plain line, each user message as "Question: <content>", each assistant
message as "Answer: <content>", one per line, then "Answer:" when add_generation_prompt is
true (the default). For example
[{"role": "user", "content": "What is the capital of France?"}] becomes
"Question: What is the capital of France?\\nAnswer:" and the embedded model replies " Paris."

A template is code: every one is rendered in Jinja's ImmutableSandboxedEnvironment, with
a time budget and a size limit (render_chat_template), off the server's event loop.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Any, Dict, List, Optional

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The format the embedded model (labengine/tinylab) was trained on: "Question: ...\nAnswer: ...".
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] in ('system', 'developer') %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Answer: {{ message['content'] }}\n"
    "{% else %}Question: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}"
)


def default_chat_prompt(messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """DEFAULT_CHAT_TEMPLATE in plain Python (no Jinja needed)."""
    lines = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            lines.append(f"{m['content']}\n")
        elif m["role"] == "assistant":
            lines.append(f"Answer: {m['content']}\n")
        else:
            lines.append(f"Question: {m['content']}\n")
    return "".join(lines) + ("Answer:" if add_generation_prompt else "")


class ChatTemplateError(ValueError):
    """A chat template that failed, ran past its time budget or grew too large (param: chat_template)."""

    param = "chat_template"


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (no attribute tricks, no mutation of the arguments), and
    `*` / `**` that cannot build a huge string, list or number in one go."""

    intercepted_binops = frozenset({"*", "**"})
    MAX_ITEMS = 1 << 20

    def call_binop(self, context, operator, left, right):
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise ChatTemplateError(f"the chat template raises to a power of {right}; at most 64 is allowed")
            return left ** right
        result_len = None
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                result_len = len(seq) * times
        if result_len is not None and result_len > self.MAX_ITEMS:
            raise ChatTemplateError(f"the chat template repeats a value into {result_len} items; "
                                    f"at most {self.MAX_ITEMS} are allowed")
        return left * right


def _raise_exception(message):
    raise ChatTemplateError(f"the chat template raised: {message}")


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat_template(template: str, context: Dict[str, Any], *, timeout_s: float = 2.0,
                         max_chars: int = 1 << 22) -> str:
    """Render `template` with `context` in the sandbox, within `timeout_s` seconds and `max_chars`.

    Blocking: the server calls it on a worker thread (never on the event loop). The time
    budget is enforced by a trace function on this thread that raises once the deadline
    has passed, so a template that loops without writing anything is stopped too.
    """
    try:
        compiled = _compile(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None
    deadline = time.monotonic() + timeout_s

    def over_budget(frame, event, arg):
        if time.monotonic() > deadline:
            raise ChatTemplateError(f"rendering the chat template took longer than {timeout_s:g} s")
        return over_budget

    pieces, size = [], 0
    previous = sys.gettrace()
    sys.settrace(over_budget)
    try:
        for piece in compiled.generate(**context):
            pieces.append(piece)
            size += len(piece)
            if size > max_chars:
                raise ChatTemplateError(f"the chat template produced more than {max_chars} characters")
    except ChatTemplateError:
        raise
    except Exception as e:  # the template's own error (undefined name, sandbox refusal, ...)
        raise ChatTemplateError(f"could not apply the chat template: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
    return "".join(pieces)


def apply_chat_template(tokenizer, messages, add_generation_prompt: bool, template: Optional[str], *,
                        timeout_s: float = 2.0, **extra) -> str:
    """The prompt for `messages`: `template` (else the tokenizer's own) rendered in the sandbox,
    else DEFAULT_CHAT_TEMPLATE. Every template is rendered by render_chat_template, with or
    without a tokenizer (Hugging Face's rendering variables: the special tokens,
    `raise_exception`, trim_blocks and lstrip_blocks). Blocking: see render_chat_template."""
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if not template:
        return default_chat_prompt(messages, add_generation_prompt)
    context: Dict[str, Any] = {}
    special = getattr(tokenizer, "special_tokens_map", None) if tokenizer is not None else None
    if isinstance(special, dict):
        context.update({k: v for k, v in special.items() if isinstance(v, str)})
    context.update(extra)
    context.update(messages=messages, add_generation_prompt=add_generation_prompt)
    return render_chat_template(template, context, timeout_s=timeout_s)
