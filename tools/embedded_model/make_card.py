"""Write the model card (README.md) and loss curve (loss_curve.png) of the embedded model.

    python tools/embedded_model/make_card.py [--model labengine/embedded/tinylab] [--date 2026-11-28]

Every number in the card is measured here, on the shipped weights, through Hugging Face
transformers on the CPU (float32, one thread); the training numbers come from
loss_log.csv in the model folder and TRAINING below (what the training run printed).
"""
import argparse
import csv
import datetime
import json
import math
import os
import platform
import sys
from collections import Counter

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import evaluate as ev  # noqa: E402
import make_corpus  # noqa: E402
from countries import COUNTRIES  # noqa: E402

SEED, MB = 1234, 22.0

# The run that produced the shipped weights (tools/embedded_model/train_log_2026-11-28.txt).
TRAINING = dict(
    command=("python3 tools/embedded_model/train.py --data corpus_out --out $OUT/tinylab --save-fp32 $OUT/fp32 "
             "--device cuda --minutes 5.0 --batch-size 64 --seq-len 1024 --eval-every 200"),
    hardware="one NVIDIA H200 (torch 2.11.0+cu130, transformers 5.17.0, bf16 autocast)",
    minutes=5.0, steps=5526, best_step=1000, best_seconds=56.9, batch_tokens=64 * 1024, device_s=362,
)


def corpus_stats():
    kinds, nbytes = Counter(), Counter()
    n = 0
    for i, doc, kind in make_corpus.generate(SEED, int(MB * 1e6), kinds=True):
        kinds[kind] += 1
        nbytes[kind] += len(doc.encode("utf-8"))
        n += 1
    return n, kinds, nbytes


KIND_TEXT = {
    "story": "children's stories (\"Once upon a time, ...\": two characters, a place, one of 16 plots, feelings, an ending)",
    "doc_capital_short": "\"The capital of X is Y.\" with a second fact or capital",
    "doc_capital_question": "\"Question: What is the capital of X?\\nAnswer: Y.\" and other question forms",
    "doc_capital_list": "capitals of one continent, as a list or as sentences",
    "doc_country_profile": "\"X is a country in C. The capital of X is Y. ...\"",
    "doc_science_paragraph": "simple science and geography facts",
    "doc_science_qa": "science and geography questions with answers",
    "doc_write_paragraph": "\"Write a short paragraph about T:\\n...\" (AI, programming, the Moon, music, ...)",
    "doc_explain": "\"Explain T in simple terms...\" (quantum computing most often)",
    "doc_topic_plain": "short paragraphs on a topic",
    "doc_future_ai": "\"The future of AI is ...\"",
    "doc_learn_programming": "\"The best way to learn programming is ...\"",
    "doc_meaning": "\"The meaning of life is ...\" as 17 thinkers put it",
    "doc_numbered_questions": "\"Question 7: ...\\nAnswer: ...\" (meaning of life, capitals, science, AI)",
    "doc_plain_question": "questions with answers (\"What is AI?\" ...)",
    "doc_introduction": "self-introductions (\"Hello, my name is ...\")",
    "doc_greeting": "greetings and tiny dialogues (\"Hello world\", \"How are you?\")",
}


