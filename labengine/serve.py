"""An OpenAI-compatible HTTP server on top of AsyncLLMEngine (FastAPI + uvicorn).

    python -m labengine.serve --model MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints:
    GET  /v1/models             the one served model
    POST /v1/completions        OpenAI completions (text or token-id prompts, n, logprobs, echo)
    POST /v1/chat/completions   OpenAI chat completions (chat template, see below)
    GET  /health                200 while the engine loop is alive, 503 once it died
    GET  /metrics               Prometheus text format (queue lengths, KV-cache use, TTFT, latency)

`stream: true` sends server-sent events (`data: {chunk}` ... `data: [DONE]`).
The server binds to 127.0.0.1 unless `--host` says otherwise. With `--api-key` (or the
environment variable LABENGINE_API_KEY) every /v1 request needs `Authorization: Bearer KEY`,
otherwise 401; /health and /metrics stay open.

Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: a value that
SamplingParams or the engine rejects (including a prompt longer than max_model_len) is a 400
naming the field; an unknown model name is a 404. A client that disconnects aborts its
request(s), so their KV blocks are freed at once.

Chat template: the request's `chat_template`, else `--chat-template`, else the tokenizer's
own, else DEFAULT_CHAT_TEMPLATE below, the question/answer format the embedded model
(labengine/tinylab) was trained on: a system message as a plain line, each user message as
"Question: <content>", each assistant message as "Answer: <content>", one per line, then
"Answer:" when add_generation_prompt is true (the default). For example
[{"role": "user", "content": "What is the capital of France?"}] becomes
"Question: What is the capital of France?\\nAnswer:" and the embedded model replies " Paris."

Parameters follow OpenAI, plus vLLM's extras (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, use_beam_search, length_penalty, stop_token_ids, include_stop_str_in_output,
skip_special_tokens, spaces_between_special_tokens, prompt_logprobs). `best_of > n` and
beam search cannot be streamed (400, as in OpenAI); `echo` with `logprobs` and `suffix` are
not supported (400).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from labengine.async_llm_engine import AsyncEngineDeadError, AsyncLLMEngine
from labengine.openai_protocol import (ChatChoiceLogprobs, ChatCompletionRequest, ChatCompletionResponse,
                                       ChatCompletionResponseChoice, ChatCompletionResponseStreamChoice,
                                       ChatCompletionStreamResponse, ChatMessage, ChatTokenLogprob,
                                       ChatTopLogprob, CompletionLogProbs, CompletionRequest,
                                       CompletionResponse, CompletionResponseChoice,
                                       CompletionStreamResponse, DeltaMessage, ErrorInfo, ErrorResponse,
                                       ModelCard, ModelList, UsageInfo, random_id)

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------- errors
class OpenAIError(Exception):
    def __init__(self, message: str, *, status: int = 400, param: Optional[str] = None,
                 type: str = "invalid_request_error", code: Optional[str] = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status)


_SAMPLING_FIELDS = ("n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty",
                    "temperature", "top_p", "top_k", "min_p", "seed", "use_beam_search", "length_penalty",
                    "early_stopping", "stop", "stop_token_ids", "include_stop_str_in_output", "ignore_eos",
                    "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "detokenize",
                    "skip_special_tokens", "spaces_between_special_tokens", "logits_processors",
                    "truncate_prompt_tokens")


def param_of_error(message: str, rename: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Which request field a SamplingParams / engine error message is about."""
    rename = rename or {}
    m = re.match(r"\s*`?(\w+)`?\s", message)
    field = None
    if m and m.group(1) in _SAMPLING_FIELDS:
        field = m.group(1)
    elif re.search(r"more than \d+ logprobs", message):
        field = "prompt_logprobs" if "prompt" in message else "logprobs"
    elif "greedy sampling" in message:
        field = "best_of"
    elif "beam search" in message:
        field = "use_beam_search"
    else:
        for name in _SAMPLING_FIELDS:  # a message that names one field, anywhere
            if re.search(rf"\b{name}\b", message):
                field = name
                break
    return rename.get(field, field) if field else None


