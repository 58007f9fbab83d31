#!/usr/bin/env python
"""Generate exercises/*.ipynb from solutions/*.ipynb.

    python tools/make_exercises.py           # (re)write every exercise
    python tools/make_exercises.py --check   # exit 1 if an exercise is missing or out of sync

In every cell tagged "solution", each region between `### BEGIN SOLUTION` and
`### END SOLUTION` becomes, at the marker's indentation:

    # YOUR CODE HERE
    raise NotImplementedError()

Everything else (prose, setup cells, "check" cells, cell ids and tags) is copied as is,
without outputs, so the grader (tools/grade.py) can put a learner's solution cells back into
the solution notebook by cell id and restore the canonical check cells.
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
STUB = ["# YOUR CODE HERE", "raise NotImplementedError()"]
_MARK = re.compile(r"^(?P<indent>\s*)### (?P<which>BEGIN|END) SOLUTION\s*$")


def stub_source(source: str, where: str = "") -> str:
    """Replace every solution region of a cell's source by the stub."""
    out: list[str] = []
    inside = False
    seen = False
    for line in source.split("\n"):
        m = _MARK.match(line)
        if m and m.group("which") == "BEGIN":
            if inside:
                raise ValueError(f"{where}: nested {BEGIN}")
            inside = seen = True
            out.extend(m.group("indent") + s for s in STUB)
        elif m and m.group("which") == "END":
            if not inside:
                raise ValueError(f"{where}: {END} without {BEGIN}")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"{where}: {BEGIN} without {END}")
    if not seen:
        raise ValueError(f"{where}: a 'solution' cell without a {BEGIN} region")
    return "\n".join(out)


def make_exercise(solution: nbformat.NotebookNode, where: str = "") -> nbformat.NotebookNode:
    nb = copy.deepcopy(solution)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            if "solution" in cell.metadata.get("tags", []):
                cell.source = stub_source(cell.source, f"{where} cell {i}")
            elif BEGIN in cell.source:
                raise ValueError(f"{where} cell {i}: {BEGIN} in a cell not tagged 'solution'")
    return nb


def dumps(nb) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if exercises/ is out of sync")
    args = ap.parse_args(argv)
    problems = []
    wanted = set()
    for sol in sorted(SOLUTIONS.glob("*.ipynb")):
        dst = EXERCISES / sol.name
        wanted.add(dst.name)
        text = dumps(make_exercise(nbformat.read(sol, as_version=4), str(sol.relative_to(ROOT))))
        old = dst.read_text() if dst.exists() else None
        if old == text:
            continue
        if args.check:
            problems.append(f"{dst.relative_to(ROOT)} is {'missing' if old is None else 'out of sync'}")
        else:
            EXERCISES.mkdir(exist_ok=True)
            dst.write_text(text)
            print(f"wrote {dst.relative_to(ROOT)}")
    for extra in sorted(EXERCISES.glob("*.ipynb")):
        if extra.name not in wanted:
            problems.append(f"{extra.relative_to(ROOT)} has no solution in solutions/")
    if args.check:
        if problems:
            print("exercises are not in sync with solutions (run `make exercises`):", *problems, sep="\n  ")
            return 1
        print(f"{len(wanted)} exercises in sync with solutions/")
        return 0
    for p in problems:
        print("warning:", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
