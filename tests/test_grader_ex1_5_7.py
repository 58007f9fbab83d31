"""Exercise 1.5.7 (predict the blocks a request reuses): the grader fails wrong answers.

Each case takes the shipped solution, edits the learner's code (the cells tagged "solution")
into a plausible mistake, hands the result in as a learner's notebook and grades it with
`python tools/grade.py` itself (a subprocess: the real code path, a fresh kernel, the
canonical check cells). Wrong answers to different checks that do not feed each other are
graded together in one notebook (a "round"); each round must fail exactly the checks its
cases target (plus the later checks they declare in `also`, which use what the wrong answer
made), pass every other check, and say what is wrong.
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
SOLUTION = ROOT / "solutions" / "ex1_5_7_prefix_reuse.ipynb"


@dataclass(frozen=True)
class Wrong:
    check: int        # the exercise's "Check k"
    what: str         # the wrong answer, in words (the test's id)
    edits: tuple      # ((old, new), ...) on the solution cells; each `old` occurs exactly once
    says: tuple       # what the failing check's message must contain
    round: str        # the cases of one round are graded together
    also: tuple = ()  # later checks that fail too, because they use what this answer made


WRONG = [
    # ---- Check 1: reusable_blocks
    Wrong(1, "the partly shared last block counted as reused",
          (("    return min(shared // block_size, (len(new) - 1) // block_size)",
            "    return min(blocks_needed(shared, block_size), (len(new) - 1) // block_size)"),),
          ("6 tokens shared, block 4", "got 2, expected 1", "a partly shared block is not reused"),
          round="a", also=(3, 4)),
    Wrong(1, "the last token's block reused too (the whole prompt counted as reused)",
          (("    return min(shared // block_size, (len(new) - 1) // block_size)",
            "    return shared // block_size"),),
          ("the same 8 tokens again, block 4", "got 2, expected 1", "the last token is always computed"),
          round="b", also=(3, 4)),
    Wrong(1, "blocks matched by position, not as a prefix chain",
          (("    shared = max((common_prefix_len(old, new) for old in served), default=0)\n"
            "    # full shared blocks only, and never the block that holds the last token (it is computed)\n"
            "    return min(shared // block_size, (len(new) - 1) // block_size)",
            "    n = 0\n"
            "    for i in range((len(new) - 1) // block_size):\n"
            "        blk = new[i * block_size:(i + 1) * block_size]\n"
            "        if any(old[i * block_size:(i + 1) * block_size] == blk for old in served):\n"
            "            n += 1\n"
            "    return n"),),
          ("a block that matches after a mismatch", "got 2, expected 1", "every token before it"),
          round="c"),
    # ---- Check 2: the first request's blocks
    Wrong(2, "first_blocks assumed to start at block 0",
          (("first_blocks = [int(b) for b in allocated[\"block\"]]",
            "first_blocks = list(range(len(allocated)))"),),
          ("first_blocks, in logical order", "expected [3, 4, 5, 6, 7]", "do not start at 0"),
          round="a", also=(3, 4)),
    # ---- Check 3: the predictions
    Wrong(3, "the numbers read off the trace of the batch, run before predicting",
          (("predicted_reused = {name: reusable_blocks(served, ids, BLOCK_SIZE) for name, ids in prompt_ids.items()}",
            "with llm.trace() as early:\n"
            "    early_out = llm.generate(list(PROMPTS.values()), ONE_TOKEN, use_tqdm=False)\n"
            "early_df = early.to_dataframe()\n"
            "predicted_reused = {name: int(((early_df['event'] == 'block_reused') & "
            "(early_df['request_id'] == o.request_id)).sum()) for name, o in zip(PROMPTS, early_out)}"),),
          ("the engine has served only WARMUP and FIRST so far", "predict from token ids",
           "restart the kernel"),
          round="d", also=(4,)),
    Wrong(3, "the shared prefix taken from SYSTEM tokenized alone",
          (("predicted_reused = {name: reusable_blocks(served, ids, BLOCK_SIZE) for name, ids in prompt_ids.items()}",
            "predicted_reused = {name: reusable_blocks(served, ids, BLOCK_SIZE) for name, ids in prompt_ids.items()}\n"
            "predicted_reused['same_system'] = len(tokenizer.encode(SYSTEM)) // BLOCK_SIZE"),),
          ("predicted_reused['same_system']", "got 4, expected 3", "SYSTEM alone has 32 tokens",
           "a partly shared block is not reused"),
          round="e", also=(4,)),
    Wrong(3, "the repeated prompt counted as wholly reused",
          (("predicted_reused = {name: reusable_blocks(served, ids, BLOCK_SIZE) for name, ids in prompt_ids.items()}",
            "predicted_reused = {name: reusable_blocks(served, ids, BLOCK_SIZE) for name, ids in prompt_ids.items()}\n"
            "predicted_reused['again'] = len(prompt_ids['again']) // BLOCK_SIZE"),),
          ("predicted_reused['again']", "got 5, expected 4", "the last prompt token is always computed"),
          round="f", also=(4,)),
    Wrong(3, "predicted_blocks one block too many",
          (("predicted_blocks = {name: first_blocks[:k] for name, k in predicted_reused.items()}",
            "predicted_blocks = {name: first_blocks[:k + 1] for name, k in predicted_reused.items()}"),),
          ("predicted_blocks['same_system']", "got [3, 4, 5, 6], expected [3, 4, 5]", "first_blocks[:reused]"),
          round="g", also=(4,)),
    Wrong(3, "the hit rate counts the last block as looked up",
          (("looked_up = sum((len(ids) - 1) // BLOCK_SIZE for ids in prompt_ids.values())",
            "looked_up = sum(blocks_needed(len(ids), BLOCK_SIZE) for ids in prompt_ids.values())"),),
          ("predicted_hit_rate", "expected 0.727", "the batch looks up 11 blocks"),
          round="h", also=(4,)),
    # ---- Check 4: the measurements
    Wrong(4, "measured_reused counts block_allocated rows",
          (("    measured_reused[name] = len(reused)",
            "    measured_reused[name] = int((mine[\"event\"] == \"block_allocated\").sum())"),),
          ("measured_reused['same_system'] read from the trace", "count the block_reused rows"),
          round="c"),
    Wrong(4, "measured_hit_rate is the engine's rate since its start",
          (("measured_hit_rate = float(lookups[\"num_hit_blocks\"].sum() / lookups[\"num_queried_blocks\"].sum())",
            "measured_hit_rate = llm.llm_engine.get_prefix_cache_hit_rate()"),),
          ("measured_hit_rate read from the trace", "not the engine's rate since its start"),
          round="j"),
    Wrong(4, "the batch run one prompt per generate call",
          (("    outputs = llm.generate(list(PROMPTS.values()), ONE_TOKEN, use_tqdm=False)",
            "    outputs = [llm.generate(p, ONE_TOKEN, use_tqdm=False)[0] for p in PROMPTS.values()]"),),
          ("one generate call: the batch arrived in one step", "expected 1"),
          round="i"),
    # ---- Check 5: the explanation
    Wrong(5, "ANSWER a (evicted)", (('ANSWER = "b"', 'ANSWER = "a"'),), ("ANSWER", "expected 'b'"), round="a"),
]
ROUNDS = sorted({w.round for w in WRONG})


def _edited(cases) -> nbformat.NotebookNode:
    """The solution notebook with the cases' edits applied to its solution cells."""
    nb = nbformat.read(SOLUTION, as_version=4)
    sol_cells = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    for w in cases:
        for old, new in w.edits:
            hits = [c for c in sol_cells if old in c.source]
            assert len(hits) == 1 and hits[0].source.count(old) == 1, f"{w.what}: {old!r} is not unique"
            hits[0].source = hits[0].source.replace(old, new)
    return nb


