#!/usr/bin/env python
"""Build the lab's notebooks from their sources (percent-format .py files).

    python tools/build_notebooks.py            # write labs/*.ipynb and solutions/*.ipynb
    python tools/build_notebooks.py --check    # exit 1 if a committed notebook differs

Sources live in tools/notebooks/{labs,solutions}/NAME.py, one per notebook, in the
"percent" format that jupytext and VS Code read:

    # %% [markdown]
    # # A title
    # Some prose (each line starts with "# ").

    # %%
    llm = LLM(model=MODEL)

    # %% tags=["solution"]
    ### BEGIN SOLUTION
    outputs = llm.generate(PROMPTS, params)
    ### END SOLUTION

    # %% tags=["check"]
    check("three outputs", len(outputs) == 3, ...)

Notebooks come out exactly as `nbstripout` leaves them (no outputs, no execution counts,
cell ids "0", "1", ... by position), so a rebuild is byte-identical, `nbstripout --verify`
passes, and the grader can match a learner's solution cells to the solution's by id. Exercises are made from the
solutions afterwards by tools/make_exercises.py. Never hand-edit the .ipynb files.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "tools" / "notebooks"
FOLDERS = ("labs", "solutions")

NB_METADATA = {
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}
_HEADER = re.compile(r"^# %%(?P<rest>.*)$")


def _parse_header(rest: str) -> tuple[str, list[str]]:
    rest = rest.strip()
    kind = "code"
    if rest.startswith("[markdown]") or rest.startswith("[md]"):
        kind = "markdown"
        rest = rest.split("]", 1)[1].strip()
    tags: list[str] = []
    m = re.search(r"tags=(\[.*?\])", rest)
    if m:
        tags = json.loads(m.group(1))
    return kind, tags


def _strip_blank(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def parse(text: str) -> list[dict]:
    """Cells of a percent-format source: [{kind, tags, source}]."""
    cells: list[dict] = []
    cur = None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            if cur is not None:
                cells.append(cur)
            kind, tags = _parse_header(m.group("rest"))
            cur = {"kind": kind, "tags": tags, "lines": []}
            continue
        if cur is None:  # text before the first cell marker: a module docstring for editors; ignored
            continue
        cur["lines"].append(line)
    if cur is not None:
        cells.append(cur)
    out = []
    for c in cells:
        lines = c["lines"]
        if c["kind"] == "markdown":
            md = []
            for ln in lines:
                if ln.startswith("# "):
                    md.append(ln[2:])
                elif ln.strip() in ("#", ""):
                    md.append("")
                else:
                    raise ValueError(f"markdown line does not start with '# ': {ln!r}")
            lines = md
        lines = _strip_blank(list(lines))
        if not lines:
            continue
        out.append({"kind": c["kind"], "tags": c["tags"], "source": "\n".join(lines)})
    return out


def build(src: Path) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(metadata=json.loads(json.dumps(NB_METADATA)))
    for index, c in enumerate(parse(src.read_text())):
        cid = str(index)  # nbstripout's own numbering
        meta = {"tags": c["tags"]} if c["tags"] else {}
        if c["kind"] == "markdown":
            cell = nbformat.v4.new_markdown_cell(c["source"], metadata=meta)
        else:
            cell = nbformat.v4.new_code_cell(c["source"], metadata=meta)
        cell["id"] = cid
        nb.cells.append(cell)
    if "solution" in src.parent.name:
        _check_solution(nb, src)
    nbformat.validate(nb)
    return nb


def _check_solution(nb, src: Path) -> None:
    n_sol = n_check = 0
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "solution" in tags:
            n_sol += 1
            if "### BEGIN SOLUTION" not in cell.source or "### END SOLUTION" not in cell.source:
                raise ValueError(f"{src}: a cell tagged 'solution' has no ### BEGIN/END SOLUTION region")
        if "check" in tags:
            n_check += 1
    if not n_sol or not n_check:
        raise ValueError(f"{src}: a solution notebook needs 'solution' and 'check' cells")


def dumps(nb) -> str:
    return nbformat.writes(nb, version=4) + "\n"


def targets() -> list[tuple[Path, Path]]:
    pairs = []
    for folder in FOLDERS:
        for src in sorted((SRC / folder).glob("*.py")):
            pairs.append((src, ROOT / folder / (src.stem + ".ipynb")))
    return pairs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if any notebook is out of date")
    ap.add_argument("names", nargs="*", help="only these notebooks (stems), e.g. 02_sampling_params")
    args = ap.parse_args(argv)
    stale = []
    for src, dst in targets():
        if args.names and src.stem not in args.names:
            continue
        text = dumps(build(src))
        old = dst.read_text() if dst.exists() else None
        if old == text:
            continue
        if args.check:
            stale.append(dst.relative_to(ROOT))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text)
            print(f"wrote {dst.relative_to(ROOT)}")
    if args.check:
        if stale:
            print("out of date (run `python tools/build_notebooks.py`):", *map(str, stale), sep="\n  ")
            return 1
        print("notebooks are in sync with tools/notebooks/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
