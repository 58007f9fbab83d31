"""The grader fails wrong answers: for every check of every exercise, a plausible wrong
answer must fail that check, with a message that names what is wrong (issue 17, item 3).

Each case takes the shipped solution, edits the learner's code (the cells tagged
"solution") into a plausible mistake, hands the result in as a learner's exercise notebook
and grades it with `python tools/grade.py` itself (a subprocess: the same code path, a fresh
kernel, the canonical check cells). Grading a notebook costs seconds, so the wrong answers of
one exercise that touch different tasks and do not feed each other are graded together, in
one notebook (a "round"); test_round_fails_exactly_its_checks then proves that in that round
exactly the targeted checks failed (plus the ones a case declares in `also`: later checks
that use what the wrong answer made), and every other check passed.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The exercises covered here; a new exercise adds its wrong answers to WRONG and its id here.
COVERED = ("ex1_5_1", "ex1_5_2", "ex1_5_3", "ex1_5_4", "ex1_5_5", "ex1_5_6")
NAMES = {p.stem[:7]: p.name for p in sorted((ROOT / "solutions").glob("ex1_5_*.ipynb")) if p.stem[:7] in COVERED}


@dataclass(frozen=True)
class Wrong:
    exercise: str        # "ex1_5_1"
    check: int           # the exercise's "Check k" (k-th check cell)
    what: str            # the wrong answer, in words (the test's id)
    edits: tuple         # ((old, new), ...) on the solution cells; each `old` occurs exactly once
    says: tuple          # what the failing check's message must name
    round: str = "a"     # the cases of one round are graded together, in one notebook
    also: tuple = ()     # later checks that fail too, because they use what this answer made


WRONG = [
    # ---------------------------------------------------------------- ex1_5_1 basic inference
    Wrong("ex1_5_1", 1, "llm is a tuple (a trailing comma)",
          (("llm = LLM(model=MODEL, seed=0)", "llm = LLM(model=MODEL, seed=0),"),),
          ("llm is a labengine LLM", "a tuple, expected a LLM"), round="b", also=(2, 3, 4)),
    Wrong("ex1_5_1", 2, "greedy_params keeps the default temperature",
          (("greedy_params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)",
            "greedy_params = SamplingParams(max_tokens=MAX_TOKENS)"),),
          ("greedy_params is greedy", "temperature=1.0")),
    Wrong("ex1_5_1", 3, "constant elapsed_s = 10.0",
          (("elapsed_s = time.perf_counter() - t0", "elapsed_s = 10.0"),),
          ("elapsed_s is the time of the generate call", "10.000 s measured", "the engine's own metrics say")),
    Wrong("ex1_5_1", 4, "settings without a seed",
          (('"focused": SamplingParams(temperature=0.3, max_tokens=MAX_TOKENS, seed=1)',
            '"focused": SamplingParams(temperature=0.3, max_tokens=MAX_TOKENS)'),
           ('"balanced": SamplingParams(temperature=0.8, top_p=0.95, max_tokens=MAX_TOKENS, seed=1)',
            '"balanced": SamplingParams(temperature=0.8, top_p=0.95, max_tokens=MAX_TOKENS)'),
           ('"creative": SamplingParams(temperature=1.3, max_tokens=MAX_TOKENS, seed=1)',
            '"creative": SamplingParams(temperature=1.3, max_tokens=MAX_TOKENS)')),
          ("every setting has a seed",)),
    # ---------------------------------------------------------------- ex1_5_2 batch processing
    Wrong("ex1_5_2", 1, "the same prompt 50 times",
          (('prompts = [f"Question {i}: what does a {animals[i % 10]} eat?" for i in range(50)]',
            'prompts = ["What does a cat eat?"] * 50'),),
          ("all strings, all different", "1 distinct")),
    Wrong("ex1_5_2", 2, "the batch generated one prompt per call",
          (("batch_outputs = llm.generate(prompts, params, use_tqdm=False)",
            "batch_outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]"),),
          ("the requests ran at the same time (one batch)",)),
    Wrong("ex1_5_2", 3, "an invented single_s (50 x the batch time)",
          (("single_s = time.perf_counter() - t0", "single_s = batch_s * len(prompts)"),),
          ("single_s is the time of the loop", "s measured; the engine's own metrics say the loop took")),
    # ---------------------------------------------------------------- ex1_5_3 multiple completions
    Wrong("ex1_5_3", 1, "five is the list generate returns",
          (("use_tqdm=False)[0]\nfor c in five.outputs:", "use_tqdm=False)\nfor c in five[0].outputs:"),),
          ("five is one RequestOutput", "a list"), round="b", also=(4,)),
    Wrong("ex1_5_3", 2, "distinct tokens counted per completion",
          (("return len({tok for t in token_lists for tok in t}) / total",
            "return sum(len(set(t)) for t in token_lists) / total"),),
          ("diversity([[1, 2], [1, 3]])", "expected 0.75")),
    Wrong("ex1_5_3", 3, "every temperature generated at 0.8",
          (("SamplingParams(n=N, temperature=t, max_tokens=MAX_TOKENS, seed=SEED)",
            "SamplingParams(n=N, temperature=0.8, max_tokens=MAX_TOKENS, seed=SEED)"),),
          ("T=0.2: N completions generated at that temperature",)),
    Wrong("ex1_5_3", 4, "best by min (the most negative logprob)",
          (("best = max(five.outputs, key=lambda c: c.cumulative_logprob)",
            "best = min(five.outputs, key=lambda c: c.cumulative_logprob)"),),
          ("best has the highest cumulative logprob", "expected")),
    # ---------------------------------------------------------------- ex1_5_4 custom stopping
    Wrong("ex1_5_4", 1, "stopped_kept without include_stop_str_in_output",
          ((",\n                                                     include_stop_str_in_output=True)", ")"),),
          ("with include_stop_str_in_output the text ends with STOP",)),
    Wrong("ex1_5_4", 2, "forced = reference (neither min_tokens nor stop)",
          (("forced = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP2], "
            "min_tokens=MIN_TOKENS),\n                      use_tqdm=False)[0].outputs[0]", "forced = reference"),),
          ("forced was generated with stop=[STOP2] and min_tokens=MIN_TOKENS",)),
    Wrong("ex1_5_4", 2, "forced with min_tokens but without stop",
          (("SamplingParams(temperature=0.0, max_tokens=32, stop=[STOP2], min_tokens=MIN_TOKENS)",
            "SamplingParams(temperature=0.0, max_tokens=32, min_tokens=MIN_TOKENS)"),),
          ("forced was generated with stop=[STOP2] and min_tokens=MIN_TOKENS",), round="b"),
    Wrong("ex1_5_4", 2, "MIN_TOKENS one past early (the first STOP2 is found again)",
          (("MIN_TOKENS = len(early.token_ids) + 2", "MIN_TOKENS = len(early.token_ids) + 1"),),
          ("forced stopped at a later STOP2", "the first ','"), round="c"),
    Wrong("ex1_5_4", 3, "finish_counts looks at the first completion only",
          (("        for c in out.outputs:\n            counts[c.finish_reason] = counts.get(c.finish_reason, 0) + 1",
            "        c = out.outputs[0]\n        counts[c.finish_reason] = counts.get(c.finish_reason, 0) + 1"),),
          ("finish_counts", "expected {'length': 4, 'stop': 1}")),
    Wrong("ex1_5_4", 4, "SamplingParams built outside the try",
          (("    try:\n        params = SamplingParams(**kwargs)\n",
            "    params = SamplingParams(**kwargs)\n    try:\n"),),
          ("safe_generate('Once upon a time', **{'max_tokens': 0}) returns the error", "it raised ValueError")),
    Wrong("ex1_5_4", 4, "safe_generate returns the CompletionOutput",
          (("return llm.generate([prompt], params, use_tqdm=False)[0], None",
            "return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0], None"),),
          ("returns the RequestOutput", "a CompletionOutput"), round="b"),
    # ---------------------------------------------------------------- ex1_5_5 KV blocks
    Wrong("ex1_5_5", 1, "prompt lengths in words",
          (("prompt_lens = [len(tokenizer.encode(p)) for p in PROMPTS]",
            "prompt_lens = [len(p.split()) for p in PROMPTS]"),),
          ("prompt_lens", "expected"), also=(4,)),
    Wrong("ex1_5_5", 2, "peak_blocks counts the last token as stored",
          (("stored = prompt_len + output_len - 1", "stored = prompt_len + output_len"),),
          ("peak_blocks(16, 1, 16)", "got 2, expected 1"), also=(4,)),
    Wrong("ex1_5_5", 3, "blocks_in_use keeps a finished request's blocks",
          (("if step < o - 1:", "if step < o:"),),
          ("one request, prompt 8, 3 tokens, block 4", "expected [2, 3, 0]"), also=(4,)),
    Wrong("ex1_5_5", 4, "the batch traced as one generate call per prompt",
          (("    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)",
            "    outputs = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(PROMPTS, PARAMS)]"),),
          ("the six requests ran as one batch",), round="b"),
    # ---------------------------------------------------------------- ex1_5_6 preemption
    Wrong("ex1_5_6", 1, "peak_total from characters, not tokens",
          (("peak_total = sum(blocks_needed(len(tokenizer.encode(p)) + params.max_tokens - 1, BLOCK_SIZE)",
            "peak_total = sum(blocks_needed(len(p) + params.max_tokens - 1, BLOCK_SIZE)"),),
          ("peak_total", "expected")),
    Wrong("ex1_5_6", 2, "the trace is of another run than outputs",
          (("with llm.trace() as trace:\n    outputs = llm.generate(prompts, params, use_tqdm=False)",
            "outputs = llm.generate(prompts, params, use_tqdm=False)\n"
            "with llm.trace() as trace:\n    llm.generate(prompts, params, use_tqdm=False)"),),
          ("the trace holds your requests",), round="b", also=(4,)),
    Wrong("ex1_5_6", 3, "victim_is_newest always True (arrived_last: any instead of all)",
          (("return all(arrival.index(request_id) > arrival.index(r) for r in among if r != request_id)",
            "return any(arrival.index(request_id) >= arrival.index(r) for r in among)"),),
          ("arrived_last(df, r, holders) for each holder r", "expected [False")),
    Wrong("ex1_5_6", 3, "arrived_last ignores `among` (last of all requests)",
          (("return all(arrival.index(request_id) > arrival.index(r) for r in among if r != request_id)",
            "return arrival.index(request_id) == len(arrival) - 1"),),
          ("arrived_last(df, r, among)", "every request but the last"), round="c"),
    Wrong("ex1_5_6", 4, "the preempted run compared with itself",
          (("alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]", "alone = outputs"),),
          ("alone are new runs, not the traced ones",), round="c"),
    Wrong("ex1_5_6", 4, "alone as one batched call (preempted again)",
          (("alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]",
            "alone = llm.generate(prompts, params, use_tqdm=False)"),),
          ("alone ran one request at a time",)),
    Wrong("ex1_5_6", 5, "ANSWER a (the newest holds the most blocks)",
          (('ANSWER = "b"', 'ANSWER = "a"'),), ("ANSWER", "got 'a', expected 'b'")),
]

# Hiding a failure: one line in a solution cell, beside a wrong answer. Every check fails.
FORGERIES = {
    "set_custom_exc": "get_ipython().set_custom_exc((BaseException,), lambda *a, **k: None)",
    "set_custom_exc via getattr": 'getattr(get_ipython(), "set_custom" + "_exc")((BaseException,), lambda *a, **k: None)',
}


def _id(w: Wrong) -> str:
    return f"{w.exercise}-check{w.check}-{w.what}"


def _learner_notebook(exercise: str, edits) -> nbformat.NotebookNode:
    """The exercise notebook as a learner hands it in: its solution cells hold the shipped
    solution's code with `edits` applied."""
    name = NAMES[exercise]
    sol = nbformat.read(ROOT / "solutions" / name, 4)
    learner = nbformat.read(ROOT / "exercises" / name, 4)
    code = {c.id: c.source for c in sol.cells if "solution" in c.metadata.get("tags", [])}
    for old, new in edits:
        hits = [cid for cid, src in code.items() if old in src]
        assert len(hits) == 1 and code[hits[0]].count(old) == 1, \
            f"{exercise}: the edit's text must occur once in the solution cells: {old!r}"
        code[hits[0]] = code[hits[0]].replace(old, new)
    for c in learner.cells:
        if c.id in code:
            c.source = code[c.id]
    return learner


