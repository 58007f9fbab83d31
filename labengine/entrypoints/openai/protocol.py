"""Request and response bodies of the OpenAI-compatible server (pydantic models).

Field names and defaults follow the OpenAI API, plus vLLM v0.5.4's extra sampling fields
(top_k, min_p, repetition_penalty, min_tokens, ignore_eos, use_beam_search, ...).
`sampling_kwargs()` maps a request onto labengine's SamplingParams; SamplingParams
itself validates the values (one place validates each input), and the server turns its
ValueError into an HTTP 400 that names the field.

Unknown fields are refused (400 naming the field), as vLLM 0.5.4's protocol does
(`extra="forbid"`): a misspelt parameter must not be silently dropped. `seed` must fit in
torch.long (64 bits), as in vLLM 0.5.4; `stream_options` without `stream` is refused by the
endpoints (serving_engine.check_streamable). Defaults that differ
from OpenAI's, as in vLLM:
chat `temperature` is 0.7 (vLLM 0.5.4) and chat `max_tokens` defaults to "until the model's
maximum length".
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


_LONG_MIN, _LONG_MAX = -(1 << 63), (1 << 63) - 1


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------- errors
class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str = "invalid_request_error"
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------------- models
class ModelCard(OpenAIBaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "labengine"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(OpenAIBaseModel):
    object: str = "list"
    data: List[ModelCard] = Field(default_factory=list)


# ---------------------------------------------------------------------- shared
class StreamOptions(OpenAIBaseModel):
    """vLLM 0.5.4's defaults: sending `stream_options` at all means usage is wanted, and with
    `continuous_usage_stats` (its extra) every chunk carries the usage so far."""

    include_usage: Optional[bool] = True
    continuous_usage_stats: Optional[bool] = True


class ResponseFormat(OpenAIBaseModel):
    """`response_format`: "text", "json_object" (any JSON object) or "json_schema" (OpenAI's later form)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[Dict[str, Any]] = None


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _SamplingFields(OpenAIBaseModel):
    """Fields common to /v1/completions and /v1/chat/completions."""

    model: Optional[str] = None
    n: int = 1
    best_of: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[str, float]] = None
    seed: Optional[int] = Field(None, ge=_LONG_MIN, le=_LONG_MAX)  # vLLM 0.5.4: torch.long's range
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    top_p: float = 1.0
    user: Optional[str] = None
    # vLLM extras
    use_beam_search: bool = False
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool = False
    stop_token_ids: Optional[List[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: Optional[int] = None
    # vLLM extras: structured output (guided decoding), one kind per request
    response_format: Optional[ResponseFormat] = None
    guided_json: Optional[Union[str, Dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[List[str]] = None
    guided_grammar: Optional[str] = None
    guided_decoding_backend: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None

    def _common_sampling_kwargs(self) -> Dict[str, Any]:
        return dict(
            n=self.n, best_of=self.best_of, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
            use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping, stop=self.stop, stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            prompt_logprobs=self.prompt_logprobs,
        )


# ---------------------------------------------------------------------- completions
class CompletionRequest(_SamplingFields):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: bool = False
    logprobs: Optional[int] = None
    max_tokens: Optional[int] = 16
    suffix: Optional[str] = None
    temperature: float = 1.0
    # vLLM extra: sample only among these token ids
    allowed_token_ids: Optional[List[int]] = None

    @property
    def echo_without_generation(self) -> bool:
        return self.echo and self.max_tokens == 0

    def sampling_kwargs(self) -> Dict[str, Any]:
        """As vLLM 0.5.4: `echo` asks the engine for the prompt's logprobs too, and `echo` with
        `max_tokens=0` generates one token that the response leaves out."""
        kw = self._common_sampling_kwargs()
        kw.update(temperature=self.temperature,
                  max_tokens=1 if self.echo_without_generation else self.max_tokens, logprobs=self.logprobs)
        if self.echo and self.prompt_logprobs is None and self.logprobs is not None:
            kw["prompt_logprobs"] = self.logprobs
        return kw


class CompletionLogProbs(OpenAIBaseModel):
    text_offset: List[int] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    tokens: List[str] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: List[CompletionResponseChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------------- chat
class ChatContentPart(OpenAIBaseModel):
    type: str
    text: Optional[str] = None


class FunctionCall(OpenAIBaseModel):
    name: str
    arguments: str


class ToolCall(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIBaseModel):
    name: str
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None


class ChatCompletionToolsParam(OpenAIBaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionNamedFunction(OpenAIBaseModel):
    name: str


class ChatCompletionNamedToolChoiceParam(OpenAIBaseModel):
    function: ChatCompletionNamedFunction
    type: Literal["function"] = "function"


class ChatMessageIn(OpenAIBaseModel):
    role: str
    content: Optional[Union[str, List[ChatContentPart]]] = None
    name: Optional[str] = None
    # an assistant turn that called tools, and a tool's answer to one
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
            parts.append(part.text or "")
        return "\n".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: List[ChatMessageIn]
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: float = 0.7
    # tools (vLLM 0.5.4: only a named function choice, answered through guided decoding)
    tools: Optional[List[ChatCompletionToolsParam]] = None
    tool_choice: Optional[Union[str, ChatCompletionNamedToolChoiceParam]] = "none"
    # vLLM extras
    echo: bool = False
    add_generation_prompt: bool = True
    chat_template: Optional[str] = None

    def sampling_kwargs(self) -> Dict[str, Any]:
        kw = self._common_sampling_kwargs()
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        kw.update(temperature=self.temperature, max_tokens=max_tokens,
                  logprobs=(self.top_logprobs or 0) if self.logprobs else None)
        return kw


class ChatMessage(OpenAIBaseModel):
    role: str
    content: Optional[str] = None
    tool_calls: List[ToolCall] = Field(default_factory=list)


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: List[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(OpenAIBaseModel):
    content: Optional[List[ChatTokenLogprob]] = None


class ChatCompletionResponseChoice(OpenAIBaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    # OpenAI's stream form: {"index", "id", "type", "function": {"name", "arguments"}} in a call's
    # first chunk, then {"index", "function": {"arguments"}} (clients concatenate the strings)
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatCompletionResponseStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatCompletionResponseStreamChoice]
    usage: Optional[UsageInfo] = None


# ---------------------------------------------------------------------- tokenizer endpoints
class TokenizeCompletionRequest(OpenAIBaseModel):
    model: Optional[str] = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(OpenAIBaseModel):
    model: Optional[str] = None
    messages: List[ChatMessageIn]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False


class TokenizeResponse(OpenAIBaseModel):
    tokens: List[int]
    count: int
    max_model_len: Optional[int] = None


class DetokenizeRequest(OpenAIBaseModel):
    model: Optional[str] = None
    tokens: List[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str
