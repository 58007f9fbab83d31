"""The server's vLLM 0.5.4 surface beyond plain generation, driven by the official `openai` client.

Structured output (`guided_*`, `response_format`), tools with a named `tool_choice` (and
0.5.4's 400s for the rest), `echo` with `logprobs` and `max_tokens=0`, streaming chat with
`n > 1` through the SDK's `chat.completions.stream()` helper, `stream_options`
(continuous usage), `/tokenize`, `/detokenize`, `/version`, `--return-tokens-as-token-ids`,
`allowed_token_ids` and `logit_bias` clamping. One uvicorn server on 127.0.0.1 over the
embedded model (labengine/tinylab), as learners run it.
"""
from __future__ import annotations

import json
import re
import time

import httpx
import jsonschema
import openai
import pytest

from labengine import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from labengine.serve import build_app, make_arg_parser
from server_helpers import one_torch_thread, serving

MODEL = "labengine/tinylab"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
OTHER = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def engine():
    return AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
        model="tinylab", num_gpu_blocks_override=256, max_num_seqs=32, seed=0, disable_log_requests=True))


@pytest.fixture(scope="module")
def urls(engine):
    with serving({"plain": build_app(engine, MODEL),
                  "token_ids": build_app(engine, MODEL, return_tokens_as_token_ids=True)}) as urls:
        yield urls


@pytest.fixture(scope="module")
def client(urls):
    return openai.OpenAI(base_url=urls["plain"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def error_of(info) -> dict:
    assert info.value.status_code == 400
    return info.value.response.json()["error"]


def all_free(engine, timeout=30.0) -> bool:
    bm = engine.engine.scheduler.block_manager
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks and not bm.block_tables:
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------- structured output
def test_guided_fields_and_response_format(client, engine):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "score": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "score"], "additionalProperties": False}
    out = client.completions.create(model=MODEL, prompt="Is the sky blue? Answer in JSON:", max_tokens=40,
                                    temperature=1.0, seed=1, n=2, extra_body={"guided_json": schema})
    for c in out.choices:
        jsonschema.validate(json.loads(c.text), schema)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a colour"}],
                                          max_tokens=10, extra_body={"guided_choice": ["red", "green", "blue"]})
    assert chat.choices[0].message.content in ("red", "green", "blue")
    out = client.completions.create(model=MODEL, prompt="The year is", max_tokens=8, temperature=0.0,
                                    extra_body={"guided_regex": r"[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{4}", out.choices[0].text)
    obj = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe Paris"}],
                                         max_tokens=60, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut at max_tokens: still the start of a JSON object
        assert obj.choices[0].message.content.lstrip().startswith("{")
    js = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Is Paris in France?"}], max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}})
    jsonschema.validate(json.loads(js.choices[0].message.content), schema)
    # a batch of prompts: each prompt's request follows the schema on its own
    batch = client.completions.create(model=MODEL, prompt=["Is it raining?", "Is Rome in Italy?", "Score:"],
                                      max_tokens=40, temperature=1.0, seed=2, extra_body={"guided_json": schema})
    assert len(batch.choices) == 3
    for c in batch.choices:
        jsonschema.validate(json.loads(c.text), schema)
    grammar = client.completions.create(model=MODEL, prompt="Query:", max_tokens=20, temperature=0.0,
                                        extra_body={"guided_grammar": 'start: "SELECT " /[a-z]{1,6}/ " FROM t"'})
    assert re.fullmatch(r"SELECT [a-z]{1,6} FROM t", grammar.choices[0].text)
    assert all_free(engine)


def test_guided_errors_are_400s_naming_the_field(client, engine):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"guided_json": {"type": "object"}, "guided_regex": "a+"})
    err = error_of(info)
    assert err["message"] == ("You can only use one kind of guided decoding ('guided_json', 'guided_regex' or "
                              "'guided_choice').")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_regex": "(unclosed"})
    assert error_of(info)["param"] == "guided_regex"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"guided_json": {"type": "nonsense-type"}})
    assert error_of(info)["param"] == "guided_json"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4,
                                  extra_body={"guided_choice": ["a"], "guided_decoding_backend": "outlines"})
    assert "outlines" in error_of(info)["message"]
    assert all_free(engine)


