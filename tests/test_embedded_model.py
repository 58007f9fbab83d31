"""The embedded model (labengine/embedded/tinylab): files, tokenizer, and quality on the shipped weights.

Quality tests go through a *backend* (see BACKENDS): Hugging Face transformers (float32, CPU)
and, where `labengine.LLM` imports, the engine itself (LLM(model="tinylab")). Another backend
needs only the two methods `greedy` and `sample`.

Every check is batched; the whole file takes well under two minutes on two CPU cores.
"""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools", "embedded_model")
sys.path.insert(0, TOOLS)

import evaluate as ev  # noqa: E402  (tools/embedded_model/evaluate.py)
from countries import COUNTRIES  # noqa: E402
from labengine.embedded import DEFAULT_MODEL, MODEL_ALIASES, resolve_alias  # noqa: E402

# sha256 of `make_corpus.py --seed 1234 --mb 22` (also in the model card).
CORPUS_SHA256 = "6f2bdc07dab75c82561e106a855536b9a5749d6f13b3aa9d659c7b7ccb7f9dff"


# ----------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------
class TransformersBackend:
    """AutoModelForCausalLM + AutoTokenizer, float32 on the CPU, batched generate."""

    name = "transformers"

    def __init__(self):
        # One thread: for a model this small a second thread gains little, and on a machine
        # whose cores are busy with other work, two threads waiting on each other are many
        # times slower (measured: 0.85 s against 23 s for the same batch).
        torch.set_num_threads(1)
        self.model, self.tok = ev.load(DEFAULT_MODEL)

    def greedy(self, prompts, max_tokens):
        """-> [(text, finish_reason)] with finish_reason 'stop' (EOS) or 'length'."""
        texts, eos = ev.generate(self.model, self.tok, prompts, max_new_tokens=max_tokens)
        return [(t, "stop" if e else "length") for t, e in zip(texts, eos)]

    def sample(self, prompt, n, temperature, max_tokens, seed):
        texts, eos = ev.generate(self.model, self.tok, [prompt], max_new_tokens=max_tokens, do_sample=True,
                                 temperature=temperature, seed=seed, num_return_sequences=n)
        return [(t, "stop" if e else "length") for t, e in zip(texts, eos)]


class LabengineBackend:
    """The engine itself: LLM(model="tinylab"), float32 on the CPU."""

    name = "labengine"

    def __init__(self):
        torch.set_num_threads(1)
        from labengine import LLM
        self.llm = LLM(model="tinylab")

    def _run(self, prompts, params):
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [(c.text, c.finish_reason) for o in outs for c in o.outputs]

    def greedy(self, prompts, max_tokens):
        from labengine import SamplingParams
        return self._run(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))

    def sample(self, prompt, n, temperature, max_tokens, seed):
        from labengine import SamplingParams
        return self._run([prompt], SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed))


BACKENDS = {"transformers": TransformersBackend, "labengine": LabengineBackend}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request):
    return BACKENDS[request.param]()


@pytest.fixture(scope="module")
def lesson_greedy(backend):
    prompts = ev.LESSON_PROMPTS + ev.OTHER_PROMPTS
    return dict(zip(prompts, backend.greedy(prompts, max_tokens=60)))


# ----------------------------------------------------------------------------------------
# Files, config, tokenizer
# ----------------------------------------------------------------------------------------
def test_default_model_is_the_shipped_folder():
    assert os.path.isabs(DEFAULT_MODEL) and os.path.isdir(DEFAULT_MODEL)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "README.md"):
        assert os.path.isfile(os.path.join(DEFAULT_MODEL, name)), name
    for alias in ("tinylab", "labengine/tinylab"):
        assert MODEL_ALIASES[alias] == DEFAULT_MODEL
        assert resolve_alias(alias) == DEFAULT_MODEL
    assert resolve_alias("facebook/opt-125m") == "facebook/opt-125m"
    assert resolve_alias(DEFAULT_MODEL) == DEFAULT_MODEL
    import labengine.embedded
    assert labengine.embedded.DEFAULT_MODEL == DEFAULT_MODEL
    print(f"DEFAULT_MODEL = {DEFAULT_MODEL}")


def test_folder_is_small():
    sizes = {f: os.path.getsize(os.path.join(DEFAULT_MODEL, f)) for f in os.listdir(DEFAULT_MODEL)}
    total = sum(sizes.values())
    assert total <= 20e6, sizes
    assert max(sizes.values()) <= 16 * 2 ** 20, sizes
    print(f"model folder: {total / 1e6:.1f} MB in {len(sizes)} files")


