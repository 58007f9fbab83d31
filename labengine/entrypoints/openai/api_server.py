"""The FastAPI application: routes, auth, error bodies, /health and /metrics (vLLM's `api_server.py`).

Endpoints:
    GET  /v1/models             the one served model
    POST /v1/completions        OpenAI completions (text or token-id prompts, n, logprobs, echo)
    POST /v1/chat/completions   OpenAI chat completions (chat template: see chat_utils.py)
    POST /tokenize              prompt or chat messages -> token ids (vLLM's extra)
    POST /detokenize            token ids -> text (vLLM's extra)
    GET  /version               {"version": labengine's version}
    GET  /health                200 while the engine is alive and making progress; 503 once its loop
                                died, or when requests wait and no step finished for
                                --health-stall-timeout-s seconds
    GET  /metrics               Prometheus text format (queue lengths, KV-cache use, TTFT, latency)

`stream: true` sends server-sent events (`data: {chunk}` ... `data: [DONE]`).
With an API key every /v1 request needs `Authorization: Bearer KEY`, otherwise 401;
/health and /metrics stay open.

Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: a value that
SamplingParams or the engine rejects (including a prompt longer than max_model_len, or a
prompt plus max_tokens that cannot fit) is a 400 naming the field; an unknown field is a
400; an unknown model name is a 404. Limits (ServerLimits, each a flag): a body over
--max-request-body-bytes is a 413, a full queue (--max-queued-requests) a 429, too many
prompts or stop strings a 400. Any other failure is a 500 with a generic message and the
request's id (also sent as the X-Request-Id header); the details go to the server's log
under that id. When the engine loop dies, requests get 503 and `run_server` stops the
server with exit status 1, so a supervisor restarts it.

A client that disconnects aborts its request(s) whenever it leaves: while they are still
queued (watched from arrival), while they run, or mid-stream; their KV blocks are freed at once.

Parameters follow OpenAI, plus vLLM's extras (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, use_beam_search, length_penalty, stop_token_ids, include_stop_str_in_output,
skip_special_tokens, spaces_between_special_tokens, prompt_logprobs, allowed_token_ids,
guided_json/regex/choice/grammar, response_format, tools with a named tool_choice). `best_of > n`
and beam search cannot be streamed (400, as in OpenAI); `suffix` is not supported (400).
"""
from __future__ import annotations

import asyncio
import hmac
import sys
import time
import uuid
from typing import Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from labengine.async_llm_engine import AsyncEngineDeadError, AsyncLLMEngine
from labengine.entrypoints.openai.protocol import (DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest)
from labengine.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard,
                                                   ModelList)
from labengine.entrypoints.openai.serving_chat import OpenAIServingChat
from labengine.entrypoints.openai.serving_completion import OpenAIServingCompletion
from labengine.entrypoints.openai.serving_engine import (OpenAIError, ServerLimits, ServerState, current_request_id,
                                                         internal_error, logger, unless_disconnected)
from labengine.entrypoints.openai.serving_tokenization import OpenAIServingTokenization


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
                ("labengine:num_gpu_blocks", "num_gpu_blocks", "KV-cache blocks in total."),
                ("labengine:gpu_prefix_cache_hit_rate", "gpu_prefix_cache_hit_rate",
                 "Prefix caching: full prompt blocks found in the cache / looked up (0-1; -1 when off).")):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self.model_name], float(stats.get(key, 0) or 0))
            yield g


# ---------------------------------------------------------------------- middleware
class RequestGuard:
    """ASGI middleware: gives each HTTP request an id (X-Request-Id) and refuses a body over
    `max_body_bytes` with 413 before the application sees any of it.

    The body is read here (up to the limit) and handed on whole, so no route ever holds
    more than the limit in memory.
    """

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        current_request_id.set(rid)

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(message)

        limit = self.max_body_bytes
        if not limit or scope.get("method") in ("GET", "HEAD"):
            return await self.app(scope, receive, send_with_id)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._too_large(scope, send_with_id, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await self._too_large(scope, send_with_id, size)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send_with_id)

    async def _too_large(self, scope, send, size: int) -> None:
        err = OpenAIError(f"The request body ({size} bytes or more) is larger than this server's limit of "
                          f"{self.max_body_bytes} bytes.", status=413, code="request_too_large")
        await err.response()(scope, None, send)