@pytest.mark.parametrize("body,param", [
    ({"guided_json": {"type": "object"}, "guided_regex": "a+"}, "guided_regex"),   # the second kind given
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: ((("}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a+", "guided_whitespace_pattern": 5}, "guided_whitespace_pattern"),
    ({"guided_choice": ["a"], "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
])
def test_every_guided_and_processor_error_names_its_field(client, engine, body, param):
    # the field comes from the error itself (SamplingParamsValueError.param), not from its text
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body=body)
    assert error_of(info)["param"] == param, error_of(info)
    assert all_free(engine)


# ---------------------------------------------------------------------- tools
def test_named_tool_choice_returns_a_tool_call_matching_the_schema(client, engine):
    schema = WEATHER["function"]["parameters"]
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[OTHER, WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60, temperature=0.0)
    msg = out.choices[0].message
    assert msg.content == "" and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("chatcmpl-tool-")
    jsonschema.validate(json.loads(call.function.arguments), schema)
    # the same call streamed: one tool call whose arguments concatenate to valid JSON
    with client.chat.completions.stream(
            model=MODEL, messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60, temperature=0.0) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)
    assert all_free(engine)


@pytest.mark.parametrize("body, message", [
    ({"tools": [WEATHER], "tool_choice": "auto"}, "Currently only named tools are supported."),
    ({"tools": [WEATHER], "tool_choice": "required"}, "Currently only named tools are supported."),
    ({"tools": [WEATHER], "tool_choice": None}, "Currently only named tools are supported."),
    ({"tool_choice": "auto"}, "Currently only named tools are supported."),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "When using `tool_choice`, `tools` must be set."),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "Tool 'nope' has not been passed in `tools`."),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
      "guided_regex": "a+"}, "You can only either use guided decoding or tools, not both."),
])
def test_tool_choice_errors_have_vllm_messages(urls, engine, body, message):
    r = httpx.post(urls["plain"] + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == message and r.json()["error"]["param"] == "tool_choice"
    assert all_free(engine)


def test_tools_with_tool_choice_none_are_plain_chat(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
                                         tools=[WEATHER], tool_choice="none", max_tokens=4, temperature=0.0)
    assert out.choices[0].message.tool_calls in (None, []) and out.choices[0].message.content


# ---------------------------------------------------------------------- echo + logprobs
def test_echo_with_logprobs_returns_the_prompt_logprobs(client, engine):
    prompt = "The capital of France is"
    n_prompt = len(engine.engine.tokenizer.encode(prompt))
    out = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=3,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    c = out.choices[0]
    lp = c.logprobs
    assert c.text.startswith(prompt)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs[1:])
    # the first token is written as the tokenizer decodes it alone (BOS: "<s>"), as vLLM 0.5.4 does
    first = engine.engine.tokenizer.decode(engine.engine.tokenizer.encode(prompt)[:1])
    assert "".join(lp.tokens) == (c.text if first == "" or c.text.startswith(first) else first + c.text)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(len(lp.tokens))]
    # the prompt's logprobs are the model's: the offline engine's prompt_logprobs
    from labengine import LLM

    ids = engine.engine.tokenizer.encode(prompt)
    ref = LLM("tinylab", num_gpu_blocks_override=64).generate(
        prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1), use_tqdm=False)[0].prompt_logprobs
    assert ref[0] is None
    assert lp.token_logprobs[1:n_prompt] == pytest.approx([ref[k][ids[k]].logprob for k in range(1, n_prompt)],
                                                          abs=1e-4)
    # echo with max_tokens=0: the prompt alone, with its logprobs
    only = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=0,
                                     temperature=0.0)
    c0 = only.choices[0]
    assert c0.text == prompt and len(c0.logprobs.tokens) == n_prompt
    assert c0.logprobs.token_logprobs[0] is None
    assert c0.logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n_prompt], abs=1e-4)
    assert only.usage.prompt_tokens == n_prompt
    # token-id prompts echo their decoded text; streaming echoes the same
    tok = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    assert tok.choices[0].logprobs.token_logprobs[1:] == pytest.approx(c0.logprobs.token_logprobs[1:], abs=1e-4)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=3,
                                            temperature=0.0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    streamed = [x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    chunks0 = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks0) == prompt
    assert all_free(engine)


