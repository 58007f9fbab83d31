"""The FastAPI application: routes, auth, error bodies, /health and /metrics (vLLM's `api_server.py`).

Endpoints:
    GET  /v1/models             the one served model
    POST /v1/completions        OpenAI completions (text or token-id prompts, n, logprobs, echo)
    POST /v1/chat/completions   OpenAI chat completions (chat template: see chat_utils.py)
    GET  /health                200 while the engine loop is alive, 503 once it died
    GET  /metrics               Prometheus text format (queue lengths, KV-cache use, TTFT, latency)

`stream: true` sends server-sent events (`data: {chunk}` ... `data: [DONE]`).
With an API key every /v1 request needs `Authorization: Bearer KEY`, otherwise 401;
/health and /metrics stay open.

Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: a value that
SamplingParams or the engine rejects (including a prompt longer than max_model_len) is a 400
naming the field; an unknown model name is a 404. A client that disconnects aborts its
request(s), so their KV blocks are freed at once.

Parameters follow OpenAI, plus vLLM's extras (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, use_beam_search, length_penalty, stop_token_ids, include_stop_str_in_output,
skip_special_tokens, spaces_between_special_tokens, prompt_logprobs). `best_of > n` and
beam search cannot be streamed (400, as in OpenAI); `echo` with `logprobs` and `suffix` are
not supported (400).
"""
from __future__ import annotations

import hmac
import time
from typing import Optional

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from labengine.async_llm_engine import AsyncEngineDeadError, AsyncLLMEngine
from labengine.entrypoints.openai.protocol import (ChatCompletionRequest, CompletionRequest, ModelCard,
                                                   ModelList)
from labengine.entrypoints.openai.serving_chat import OpenAIServingChat
from labengine.entrypoints.openai.serving_completion import OpenAIServingCompletion
from labengine.entrypoints.openai.serving_engine import OpenAIError, logger


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
    completion = OpenAIServingCompletion(engine, served_model_name, metrics=metrics)
    chat = OpenAIServingChat(engine, served_model_name, chat_template=chat_template, metrics=metrics)

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

    dependencies = [Depends(check_api_key)]

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

    @app.post("/v1/completions", dependencies=dependencies)
    async def completions(req: CompletionRequest, raw_request: Request):
        return await completion.create_completion(req, raw_request)

    @app.post("/v1/chat/completions", dependencies=dependencies)
    async def chat_completions(req: ChatCompletionRequest, raw_request: Request):
        return await chat.create_chat_completion(req, raw_request)

    return app


def run_server(engine: AsyncLLMEngine, app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)
