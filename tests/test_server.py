"""The OpenAI-compatible server, driven by the official `openai` client over loopback.

Two uvicorn servers share one event loop in a background thread (and so one
AsyncLLMEngine): one open, one that needs an API key. Ports are picked by the OS on
127.0.0.1; every client call has a timeout.
"""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from labengine import AsyncEngineArgs, AsyncLLMEngine
from labengine.serve import build_app, make_arg_parser
from labengine.testing import make_random_model
from server_helpers import ExplodingEngine, one_torch_thread, serving

MODEL_NAME = "tiny-llama"
API_KEY = "sk-test-123"
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time", "What is AI?",
           "The quick brown fox"]
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_random_model("llama", tmp_path_factory.mktemp("server_llama"))
    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model=str(path), max_model_len=MAX_MODEL_LEN, block_size=8, num_gpu_blocks_override=192,
        max_num_seqs=64, seed=0, disable_log_requests=True))


@pytest.fixture(scope="module")
def servers(engine):
    apps = {"open": build_app(engine, MODEL_NAME), "keyed": build_app(engine, MODEL_NAME, api_key=API_KEY)}
    with serving(apps) as urls:
        yield {**urls, "apps": list(apps.values())}


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=servers["open"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(engine, timeout=30.0):
    """Poll (bounded) until the engine holds no request and no KV block."""
    bm = engine.engine.scheduler.block_manager
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.get_stats()
        if (engine.get_num_unfinished_requests() == 0 and stats.get("num_running") == 0
                and stats.get("num_waiting") == 0 and bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.get_stats()}, {engine.get_num_unfinished_requests()} live")


def error_body(exc: openai.APIStatusError) -> dict:
    return exc.response.json()["error"]


# ---------------------------------------------------------------------- basics
def test_models_and_health(client, servers):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert httpx.get(servers["open"] + "/health", timeout=10).status_code == 200


def test_completion_and_its_stream_agree(client, engine):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    choice = full.choices[0]
    assert full.object == "text_completion" and choice.index == 0 and choice.finish_reason == "length"
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + 8
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    wait_idle(engine)


def test_completion_logprobs_shape(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=5, temperature=0.0,
                                    logprobs=2, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs)
    # top 2 (plus the sampled token if it is not among them); keyed by token text, so two
    # tokens that decode alike (partial UTF-8 bytes of this random model) share one key
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # greedy: the sampled token is the most likely one
    assert all(max(top.values()) == pytest.approx(x) for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_completion_batch_of_prompts_and_n(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:2], n=2, max_tokens=4, temperature=1.0,
                                    seed=1)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    token_prompt = client.completions.create(model=MODEL_NAME, prompt=[1, 5, 9, 12], max_tokens=3)
    assert token_prompt.usage.prompt_tokens == 4


def test_logit_bias_and_vllm_extras(client):
    out = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0.0,
                                    logprobs=0, logit_bias={"65": 100},
                                    extra_body={"ignore_eos": True, "top_k": 5, "min_tokens": 2,
                                                "repetition_penalty": 1.0})
    lp = out.choices[0].logprobs
    assert len(set(lp.tokens)) == 1 and out.usage.completion_tokens == 4  # always token 65


def test_beam_search_and_best_of_choices(client):
    beam = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=4, n=2, best_of=3,
                                     temperature=0.0, extra_body={"use_beam_search": True})
    assert [c.index for c in beam.choices] == [0, 1]
    best = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=4, n=1, best_of=3,
                                     temperature=1.0, seed=2)
    assert [c.index for c in best.choices] == [0]
    with pytest.raises(openai.BadRequestError) as info:  # OpenAI: best_of results cannot be streamed
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=4, best_of=3, stream=True)
    assert error_body(info.value)["param"] == "best_of"


def test_stream_usage_and_stop(client):
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=6, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True},
                                            stop=["zzz"], extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_chat_and_its_stream_agree(client, engine):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello"}]
    kw = dict(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0.0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    assert full.object == "chat.completion" and msg.role == "assistant"
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length"
    wait_idle(engine)


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=4, temperature=0.0, logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0].logprob == pytest.approx(tok.logprob)  # greedy
        assert bytes(tok.bytes).decode("utf-8", "replace") == tok.token


def test_default_chat_template_is_documented_and_used(servers):
    from labengine.serve import default_chat_prompt

    from jinja2 import Template

    from labengine.serve import DEFAULT_CHAT_TEMPLATE

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"},
            {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "And Japan?"}]
    expected = "Be brief.\nQuestion: Capital of Italy?\nAnswer: Rome.\nQuestion: And Japan?\nAnswer:"
    assert default_chat_prompt(msgs) == expected
    assert Template(DEFAULT_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True) == expected


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0), ("top_p", 2.0), ("n", 0), ("max_tokens", 0), ("presence_penalty", 3.0),
    ("frequency_penalty", -5.0), ("top_k", 0), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("logprobs", 1000), ("best_of", 1), ("temperature", "hot"), ("stop", [""]), ("min_tokens", -1),
])
def test_bad_completion_parameter_is_400_naming_the_field(client, field, value):
    kw = dict(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4)
    body = {field: value}
    if field == "best_of":  # best_of < n
        body["n"] = 2
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kw, extra_body=body)
    err = error_body(info.value)
    assert info.value.status_code == 400
    assert err["param"] == field and err["type"] == "invalid_request_error" and err["message"]


