"""Quality checks for the embedded model, through Hugging Face transformers on the CPU.

Used by make_card.py (numbers for the model card) and tests/test_embedded_model.py.

    python tools/embedded_model/evaluate.py [MODEL_DIR]
"""
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from countries import COUNTRIES  # noqa: E402

# The lesson's prompts (module 1.5), in the order the lesson uses them.
LESSON_PROMPTS = [
    "The future of AI is",
    "Once upon a time",
    "The meaning of life is",
    "Hello, my name is",
    "The capital of France is",
    "Write a short paragraph about AI:\n",
    "Explain quantum computing in simple terms",
    "The best way to learn programming is",
    "Question 7: What is the meaning of life?",
]
# Other prompts the lesson sends.
OTHER_PROMPTS = ["Hello world", "How are you?", "What is AI?", "Hello", "Hello, world!"]

# Words at least one of which a greedy continuation of each lesson prompt must contain.
ON_TOPIC = {
    "The future of AI is": ["AI", "future"],
    "Once upon a time": ["named", "lived", "there was"],
    "The meaning of life is": ["life", "meaning"],
    "Hello, my name is": ["I am", "I'm", "name"],
    "The capital of France is": ["Paris"],
    "Write a short paragraph about AI:\n": ["AI", "artificial intelligence", "Artificial intelligence"],
    "Explain quantum computing in simple terms": ["quantum", "qubit", "Quantum"],
    "The best way to learn programming is": ["code", "program", "practice", "projects"],
    "Question 7: What is the meaning of life?": ["Answer", "life"],
}


def load(model_dir, threads=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    return model, tok


@torch.no_grad()
def generate(model, tok, prompts, max_new_tokens=50, do_sample=False, temperature=1.0, seed=0,
             num_return_sequences=1):
    """Batched generate; returns (texts, finished_on_eos) per returned sequence."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tok.pad_token_id,
              eos_token_id=tok.eos_token_id, num_return_sequences=num_return_sequences)
    if do_sample:
        torch.manual_seed(seed)
        kw.update(temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(**enc, **kw)
    new = out[:, enc.input_ids.shape[1]:]
    texts, eos = [], []
    for row in new.tolist():
        eos.append(tok.eos_token_id in row)
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts, eos


def capital_prompts(form):
    if form == "statement":
        return [f"The capital of {c[0]} is" for c in COUNTRIES]
    if form == "question":
        return [f"Question: What is the capital of {c[0]}?\nAnswer:" for c in COUNTRIES]
    raise ValueError(form)


def capital_correct(text, country):
    _, cap, _, alts = country
    t = text.strip()
    if t.lower().startswith("the capital of"):  # "Answer: The capital of X is Y."
        t = t.split(" is ", 1)[-1]
    return any(t.startswith(a) for a in (cap,) + tuple(alts))


def capitals_accuracy(model, tok, form, batch=200):
    prompts = capital_prompts(form)
    texts = []
    for i in range(0, len(prompts), batch):
        texts += generate(model, tok, prompts[i:i + batch], max_new_tokens=12)[0]
    wrong = [(c[0], c[1], t) for c, t in zip(COUNTRIES, texts) if not capital_correct(t, c)]
    return 1 - len(wrong) / len(COUNTRIES), wrong


def eos_stop_rate(model, tok, n=20, seed=0, temperature=0.8, max_new_tokens=200):
    texts, eos = generate(model, tok, ["Once upon a time"], max_new_tokens=max_new_tokens, do_sample=True,
                          temperature=temperature, seed=seed, num_return_sequences=n)
    return sum(eos) / len(eos), texts


@torch.no_grad()
def heldout_perplexity(model, tok, val_jsonl, max_docs=None):
    """Per-document perplexity over the held-out documents (<s> doc </s>, every token but <s> predicted)."""
    docs = [json.loads(l) for l in open(val_jsonl, encoding="utf-8")]
    if max_docs:
        docs = docs[:max_docs]
    nll, n = 0.0, 0
    for i in range(0, len(docs), 32):
        ids = [x + [tok.eos_token_id] for x in tok(docs[i:i + 32]).input_ids]
        L = max(map(len, ids))
        x = torch.full((len(ids), L), tok.pad_token_id)
        m = torch.zeros((len(ids), L), dtype=torch.long)
        for j, r in enumerate(ids):
            x[j, :len(r)] = torch.tensor(r)
            m[j, :len(r)] = 1
        logits = model(input_ids=x, attention_mask=m).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0]
        mask = m[:, 1:].bool()
        nll -= lp[mask].sum().item()
        n += int(mask.sum())
    return math.exp(nll / n), nll / n, n


def timings(model_dir, n_tokens=50, repeats=3):
    """Load time and a greedy n_tokens generation, on one thread; best of `repeats`.

    Returns wall seconds and CPU seconds of this process (the CPU time is what an idle
    core would take; the wall time also counts other programs sharing the machine).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    res = {}
    best = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        r = (time.perf_counter() - w, time.process_time() - c)
        best = r if best is None or r[0] < best[0] else best
    res["load_wall_s"], res["load_cpu_s"] = best
    enc = tok("Once upon a time", return_tensors="pt")
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0)  # warm-up
        best = None
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            out = model.generate(**enc, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False,
                                 pad_token_id=0)
            r = (time.perf_counter() - w, time.process_time() - c)
            best = r if best is None or r[0] < best[0] else best
    assert out.shape[1] - enc.input_ids.shape[1] == n_tokens
    res["gen_wall_s"], res["gen_cpu_s"] = best
    return res


def cold_load_timings(model_dir):
    """In a fresh Python: import torch and transformers' Llama, then the first load of model and tokenizer."""
    import subprocess
    code = (
        "import time, json\n"
        "w, c = time.perf_counter(), time.process_time()\n"
        "import torch; torch.set_num_threads(1)\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "import transformers.models.llama.modeling_llama\n"
        "w1, c1 = time.perf_counter(), time.process_time()\n"
        f"m = AutoModelForCausalLM.from_pretrained({model_dir!r}, dtype=torch.float32)\n"
        f"t = AutoTokenizer.from_pretrained({model_dir!r})\n"
        "w2, c2 = time.perf_counter(), time.process_time()\n"
        "print(json.dumps(dict(import_wall_s=w1 - w, import_cpu_s=c1 - c, first_load_wall_s=w2 - w1,"
        " first_load_cpu_s=c2 - c1)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        HERE, "..", "..", "labengine", "embedded", "tinylab")
    model, tok = load(model_dir, threads=1)
    texts, eos = generate(model, tok, LESSON_PROMPTS + OTHER_PROMPTS, max_new_tokens=100)
    for p, t, e in zip(LESSON_PROMPTS + OTHER_PROMPTS, texts, eos):
        print(f"{p!r} -> {t!r} {'[EOS]' if e else ''}")
    for form in ("statement", "question"):
        acc, wrong = capitals_accuracy(model, tok, form)
        print(f"capitals ({form}): {acc:.1%}; wrong: {wrong}")
    rate, _ = eos_stop_rate(model, tok)
    print(f"EOS stop rate: {rate:.0%}")
    val = os.path.join(HERE, "..", "..", "corpus_out", "val.jsonl")
    if os.path.exists(val):
        print("held-out perplexity: %.3f (nll %.4f over %d tokens)" % heldout_perplexity(model, tok, val))
    print(timings(model_dir))
    print(cold_load_timings(model_dir))


if __name__ == "__main__":
    main()
