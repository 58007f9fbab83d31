"""What the completions and chat endpoints share (vLLM's `serving_engine.OpenAIServing`).

`OpenAIServing` holds the engine, the served model name and the tokenizer, and gives both
endpoints the same rules: the model check, request -> SamplingParams (errors become 400s
naming the field), starting engine requests and reading their first outputs, watching
the client, and the one streaming helper (`ChoiceDeltas` + `sse_stream`) both streaming
loops are built on. Logprob formatting for both APIs lives here too.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import dataclasses
import functools
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse

from labengine.entrypoints.openai.protocol import (ChatChoiceLogprobs, ChatTokenLogprob, ChatTopLogprob,
                                                   CompletionLogProbs, ErrorInfo, ErrorResponse, UsageInfo)

logger = logging.getLogger("labengine.serve")


# ---------------------------------------------------------------------- limits
def _limit(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ServerLimits:
    """What one client may ask of the server; each is a `python -m labengine.serve` flag.

    A request over a limit is refused before it reaches the engine: 413 for the body,
    429 when the queue is full, 400 for the rest. 0 means "no limit".
    """

    max_request_body_bytes: int = _limit(4 << 20, "largest request body, in bytes (413 above it)")
    max_prompts_per_request: int = _limit(256, "most prompts in one /v1/completions request")
    max_stop_strings: int = _limit(16, "most `stop` strings in one request")
    max_stop_string_length: int = _limit(256, "longest `stop` string, in characters")
    max_queued_requests: int = _limit(1024, "most requests waiting for the engine (429 above it)")
    chat_template_timeout_s: float = _limit(2.0, "time budget for rendering one chat template, in seconds")
    health_stall_timeout_s: float = _limit(
        300.0, "/health fails when requests are waiting and the engine made no step for this long, in seconds")
    trust_request_chat_template: bool = _limit(
        False, "render a `chat_template` sent in a request (by default such a request is refused)")


# ---------------------------------------------------------------------- errors
class OpenAIError(Exception):
    """An error answered to the client with OpenAI's error body."""

    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


def param_of(exc: BaseException, prompt_param: str = "prompt", rename: Optional[Dict[str, str]] = None) -> str:
    """The request field an engine / SamplingParams error is about: the `param` the error
    carries (SamplingParamsValueError, ChatTemplateError), else the prompt; renamed to the
    endpoint's own name for it (chat: logprobs -> top_logprobs, prompt -> messages)."""
    field = getattr(exc, "param", None) or "prompt"
    if field == "prompt":
        return prompt_param
    return (rename or {}).get(field, field)


def field_error(exc: BaseException) -> OpenAIError:
    """A 400 for a ValueError that names its field (SamplingParamsValueError.param), if any."""
    return OpenAIError(str(exc), param=getattr(exc, "param", None))


# The id of the HTTP request being served (set by api_server's middleware, sent back as the
# X-Request-Id header); an internal error names it so the log line can be found.
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("current_request_id", default="-")


def internal_error(exc: BaseException, what: str) -> OpenAIError:
    """A generic 500 for the client; the details go to the log under the request's id."""
    rid = current_request_id.get()
    logger.error("%s failed (request %s)", what, rid, exc_info=exc)
    return OpenAIError(f"Internal server error (request id {rid}); the server's log has the details.",
                       status=500, type="internal_server_error")


class ServerState:
    """What the endpoints share: the limits, the count of requests still waiting for their
    first output, and the worker threads that tokenize prompts and render chat templates
    (so neither blocks the event loop or the engine thread)."""

    def __init__(self, limits: Optional[ServerLimits] = None) -> None:
        self.limits = limits or ServerLimits()
        self.queued = 0
        self.tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labengine-tokenize")
        self.template_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="labengine-template")
        self._tokenizers: Dict[int, Any] = {}
        self._longest_token: Dict[int, int] = {}

    def longest_token(self, tokenizer) -> int:
        """Characters in the vocabulary's longest entry (an upper bound on the characters one
        token spells: byte-level vocabularies have a character per byte); 0 if unknown."""
        key = id(tokenizer)
        if key not in self._longest_token:
            try:
                self._longest_token[key] = max(map(len, tokenizer.get_vocab()), default=0)
            except Exception:
                self._longest_token[key] = 0
        return self._longest_token[key]

    def own_tokenizer(self, tokenizer):
        """A private copy of `tokenizer` for the tokenize thread (a fast tokenizer used from two
        threads at once can fail with "Already borrowed")."""
        key = id(tokenizer)
        if key not in self._tokenizers:
            try:
                self._tokenizers[key] = copy.deepcopy(tokenizer)
            except Exception:  # not copyable: share it
                self._tokenizers[key] = tokenizer
        return self._tokenizers[key]