def test_chat_parameter_errors(client):
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=msgs, top_logprobs=2)
    assert error_body(info.value)["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=msgs, logprobs=True, top_logprobs=1000)
    assert error_body(info.value)["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=msgs, temperature=5.0, top_p=0.0)
    assert error_body(info.value)["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[])
    assert error_body(info.value)["param"] == "messages"


def test_too_long_prompt_is_400_not_a_crash(client, engine):
    long_prompt = " ".join(["token"] * (MAX_MODEL_LEN * 2))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=4)
    err = error_body(info.value)
    assert err["param"] == "prompt" and str(MAX_MODEL_LEN) in err["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": long_prompt}],
                                       stream=True)
    assert error_body(info.value)["param"] == "messages"
    # the server still works
    assert client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices[0].finish_reason
    wait_idle(engine)


def test_malformed_json_is_400(servers):
    r = httpx.post(servers["open"] + "/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(servers["open"] + "/v1/completions", json={"max_tokens": 2}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="Hi", max_tokens=2)
    assert error_body(info.value)["param"] == "model"


def test_api_key(servers):
    url = servers["keyed"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=30).models.list()
    assert httpx.post(url + "/v1/completions", json={"prompt": "Hi"}, timeout=10).status_code == 401
    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
    assert good.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2).choices
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # health and metrics stay open
    assert httpx.get(url + "/metrics", timeout=10).status_code == 200


# ---------------------------------------------------------------------- disconnects, metrics
def test_client_disconnect_aborts_the_request(servers, engine, monkeypatch):
    from labengine.events import RequestFinished

    inner = engine.engine
    real_step = inner.step

    def slow_step():  # make requests outlive the clients below
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(inner, "step", slow_step)
    finished = []
    listener = lambda e: finished.append(e) if isinstance(e, RequestFinished) else None  # noqa: E731
    inner.add_event_listener(listener)
    try:
        body = {"model": MODEL_NAME, "prompt": PROMPTS[3], "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", servers["open"] + "/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then hang up
        wait_idle(engine)
        assert [e.finish_reason for e in finished] == ["abort"]
        # a non-streaming client that gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(servers["open"] + "/v1/completions", timeout=httpx.Timeout(10, read=0.3),
                       json={"model": MODEL_NAME, "prompt": PROMPTS[3], "max_tokens": 100, "ignore_eos": True})
        wait_idle(engine)
        assert [e.finish_reason for e in finished] == ["abort", "abort"]
        assert all(e.output_len < 100 for e in finished)
    finally:
        inner.remove_event_listener(listener)


def test_metrics(servers, client):
    client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=3)
    text = httpx.get(servers["open"] + "/metrics", timeout=10).text
    for name in ("labengine:num_requests_running", "labengine:num_requests_waiting",
                 "labengine:kv_cache_usage_perc", "labengine:time_to_first_token_seconds_bucket",
                 "labengine:e2e_request_latency_seconds_count"):
        assert name in text, name
    count = [ln for ln in text.splitlines() if ln.startswith("labengine:e2e_request_latency_seconds_count")]
    assert float(count[0].split()[-1]) >= 1


# ---------------------------------------------------------------------- load
def test_200_concurrent_streams_complete_and_correct(servers, engine):
    url = servers["open"] + "/v1"

    async def main():
        aclient = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        expected = {}
        for p in PROMPTS:
            out = await aclient.completions.create(model=MODEL_NAME, prompt=p, max_tokens=8, temperature=0.0,
                                                   extra_body={"ignore_eos": True})
            expected[p] = out.choices[0].text

        async def one(i):
            prompt = PROMPTS[i % len(PROMPTS)]
            stream = await aclient.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=8,
                                                      temperature=0.0, stream=True,
                                                      extra_body={"ignore_eos": True})
            text, finish = "", None
            async for chunk in stream:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            return prompt, text, finish

        results = await asyncio.gather(*(one(i) for i in range(200)))
        await aclient.close()
        return expected, results

    expected, results = asyncio.run(asyncio.wait_for(main(), 180))
    assert len(results) == 200
    for prompt, text, finish in results:
        assert finish == "length"
        assert text == expected[prompt]
    wait_idle(engine)


def test_cli_parser_defaults():
    ns = make_arg_parser().parse_args(["--model", "m"])
    assert ns.host == "127.0.0.1" and ns.port == 8000 and ns.model == "m"
    ns = make_arg_parser().parse_args(["--model", "m", "--max-model-len", "64", "--api-key", "k", "--port", "9"])
    assert ns.max_model_len == 64 and ns.api_key == "k" and ns.port == 9


def test_dead_engine_gives_503_not_a_hang(engine):
    dead = AsyncLLMEngine(ExplodingEngine(engine.engine), log_requests=False)
    app = build_app(dead, MODEL_NAME)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as http:
            first = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            health = await http.get("/health")
            again = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        return first, health, again

    try:
        first, health, again = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        engine.engine.abort_request([rid for rid in _live_ids(engine.engine)])
    # a generic message naming the request's id; the exception's text stays in the server's log
    message = first.json()["error"]["message"]
    assert first.status_code == 503 and "engine exploded" not in message
    assert first.headers["x-request-id"] in message
    assert health.status_code == 503
    assert again.status_code == 503


def _live_ids(llm_engine):
    s = llm_engine.scheduler
    return [g.request_id for q in (s.waiting, s.running, s.swapped) for g in q]