def grade(learner: nbformat.NotebookNode, exercise: str, workdir: Path) -> tuple:
    """`python tools/grade.py` on the learner's notebook: (exit code, stdout, JSON report)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path, out = workdir / f"{exercise}_learner.ipynb", workdir / "report.json"
    nbformat.write(learner, path)
    # One PyTorch thread: on a 2-core machine shared with other work, several threads per
    # kernel spin against each other and a 0.1 s generate call can take 10 s.
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "tools/grade.py", str(path), "--solution",
                        str(ROOT / "solutions" / NAMES[exercise]), "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode in (0, 1), r.stdout + r.stderr
    return r.returncode, r.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def graded_round(tmp_path_factory):
    """(exercise, round) -> the grade of the notebook holding that round's wrong answers; each
    round is graded once per test session."""
    base = tmp_path_factory.mktemp("wrong_answers")

    @functools.lru_cache(maxsize=None)
    def run(exercise: str, rnd: str):
        cases = [w for w in WRONG if (w.exercise, w.round) == (exercise, rnd)]
        learner = _learner_notebook(exercise, [e for w in cases for e in w.edits])
        return grade(learner, exercise, base / f"{exercise}-{rnd}")

    return run


def printed_block(stdout: str, check: dict) -> str:
    """The lines the grader printed for one check (its ✓/✗ line and what follows)."""
    lines = stdout.splitlines()
    head = f"{check['name']} (cell [{check['number']}])"
    start = next(i for i, ln in enumerate(lines) if ln.strip().endswith(head))
    end = next((j for j in range(start + 1, len(lines))
                if lines[j].startswith("  ✓ ") or lines[j].startswith("  ✗ ") or "checks passed" in lines[j]),
               len(lines))
    return "\n".join(lines[start:end])


@pytest.mark.parametrize("wrong", WRONG, ids=_id)
def test_wrong_answer_fails_its_check_with_a_helpful_message(wrong, graded_round):
    code, stdout, rep = graded_round(wrong.exercise, wrong.round)
    assert code == 1, stdout
    check = rep["checks"][wrong.check - 1]
    assert check["name"].startswith(f"Check {wrong.check}:"), check["name"]
    assert not check["passed"], f"{wrong.what!r} passed {check['name']}:\n{stdout}"
    shown = printed_block(stdout, check)
    assert shown.lstrip().startswith("✗"), shown
    for words in wrong.says:
        assert words in check["error"], f"the message should name {words!r}:\n{check['error']}"
        assert words in shown, f"the learner should see {words!r}:\n{shown}"


ROUNDS = sorted({(w.exercise, w.round) for w in WRONG})


@pytest.mark.parametrize("exercise,rnd", ROUNDS, ids=[f"{e}-{r}" for e, r in ROUNDS])
def test_round_fails_exactly_its_checks(exercise, rnd, graded_round):
    """The wrong answers of a round break their own checks (and the declared later ones)
    and nothing else: every other check of the exercise still passes with the real grader."""
    code, stdout, rep = graded_round(exercise, rnd)
    cases = [w for w in WRONG if (w.exercise, w.round) == (exercise, rnd)]
    expected = {w.check for w in cases} | {k for w in cases for k in w.also}
    failed = {i + 1 for i, c in enumerate(rep["checks"]) if not c["passed"]}
    assert failed == expected, stdout
    assert rep["total"] == len(rep["checks"]) >= 3 and not rep["tampering"]


def test_every_check_has_a_wrong_answer():
    assert sorted(NAMES) == list(COVERED)
    for exercise, name in NAMES.items():
        nb = nbformat.read(ROOT / "solutions" / name, 4)
        n = sum("check" in c.metadata.get("tags", []) for c in nb.cells)
        covered = {w.check for w in WRONG if w.exercise == exercise}
        assert covered == set(range(1, n + 1)), f"{exercise}: checks without a wrong answer: " \
                                                f"{sorted(set(range(1, n + 1)) - covered)}"


@pytest.mark.parametrize("how", sorted(FORGERIES))
def test_hiding_failures_fails_every_check(how, tmp_path):
    """One line that hides exceptions (set_custom_exc), beside a wrong elapsed_s: no check
    passes, and the message says what the line did."""
    line = FORGERIES[how]
    learner = _learner_notebook("ex1_5_1", [("llm = LLM(model=MODEL, seed=0)", f"llm = LLM(model=MODEL, seed=0)\n{line}"),
                                            ("elapsed_s = time.perf_counter() - t0", "elapsed_s = 10.0")])
    code, stdout, rep = grade(learner, "ex1_5_1", tmp_path)
    assert code == 1 and rep["passed"] == 0 and rep["total"] >= 4, stdout
    for c in rep["checks"]:
        assert "set_custom_exc" in c["error"], c
        assert "set_custom_exc" in printed_block(stdout, c)
    if how == "set_custom_exc":  # found before running, in the learner's cell
        assert rep["tampering"] and rep["tampering"][0]["number"] == 2, rep["tampering"]
        assert "your code in cell [2], line 3, uses .set_custom_exc" in stdout