# ---------------------------------------------------------------------- logprobs
def _clamp(lp: float) -> float:
    return max(lp, -9999.0) if not math.isnan(lp) else -9999.0


class TokenText:
    """Token id -> text, from the Logprob's decoded_token or the tokenizer.

    With `as_token_ids` (the server's --return-tokens-as-token-ids, as vLLM 0.5.4) every token
    is written "token_id:<id>", so tokens that are not valid UTF-8 on their own stay distinct.
    """

    def __init__(self, tokenizer, as_token_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids

    def __call__(self, token_id: int, lp) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        if lp is not None and getattr(lp, "decoded_token", None) is not None:
            return lp.decoded_token
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])


def _sorted_top(step: Dict[int, Any]):
    return sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                -kv[1].logprob))


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[Dict[int, Any]], num_top: int,
                        text_of: TokenText, initial_offset: int = 0) -> CompletionLogProbs:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    top_logprobs holds, like vLLM's, the top `num_top` tokens plus the sampled one.
    """
    out = CompletionLogProbs()
    offset = initial_offset
    for tid, step in zip(token_ids, logprobs):
        if step is None:  # a prompt's first token (echo): nothing before it to condition on
            tok = text_of(tid, None)
            out.tokens.append(tok)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            lp = step.get(tid)
            tok = text_of(tid, lp)
            out.tokens.append(tok)
            out.token_logprobs.append(_clamp(lp.logprob) if lp is not None else None)
            top: Dict[str, float] = {}
            for t, l in _sorted_top(step):
                if (l.rank is not None and l.rank <= num_top) or t == tid:
                    top.setdefault(text_of(t, l), _clamp(l.logprob))
            out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(tok)
    return out


def chat_logprobs(token_ids: Sequence[int], logprobs: Sequence[Dict[int, Any]], num_top: int,
                  text_of: TokenText) -> ChatChoiceLogprobs:
    """OpenAI chat logprobs: per token its text, logprob, UTF-8 bytes and the top `num_top`."""
    content = []
    for tid, step in zip(token_ids, logprobs):
        step = step or {}
        lp = step.get(tid)
        tok = text_of(tid, lp)
        tops = []
        for t, l in _sorted_top(step)[:num_top] if num_top else []:
            s = text_of(t, l)
            tops.append(ChatTopLogprob(token=s, logprob=_clamp(l.logprob), bytes=list(s.encode("utf-8"))))
        content.append(ChatTokenLogprob(token=tok, logprob=_clamp(lp.logprob) if lp is not None else -9999.0,
                                        bytes=list(tok.encode("utf-8")), top_logprobs=tops))
    return ChatChoiceLogprobs(content=content)


def indexed_outputs(outputs) -> list:
    """(choice index, output) pairs of one request, in index order.

    A request's outputs come best first; each keeps the index of its sequence, which the
    stream uses too, so a choice has the same index streamed or not. With best_of > n (or
    beam search) the kept sequences' indices have gaps: then the index is the rank.
    """
    outputs = list(outputs)
    if sorted(o.index for o in outputs) == list(range(len(outputs))):
        return sorted(((o.index, o) for o in outputs), key=lambda p: p[0])
    return list(enumerate(outputs))


def usage_of(outs, count_completion: bool = True) -> UsageInfo:
    prompt_tokens = completion_tokens = 0
    for out in outs:
        prompt_tokens += len(out.prompt_token_ids or ())
        if count_completion:
            completion_tokens += sum(len(o.token_ids) for o in out.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


# ---------------------------------------------------------------------- engine streams
async def first_outputs(gens) -> List[Any]:
    """The first output of each stream; the engine's validation errors surface here."""

    async def first(g):
        try:
            return await g.__anext__()
        except StopAsyncIteration:
            return None

    results = await asyncio.gather(*(first(g) for g in gens), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for g in gens:
            with contextlib.suppress(Exception):
                await g.aclose()
        raise errors[0]
    return results


async def merge_outputs(gens, firsts) -> AsyncIterator[tuple]:
    """Yield (prompt_index, output) from several streams as they arrive, firsts first."""
    for i, f in enumerate(firsts):
        if f is not None:
            yield i, f
    live = [i for i, f in enumerate(firsts) if f is not None and not f.finished]
    if len(live) == 1:
        i = live[0]
        async for out in gens[i]:
            yield i, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i):
        try:
            async for out in gens[i]:
                queue.put_nowait((i, out))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
            return
        queue.put_nowait((i, done))

    tasks = [asyncio.ensure_future(pump(i)) for i in live]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, coro):
    """Run coro; if the client goes away first, cancel it (which aborts its requests) and return None."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return None
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        if not task.done():
            task.cancel()


# ---------------------------------------------------------------------- streaming
def sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


class ChoiceDeltas:
    """What each streamed choice has already been sent, so each chunk carries only the new part.

    Engine outputs are cumulative; `take(idx, o)` returns the text, token ids and logprobs
    that choice `idx` gained since the last call, and remembers the new position.
    """

    def __init__(self) -> None:
        self._sent: Dict[int, tuple] = {}  # choice index -> (characters sent, tokens sent)

    def is_new(self, idx: int) -> bool:
        if idx in self._sent:
            return False
        self._sent[idx] = (0, 0)
        return True

    def take(self, idx: int, o):
        chars, tokens = self._sent[idx]
        self._sent[idx] = (len(o.text), len(o.token_ids))
        new_logprobs = o.logprobs[tokens:] if o.logprobs is not None else None
        return o.text[chars:], o.token_ids[tokens:], new_logprobs


async def sse_stream(chunks: AsyncIterator[str], gens, what: str) -> AsyncIterator[str]:
    """The server-sent-event body of one streaming response: `chunks`, then `data: [DONE]`.

    An error after the response has started can only be told in-band (an error event);
    whatever happens, every engine request of the response is closed (aborted if live).
    """
    try:
        async for chunk in chunks:
            yield chunk
        yield "data: [DONE]\n\n"
    except Exception as e:  # engine died mid-stream: tell the client in-band, details in the log
        err = internal_error(e, f"streaming {what}")
        yield sse(ErrorResponse(error=ErrorInfo(message=err.message, type=err.type)))
        yield "data: [DONE]\n\n"
    finally:
        for g in gens:
            await g.aclose()


# ---------------------------------------------------------------------- the shared base
class OpenAIServing:
    """State and rules both endpoints share."""

    def __init__(self, engine, served_model_name: str, *, metrics=None,
                 return_tokens_as_token_ids: bool = False) -> None:
        self.engine = engine
        self.served_model_name = served_model_name
        self.metrics = metrics
        self.tokenizer = None
        with contextlib.suppress(Exception):
            self.tokenizer = engine.engine.get_tokenizer()
        self.text_of = TokenText(self.tokenizer, as_token_ids=return_tokens_as_token_ids)

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.served_model_name:
            raise OpenAIError(f"The model `{name}` does not exist.", status=404, param="model",
                              code="model_not_found")

    # Set by build_app; a serving built on its own gets default limits.
    server_state: Optional[ServerState] = None

    @property
    def state(self) -> ServerState:
        if self.server_state is None:
            self.server_state = ServerState()
        return self.server_state

    def make_params(self, kwargs: Dict[str, Any], logit_bias: Optional[Dict[str, float]],
                    rename: Optional[Dict[str, str]] = None, *, allowed_token_ids: Optional[List[int]] = None,
                    guided=None):
        """SamplingParams of a request; `logit_bias`, `allowed_token_ids` and the guided-decoding
        request (a GuidedDecodingRequest) become its logits processors."""
        from labengine.entrypoints.openai.logits_processors import get_logits_processors
        from labengine.sampling_params import SamplingParams

        self.check_stop(kwargs.get("stop"))
        vocab_size = self._vocab_size()
        try:
            processors = get_logits_processors(logit_bias, allowed_token_ids, vocab_size)
        except ValueError as e:
            raise field_error(e) from None
        if guided is not None:
            processors.append(self.guided_processor(guided))
        if processors:
            kwargs["logits_processors"] = processors
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), param=param_of(e, rename=rename)) from None

    def check_stop(self, stop) -> None:
        limits = self.state.limits
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if limits.max_stop_strings and len(stops) > limits.max_stop_strings:
            raise OpenAIError(f"stop has {len(stops)} strings; at most {limits.max_stop_strings} are allowed.",
                              param="stop")
        longest = max((len(x) for x in stops if isinstance(x, str)), default=0)
        if limits.max_stop_string_length and longest > limits.max_stop_string_length:
            raise OpenAIError(f"a stop string has {longest} characters; at most {limits.max_stop_string_length} "
                              "are allowed.", param="stop")

    def _vocab_size(self) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer)
        return self.engine.engine.model_runner.vocab_size

    @staticmethod
    def guided_of(req, tool_parameters=None):
        """The request's guided-decoding fields as a GuidedDecodingRequest (None when unconstrained)."""
        from labengine.entrypoints.openai.logits_processors import check_guided_decoding_count, guided_request_of

        try:
            check_guided_decoding_count(req)
            return guided_request_of(req, tool_parameters)
        except ValueError as e:
            raise field_error(e) from None

    def guided_processor(self, guided):
        """The llguidance logits processor of one request (a 400 naming the field when the spec is bad)."""
        from labengine.guided_decoding import get_guided_decoding_logits_processor

        llm_engine = self.engine.engine
        try:
            return get_guided_decoding_logits_processor(
                guided, self.tokenizer, llm_engine.model_runner.vocab_size, llm_engine.eos_token_ids,
                backend=guided.guided_decoding_backend or llm_engine.guided_decoding_backend)
        except ValueError as e:
            raise field_error(e) from None

    @staticmethod
    def engine_error(e: BaseException, prompt_param: str, rename=None) -> OpenAIError:
        return OpenAIError(str(e), param=param_of(e, prompt_param, rename))

    @property
    def max_model_len(self) -> Optional[int]:
        return getattr(getattr(getattr(self.engine, "engine", None), "model_config", None), "max_model_len", None)

    def check_context_window(self, num_prompt_tokens: int, params) -> None:
        """vLLM 0.5.4 / OpenAI: a request whose prompt plus max_tokens cannot fit is refused
        (rather than silently cut short). A prompt alone too long gets the engine's message."""
        from labengine.sampling_params import SamplingParamsValueError

        max_len = self.max_model_len
        if max_len is None or num_prompt_tokens > max_len:
            return
        if params.max_tokens is None:
            if num_prompt_tokens >= max_len:
                raise SamplingParamsValueError(
                    f"This model's maximum context length is {max_len} tokens. However, you requested "
                    f"{num_prompt_tokens} tokens in the messages, Please reduce the length of the messages.",
                    "prompt")
        elif num_prompt_tokens + params.max_tokens > max_len:
            raise SamplingParamsValueError(
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{params.max_tokens + num_prompt_tokens} tokens ({num_prompt_tokens} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the messages or completion.",
                "max_tokens")

    def check_text_length(self, text: str) -> None:
        """Refuse, without tokenizing it, a text that must be longer than max_model_len tokens:
        no token spells more characters than the longest entry of the vocabulary."""
        from labengine.sampling_params import SamplingParamsValueError

        max_len, per_token = self.max_model_len, self.state.longest_token(self.tokenizer)
        if max_len is None or not per_token or len(text) <= max_len * per_token:
            return
        at_least = -(-len(text) // per_token)
        raise SamplingParamsValueError(
            f"The prompt ({len(text)} characters, so at least {at_least} tokens) is longer than the maximum "
            f"model length of {max_len}.", "prompt")

    async def prepare_prompt(self, prompt, params):
        """Tokenize a text prompt on the tokenize thread (never the engine's, so a huge prompt
        stalls nobody else), apply truncate_prompt_tokens and check the context window; the
        engine gets token ids."""
        ids = None
        if isinstance(prompt, str) and self.tokenizer is not None:
            self.check_text_length(prompt)
            tokenizer = self.state.own_tokenizer(self.tokenizer)
            ids = await asyncio.get_running_loop().run_in_executor(self.state.tokenize_pool, tokenizer.encode,
                                                                   prompt)
            prompt = {"prompt": prompt, "prompt_token_ids": ids}
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt_token_ids"), list):
            ids = prompt["prompt_token_ids"]
        if ids is None:
            return prompt  # no tokenizer (skip_tokenizer_init): the engine says what is wrong
        k = getattr(params, "truncate_prompt_tokens", None)
        if k is not None and len(ids) > k:
            prompt = {"prompt_token_ids": ids[-k:]}
            ids = prompt["prompt_token_ids"]
        self.check_context_window(len(ids), params)
        return prompt

    async def render_chat_prompt(self, messages, req, default_template: Optional[str], **extra) -> str:
        """The chat template, rendered in the sandbox on a template thread within the time budget.

        A request's own `chat_template` is code from the client: it is refused unless the
        operator passed --trust-request-chat-template.
        """
        from labengine.entrypoints.openai.chat_utils import ChatTemplateError, apply_chat_template

        limits = self.state.limits
        requested = getattr(req, "chat_template", None)
        if requested is not None and not limits.trust_request_chat_template:
            raise OpenAIError("Chat template is passed with request, but --trust-request-chat-template is not "
                              "set. Refused request with untrusted chat template.", param="chat_template")
        template = requested if requested is not None else default_template
        budget = limits.chat_template_timeout_s
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.state.template_pool, functools.partial(
            apply_chat_template, self.tokenizer, messages, req.add_generation_prompt, template,
            timeout_s=budget, **extra))
        try:
            # The template thread stops itself at the budget; this is the backstop for a
            # template stuck inside one long builtin call.
            return await asyncio.wait_for(job, budget + 5.0)
        except ChatTemplateError as e:
            raise OpenAIError(str(e), param="chat_template") from None
        except asyncio.TimeoutError:
            raise OpenAIError(f"rendering the chat template took longer than {budget:g} s",
                              param="chat_template") from None

    def start(self, prompt, params, request_id: str, arrival: float):
        """One engine request's output stream (instrumented for /metrics when metrics are on).

        Nothing runs until the stream is first read; then the prompt is prepared
        (prepare_prompt) and the request counts as queued until its first output.
        """
        gen = self._prepared_generate(prompt, params, request_id, arrival)
        return self.metrics.instrument(gen, arrival) if self.metrics is not None else gen

    async def _prepared_generate(self, prompt, params, request_id: str, arrival: float):
        state = self.state
        state.queued += 1
        waiting = True
        try:
            engine_prompt = await self.prepare_prompt(prompt, params)
            inner = self.engine.generate(engine_prompt, params, request_id, arrival_time=arrival)
            try:
                async for out in inner:
                    if waiting:
                        waiting = False
                        state.queued -= 1
                    yield out
            finally:
                await inner.aclose()
        finally:
            if waiting:
                state.queued -= 1

    async def first_outputs(self, gens, prompt_param: str, rename=None) -> List[Any]:
        try:
            return await first_outputs(gens)
        except (ValueError, TypeError) as e:
            raise self.engine_error(e, prompt_param, rename) from None


def check_streamable(req) -> None:
    """OpenAI: best_of results and beam search cannot be streamed; vLLM 0.5.4: stream_options needs stream."""
    if not req.stream:
        if req.stream_options is not None:
            raise OpenAIError("Stream options can only be defined when stream is True.", param="stream_options")
        return
    if req.best_of is not None and req.best_of > req.n:
        raise OpenAIError("best_of > n cannot be streamed", param="best_of")
    if req.use_beam_search:
        raise OpenAIError("beam search cannot be streamed", param="use_beam_search")