def test_max_tokens_zero_without_echo_is_still_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    assert error_of(info)["param"] == "max_tokens"


# ---------------------------------------------------------------------- streaming chat, n > 1
def test_streaming_chat_n_gt_1_with_the_sdk_stream_helper(client, urls, engine):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me about Paris"}], n=3, max_tokens=12,
              temperature=1.0, seed=4)
    done = []
    with client.chat.completions.stream(**kw) as stream:
        for event in stream:
            if event.type == "content.done":
                done.append(event)
        # the helper's accumulated completion (get_final_completion() refuses a "length" finish)
        final = stream.current_completion_snapshot
    assert [c.index for c in final.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in final.choices)
    assert len(done) == 3  # one content.done per choice: each finish_reason arrived once
    # the raw stream: the role chunks first, in index order; each finish_reason once
    with httpx.stream("POST", urls["plain"] + "/v1/chat/completions", json={**kw, "stream": True},
                      timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [ch for e in events for ch in e["choices"]]
    assert [c["index"] for c in choices[:3]] == [0, 1, 2]
    assert all(c["delta"].get("role") == "assistant" for c in choices[:3])
    assert not any(c["delta"].get("role") for c in choices[3:])
    finishes = [c["index"] for c in choices if c["finish_reason"] is not None]
    assert sorted(finishes) == [0, 1, 2]
    texts = {i: "".join(c["delta"].get("content") or "" for c in choices if c["index"] == i) for i in range(3)}
    # seeded: the stream carries the same completions as the helper's final message
    assert [texts[i] for i in range(3)] == [c.message.content for c in final.choices]
    # and without streaming, choice i is the same completion
    full = client.chat.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert [c.message.content for c in full.choices] == [texts[i] for i in range(3)]
    assert all_free(engine)


# ---------------------------------------------------------------------- stream_options
def test_continuous_usage_stats(client):
    base = dict(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0.0, stream=True,
                extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(**base, stream_options={"include_usage": True,
                                                                    "continuous_usage_stats": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert all(c.usage is not None for c in text_chunks)
    assert [c.usage.completion_tokens for c in text_chunks] == sorted(c.usage.completion_tokens for c in text_chunks)
    assert text_chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    off = list(client.completions.create(**base, stream_options={"include_usage": True,
                                                                 "continuous_usage_stats": False}))
    assert all(c.usage is None for c in off if c.choices) and off[-1].usage.total_tokens > 5
    chat = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    assert chat[0].usage.completion_tokens == 0 and chat[0].usage.prompt_tokens > 0
    assert chat[-1].choices == [] and chat[-1].usage.completion_tokens == 4
    none = list(client.completions.create(**base))
    assert all(c.usage is None for c in none)
    with pytest.raises(openai.BadRequestError) as info:  # vLLM 0.5.4: stream_options needs stream
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, stream_options={"include_usage": True})
    assert error_of(info)["message"] == "Stream options can only be defined when stream is True."


# ---------------------------------------------------------------------- tokenizer endpoints
def test_tokenize_detokenize_version(urls, engine):
    tok = engine.engine.tokenizer
    base = urls["plain"]
    r = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": "Hello world"}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == tok.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == engine.engine.model_config.max_model_len
    r = httpx.post(base + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}, timeout=30)
    assert r.json()["tokens"] == tok.encode("Hello world", add_special_tokens=False)
    chat = httpx.post(base + "/tokenize", json={"messages": [{"role": "user", "content": "Capital of France?"}]},
                      timeout=30).json()
    assert tok.decode(chat["tokens"]) == "Question: Capital of France?\nAnswer:"
    d = httpx.post(base + "/detokenize", json={"model": MODEL, "tokens": body["tokens"]}, timeout=30)
    assert d.status_code == 200 and d.json()["prompt"] == tok.decode(body["tokens"])
    bad = httpx.post(base + "/detokenize", json={"tokens": [len(tok) + 5]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    wrong = httpx.post(base + "/tokenize", json={"model": "other", "prompt": "x"}, timeout=30)
    assert wrong.status_code == 404
    import labengine

    assert httpx.get(base + "/version", timeout=30).json() == {"version": labengine.__version__}


def test_return_tokens_as_token_ids(urls):
    c = openai.OpenAI(base_url=urls["token_ids"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = c.completions.create(model=MODEL, prompt="Hello", max_tokens=3, logprobs=2, temperature=0.0,
                               extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert all(re.fullmatch(r"token_id:\d+", t) for t in lp.tokens)
    assert all(re.fullmatch(r"token_id:\d+", k) for top in lp.top_logprobs for k in top)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                     logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert all(t.token.startswith("token_id:") for t in chat.choices[0].logprobs.content)
    assert make_arg_parser().parse_args(["--return-tokens-as-token-ids"]).return_tokens_as_token_ids


# ---------------------------------------------------------------------- allowed_token_ids, logit_bias
def test_allowed_token_ids_are_honoured(client, urls, engine):
    tok = engine.engine.tokenizer
    allowed = [tok.encode(w, add_special_tokens=False)[0] for w in (" cat", " dog")]
    as_ids = openai.OpenAI(base_url=urls["token_ids"] + "/v1", api_key="unused", max_retries=0, timeout=120)
    out = as_ids.completions.create(model=MODEL, prompt="My pet is a", max_tokens=6, temperature=1.0, seed=3,
                                    logprobs=0, extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    ids = [int(t.split(":")[1]) for t in out.choices[0].logprobs.tokens]
    assert len(ids) == 6 and set(ids) <= set(allowed)
    for bad, msg in (([], "Empty allowed_token_ids provided"),
                     ([len(tok) + 10], "allowed_token_ids contains out-of-vocab token id")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_body={"allowed_token_ids": bad})
        assert error_of(info)["message"] == msg and error_of(info)["param"] == "allowed_token_ids"
    assert all_free(engine)


def test_logit_bias_is_clamped_not_refused(client, engine):
    tok = engine.engine.tokenizer
    target = tok.encode(" banana", add_special_tokens=False)[0]
    out = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0.0,
                                    logit_bias={str(target): 250}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == tok.decode([target] * 3)  # +100 (clamped) still wins every step
    low = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0.0,
                                    logit_bias={str(target): -1e9}, extra_body={"ignore_eos": True})
    assert target not in tok.encode(low.choices[0].text, add_special_tokens=False)
    from labengine.entrypoints.openai.logits_processors import logit_bias_processor

    assert logit_bias_processor({"3": 250.0, "4": -1e9}, 10).bias == {3: 100.0, 4: -100.0}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, logit_bias={str(len(tok) + 1): 5})
    assert error_of(info)["message"] == f"token_id {len(tok) + 1} in logit_bias contains out-of-vocab token id"
    assert all_free(engine)


def test_guided_decoding_backend_flag():
    from labengine.entrypoints.openai.cli import engine_args_from_cli

    parser = make_arg_parser()
    ns = parser.parse_args(["--model", "tinylab", "--guided-decoding-backend", "llguidance"])
    assert engine_args_from_cli(ns).guided_decoding_backend == "llguidance"
    assert parser.parse_args([]).guided_decoding_backend == "llguidance"
    with pytest.raises(ValueError, match="outlines"):
        engine_args_from_cli(parser.parse_args(["--model", "tinylab", "--guided-decoding-backend", "outlines"]))


def test_response_format_text_is_unconstrained(client):
    plain = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0.0)
    text = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0.0,
                                     extra_body={"response_format": {"type": "text"}})
    assert text.choices[0].text == plain.choices[0].text