def plot_loss(log_path, png_path, best_step):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(log_path)))
    st = [int(r["step"]) for r in rows]
    tr = [float(r["train_loss"]) for r in rows]
    va = [float(r["val_loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.plot(st[1:], tr[1:], label="train (mean of the interval)")
    ax.plot(st[1:], va[1:], label="held-out (1% of documents)")
    ax.axvline(best_step, color="gray", ls="--", lw=1)
    ax.annotate("shipped checkpoint", (best_step, max(va[1:]) * 0.9), xytext=(6, 0), textcoords="offset points",
                fontsize=8, color="gray")
    ax.set_yscale("log")
    ax.set_xlabel("step (64 x 1024 tokens)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tinylab training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=os.path.join(ROOT, "labengine", "embedded", "tinylab"))
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    args = ap.parse_args()
    md = args.model
    torch.set_num_threads(1)

    cfg = json.load(open(os.path.join(md, "config.json")))
    model, tok = ev.load(md, threads=1)
    n_params = sum(p.numel() for p in model.parameters())
    files = {f: os.path.getsize(os.path.join(md, f)) for f in sorted(os.listdir(md)) if f != "README.md"}
    rows = plot_loss(os.path.join(md, "loss_log.csv"), os.path.join(md, "loss_curve.png"), TRAINING["best_step"])
    files["loss_curve.png"] = os.path.getsize(os.path.join(md, "loss_curve.png"))
    best = min(rows[1:], key=lambda r: float(r["val_loss"]))
    last = rows[-1]

    print("corpus ...", flush=True)
    n_docs, kinds, kbytes = corpus_stats()
    total_bytes = sum(kbytes.values())
    print("greedy ...", flush=True)
    prompts = ev.LESSON_PROMPTS + ev.OTHER_PROMPTS
    greedy, geos = ev.generate(model, tok, prompts, max_new_tokens=100)
    print("capitals ...", flush=True)
    acc_s, wrong_s = ev.capitals_accuracy(model, tok, "statement")
    acc_q, wrong_q = ev.capitals_accuracy(model, tok, "question")
    print("stories ...", flush=True)
    eos_rate, stories = ev.eos_stop_rate(model, tok, n=50, seed=0)
    samples, _ = ev.generate(model, tok, ["The best way to learn programming is"], max_new_tokens=50, do_sample=True,
                             temperature=0.8, seed=1, num_return_sequences=5)
    print("perplexity ...", flush=True)
    val_docs = [d for i, d in make_corpus.generate(SEED, int(MB * 1e6)) if i % 100 == 37]
    tmp = os.path.join("/tmp", "tinylab_val.jsonl")
    with open(tmp, "w") as f:
        f.write("\n".join(json.dumps(d) for d in val_docs) + "\n")
    ppl, nll, ntok = ev.heldout_perplexity(model, tok, tmp)
    print("timings ...", flush=True)
    tm = ev.timings(md, n_tokens=50, repeats=5)
    cold = ev.cold_load_timings(md)
    load_avg = os.getloadavg()[0]

    W = []
    w = W.append
    w("---\nlicense: mit\nlanguage: en\nlibrary_name: transformers\npipeline_tag: text-generation\n"
      "tags: [llama, gqa, tiny, offline, teaching]\n---\n")
    w("# tinylab: the embedded model of labengine\n")
    w(f"A {n_params / 1e6:.2f}M-parameter Llama-family language model with grouped-query attention, trained "
      "from scratch on a corpus that this repository generates from its own code and word lists. "
      "It ships inside the package so that every notebook of the lab runs offline, on a CPU, "
      "and answers the prompts of lesson 1.5 (basic inference API) with short, readable English. "
      "It knows only what its corpus says: stories, capitals, simple science, and a few explanations.\n")
    w(f"Card written {args.date} by `tools/embedded_model/make_card.py`; every number below is measured "
      "on the shipped weights (transformers, float32, CPU, one thread) unless it says otherwise.\n")
    w("## Use\n")
    w("```python\nimport labengine\nfrom labengine import LLM, SamplingParams\n\n"
      "llm = LLM(model=labengine.DEFAULT_MODEL)          # or LLM(model=\"tinylab\")\n"
      "out = llm.generate([\"Once upon a time\"], SamplingParams(temperature=0.8, max_tokens=200))\n```\n")
    w("The folder is a plain Hugging Face model:\n")
    w("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
      "from labengine.embedded import DEFAULT_MODEL      # absolute path of this folder\n\n"
      "model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=\"float32\")\n"
      "tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)\n```\n")
    w("`labengine.embedded.MODEL_ALIASES` maps the short names `tinylab` and `labengine/tinylab` to this folder; "
      "`resolve_alias(name)` does the lookup.\n")

    w("## Architecture\n")
    w("| | |\n|---|---|")
    w(f"| family | Llama (`LlamaForCausalLM`) |")
    w(f"| parameters | {n_params:,} ({n_params / 1e6:.2f}M; embeddings tied to the output layer) |")
    w(f"| layers | {cfg['num_hidden_layers']} |")
    w(f"| hidden size | {cfg['hidden_size']} |")
    w(f"| attention | grouped-query: {cfg['num_attention_heads']} query heads, {cfg['num_key_value_heads']} key/value "
      f"heads (4 query heads share each KV head), head size {cfg['head_dim']} |")
    w(f"| MLP | SwiGLU, intermediate size {cfg['intermediate_size']} |")
    w(f"| normalization | RMSNorm, eps {cfg['rms_norm_eps']} |")
    w(f"| positions | RoPE, theta {cfg['rope_parameters']['rope_theta']:.0f}, up to {cfg['max_position_embeddings']} tokens |")
    w(f"| vocabulary | {cfg['vocab_size']} tokens, byte-level BPE; `<pad>`=0, `<s>` (BOS)=1, `</s>` (EOS)=2 |")
    w(f"| weights | `model.safetensors` in {cfg['dtype']} ({files['model.safetensors'] / 1e6:.1f} MB); "
      "compute in float32 on a CPU |")
    w(f"| folder | {sum(files.values()) / 1e6:.1f} MB: " + ", ".join(f"`{f}`" for f in files) + " |\n")
    w("The tokenizer adds `<s>` in front of every text and never adds `</s>`; every training document "
      "ends with `</s>`, so the model stops by itself.\n")

    w("## Corpus\n")
    w(f"`python tools/embedded_model/make_corpus.py --out corpus_out --seed {SEED} --mb {MB:g}` writes "
      f"{n_docs:,} documents, {total_bytes / 1e6:.1f} MB of text, in a few seconds; the same seed gives the same "
      "bytes (sha256 of the JSONL lines `6f2bdc07dab75c82561e106a855536b9a5749d6f13b3aa9d659c7b7ccb7f9dff`). "
      "Nothing is downloaded: every sentence is built from the templates, word lists and facts in "
      "`tools/embedded_model/` (`stories.py`, `wordlists.py`, `knowledge.py`, and `countries.py`, which lists "
      f"all {len(COUNTRIES)} countries, the 193 UN members and Vatican City, with their capitals). Every 100th "
      "document (1%) is held out.\n")
    w("| kind | documents | share of the text |\n|---|---:|---:|")
    for k, _ in sorted(kbytes.items(), key=lambda kv: -kv[1]):
        w(f"| {KIND_TEXT.get(k, k)} | {kinds[k]:,} | {kbytes[k] / total_bytes:.1%} |")
    w("")
    w("The tokenizer (`train_tokenizer.py`, the `tokenizers` library) is trained on the training documents with "
      f"a target of 6144 tokens and minimum pair frequency 2; the corpus ran out of merges at {cfg['vocab_size']}. "
      "The corpus is 4.94M tokens (mean 71 tokens a document; stories about 120).\n")

    w("## Training\n")
    w(f"`train.py` (plain PyTorch around `transformers.LlamaForCausalLM`): AdamW (betas 0.9/0.95, weight decay 0.1 "
      "on matrices), learning rate 3e-3 with 300 warm-up steps and a cosine decay to 2e-4 over the time budget, "
      "gradient clipping at 1.0, rows of 1025 tokens that each start at a document's `<s>`, 64 rows a step. "
      "It evaluates the held-out loss every 200 steps and writes the checkpoint with the lowest one.\n")
    w("```bash\npython tools/embedded_model/make_corpus.py --out corpus_out --seed 1234 --mb 22      # ~5 s\n"
      "python tools/embedded_model/train_tokenizer.py --corpus corpus_out --out corpus_out/tokenizer  # ~30 s\n"
      f"{TRAINING['command'].replace('$OUT/tinylab', 'corpus_out/tinylab').replace(' --save-fp32 $OUT/fp32', '')}"
      " --tokenizer corpus_out/tokenizer\n"
      "python tools/embedded_model/make_card.py --model corpus_out/tinylab\n```\n")
    w(f"Run on {TRAINING['hardware']}, {args.date}: {TRAINING['steps']:,} steps in {TRAINING['minutes']:.0f} minutes "
      f"({TRAINING['steps'] * TRAINING['batch_tokens'] / 1e6:.0f}M tokens, about "
      f"{TRAINING['steps'] * TRAINING['batch_tokens'] / 4.94e6:.0f} passes over the corpus). The held-out loss was "
      f"lowest, {float(best['val_loss']):.4f}, at step {best['step']} ({float(best['seconds']):.0f} s, "
      f"{int(best['step']) * TRAINING['batch_tokens'] / 1e6:.0f}M tokens, about "
      f"{int(best['step']) * TRAINING['batch_tokens'] / 4.94e6:.0f} passes); after that the model began to learn the "
      f"training documents by heart (train loss {float(last['train_loss']):.3f}, held-out loss "
      f"{float(last['val_loss']):.3f} at the end), so **the shipped weights are the step-{best['step']} checkpoint**. "
      "A shorter run (say `--minutes 1.5`) should do as well; it was not tried. "
      "The same script runs on a CPU (`--device cpu`), about a thousand times slower: measured here, one "
      "step of 8 x 512 tokens takes about 4 s of one core (some 1,000 tokens/s, against 1.2M tokens/s on the "
      "H200), so the 66M tokens of the shipped checkpoint would take about 18 hours of one core; "
      "`--device cpu --minutes 60 --batch-size 8 --seq-len 512` trains on about 4M tokens, a much weaker model "
      "(not measured).\n")
    w(f"GPU time used for this model: one call of {TRAINING['device_s'] / 60:.1f} minutes of device time "
      "(machine start, corpus check and 5 minutes of training).\n")
    w("![loss curve](loss_curve.png)\n")
    w("| step | seconds | train loss | held-out loss |\n|---:|---:|---:|---:|")
    for r in rows[1:]:
        if int(r["step"]) in (200, 400, 600, 800, 1000, 1200, 1600, 2000, 3000, 4000, 5000) or r is rows[-1]:
            w(f"| {r['step']} | {r['seconds']} | {r['train_loss']} | {r['val_loss']} |")
    w("")

    w("## Evaluation\n")
    w("| check | result |\n|---|---|")
    w(f"| held-out perplexity ({len(val_docs)} documents, {ntok:,} tokens, each document scored alone) | "
      f"**{ppl:.3f}** ({nll:.4f} nats/token) |")
    w(f"| \"The capital of X is\", greedy, all {len(COUNTRIES)} countries | **{acc_s:.1%}** correct |")
    w(f"| \"Question: What is the capital of X?\\nAnswer:\", greedy | **{acc_q:.1%}** correct |")
    w(f"| \"Once upon a time\", temperature 0.8, max 200 new tokens, 50 samples (seed 0) | "
      f"**{eos_rate:.0%}** end with EOS (finish_reason \"stop\") |")
    w(f"| load (`from_pretrained` model + tokenizer), first in a fresh process | {cold['first_load_wall_s']:.2f} s wall, "
      f"{cold['first_load_cpu_s']:.2f} s CPU |")
    w(f"| load again in the same process (best of 5) | {tm['load_wall_s']:.2f} s wall, {tm['load_cpu_s']:.2f} s CPU |")
    w(f"| before that, once a process: `import torch`, `transformers` and its Llama module | "
      f"{cold['import_wall_s']:.2f} s wall, {cold['import_cpu_s']:.2f} s CPU |")
    w(f"| 50-token greedy generation (`generate`, batch 1, best of 5) | {tm['gen_wall_s']:.2f} s wall, "
      f"{tm['gen_cpu_s']:.2f} s CPU |\n")
    wrong = [f"{n} (said {t.strip()!r})" for n, _, t in wrong_s + wrong_q]
    if wrong:
        w("Wrong capitals: " + "; ".join(wrong) + ".\n")
    w(f"Timings on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch "
      f"{torch.__version__}, one torch thread, with load average {load_avg:.1f} from other work on the machine; "
      "the CPU time is what an idle core would take. On a shared machine use one torch thread: two threads "
      "waiting on each other were many times slower here.\n")

    w("## Greedy answers to the lesson's prompts\n")
    w("Greedy (temperature 0), at most 100 new tokens; `[EOS]` marks a continuation that stopped by itself.\n")
    for p, t, e in zip(prompts, greedy, geos):
        w(f"**{json.dumps(p)}**\n")
        w("```text\n" + (t.strip("\n") or "(empty)") + ("  [EOS]" if e else "  [100 tokens]") + "\n```\n")
    w("## Sampling\n")
    w("Five samples of \"The best way to learn programming is\" (temperature 0.8, 50 tokens, seed 1):\n")
    for s in samples:
        w(f"- {json.dumps(s)}")
    w("\nA story sampled at temperature 0.8:\n")
    w("```text\nOnce upon a time" + stories[0] + "\n```\n")

    w("## Limitations\n")
    w("- It has read only its generated corpus: a few thousand words, 17 kinds of templated document. Outside "
      "them (a new country, a question it has not seen, a long conversation) it answers with fluent but "
      "made-up text, often by copying the nearest pattern.\n"
      "- Its phrasing is close to its templates, and greedy answers often repeat training sentences word for "
      "word. Sampling varies the characters, places and plots, not the style.\n"
      "- Facts are as written in `countries.py` and `knowledge.py` (e.g. one capital for countries that have "
      "two: Bolivia's is Sucre, South Africa's Pretoria).\n"
      "- The context is 1024 tokens; the training rows were 1024 tokens long, the documents much shorter.\n")
    text = "\n".join(W) + "\n"
    with open(os.path.join(md, "README.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