# ---------------------------------------------------------------------- the app
def build_app(engine: AsyncLLMEngine, served_model_name: str, api_key: Optional[str] = None, *,
              chat_template: Optional[str] = None, max_model_len: Optional[int] = None,
              limits: Optional[ServerLimits] = None, return_tokens_as_token_ids: bool = False) -> FastAPI:
    """The FastAPI application serving `engine` as `served_model_name`, within `limits`."""
    app = FastAPI(title="labengine OpenAI-compatible server", version="0.1.0")
    limits = limits or ServerLimits()
    state = ServerState(limits)
    metrics = ServerMetrics(engine, served_model_name)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.server_state = state
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_request_body_bytes)
    if max_model_len is None:
        max_model_len = getattr(getattr(engine.engine, "model_config", None), "max_model_len", None)
    completion = OpenAIServingCompletion(engine, served_model_name, metrics=metrics,
                                         return_tokens_as_token_ids=return_tokens_as_token_ids)
    chat = OpenAIServingChat(engine, served_model_name, chat_template=chat_template, metrics=metrics,
                             return_tokens_as_token_ids=return_tokens_as_token_ids)
    tokenization = OpenAIServingTokenization(engine, served_model_name, chat_template=chat_template,
                                             max_model_len=max_model_len)
    completion.server_state = chat.server_state = tokenization.server_state = state

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
        rid = current_request_id.get()
        logger.error("request %s: the engine is dead: %s", rid, exc)
        return OpenAIError(f"The engine has stopped (request id {rid}); this server is shutting down.",
                           status=503, type="internal_server_error").response()

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):  # the backstop: no internal text to clients
        return internal_error(exc, "request").response()

    async def serve(handler, req, raw_request: Request, num_prompts: int):
        """Admission (queue limit), then the endpoint, watched for a disconnect from arrival on."""
        # Refused while the queue is full; a request is admitted whole, so a queue below the
        # limit may go over it by one request's prompts (never starving a big request).
        if limits.max_queued_requests and state.queued >= limits.max_queued_requests:
            return OpenAIError(f"The server has {state.queued} requests waiting, its limit is "
                               f"{limits.max_queued_requests}; try again later.", status=429,
                               type="server_overloaded", code="too_many_queued_requests").response()
        try:
            result = await unless_disconnected(raw_request, handler(req, raw_request))
        except (OpenAIError, AsyncEngineDeadError):
            raise
        except Exception as e:
            raise internal_error(e, raw_request.url.path) from None
        return Response(status_code=499) if result is None else result

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode()):
            raise OpenAIError("Incorrect or missing API key (send `Authorization: Bearer <key>`).",
                              status=401, code="invalid_api_key")

    dependencies = [Depends(check_api_key)]

    @app.get("/health")
    async def health():
        if engine.errored:
            return OpenAIError("engine loop is dead", status=503, type="internal_server_error").response()
        stalled = engine.seconds_without_progress()
        if limits.health_stall_timeout_s and stalled > limits.health_stall_timeout_s:
            return OpenAIError(f"the engine has made no progress for {stalled:.0f} s with requests waiting",
                               status=503, type="internal_server_error").response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=dependencies)
    async def models():
        return ModelList(data=[ModelCard(id=served_model_name, root=served_model_name,
                                         max_model_len=max_model_len)]).model_dump()

    @app.post("/v1/completions", dependencies=dependencies)
    async def completions(req: CompletionRequest, raw_request: Request):
        num_prompts = count_prompts(req.prompt)
        if limits.max_prompts_per_request and num_prompts > limits.max_prompts_per_request:
            raise OpenAIError(f"prompt holds {num_prompts} prompts; at most {limits.max_prompts_per_request} "
                              "are allowed in one request.", param="prompt")
        return await serve(completion.create_completion, req, raw_request, num_prompts)

    @app.post("/v1/chat/completions", dependencies=dependencies)
    async def chat_completions(req: ChatCompletionRequest, raw_request: Request):
        return await serve(chat.create_chat_completion, req, raw_request, 1)

    # vLLM's extras, outside /v1 as in vLLM 0.5.4 (but behind the API key when there is one)
    @app.post("/tokenize", dependencies=dependencies)
    async def tokenize(req: Union[TokenizeCompletionRequest, TokenizeChatRequest]):
        return await tokenization.tokenize(req)

    @app.post("/detokenize", dependencies=dependencies)
    async def detokenize(req: DetokenizeRequest):
        return tokenization.detokenize(req)

    @app.get("/version")
    async def version():
        from labengine import __version__

        return {"version": __version__}

    return app


def count_prompts(prompt) -> int:
    """How many engine requests a completions `prompt` field makes."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return 1


async def serve_until_done(server, engine: AsyncLLMEngine, poll_s: float = 0.5) -> int:
    """Run a uvicorn Server; stop it when the engine loop dies. The exit status: 1 if the
    engine died (so a supervisor restarts the server), else 0."""

    async def watch_engine():
        while not server.should_exit:
            if engine.errored:
                logger.error("The engine loop died; stopping the server (exit status 1).")
                server.should_exit = True
                return
            await asyncio.sleep(poll_s)

    watcher = asyncio.ensure_future(watch_engine())
    try:
        await server.serve()
    finally:
        watcher.cancel()
    return 1 if engine.errored else 0


def run_server(engine: AsyncLLMEngine, app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted; exit with status 1 if the engine dies."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    status = asyncio.run(serve_until_done(server, engine))
    if status:
        sys.exit(status)
