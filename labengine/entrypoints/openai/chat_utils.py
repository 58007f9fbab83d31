"""Chat messages -> prompt text: the chat template (vLLM's `entrypoints/chat_utils.py`).

Which template: the server's `--chat-template`, else the tokenizer's own, else
DEFAULT_CHAT_TEMPLATE below, the question/answer format the embedded model
(labengine/tinylab) was trained on: a system message as a plain line, each user message as
"Question: <content>", each assistant message as "Answer: <content>", one per line, then
"Answer:" when add_generation_prompt is true (the default). For example
[{"role": "user", "content": "What is the capital of France?"}] becomes
"Question: What is the capital of France?\\nAnswer:" and the embedded model replies " Paris."
"""
from __future__ import annotations

from typing import Dict, List, Optional

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


def apply_chat_template(tokenizer, messages, add_generation_prompt: bool, template: Optional[str]) -> str:
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if template and tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    if template:  # a template but no HF tokenizer to render it
        import jinja2

        return jinja2.Template(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    return default_chat_prompt(messages, add_generation_prompt)
