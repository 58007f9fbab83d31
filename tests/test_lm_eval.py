"""lm-evaluation-harness's `local-completions` model against our server (loopback, embedded model).

lm-eval scores loglikelihood and multiple-choice tasks by sending context + continuation
token ids with `echo=True, logprobs=1, max_tokens=1` and summing the echoed prompt's
`token_logprobs` over the continuation; generate-until tasks are plain completions with
stop strings. Two small local tasks (tests/data/lm_eval/: the same JSON-lines file of
capitals, one multiple-choice, one generate-until) run offline, the tokenizer read from the
model's folder. The embedded model knows these capitals, so sane results are high accuracy;
the loglikelihoods lm-eval computed are checked against the engine's own prompt logprobs.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from labengine import LLM, AsyncEngineArgs, AsyncLLMEngine, SamplingParams
from labengine.embedded import DEFAULT_MODEL
from labengine.serve import build_app
from server_helpers import one_torch_thread, serving

DATA = Path(__file__).parent / "data" / "lm_eval"
MODEL = "labengine/tinylab"


@pytest.fixture(scope="module")
def server_url():
    with one_torch_thread():
        engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(
            model="tinylab", num_gpu_blocks_override=256, seed=0, disable_log_requests=True))
        with serving({"server": build_app(engine, MODEL)}) as urls:
            yield urls["server"]


@pytest.fixture()
def task_dir(tmp_path, monkeypatch):
    """The task YAMLs with the data file's absolute path (lm-eval reads data_files from the cwd)."""
    for name in ("capitals_mc.yaml", "capitals_gen.yaml"):
        text = (DATA / name).read_text().replace("capitals.jsonl", str(DATA / "capitals.jsonl"))
        (tmp_path / name).write_text(text)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    return tmp_path


def run_lm_eval(url, task_dir, tasks, **extra):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model="local-completions",
        model_args=dict(model=MODEL, base_url=url + "/v1/completions", tokenizer=DEFAULT_MODEL,
                        tokenizer_backend="huggingface", tokenized_requests=True, add_bos_token=True,
                        num_concurrent=1, max_retries=1,
                        batch_size=4, max_length=1024, timeout=120),
        tasks=tasks, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, **extra)


def test_lm_eval_multiple_choice_and_generate_until(server_url, task_dir):
    results = run_lm_eval(server_url, task_dir, ["labengine_capitals_mc", "labengine_capitals_gen"])
    mc = results["results"]["labengine_capitals_mc"]
    gen = results["results"]["labengine_capitals_gen"]
    n_docs = len((DATA / "capitals.jsonl").read_text().splitlines())
    assert len(results["samples"]["labengine_capitals_mc"]) == n_docs
    assert len(results["samples"]["labengine_capitals_gen"]) == n_docs
    # sane, not perfect: four choices give 0.25 by chance; the model was trained on capitals
    print(f"lm-eval: capitals_mc acc={mc['acc,none']:.3f}, capitals_gen exact_match={gen['exact_match,none']:.3f}")
    assert mc["acc,none"] >= 0.75, mc
    assert gen["exact_match,none"] >= 0.75, gen
    # lm-eval's loglikelihoods are the engine's: recompute one document's scores offline
    sample = results["samples"]["labengine_capitals_mc"][0]
    doc = sample["doc"]
    context = f"Question: What is the capital of {doc['country']}?\nAnswer:"
    llm = LLM("tinylab", num_gpu_blocks_override=64)
    tok = llm.get_tokenizer()
    ctx_ids = tok.encode(context)  # add_bos_token=True: as the model was trained, <s> first
    expected = []
    for choice in doc["choices"]:
        cont_ids = tok.encode(context + " " + choice)[len(ctx_ids):]
        ids = ctx_ids + cont_ids
        out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                           use_tqdm=False)[0]
        expected.append(sum(out.prompt_logprobs[k][ids[k]].logprob for k in range(len(ctx_ids), len(ids))))
    got = [float(resp[0][0]) if isinstance(resp[0], (list, tuple)) else float(resp[0])
           for resp in sample["resps"]]
    assert got == pytest.approx(expected, abs=1e-3)
