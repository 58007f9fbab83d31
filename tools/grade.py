#!/usr/bin/env python
"""Grade a learner's exercise notebook against the canonical checks.

    python tools/grade.py exercises/ex1_5_1_basic_inference.ipynb
    make grade EX=exercises/ex1_5_1_basic_inference.ipynb        # the same
    python tools/grade.py my_copy.ipynb --solution solutions/ex1_5_1_basic_inference.ipynb

What it does (nbgrader's "autograde", in a few lines):
1. copies the solution notebook (solutions/<same name>),
2. puts the learner's cells tagged "solution" in place of the solution's (matched by cell id,
   or by order when the ids differ); every other cell, the "check" cells above all, stays the
   canonical one, so editing or deleting a check in your copy changes nothing,
3. runs the result top to bottom in a fresh kernel (nbclient) without stopping at errors,
4. prints one line per check cell (✓ passed / ✗ failed, with what it verified or why not).

Exit code: 0 when every check passes, 1 when any fails, 2 on a usage error.
`--json FILE` also writes the report as JSON; `--executed FILE` saves the executed notebook.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def tags(cell) -> list:
    return list(cell.get("metadata", {}).get("tags", []))


def merge(learner: nbformat.NotebookNode, solution: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The solution notebook with the learner's 'solution' cells substituted."""
    nb = copy.deepcopy(solution)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    sol_idx = [i for i, c in enumerate(nb.cells) if "solution" in tags(c)]
    mine = [c for c in learner.cells if "solution" in tags(c)]
    by_id = {c.get("id"): c for c in mine}
    if all(nb.cells[i].get("id") in by_id for i in sol_idx):
        for i in sol_idx:
            nb.cells[i].source = by_id[nb.cells[i].get("id")].source
    elif len(mine) == len(sol_idx):
        for i, c in zip(sol_idx, mine):
            nb.cells[i].source = c.source
    else:
        raise SystemExit(f"grade: the notebook has {len(mine)} cells tagged 'solution', the exercise has "
                         f"{len(sol_idx)}; put your code in the exercise's own solution cells "
                         "(keep their 'solution' tag) and grade again.")
    return nb


def check_name(cell, k: int) -> str:
    for line in cell.source.splitlines():
        s = line.strip()
        if s.startswith("#"):
            s = s.lstrip("#").strip()
            if s:
                return s
        elif s:
            break
    return f"check {k}"


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _error(cell):
    for o in cell.get("outputs", []):
        if o.get("output_type") == "error":
            return o
    return None


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    # The kernel inherits our environment: make `import labengine` work from a clone too.
    pp = os.environ.get("PYTHONPATH", "")
    if str(ROOT) not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([pp] if pp else []))
    os.environ.setdefault("MPLBACKEND", "Agg")
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def report(nb: nbformat.NotebookNode) -> dict:
    checks, problems = [], []
    k = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        err = _error(cell)
        if "check" in tags(cell):
            k += 1
            verified = [ln for ln in _stream_text(cell).splitlines() if ln.startswith("✓")]
            checks.append({"name": check_name(cell, k), "cell": i, "passed": err is None,
                           "verified": verified,
                           "error": None if err is None else f"{err['ename']}: {err['evalue']}".strip()})
        elif err is not None:
            problems.append({"cell": i, "id": cell.get("id"), "solution": "solution" in tags(cell),
                             "error": f"{err['ename']}: {err['evalue']}".strip()})
    return {"checks": checks, "cell_errors": problems,
            "passed": sum(c["passed"] for c in checks), "total": len(checks)}


def print_report(rep: dict, name: str, elapsed: float) -> None:
    print(f"Grading {name}")
    for p in rep["cell_errors"][:4]:
        first = p["error"].splitlines()[0][:300] if p["error"] else "an error"
        if p["solution"] and first.startswith("NotImplementedError"):
            print(f"  ! your code in cell {p['cell']} is not written yet (NotImplementedError)")
        else:
            where = "your code in cell" if p["solution"] else "setup cell"
            print(f"  ! {where} {p['cell']} raised {first}")
    for c in rep["checks"]:
        mark = "✓" if c["passed"] else "✗"
        print(f"  {mark} {c['name']}")
        if c["passed"]:
            for ln in c["verified"]:
                print(f"      {ln}")
        else:
            first = (c["error"] or "").splitlines()
            print(f"      {first[0][:300] if first else 'failed'}")
            for ln in first[1:3]:
                print(f"      {ln[:300]}")
    print(f"{rep['passed']}/{rep['total']} checks passed in {elapsed:.0f} s")


def find_solution(path: Path, learner) -> "Path | None":
    """The solution notebook for a learner's file: the same name; else the exercise id in its
    name (e.g. "ex1_5_3" in "ex1_5_3_mine.ipynb"); else the one whose title cell it shares."""
    sols = sorted((ROOT / "solutions").glob("*.ipynb"))
    same = ROOT / "solutions" / path.name
    if same.exists():
        return same
    for sol in sols:
        exid = "_".join(sol.stem.split("_")[:3])  # ex1_5_3
        if exid in path.stem:
            return sol
    title = next((c.source.splitlines()[0] for c in learner.cells if c.cell_type == "markdown" and c.source), None)
    for sol in sols:
        nb = nbformat.read(sol, as_version=4)
        if title and nb.cells and nb.cells[0].source.splitlines()[0] == title:
            return sol
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Grade an exercise notebook with the canonical checks.")
    ap.add_argument("notebook", help="the learner's notebook (e.g. exercises/ex1_5_1_basic_inference.ipynb)")
    ap.add_argument("--solution", help="the solution notebook (default: solutions/<same name>)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    ap.add_argument("--json", dest="json_out", help="also write the report as JSON to this file")
    ap.add_argument("--executed", help="save the executed, merged notebook to this file")
    args = ap.parse_args(argv)

    path = Path(args.notebook)
    if not path.exists():
        cand = ROOT / "exercises" / (path.name if path.suffix else path.name + ".ipynb")
        matches = sorted((ROOT / "exercises").glob(f"{path.name}*.ipynb"))
        if cand.exists():
            path = cand
        elif len(matches) == 1:
            path = matches[0]
        else:
            print(f"grade: no such notebook: {args.notebook}", file=sys.stderr)
            return 2
    learner = nbformat.read(path, as_version=4)
    sol = Path(args.solution) if args.solution else find_solution(path, learner)
    if sol is None or not sol.exists():
        print(f"grade: which exercise is {path.name}? No solution notebook matches it; "
              "pass --solution solutions/<exercise>.ipynb", file=sys.stderr)
        return 2
    solution = nbformat.read(sol, as_version=4)
    nb = merge(learner, solution)
    t0 = time.perf_counter()
    execute(nb, sol.resolve().parent, args.timeout)
    rep = report(nb)
    rep["notebook"] = str(path)
    print_report(rep, str(path), time.perf_counter() - t0)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rep, indent=2, ensure_ascii=False))
    if args.executed:
        nbformat.write(nb, args.executed)
    ok = rep["total"] > 0 and rep["passed"] == rep["total"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
