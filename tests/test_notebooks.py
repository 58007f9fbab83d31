"""The lab's notebooks: generated files in sync, committed clean, exercises fail until
completed, solutions pass the canonical checks, and the grader grades.

Executing the labs and solutions themselves is CI's separate command:
    python -m pytest --nbval-lax --nbval-current-env labs solutions
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import grade as grader  # noqa: E402  tools/grade.py
import make_exercises  # noqa: E402  tools/make_exercises.py

LABS = sorted((ROOT / "labs").glob("*.ipynb"))
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))
ALL = LABS + SOLUTIONS + EXERCISES


def _env() -> dict:
    """The environment of a notebook's kernel or the grader: labengine comes from the install."""
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _run(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 600) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    os.environ.setdefault("MPLBACKEND", "Agg")
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def _name(p: Path) -> str:
    return f"{p.parent.name}/{p.name}"


# ------------------------------------------------------------------ hygiene (fast)

def test_there_are_notebooks():
    assert len(LABS) >= 9, [p.name for p in LABS]
    assert len(SOLUTIONS) >= 6 and len(EXERCISES) == len(SOLUTIONS)


def test_generated_notebooks_in_sync():
    r = subprocess.run([sys.executable, "tools/build_notebooks.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "tools/make_exercises.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", ALL, ids=_name)
def test_committed_without_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"cell {i} has outputs"
            assert cell.get("execution_count") is None, f"cell {i} has an execution count"
    assert "widgets" not in nb.get("metadata", {})


def test_nbstripout_verify():
    exe = [sys.executable, "-m", "nbstripout"]  # nbstripout is in the [test] extra
    r = subprocess.run(exe + ["--verify", *map(str, ALL)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("path", LABS + SOLUTIONS, ids=_name)
def test_device_and_model_not_hard_coded(path):
    src = "\n".join(c.source for c in nbformat.read(path, 4).cells if c.cell_type == "code")
    assert "labengine.DEFAULT_MODEL" in src
    for bad in ('device="cpu"', "device='cpu'", 'device="cuda"', "device='cuda'", ".cuda()", "/tmp/"):
        assert bad not in src, f"{path.name} hard-codes {bad}"


def test_stub_replaces_regions_only():
    src = "x = 1\n    ### BEGIN SOLUTION\n    y = 2\n    ### END SOLUTION\nprint(x)"
    assert make_exercises.stub_source(src) == "x = 1\n    # YOUR CODE HERE\n    raise NotImplementedError()\nprint(x)"
    with pytest.raises(ValueError):
        make_exercises.stub_source("### BEGIN SOLUTION\ny = 2")


@pytest.mark.parametrize("path", EXERCISES, ids=_name)
def test_exercise_structure_matches_solution(path):
    ex, sol = nbformat.read(path, 4), nbformat.read(ROOT / "solutions" / path.name, 4)
    assert [c.get("id") for c in ex.cells] == [c.get("id") for c in sol.cells]
    for e, s in zip(ex.cells, sol.cells):
        if "check" in s.metadata.get("tags", []):
            assert e.source == s.source, "check cells are shipped as they are"
        if "solution" in s.metadata.get("tags", []):
            assert "raise NotImplementedError()" in e.source and "### BEGIN SOLUTION" not in e.source


def test_merge_restores_canonical_checks():
    sol = nbformat.read(SOLUTIONS[0], 4)
    learner = nbformat.read(ROOT / "exercises" / SOLUTIONS[0].name, 4)
    for c in learner.cells:
        if "check" in c.metadata.get("tags", []):
            c.source = "pass  # tampered"
    merged = grader.merge(learner, sol)
    for m, s, l in zip(merged.cells, sol.cells, learner.cells):
        tags = s.metadata.get("tags", [])
        if "check" in tags:
            assert m.source == s.source
        if "solution" in tags:
            assert m.source == l.source


def test_grader_finds_the_exercise_of_a_renamed_copy(tmp_path):
    sol = SOLUTIONS[-1]
    exid = "_".join(sol.stem.split("_")[:3])
    nb = nbformat.read(ROOT / "exercises" / sol.name, 4)
    assert grader.find_solution(Path(f"{exid}_alice.ipynb"), nb) == sol
    assert grader.find_solution(Path("homework.ipynb"), nb) == sol  # by its title cell


# ------------------------------------------------------------------ execution (slow: a kernel each)

@pytest.mark.parametrize("path", EXERCISES, ids=_name)
def test_exercise_fails_until_completed(path):
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, 4)
    with pytest.raises(CellExecutionError) as e:
        _run(nb, path.parent)
    assert e.value.ename == "NotImplementedError", e.value


@pytest.mark.parametrize("path", SOLUTIONS, ids=_name)
def test_solution_passes_canonical_checks(path):
    sol = nbformat.read(path, 4)
    nb = _run(grader.merge(sol, sol), path.parent)
    rep = grader.report(nb)
    assert rep["total"] >= 3 and rep["passed"] == rep["total"], rep
    printed = "".join(o.get("text", "") for c in nb.cells if "check" in c.metadata.get("tags", [])
                      for o in c.outputs if o.get("output_type") == "stream")
    assert printed.count("✓") >= rep["total"], "every check cell prints what it verified"


def test_grade_command_on_solution_and_on_untouched_exercise(tmp_path):
    """`make grade` on a completed notebook passes (exit 0); on the shipped exercise it fails (exit 1)."""
    name = SOLUTIONS[0].name
    done = subprocess.run([sys.executable, "tools/grade.py", str(SOLUTIONS[0]), "--json", str(tmp_path / "a.json")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    rep = json.loads((tmp_path / "a.json").read_text())
    assert rep["total"] >= 3 and rep["passed"] == rep["total"]
    assert "✓" in done.stdout

    todo = subprocess.run([sys.executable, "tools/grade.py", f"exercises/{name}", "--json", str(tmp_path / "b.json")],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert todo.returncode == 1, todo.stdout + todo.stderr
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["passed"] < rep["total"]
    assert "NotImplementedError" in todo.stdout