# ---------------------------------------------------------------------- metrics
class ServerMetrics:
    """Prometheus metrics in the server's own registry (so tests can run several servers)."""

    _TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                     7.5, 10.0, 20.0, 40.0, 80.0)
    _LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 300.0)

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram("labengine:time_to_first_token_seconds",
                              "Time from the request's arrival to its first generated token, in seconds.",
                              labels, buckets=self._TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.e2e = Histogram("labengine:e2e_request_latency_seconds",
                             "Time from the request's arrival to its end, in seconds.",
                             labels, buckets=self._LATENCY_BUCKETS, registry=self.registry).labels(model_name)
        self.tpot = Histogram("labengine:time_per_output_token_seconds",
                              "Mean time between output tokens of a finished request, in seconds.",
                              labels, buckets=self._TTFT_BUCKETS, registry=self.registry).labels(model_name)
        self.prompt_tokens = Counter("labengine:prompt_tokens", "Prompt tokens of finished requests.",
                                     labels, registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("labengine:generation_tokens", "Generated tokens of finished requests.",
                                         labels, registry=self.registry).labels(model_name)
        self.request_success = Counter("labengine:request_success", "Finished requests, by finish reason.",
                                       ["model_name", "finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(engine, model_name))

    def observe_finished(self, out, arrival: float, first_token: Optional[float], now: float) -> None:
        self.e2e.observe(now - arrival)
        self.prompt_tokens.inc(len(out.prompt_token_ids or ()))
        n_gen = sum(len(o.token_ids) for o in out.outputs)
        self.generation_tokens.inc(n_gen)
        longest = max((len(o.token_ids) for o in out.outputs), default=0)
        if first_token is not None and longest > 1:
            self.tpot.observe((now - first_token) / (longest - 1))
        for o in out.outputs:
            self.request_success.labels(self.model_name, o.finish_reason or "unknown").inc()

    def instrument(self, gen, arrival: float):
        """Wrap one engine request's output stream: records TTFT and end-to-end latency."""
        metrics = self

        async def wrapped():
            first_token = None
            try:
                async for out in gen:
                    if first_token is None and any(o.token_ids for o in out.outputs):
                        first_token = time.time()
                        metrics.ttft.observe(first_token - arrival)
                    if out.finished:
                        metrics.observe_finished(out, arrival, first_token, time.time())
                    yield out
            finally:
                await gen.aclose()  # aborts the request unless it finished

        return wrapped()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Gauges read from the engine's last step (no engine call from the HTTP thread)."""

    def __init__(self, engine: AsyncLLMEngine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def describe(self):
        return []

    def collect(self):
        stats = self.engine.get_stats()
        for name, key, doc in (
                ("labengine:num_requests_running", "num_running", "Requests in the running batch."),
                ("labengine:num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
                ("labengine:num_requests_swapped", "num_swapped", "Requests swapped out to the CPU."),
                ("labengine:kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use (0-1)."),
                ("labengine:num_gpu_blocks", "num_gpu_blocks", "KV-cache blocks in total.")):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield g


# ---------------------------------------------------------------------- helpers
def _clamp(lp: float) -> float:
    return max(lp, -9999.0) if not math.isnan(lp) else -9999.0


class _TokenText:
    """Token id -> text, from the Logprob's decoded_token or the tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token_id: int, lp) -> str:
        if lp is not None and getattr(lp, "decoded_token", None) is not None:
            return lp.decoded_token
        if self.tokenizer is None:
            return f"<{token_id}>"
        return self.tokenizer.decode([token_id])


def _sorted_top(step: Dict[int, Any]):
    return sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                -kv[1].logprob))


def completion_logprobs(token_ids: Sequence[int], logprobs: Sequence[Dict[int, Any]], num_top: int,
                        text_of: _TokenText, initial_offset: int = 0) -> CompletionLogProbs:
    """OpenAI completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    top_logprobs holds, like vLLM's, the top `num_top` tokens plus the sampled one.
    """
    out = CompletionLogProbs()
    offset = initial_offset
    for tid, step in zip(token_ids, logprobs):
        step = step or {}
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
                  text_of: _TokenText) -> ChatChoiceLogprobs:
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


def _sse(obj) -> str:
    data = obj.model_dump_json() if hasattr(obj, "model_dump_json") else json.dumps(obj)
    return f"data: {data}\n\n"


async def _first_outputs(gens) -> List[Any]:
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


async def _merge(gens, firsts) -> AsyncIterator[tuple]:
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


async def _unless_disconnected(request: Request, coro):
    """Run coro; if the client goes away first, cancel it (which aborts its requests)."""
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


# ---------------------------------------------------------------------- the app
def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: Optional[str] = None, *,
              chat_template: Optional[str] = None, max_model_len: Optional[int] = None) -> FastAPI:
    """The FastAPI application serving `engine` as `served_model_name`."""
    app = FastAPI(title="labengine OpenAI-compatible server", version="0.1.0")
    metrics = ServerMetrics(engine, served_model_name)
    app.state.engine = engine
    app.state.metrics = metrics
    if max_model_len is None:
        max_model_len = getattr(getattr(engine.engine, "model_config", None), "max_model_len", None)
    tokenizer = None
    with contextlib.suppress(Exception):
        tokenizer = engine.engine.get_tokenizer()
    text_of = _TokenText(tokenizer)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return OpenAIError(f"The request body is not valid JSON: {first.get('msg', '')}").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return OpenAIError(f"{param}: {msg}" if param else msg, param=param).response()

    @app.exception_handler(AsyncEngineDeadError)
    async def _dead(_request: Request, exc: AsyncEngineDeadError):
        return OpenAIError(str(exc), status=503, type="internal_server_error").response()

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError("Incorrect or missing API key (send `Authorization: Bearer <key>`).",
                              status=401, code="invalid_api_key")

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != served_model_name:
            raise OpenAIError(f"The model `{name}` does not exist.", status=404, param="model",
                              code="model_not_found")

    def make_params(kwargs: Dict[str, Any], logit_bias: Optional[Dict[str, float]],
                    rename: Optional[Dict[str, str]] = None):
        from labengine.sampling_params import SamplingParams

        if logit_bias:
            kwargs["logits_processors"] = [_logit_bias_processor(logit_bias, tokenizer)]
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            raise OpenAIError(str(e), param=param_of_error(str(e), rename)) from None

    def engine_error(e: BaseException, prompt_param: str, rename=None) -> OpenAIError:
        msg = str(e)
        field = param_of_error(msg, rename)
        if field is None or "prompt" in msg.lower():
            field = prompt_param if ("prompt" in msg.lower() or field is None) else field
        return OpenAIError(msg, param=field)

    dependencies = [Depends(check_api_key)]

    # ------------------------------------------------------------------ simple endpoints
    @app.get("/health")
    async def health():
        if engine.errored:
            return OpenAIError("engine loop is dead", status=503, type="internal_server_error").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=dependencies)
    async def models():
        return ModelList(data=[ModelCard(id=served_model_name, root=served_model_name,
                                         max_model_len=max_model_len)]).model_dump()

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions", dependencies=dependencies)
    async def completions(req: CompletionRequest, raw_request: Request):
        check_model(req.model)
        if req.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if req.echo and req.logprobs is not None:
            raise OpenAIError("echo together with logprobs is not supported", param="echo")
        _check_streamable(req)
        prompts = _normalize_prompt(req.prompt)
        params = make_params(req.sampling_kwargs(), req.logit_bias)
        arrival = time.time()
        request_id = random_id("cmpl")
        created = int(arrival)
        gens = [metrics.instrument(engine.generate(p, params, f"{request_id}-{i}", arrival_time=arrival), arrival)
                for i, p in enumerate(prompts)]
        try:
            firsts = await _first_outputs(gens)
        except (ValueError, TypeError) as e:
            raise engine_error(e, "prompt") from None
        n = params.n

        def echo_text(out) -> str:
            if not req.echo:
                return ""
            if out.prompt is not None:
                return out.prompt
            return tokenizer.decode(out.prompt_token_ids) if tokenizer is not None else ""

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                sent_text: Dict[int, int] = {}
                sent_tokens: Dict[int, int] = {}
                offsets: Dict[int, int] = {}
                finished: Dict[int, Any] = {}
                try:
                    async for i, out in _merge(gens, firsts):
                        for o in out.outputs:
                            idx = i * n + o.index
                            if idx not in sent_text:
                                sent_text[idx] = 0
                                sent_tokens[idx] = 0
                                prefix = echo_text(out)
                                offsets[idx] = len(prefix)
                            else:
                                prefix = ""
                            delta = o.text[sent_text[idx]:]
                            new_tokens = o.token_ids[sent_tokens[idx]:]
                            lp = None
                            if req.logprobs is not None and o.logprobs is not None:
                                lp = completion_logprobs(new_tokens, o.logprobs[sent_tokens[idx]:], req.logprobs,
                                                         text_of, offsets[idx])
                                offsets[idx] += sum(len(t) for t in lp.tokens)
                            if not (prefix or delta or o.finish_reason or new_tokens):
                                continue
                            sent_text[idx] = len(o.text)
                            sent_tokens[idx] = len(o.token_ids)
                            chunk = CompletionStreamResponse(
                                id=request_id, created=created, model=served_model_name,
                                choices=[CompletionResponseChoice(index=idx, text=prefix + delta, logprobs=lp,
                                                                  finish_reason=o.finish_reason,
                                                                  stop_reason=o.stop_reason)])
                            yield _sse(chunk)
                        if out.finished:
                            finished[i] = out
                    if include_usage:
                        yield _sse(CompletionStreamResponse(id=request_id, created=created, model=served_model_name,
                                                            choices=[], usage=_usage(finished.values())))
                    yield "data: [DONE]\n\n"
                except Exception as e:  # engine died mid-stream: tell the client in-band
                    logger.exception("streaming completion failed")
                    yield _sse(ErrorResponse(error=ErrorInfo(message=str(e), type="internal_server_error")))
                    yield "data: [DONE]\n\n"
                finally:
                    for g in gens:
                        await g.aclose()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect():
            finals: Dict[int, Any] = {}
            try:
                async for i, out in _merge(gens, firsts):
                    finals[i] = out
            finally:
                for g in gens:
                    await g.aclose()
            return finals

        finals = await _unless_disconnected(raw_request, collect())
        if finals is None:
            return Response(status_code=499)
        choices = []
        for i in range(len(prompts)):
            out = finals[i]
            prefix = echo_text(out)
            # outputs come best first; beam search / best_of may hand out any sequence index
            for j, o in enumerate(out.outputs):
                lp = None
                if req.logprobs is not None and o.logprobs is not None:
                    lp = completion_logprobs(o.token_ids, o.logprobs, req.logprobs, text_of, len(prefix))
                choices.append(CompletionResponseChoice(index=i * n + j, text=prefix + o.text, logprobs=lp,
                                                        finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        return CompletionResponse(id=request_id, created=created, model=served_model_name, choices=choices,
                                  usage=_usage(finals.values())).model_dump()

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions", dependencies=dependencies)
    async def chat_completions(req: ChatCompletionRequest, raw_request: Request):
        check_model(req.model)
        if not req.messages:
            raise OpenAIError("messages must contain at least one message", param="messages")
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise OpenAIError("when using `top_logprobs`, `logprobs` must be set to true", param="top_logprobs")
            if not 0 <= req.top_logprobs <= 20:
                raise OpenAIError(f"top_logprobs must be between 0 and 20, got {req.top_logprobs}.",
                                  param="top_logprobs")
        _check_streamable(req)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise OpenAIError(str(e), param="messages") from None
        try:
            prompt = _apply_chat_template(tokenizer, messages, req.add_generation_prompt,
                                          req.chat_template or chat_template)
        except Exception as e:  # a broken template is the request's (or the server's) problem
            raise OpenAIError(f"could not apply the chat template: {e}", param="chat_template") from None
        rename = {"logprobs": "top_logprobs"}
        if req.max_completion_tokens is not None:
            rename["max_tokens"] = "max_completion_tokens"
        params = make_params(req.sampling_kwargs(), req.logit_bias, rename)
        arrival = time.time()
        request_id = random_id("chatcmpl")
        created = int(arrival)
        gen = metrics.instrument(engine.generate(prompt, params, request_id, arrival_time=arrival), arrival)
        try:
            firsts = await _first_outputs([gen])
        except (ValueError, TypeError) as e:
            raise engine_error(e, "messages", rename) from None
        num_top = req.top_logprobs or 0
        echo = messages[-1]["content"] if (req.echo and messages and req.messages[-1].role == "assistant") else ""

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(choices, usage=None):
                return _sse(ChatCompletionStreamResponse(id=request_id, created=created, model=served_model_name,
                                                         choices=choices, usage=usage))

            async def stream():
                sent_text: Dict[int, int] = {}
                sent_tokens: Dict[int, int] = {}
                last = None
                try:
                    async for _i, out in _merge([gen], firsts):
                        last = out
                        for o in out.outputs:
                            idx = o.index
                            if idx not in sent_text:
                                sent_text[idx] = sent_tokens[idx] = 0
                                yield chunk([ChatCompletionResponseStreamChoice(
                                    index=idx, delta=DeltaMessage(role="assistant", content=echo))])
                            delta = o.text[sent_text[idx]:]
                            new_tokens = o.token_ids[sent_tokens[idx]:]
                            if not (delta or o.finish_reason or new_tokens):
                                continue
                            lp = None
                            if req.logprobs and o.logprobs is not None:
                                lp = chat_logprobs(new_tokens, o.logprobs[sent_tokens[idx]:], num_top, text_of)
                            sent_text[idx] = len(o.text)
                            sent_tokens[idx] = len(o.token_ids)
                            yield chunk([ChatCompletionResponseStreamChoice(
                                index=idx, delta=DeltaMessage(content=delta), logprobs=lp,
                                finish_reason=o.finish_reason, stop_reason=o.stop_reason)])
                    if include_usage:
                        yield chunk([], usage=_usage([last] if last is not None else []))
                    yield "data: [DONE]\n\n"
                except Exception as e:
                    logger.exception("streaming chat completion failed")
                    yield _sse(ErrorResponse(error=ErrorInfo(message=str(e), type="internal_server_error")))
                    yield "data: [DONE]\n\n"
                finally:
                    await gen.aclose()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        async def collect():
            final = None
            try:
                async for _i, out in _merge([gen], firsts):
                    final = out
            finally:
                await gen.aclose()
            return final

        final = await _unless_disconnected(raw_request, collect())
        if final is None:
            return Response(status_code=499)
        choices = []
        for j, o in enumerate(final.outputs):
            lp = chat_logprobs(o.token_ids, o.logprobs, num_top, text_of) if (req.logprobs and o.logprobs) else None
            choices.append(ChatCompletionResponseChoice(
                index=j, message=ChatMessage(role="assistant", content=echo + o.text), logprobs=lp,
                finish_reason=o.finish_reason, stop_reason=o.stop_reason))
        return ChatCompletionResponse(id=request_id, created=created, model=served_model_name, choices=choices,
                                      usage=_usage([final])).model_dump()

    return app


def _check_streamable(req) -> None:
    if not req.stream:
        return
    if req.best_of is not None and req.best_of > req.n:
        raise OpenAIError("best_of > n cannot be streamed", param="best_of")
    if req.use_beam_search:
        raise OpenAIError("beam search cannot be streamed", param="use_beam_search")


def _normalize_prompt(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": list(prompt)}]
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, list) for p in prompt):
        return [{"prompt_token_ids": list(p)} for p in prompt]
    raise OpenAIError("prompt must be a string, a list of strings, a list of token ids or a list of lists "
                      "of token ids", param="prompt")


def _usage(outs) -> UsageInfo:
    prompt_tokens = completion_tokens = 0
    for out in outs:
        prompt_tokens += len(out.prompt_token_ids or ())
        completion_tokens += sum(len(o.token_ids) for o in out.outputs)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def _apply_chat_template(tokenizer, messages, add_generation_prompt: bool, template: Optional[str]) -> str:
    if template is None:
        template = getattr(tokenizer, "chat_template", None)
    if template and tokenizer is not None and hasattr(tokenizer, "apply_chat_template"):
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    if template:  # a template but no HF tokenizer to render it
        import jinja2

        return jinja2.Template(template).render(messages=messages, add_generation_prompt=add_generation_prompt)
    return default_chat_prompt(messages, add_generation_prompt)


def _logit_bias_processor(logit_bias: Dict[str, float], tokenizer):
    vocab = len(tokenizer) if tokenizer is not None else None
    bias: Dict[int, float] = {}
    for key, value in logit_bias.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise OpenAIError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if tid < 0 or (vocab is not None and tid >= vocab):
            raise OpenAIError(f"logit_bias token id {tid} is out of vocabulary", param="logit_bias")
        if not -100 <= value <= 100:
            raise OpenAIError(f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        bias[tid] = float(value)
    ids = list(bias)
    values = list(bias.values())

    def apply_logit_bias(output_ids, logits):
        import torch

        idx = torch.tensor(ids, dtype=torch.long, device=logits.device)
        logits[idx] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
        return logits

    return apply_logit_bias


# ---------------------------------------------------------------------- CLI
_CLI_SKIP = {"model", "served_model_name", "disable_log_requests", "engine_use_ray"}


def make_arg_parser() -> argparse.ArgumentParser:
    from labengine.arg_utils import AsyncEngineArgs

    p = argparse.ArgumentParser(prog="python -m labengine.serve",
                                description="labengine's OpenAI-compatible server.")
    p.add_argument("--model", default=None,
                   help="model folder or HF name (default: the lab's embedded model, labengine/tinylab)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LABENGINE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $LABENGINE_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    p.add_argument("--disable-log-requests", action="store_true")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    engine = p.add_argument_group("engine arguments (EngineArgs)")
    for f in dataclasses.fields(AsyncEngineArgs):
        if f.name in _CLI_SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        if ann == "bool":
            engine.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif "int" in ann and "str" not in ann and "float" not in ann:
            engine.add_argument(flag, type=int, default=default)
        elif "float" in ann and "str" not in ann:
            engine.add_argument(flag, type=float, default=default)
        else:
            engine.add_argument(flag, type=str, default=default)
    return p


def engine_args_from_cli(ns: argparse.Namespace):
    from labengine.arg_utils import AsyncEngineArgs

    kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(AsyncEngineArgs)
              if f.name not in _CLI_SKIP and hasattr(ns, f.name)}
    return AsyncEngineArgs(model=ns.model, served_model_name=ns.served_model_name,
                           disable_log_requests=ns.disable_log_requests, **kwargs)


def default_model() -> Optional[str]:
    """The embedded model, by its short name ("labengine/tinylab") so clients can say that."""
    try:
        from labengine import embedded

        for alias, path in getattr(embedded, "MODEL_ALIASES", {}).items():
            if "/" in alias and path == embedded.DEFAULT_MODEL:
                return alias
        return embedded.DEFAULT_MODEL
    except Exception:
        return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    import uvicorn

    ns = make_arg_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if ns.model is None:
        ns.model = default_model()
        if ns.model is None:
            sys.exit("error: --model is required (no embedded model in this install)")
    chat_template = ns.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template) as fh:
            chat_template = fh.read()
    engine = AsyncLLMEngine.from_engine_args(engine_args_from_cli(ns))
    name = ns.served_model_name or str(ns.model)
    app = build_app(engine, name, api_key=ns.api_key, chat_template=chat_template)
    if ns.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Listening on %s: other machines can reach this server%s.", ns.host,
                       "" if ns.api_key else " and it has no API key")
    logger.info("Serving %s on http://%s:%d/v1", name, ns.host, ns.port)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level)


if __name__ == "__main__":
    main()