def test_config_is_a_small_llama_with_gqa():
    cfg = json.load(open(os.path.join(DEFAULT_MODEL, "config.json")))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert 4000 <= cfg["vocab_size"] <= 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)
    from safetensors import safe_open
    with safe_open(os.path.join(DEFAULT_MODEL, "model.safetensors"), "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert 2e6 <= n <= 12e6, n
    print(f"{n / 1e6:.2f}M parameters, {cfg['num_attention_heads']} query / {cfg['num_key_value_heads']} KV heads")


def test_tokenizer_adds_bos_not_eos():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    ids = tok("Hello, my name is").input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    text = "Once upon a time, \"Zoë\" said: 42 + 1!\n\nThe end."
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text  # byte-level: lossless
    assert len(tok) == json.load(open(os.path.join(DEFAULT_MODEL, "config.json")))["vocab_size"]


def test_corpus_is_reproducible(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(TOOLS, "make_corpus.py"), "--out", str(tmp_path),
                          "--seed", "1234", "--mb", "22"], capture_output=True, text=True, check=True).stdout
    print(out.strip())
    size = sum(os.path.getsize(tmp_path / f) for f in ("train.jsonl", "val.jsonl"))
    assert size >= 20e6
    assert (tmp_path / "corpus.sha256").read_text().strip() == CORPUS_SHA256


# ----------------------------------------------------------------------------------------
# Quality on the shipped weights
# ----------------------------------------------------------------------------------------
def _readable(text):
    words = re.findall(r"[A-Za-z']+", text)
    if len(words) < 4:
        return False
    odd = sum(1 for ch in text if not (ch.isalnum() or ch.isspace() or ch in ".,;:!?'\"()-"))
    if odd > 0.05 * len(text):
        return False
    # no degenerate loops: no word 4-gram more than twice
    grams = [" ".join(words[i:i + 4]) for i in range(len(words) - 3)]
    return all(grams.count(g) <= 2 for g in set(grams))


@pytest.mark.parametrize("prompt", ev.LESSON_PROMPTS)
def test_lesson_prompt_greedy_is_readable_and_on_topic(lesson_greedy, prompt):
    text, _ = lesson_greedy[prompt]
    print(f"{prompt!r} -> {text!r}")
    assert _readable(text), text
    assert any(w in text for w in ev.ON_TOPIC[prompt]), text
    if prompt.startswith("The capital of France"):
        assert text.strip().startswith("Paris")


def test_other_lesson_prompts_are_readable(lesson_greedy):
    for p in ev.OTHER_PROMPTS:
        text, _ = lesson_greedy[p]
        print(f"{p!r} -> {text!r}")
        assert len(re.findall(r"[A-Za-z]+", text)) >= 3, (p, text)


@pytest.mark.parametrize("form", ["statement", "question"])
def test_capitals_of_all_countries(backend, form):
    prompts = ev.capital_prompts(form)
    outs = backend.greedy(prompts, max_tokens=12)
    wrong = [(c[0], c[1], t) for c, (t, _) in zip(COUNTRIES, outs) if not ev.capital_correct(t, c)]
    acc = 1 - len(wrong) / len(COUNTRIES)
    print(f"{form}: {acc:.1%} of {len(COUNTRIES)} countries; wrong: {wrong}")
    assert acc >= 0.90, wrong


def test_stories_end_with_eos(backend):
    outs = backend.sample("Once upon a time", n=20, temperature=0.8, max_tokens=200, seed=0)
    stopped = sum(r == "stop" for _, r in outs)
    print(f"{stopped}/20 stories stopped on EOS; e.g. {outs[0][0]!r}")
    assert stopped >= 14
    assert all(_readable(t) for t, _ in outs)


def test_sampling_is_varied(backend, lesson_greedy):
    prompt = "The best way to learn programming is"
    outs = [t for t, _ in backend.sample(prompt, n=5, temperature=0.8, max_tokens=50, seed=1)]
    # The model is confident (held-out perplexity 1.5), so two samples of 50 tokens sometimes
    # coincide: measured 2026-11-28 on the engine, 7 of 300 pairs of n=5 children and 7 of 300
    # pairs of independent requests were identical (the same rate: the children's randomness is
    # independent). So n=5 gives at least 4 distinct completions, nearly always 5.
    assert len(set(outs)) >= 4, outs  # n=5 completions differ
    hot = [t for t, _ in backend.sample("Once upon a time", n=3, temperature=1.0, max_tokens=50, seed=2)]
    greedy = backend.greedy(["Once upon a time"], max_tokens=50)[0][0]
    assert all(t != greedy for t in hot)


def test_heldout_perplexity():
    """Perplexity on the first held-out documents of the seed-1234 corpus (regenerated, no files needed)."""
    import make_corpus
    docs = [d for i, d in make_corpus.generate(1234, 3_000_000) if i % 100 == 37][:60]
    model, tok = ev.load(DEFAULT_MODEL, threads=1)
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("\n".join(json.dumps(d) for d in docs) + "\n")
    try:
        ppl, nll, n = ev.heldout_perplexity(model, tok, f.name)
    finally:
        os.unlink(f.name)
    print(f"held-out perplexity {ppl:.3f} over {n} tokens ({len(docs)} documents)")
    assert ppl < 2.0


def test_loads_and_generates_fast_on_cpu():
    """Load under 2 s, 50 greedy tokens under 1 s (one thread, best of 3).

    The machine is shared, so each time counts as the smaller of wall time and the
    process's CPU time (what an idle core would take).
    """
    t = ev.timings(DEFAULT_MODEL, n_tokens=50, repeats=3)
    print({k: round(v, 3) for k, v in t.items()})
    assert min(t["load_wall_s"], t["load_cpu_s"]) < 2.0
    assert min(t["gen_wall_s"], t["gen_cpu_s"]) < 1.0