@functools.lru_cache(maxsize=None)
def _graded(round_: str, tmp: str) -> dict:
    cases = [w for w in WRONG if w.round == round_]
    path = Path(tmp) / f"ex1_5_7_wrong_{round_}.ipynb"
    nbformat.write(_edited(cases), path)
    out = Path(tmp) / f"report_{round_}.json"
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    r = subprocess.run([sys.executable, "tools/grade.py", str(path), "--solution", str(SOLUTION), "--json", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    rep["stdout"] = r.stdout
    return rep


@pytest.fixture(scope="module")
def grading_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ex1_5_7_wrong"))


def _check(rep: dict, k: int) -> dict:
    return next(c for c in rep["checks"] if c["name"].startswith(f"Check {k}:"))


def test_cases_are_sound():
    """Every round targets each check once at most (a check cell stops at its first failure)
    and its cases' `also` do not hide another case's target."""
    for r in ROUNDS:
        cases = [w for w in WRONG if w.round == r]
        targets = [w.check for w in cases]
        assert len(targets) == len(set(targets)), f"round {r} targets a check twice"
        for w in cases:
            # a check that another case's answer already fails would not show this case's message
            assert not set(w.also) & (set(targets) - {w.check}), f"round {r}: {w.what} fails another's target"
    assert {w.check for w in WRONG} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("case", WRONG, ids=lambda w: f"check{w.check}-{w.what}")
def test_wrong_answer_fails_its_check_and_says_why(case, grading_dir):
    rep = _graded(case.round, grading_dir)
    c = _check(rep, case.check)
    assert not c["passed"], f"{case.what}: Check {case.check} passed\n{rep['stdout']}"
    for text in case.says:
        assert text in (c["error"] or ""), f"{case.what}: {text!r} not in the message {c['error']!r}"


@pytest.mark.parametrize("round_", ROUNDS)
def test_round_fails_exactly_its_checks(round_, grading_dir):
    rep = _graded(round_, grading_dir)
    cases = [w for w in WRONG if w.round == round_]
    expected = {w.check for w in cases} | {k for w in cases for k in w.also}
    failed = {int(c["name"].split(":")[0].split()[1]) for c in rep["checks"] if not c["passed"]}
    assert rep["total"] == 5
    assert failed == expected, rep["stdout"]
    assert not rep["tampering"], rep["tampering"]
