"""The server survives careless and hostile clients (issue 16, items 1-6).

Three uvicorn apps share one engine (max_num_seqs=8) on one event loop in a background
thread, as in test_server.py: default limits, tight limits, and one that trusts a request's
chat template. Engine steps are held with an Event where a test needs requests to stay
queued; every wait is bounded, nothing depends on how fast the machine is.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import httpx
import pytest
import uvicorn

from labengine import AsyncEngineArgs, AsyncLLMEngine
from labengine.entrypoints.openai.api_server import build_app, serve_until_done
from labengine.entrypoints.openai.chat_utils import ChatTemplateError, apply_chat_template
from labengine.entrypoints.openai.serving_engine import ServerLimits
from labengine.events import RequestFinished
from labengine.testing import make_random_model
from server_helpers import ExplodingEngine, one_torch_thread, serving

MODEL = "tiny"
MAX_MODEL_LEN = 128
MAX_NUM_SEQS = 8
TIGHT = ServerLimits(max_request_body_bytes=4096, max_prompts_per_request=4, max_stop_strings=2,
                     max_stop_string_length=8, max_queued_requests=1, health_stall_timeout_s=0.2)
TRUSTED = ServerLimits(trust_request_chat_template=True, chat_template_timeout_s=3.0)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_random_model("llama", tmp_path_factory.mktemp("hardening"))
    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=str(path), max_model_len=MAX_MODEL_LEN, block_size=8, num_gpu_blocks_override=128,
        max_num_seqs=MAX_NUM_SEQS, seed=0, disable_log_requests=True))


@pytest.fixture(scope="module")
def urls(engine):
    apps = {"default": build_app(engine, MODEL), "tight": build_app(engine, MODEL, limits=TIGHT),
            "trusted": build_app(engine, MODEL, limits=TRUSTED)}
    with serving(apps) as urls:
        yield {**urls, "apps": apps}


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=kw.pop("timeout", 30), **kw)


def completion(url, timeout=30, **body):
    return post(url, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **body},
                timeout=timeout)


def chat(url, **body):
    return post(url, "/v1/chat/completions",
                {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body})


def wait_until(cond, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_idle(engine):
    bm = engine.engine.scheduler.block_manager
    wait_until(lambda: engine.get_num_unfinished_requests() == 0 and not engine.has_work
               and bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks, "the engine to be idle")


@contextlib.contextmanager
def held_steps(engine, monkeypatch):
    """Engine steps wait until released: requests added meanwhile stay queued."""
    release, entered = threading.Event(), threading.Event()
    inner = engine.engine
    real_step = inner.step

    def held_step(*a, **kw):
        entered.set()
        release.wait(30)
        return real_step(*a, **kw)

    monkeypatch.setattr(inner, "step", held_step)
    try:
        yield entered
    finally:
        release.set()
        monkeypatch.setattr(inner, "step", real_step)


def in_background(fn):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as e:  # noqa: BLE001 - looked at by the test
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def err(r):
    return r.json()["error"]


# ---------------------------------------------------------------------- 1. too wide
@pytest.mark.parametrize("body, field", [({"n": MAX_NUM_SEQS + 1}, "n"),
                                         ({"n": 1, "best_of": MAX_NUM_SEQS + 1}, "best_of"),
                                         ({"n": 2, "best_of": 300, "use_beam_search": True, "temperature": 0},
                                          "best_of")])
def test_more_sequences_than_max_num_seqs_is_400_and_wedges_nobody(urls, engine, body, field):
    r = completion(urls["default"], **body)
    assert r.status_code == 400 and err(r)["param"] == field
    assert f"max_num_seqs={MAX_NUM_SEQS}" in err(r)["message"]
    r = chat(urls["default"], **body)
    assert r.status_code == 400 and err(r)["param"] == field
    ok = completion(urls["default"], n=MAX_NUM_SEQS, temperature=1.0)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == MAX_NUM_SEQS
    wait_idle(engine)


# ---------------------------------------------------------------------- 2. chat templates
def test_request_chat_template_is_refused_unless_trusted(urls):
    template = "{% for m in messages %}{{ m['content'] }}!{% endfor %}"
    r = chat(urls["default"], chat_template=template)
    assert r.status_code == 400 and err(r)["param"] == "chat_template"
    assert "--trust-request-chat-template" in err(r)["message"]
    r = chat(urls["trusted"], chat_template=template, echo=False)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("template", [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER') }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.append(1) }}",  # immutable sandbox: no mutation of the arguments
    "{{ 'x' * 100000000 }}",
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "{{ raise_exception('bad template') }}",
])
def test_hostile_templates_are_400_and_the_server_carries_on(urls, tmp_path, template):
    marker = tmp_path / "pwned"
    r = chat(urls["trusted"], chat_template=template.replace("MARKER", str(marker)))
    assert r.status_code == 400 and err(r)["param"] == "chat_template", r.text
    assert not marker.exists()
    assert httpx.get(urls["trusted"] + "/health", timeout=10).status_code == 200


def test_skip_tokenizer_fallback_renders_in_the_sandbox(tmp_path):
    """No tokenizer: the old fallback used plain jinja2.Template, so this ran a shell command."""
    marker = tmp_path / "pwned"
    payload = "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}" % marker
    with pytest.raises(ChatTemplateError):
        apply_chat_template(None, [{"role": "user", "content": "x"}], True, payload)
    assert not marker.exists()
    assert apply_chat_template(None, [{"role": "user", "content": "x"}], True,
                               "{% for m in messages %}<{{ m.content }}>{% endfor %}") == "<x>"


def test_a_slow_template_does_not_block_the_event_loop(urls):
    loop_forever = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
    t, result = in_background(lambda: chat(urls["trusted"], chat_template=loop_forever))
    health = httpx.get(urls["trusted"] + "/health", timeout=30)
    still_rendering = t.is_alive()
    t.join(30)
    assert health.status_code == 200 and still_rendering
    r = result["value"]
    assert r.status_code == 400 and "longer than 3 s" in err(r)["message"]


# ---------------------------------------------------------------------- 3. limits
def test_body_over_the_limit_is_413(urls):
    r = completion(urls["tight"], prompt="x" * 5000)
    assert r.status_code == 413 and err(r)["code"] == "request_too_large"
    # also without a Content-Length header (chunked upload)
    r = httpx.post(urls["tight"] + "/v1/completions", timeout=30,
                   content=iter([b'{"model": "tiny", "prompt": "', b"x" * 5000, b'"}']))
    assert r.status_code == 413
    assert completion(urls["tight"]).status_code == 200


def test_prompt_and_stop_limits_are_400(urls):
    r = completion(urls["tight"], prompt=["a"] * 5)
    assert r.status_code == 400 and err(r)["param"] == "prompt" and "at most 4" in err(r)["message"]
    assert completion(urls["tight"], prompt=[[1, 2, 3]] * 4).status_code == 200
    r = completion(urls["tight"], stop=["a", "b", "c"])
    assert r.status_code == 400 and err(r)["param"] == "stop"
    r = chat(urls["tight"], stop="x" * 9)
    assert r.status_code == 400 and err(r)["param"] == "stop"


def test_full_queue_is_429(urls, engine, monkeypatch):
    state = urls["apps"]["tight"].state.server_state
    with held_steps(engine, monkeypatch):
        t, first = in_background(lambda: completion(urls["tight"], max_tokens=2))
        wait_until(lambda: state.queued == 1, "the first request to be queued")
        r = completion(urls["tight"], max_tokens=2)
        assert r.status_code == 429 and err(r)["code"] == "too_many_queued_requests"
    t.join(30)
    assert first["value"].status_code == 200
    wait_idle(engine)
    assert state.queued == 0 and completion(urls["tight"]).status_code == 200


def test_prompts_are_tokenized_off_the_engine_thread(urls, engine, monkeypatch):
    completion(urls["default"])  # the server's own tokenizer copy exists after one request
    state = urls["apps"]["default"].state.server_state
    threads = []
    server_tokenizer = state.own_tokenizer(engine.engine.tokenizer)
    assert server_tokenizer is not engine.engine.tokenizer
    real_encode = server_tokenizer.encode

    def recording_encode(*a, **kw):
        threads.append(threading.current_thread().name)
        return real_encode(*a, **kw)

    monkeypatch.setattr(server_tokenizer, "encode", recording_encode)
    engine_tokenizer = engine.engine.tokenizer
    engine_calls = []
    real_engine_encode = engine_tokenizer.encode
    monkeypatch.setattr(engine_tokenizer, "encode", lambda *a, **kw: engine_calls.append(1) or
                        real_engine_encode(*a, **kw))
    assert completion(urls["default"], prompt="Tokenize me elsewhere").status_code == 200
    assert chat(urls["default"]).status_code == 200
    assert len(threads) == 2 and all(t.startswith("labengine-tokenize") for t in threads)
    assert engine_calls == []  # the engine got token ids


def test_a_huge_prompt_is_refused_without_tokenizing_it(urls, engine, monkeypatch):
    state = urls["apps"]["default"].state.server_state
    server_tokenizer = state.own_tokenizer(engine.engine.tokenizer)
    calls = []
    monkeypatch.setattr(server_tokenizer, "encode", lambda *a, **kw: calls.append(1))
    longest = state.longest_token(engine.engine.tokenizer)
    r = completion(urls["default"], prompt="y" * (MAX_MODEL_LEN * longest + 1))
    assert r.status_code == 400 and err(r)["param"] == "prompt" and str(MAX_MODEL_LEN) in err(r)["message"]
    assert calls == []


# ---------------------------------------------------------------------- 4. disconnects
@pytest.mark.parametrize("stream", [False, True])
def test_client_leaving_while_queued_aborts_its_request(urls, engine, monkeypatch, stream):
    finished = []
    listener = lambda e: finished.append(e) if isinstance(e, RequestFinished) else None  # noqa: E731
    engine.add_event_listener(listener)
    try:
        with held_steps(engine, monkeypatch) as entered:
            t, blocker = in_background(lambda: completion(urls["default"], max_tokens=2))
            assert entered.wait(30)  # the engine thread is inside a step
            with pytest.raises(httpx.ReadTimeout):
                completion(urls["default"], max_tokens=100, ignore_eos=True, stream=stream,
                           timeout=httpx.Timeout(10, read=0.5))
            # the server notices the hang-up while the request is still queued
            wait_until(lambda: engine.get_num_unfinished_requests() <= 1, "the queued request to be aborted")
        t.join(30)
        assert blocker["value"].status_code == 200
        wait_idle(engine)
        assert all(e.output_len < 100 for e in finished)
    finally:
        engine.remove_event_listener(listener)


# ---------------------------------------------------------------------- 5. failures
def test_internal_errors_are_generic_with_a_request_id(urls, monkeypatch, caplog):
    from labengine.entrypoints.openai.serving_engine import OpenAIServing

    async def broken(self, prompt, params):
        raise RuntimeError("secret internals /home/admin/key")

    monkeypatch.setattr(OpenAIServing, "prepare_prompt", broken)
    with caplog.at_level(logging.ERROR, logger="labengine.serve"):
        r = completion(urls["default"])
    assert r.status_code == 500 and err(r)["type"] == "internal_server_error"
    rid = r.headers["x-request-id"]
    assert rid in err(r)["message"] and "secret" not in r.text
    assert any(rid in rec.getMessage() and "secret internals" in (rec.exc_text or "") for rec in caplog.records)


def test_health_fails_when_the_engine_makes_no_progress(urls, engine, monkeypatch):
    assert httpx.get(urls["tight"] + "/health", timeout=10).status_code == 200
    with held_steps(engine, monkeypatch) as entered:
        t, _ = in_background(lambda: completion(urls["default"], max_tokens=2))
        assert entered.wait(30)
        wait_until(lambda: httpx.get(urls["tight"] + "/health", timeout=10).status_code == 503,
                   "/health to report the stall")
        assert httpx.get(urls["default"] + "/health", timeout=10).status_code == 200  # 300 s by default
    t.join(30)
    wait_idle(engine)
    assert httpx.get(urls["tight"] + "/health", timeout=10).status_code == 200


def test_server_exits_non_zero_when_the_engine_dies(engine):
    dead = AsyncLLMEngine(ExplodingEngine(engine.engine), log_requests=False)
    server = uvicorn.Server(uvicorn.Config(build_app(dead, MODEL), host="127.0.0.1", port=0, log_level="critical",
                                           lifespan="off"))
    t, status = in_background(lambda: asyncio.run(serve_until_done(server, dead, poll_s=0.05)))
    try:
        wait_until(lambda: server.started, "uvicorn to start")
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        r = completion(url)
        assert r.status_code == 503 and "exploded" not in r.text
        t.join(30)
        assert status["value"] == 1
    finally:
        server.should_exit = True
        t.join(15)
        s = engine.engine.scheduler
        engine.engine.abort_request([g.request_id for q in (s.waiting, s.running, s.swapped) for g in q])


# ---------------------------------------------------------------------- 6. bad values
@pytest.mark.parametrize("seed", [1 << 63, -(1 << 63) - 1, 10 ** 30])
def test_seed_outside_64_bits_is_400_naming_seed(urls, seed):
    for r in completion(urls["default"], seed=seed), chat(urls["default"], seed=seed):
        assert r.status_code == 400 and err(r)["param"] == "seed", r.text


def test_max_tokens_that_cannot_fit_is_400(urls):
    r = completion(urls["default"], max_tokens=MAX_MODEL_LEN)
    assert r.status_code == 400 and err(r)["param"] == "max_tokens"
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in err(r)["message"]
    r = chat(urls["default"], max_tokens=None, max_completion_tokens=MAX_MODEL_LEN)
    assert r.status_code == 400 and err(r)["param"] == "max_completion_tokens"
    r = completion(urls["default"], prompt=[1] * 100, max_tokens=MAX_MODEL_LEN - 100)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 100


def test_stream_options_without_stream_is_400(urls):
    for r in (completion(urls["default"], stream_options={"include_usage": True}),
              chat(urls["default"], stream_options={"include_usage": True})):
        assert r.status_code == 400 and err(r)["param"] == "stream_options"
    assert completion(urls["default"], stream=True, stream_options={"include_usage": True}).status_code == 200


def test_unknown_fields_are_400_naming_them(urls):
    r = completion(urls["default"], max_token=5)
    assert r.status_code == 400 and err(r)["param"] == "max_token"
    r = chat(urls["default"], temprature=0.5)
    assert r.status_code == 400 and err(r)["param"] == "temprature"


def test_too_many_logprobs_is_400(urls):
    r = completion(urls["default"], logprobs=21)
    assert r.status_code == 400 and err(r)["param"] == "logprobs" and "20" in err(r)["message"]
    r = completion(urls["default"], prompt_logprobs=21)
    assert r.status_code == 400 and err(r)["param"] == "prompt_logprobs"
