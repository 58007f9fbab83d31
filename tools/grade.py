#!/usr/bin/env python
"""Grade a learner's exercise notebook against the canonical checks.

    python tools/grade.py exercises/ex1_5_1_basic_inference.ipynb
    make grade EX=exercises/ex1_5_1_basic_inference.ipynb        # the same
    python tools/grade.py my_copy.ipynb --solution solutions/ex1_5_1_basic_inference.ipynb

It works from a new terminal: without an activated virtual environment it runs itself again
with the repository's .venv/bin/python (made by `bash tools/lab.sh`) when the Python that
started it lacks nbformat/nbclient.

What it does (nbgrader's "autograde"):
1. copies the solution notebook (solutions/<same name>),
2. puts the learner's cells tagged "solution" in place of the solution's (matched by cell id,
   or by order when the ids differ); every other cell, the setup and "check" cells above all,
   stays the canonical one, so editing or deleting a check in your copy changes nothing,
3. runs the result top to bottom in a fresh kernel (nbclient) without stopping at errors,
4. prints one line per check cell (✓ passed / ✗ failed, with what it verified or why not).

How a check passes: only on evidence the learner's code cannot forge by accident or by an
easy trick. The learner's code runs in the same kernel as the checks (they need its live
objects), so the verdict is not read from anything that code can write (its printed text,
an error output it can hide) but from:

* the kernel's execute_reply for the check cell: status "ok". The kernel reports an
  exception as status "error" even when `get_ipython().set_custom_exc(...)` or
  `sys.excepthook` hides the traceback, so a swallowed failure is still a failure;
* a per-run secret: every check cell is sent wrapped in a prologue and an epilogue; the
  epilogue prints a fresh random nonce that the grader made just before sending that cell
  (the learner's earlier cells cannot know it). A check passes only when that exact line
  came back, i.e. the canonical check code ran to its last line;
* an integrity audit, in the prologue and again in the epilogue: the check fails if the
  kernel was tampered with: custom exception handlers, an excepthook, trace or profile
  functions, cell/AST transformers or event callbacks defined by notebook code, shell or
  kernel methods replaced, builtins (print, len, ...) replaced, stdout replaced, or any
  function of labengine or labengine.grading replaced by notebook code. The prologue also
  imports the check helpers (check, check_equal, ...) again, so rebinding those names does
  nothing;
* a static scan of the learner's solution cells before running: code that reaches for the
  kernel's machinery (set_custom_exc, excepthook, settrace, ast/input transformers,
  sys.modules, builtins, __code__, globals(), importlib ...), assigns an attribute of an
  imported module (`labengine.grading.check = ...`), or rebinds or mutates a name that the
  exercise's own setup cells define (PROMPTS, MODEL, llm ...) makes every check fail with a
  message naming the cell and the line;
* checks that verify against independent evidence, not against the learner's own claims
  (times against the engine's RequestOutput.metrics, outputs regenerated with the
  parameters the task asks for, trace facts recomputed from the trace, functions called on
  cases with known answers, including cases where the answer is False).

None of this makes a check unforgeable by code written to attack this grader (anything in a
kernel can, in principle, reach anything else in it); it makes a wrong answer fail, and an
attempt to hide a failure visible, with a message that says which cell did what.

Cell numbers: "cell [k]" is the k-th code cell of the exercise notebook, which is the
execution count JupyterLab shows beside it ("[k]:") after "Restart Kernel and Run All
Cells"; markdown cells are not counted.

Exit code: 0 when every check passes, 1 when any fails, 2 on a usage error.
`--json FILE` also writes the report as JSON; `--executed FILE` saves the executed notebook.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_VENV = ROOT / ".venv"
_REEXEC = "LABENGINE_GRADE_REEXEC"


def _ensure_notebook_packages() -> None:
    """Run again with the repo's .venv when this Python lacks nbformat/nbclient (a new
    terminal where .venv was never activated)."""
    try:
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    except ImportError as e:
        venv_python = _VENV / "bin" / "python"
        in_venv = Path(sys.prefix).resolve() == _VENV.resolve()
        if venv_python.exists() and not in_venv and not os.environ.get(_REEXEC):
            print(f"grade: {e.name} is not installed for {sys.executable}; running with {venv_python}",
                  file=sys.stderr)
            os.environ[_REEXEC] = "1"
            os.execv(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]])
        print(f"grade: this Python ({sys.executable}) has no {e.name}. Set up the lab first with "
              "`bash tools/lab.sh` (it makes .venv, which the grader then uses by itself), or install the "
              "lab's packages into this Python: `python -m pip install -e '.[lab]'`.", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    _ensure_notebook_packages()

import argparse  # noqa: E402
import ast  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import secrets  # noqa: E402
import time  # noqa: E402

import nbformat  # noqa: E402

NONCE_MARK = "labengine-grader-ok"


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


def cell_numbers(nb) -> dict:
    """{cell index: k}, k = the cell's 1-based position among code cells, which is the
    execution count JupyterLab shows ("[k]:") after Restart Kernel and Run All."""
    out, k = {}, 0
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            k += 1
            out[i] = k
    return out


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


# ------------------------------------------------------------------------------------------
# static scan of the learner's solution cells

# attributes and names that only code reaching into the kernel or the grader needs
_KERNEL_ATTRS = {
    "set_custom_exc": "hides exceptions from the kernel", "custom_exceptions": "hides exceptions",
    "CustomTB": "hides exceptions", "showtraceback": "hides exceptions", "_showtraceback": "hides exceptions",
    "excepthook": "replaces the exception hook", "settrace": "installs a trace function",
    "setprofile": "installs a profile function", "ast_transformers": "rewrites later cells",
    "input_transformers_post": "rewrites later cells", "input_transformers_cleanup": "rewrites later cells",
    "input_transformer_manager": "rewrites later cells", "run_cell": "replaces cell execution",
    "run_code": "replaces cell execution", "run_ast_nodes": "replaces cell execution",
    "do_execute": "replaces cell execution",
    "__code__": "replaces a function's code", "__globals__": "reaches another module's globals",
    "__builtins__": "edits the builtins",
    "_getframe": "reads the caller's frame", "f_back": "reads the caller's frame",
    "f_locals": "reads the caller's frame", "f_globals": "reads the caller's frame",
}
_KERNEL_NAMES = {
    "builtins": "edits the builtins", "__builtins__": "edits the builtins", "globals": "edits the namespace",
    "importlib": "reloads or replaces modules", "ctypes": "edits memory", "gc": "reaches every object",
    "In": "reads the cells' source", "_ih": "reads the cells' source", "Out": "reads the cells' results",
}
_MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "update",
             "setdefault", "popitem", "add", "discard", "__setitem__", "__delitem__", "__setattr__"}


def _python_source(source: str) -> str:
    """The cell's code as the kernel runs it (IPython magics turned into Python)."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return TransformerManager().transform_cell(source)
    except Exception:  # noqa: BLE001  no IPython here: the raw source is what we have
        return source


def _bound_names(tree) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _module_names(trees) -> set:
    mods = {"sys", "os", "math", "builtins", "labengine"}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:  # `from labengine import grading` binds a module too
                    if a.name[:1].islower():
                        mods.add(a.asname or a.name)
    return mods


def scan_solution_cells(nb) -> list:
    """Findings in the learner's solution cells that make the notebook ungradable:
    [{"cell": index, "line": n, "what": text}]."""
    numbers = cell_numbers(nb)
    setup_trees, sol = [], []
    for i, c in enumerate(nb.cells):
        if c.cell_type != "code":
            continue
        try:
            tree = ast.parse(_python_source(c.source))
        except SyntaxError:
            tree = None
        if "solution" in tags(c):
            sol.append((i, tree))
        elif "check" not in tags(c) and tree is not None:
            setup_trees.append(tree)
    setup_names = set().union(*map(_bound_names, setup_trees)) if setup_trees else set()
    modules = _module_names(setup_trees + [t for _, t in sol if t is not None])
    found = []

    def add(i, node, what):
        found.append({"cell": i, "number": numbers.get(i), "line": getattr(node, "lineno", None), "what": what})

    for i, tree in sol:
        if tree is None:
            continue  # a syntax error shows up when the cell runs
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in _KERNEL_ATTRS:
                add(i, node, f"uses .{node.attr} ({_KERNEL_ATTRS[node.attr]})")
            elif isinstance(node, ast.Attribute) and node.attr == "modules" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                add(i, node, "uses sys.modules (replaces modules)")
            elif isinstance(node, ast.Name) and node.id in _KERNEL_NAMES and node.id not in setup_names:
                add(i, node, f"uses {node.id} ({_KERNEL_NAMES[node.id]})")
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    root = (node.module or a.name).split(".")[0] if isinstance(node, ast.ImportFrom) else \
                        a.name.split(".")[0]
                    if root in _KERNEL_NAMES:
                        add(i, node, f"imports {root} ({_KERNEL_NAMES[root]})")
                    bound = a.asname or a.name.split(".")[0]
                    if bound in setup_names and bound != "*":
                        add(i, node, f"imports a new {bound!r}, a name the exercise's setup defines")
            elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)) \
                    and node.id in setup_names:
                add(i, node, f"assigns {node.id!r}, which the exercise's setup defines and the checks "
                             "compare against; use a name of your own")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in setup_names:
                add(i, node, f"defines {node.name!r}, which the exercise's setup defines")
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                for t in targets:
                    base = t
                    while isinstance(base, (ast.Attribute, ast.Subscript)):
                        base = base.value
                    if isinstance(t, (ast.Attribute, ast.Subscript)) and isinstance(base, ast.Name):
                        if base.id in modules:
                            add(i, node, f"changes {ast.unparse(t)}, part of the module {base.id!r}")
                        elif base.id in setup_names:
                            add(i, node, f"changes {ast.unparse(t)}, part of {base.id!r}, which the "
                                         "exercise's setup defines")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in _MUTATORS and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id in setup_names | modules:
                add(i, node, f"calls {node.func.value.id}.{node.func.attr}(...), which changes "
                             f"{node.func.value.id!r}, defined by the exercise's setup")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id in ("setattr", "delattr", "exec", "eval", "__import__"):
                add(i, node, f"calls {node.func.id}(...), which the grader does not allow in solution cells")
    uniq, seen = [], set()
    for f in found:
        key = (f["cell"], f["line"], f["what"])
        if key not in seen:
            seen.add(key)
            uniq.append(f)
    return uniq


# ------------------------------------------------------------------------------------------
# running: every check cell wrapped in an audit and a nonce

_AUDIT = r'''
def __labengine_grader_audit(_when):
    import builtins as _b, os as _os, sys as _s, types as _t
    import labengine.grading as _g
    _ip = get_ipython()
    _found = []

    def _from_notebook(f):
        f = getattr(f, "__func__", f)
        for _ in range(8):
            if hasattr(f, "func") and not isinstance(f, type):
                f = f.func
        if isinstance(f, (_t.BuiltinFunctionType, _t.BuiltinMethodType, _t.MethodWrapperType,
                          _t.WrapperDescriptorType, _t.MethodDescriptorType)):
            return False
        if getattr(f, "__module__", None) == "__main__":
            return True
        _c = getattr(f, "__code__", None)
        if _c is None:
            _c = getattr(getattr(type(f), "__call__", None), "__code__", None)
            if _c is None:
                return False
        _fn = _c.co_filename  # a cell's code: /tmp/ipykernel_<pid>/<hash>.py (or <ipython-input-...>)
        return "ipykernel_" in _fn or _fn.startswith("<ipython-input")

    if type(_ip).__module__.split(".")[0] not in ("ipykernel", "IPython"):
        _found.append("get_ipython() was replaced")
    # (the exceptiongroup backport registers a handler for BaseExceptionGroup, which only
    # formats exception groups; any other type's handler hides a check's failure)
    _eg = getattr(_b, "BaseExceptionGroup", None) or getattr(_s.modules.get("exceptiongroup"), "BaseExceptionGroup", None)
    if any(not (_eg is not None and isinstance(_x, type) and issubclass(_x, _eg)) for _x in _ip.custom_exceptions):
        _found.append("get_ipython().set_custom_exc(...) hides exceptions")
    for _n, _f in (("sys.excepthook", _s.excepthook), ("sys.gettrace()", _s.gettrace()),
                   ("sys.getprofile()", _s.getprofile()), ("threading trace", None)):
        if _f is not None and _from_notebook(_f):
            _found.append(f"{_n} is set by notebook code")
    for _ev, _fns in _ip.events.callbacks.items():
        if any(_from_notebook(_f) for _f in _fns):
            _found.append(f"an event callback ({_ev}) was registered by notebook code")
    for _n in ("ast_transformers", "input_transformers_post", "input_transformers_cleanup"):
        for _tr in getattr(_ip, _n, []) or []:
            if _from_notebook(_tr) or type(_tr).__module__ == "__main__":
                _found.append(f"get_ipython().{_n} holds a transformer defined by notebook code")
    for _n in ("run_cell", "run_cell_async", "run_ast_nodes", "run_code", "showtraceback",
               "_showtraceback", "transform_cell", "transform_ast", "ev", "ex", "user_expressions",
               "excepthook", "should_run_async"):
        _f = getattr(_ip, _n, None)
        if _f is not None and _from_notebook(_f):
            _found.append(f"get_ipython().{_n} was replaced")
    _k = getattr(_ip, "kernel", None)
    for _n in ("do_execute", "execute_request", "send_response"):
        _f = getattr(_k, _n, None)
        if _f is not None and _from_notebook(_f):
            _found.append(f"the kernel's {_n} was replaced")
    for _n, _f in vars(_b).items():
        if callable(_f) and _from_notebook(_f):
            _found.append(f"builtins.{_n} was replaced")
    for _n, _f in (("sys.stdout", _s.stdout), ("sys.stderr", _s.stderr)):
        if type(_f).__module__.split(".")[0] != "ipykernel":
            _found.append(f"{_n} was replaced")
    if _s.modules.get("labengine.grading") is not _g or \
            _os.path.realpath(_g.__file__) != _os.path.realpath(GRADING_FILE):
        _found.append("labengine.grading is not the lab's own module")
    for _mn, _mod in list(_s.modules.items()):
        if not (_mn == "labengine" or _mn.startswith("labengine.") or _mn in ("math", "operator", "numpy",
                                                                            "pandas", "functools")):
            continue
        for _n, _f in list(vars(_mod).items()):
            _fs = [_f] + ([_v for _v in vars(_f).values()] if isinstance(_f, type) and
                          getattr(_f, "__module__", "").startswith("labengine") else [])
            for _x in _fs:
                _x = getattr(_x, "__func__", getattr(_x, "fget", _x))
                if callable(_x) and _from_notebook(_x):
                    _found.append(f"{_mn}.{_n} was replaced by notebook code")
                    break
    if _found:
        raise RuntimeError("the grader found the kernel tampered with (" + _when + "): "
                           + "; ".join(dict.fromkeys(_found)))
'''


def wrap_check(source: str, nonce: str, helper_names: list) -> str:
    """A check cell's source as the grader sends it: audit, fresh helpers, the check, audit, nonce."""
    grading_file = str(ROOT / "labengine" / "grading.py")
    try:  # the installed package's file (an editable install points here too)
        import importlib.util

        spec = importlib.util.find_spec("labengine.grading")
        if spec is not None and spec.origin:
            grading_file = spec.origin
    except (ImportError, ValueError):
        pass
    prologue = [_AUDIT.replace("GRADING_FILE", repr(grading_file)),
                '__labengine_grader_audit("before the check")']
    if helper_names:
        prologue.append(f"from labengine.grading import {', '.join(helper_names)}")
    epilogue = ['__labengine_grader_audit("after the check")', "del __labengine_grader_audit",
                f'print("{NONCE_MARK} {nonce}")']
    return "\n".join(prologue) + "\n# ---- the check cell\n" + source + "\n# ----\n" + "\n".join(epilogue) + "\n"


def grading_helpers(nb) -> list:
    """The names the exercise's setup cells import from labengine.grading."""
    names = []
    for c in nb.cells:
        if c.cell_type != "code" or {"solution", "check"} & set(tags(c)):
            continue
        try:
            tree = ast.parse(_python_source(c.source))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "labengine.grading":
                names += [a.name for a in node.names if a.asname is None and a.name != "*"]
    return list(dict.fromkeys(names))


def kernel_env(environ=None) -> dict:
    """The grading kernel's environment: ours (os.environ, or `environ`), with the repo root
    taken out of PYTHONPATH. The root holds our `kernels/` folder, which transformers would
    import as Hugging Face's `kernels` package (and fail without triton); labengine comes from
    the installed package. Nothing is added to the path."""
    env = dict(os.environ if environ is None else environ)
    root = os.path.realpath(ROOT)
    kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and os.path.realpath(p) != root]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    env.setdefault("MPLBACKEND", "Agg")
    # One PyTorch thread unless the learner set a count: the exercises run the embedded
    # ~7 M-parameter model, whose steps a second thread does not speed up, and on a busy
    # laptop threads waiting for each other turned a 0.2 s call into 4-8 s (see
    # labengine/cpu_threads.py), enough to push a timing check past its margin.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int) -> dict:
    """Run the merged notebook in a fresh kernel; check cells wrapped (see the module's
    docstring). Returns {cell index: {"status": execute_reply status, "nonce": ...}}."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    helpers = grading_helpers(nb)
    runs: dict = {}

    class GradingClient(NotebookClient):
        async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
            if cell.cell_type != "code":
                return cell
            if any(r.get("dead") for r in runs.values()):
                return cell  # the kernel died: nothing after it runs
            run = runs.setdefault(cell_index, {"status": None, "nonce": None})
            original = cell.source
            if "check" in tags(cell):
                run["nonce"] = secrets.token_hex(16)
                cell.source = wrap_check(original, run["nonce"], helpers)
            try:
                return await super().async_execute_cell(cell, cell_index, execution_count, store_history)
            except (CellTimeoutError, DeadKernelError) as e:
                run["status"], run["dead"] = "error", True
                cell.outputs.append(nbformat.v4.new_output(
                    "error", ename=type(e).__name__, evalue=str(e).splitlines()[0] if str(e) else "", traceback=[]))
                return cell
            finally:
                cell.source = original

    def on_cell_executed(cell, cell_index, execute_reply, **_):
        content = (execute_reply or {}).get("content", {})
        run = runs.setdefault(cell_index, {"status": None, "nonce": None})
        run["status"] = content.get("status")
        if run["status"] == "error":  # the kernel's own account, even when the notebook hid the traceback
            run["ename"], run["evalue"] = content.get("ename"), content.get("evalue")

    client = GradingClient(nb, timeout=timeout, kernel_name="python3", allow_errors=True,
                           on_cell_executed=on_cell_executed, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env())  # handed to the kernel manager's start_kernel
    return runs


# ------------------------------------------------------------------------------------------
# the report


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def _error(cell):
    for o in cell.get("outputs", []):
        if o.get("output_type") == "error":
            return o
    return None


def report(nb: nbformat.NotebookNode, runs: "dict | None" = None, findings: "list | None" = None) -> dict:
    """The verdicts. With `runs` (from execute), a check passes only when its execute_reply
    was "ok", it printed no error and its nonce line came back; without (a notebook run by
    other means, e.g. the tests' own kernel), on no error output alone."""
    numbers = cell_numbers(nb)
    findings = findings or []
    checks, problems = [], []
    k = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        err = _error(cell)
        error = None if err is None else f"{err['ename']}: {err['evalue']}".strip()
        if "check" in tags(cell):
            k += 1
            text = _stream_text(cell)
            verified = [ln for ln in text.splitlines() if ln.startswith("✓")]
            passed = err is None
            if runs is not None:
                run = runs.get(i, {})
                completed = bool(run.get("nonce")) and f"{NONCE_MARK} {run['nonce']}" in text.splitlines()
                if error is None and run.get("status") != "ok":
                    if run.get("ename"):
                        error = (f"{run['ename']}: {run.get('evalue') or ''}".strip() + "\n  (the kernel "
                                 "reported this error, but the notebook showed none: something hid it)")
                    else:
                        error = ("the check did not complete: the kernel reported "
                                 f"{run.get('status') or 'no reply'} but showed no error (was the exception hidden?)")
                elif error is None and not completed:
                    error = "the check did not run to its end (its completion line is missing)"
                passed = error is None
            if findings:  # whatever the check did, it cannot be trusted
                passed = False
                error = "not graded: your code " + findings[0]["what"] + f" (cell [{findings[0]['number']}])" + \
                    (f"\n  the check itself: {error.splitlines()[0]}" if error else "")
            checks.append({"name": check_name(cell, k), "cell": i, "number": numbers[i], "passed": passed,
                           "verified": verified, "error": error})
        elif err is not None:
            problems.append({"cell": i, "number": numbers[i], "id": cell.get("id"),
                             "solution": "solution" in tags(cell), "error": error})
    return {"checks": checks, "cell_errors": problems, "tampering": findings,
            "passed": sum(c["passed"] for c in checks), "total": len(checks)}


def strip_nonces(nb) -> None:
    """Remove the grader's completion lines from the executed notebook's outputs."""
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream" and NONCE_MARK in o.get("text", ""):
                o["text"] = "".join(ln for ln in o["text"].splitlines(True) if not ln.startswith(NONCE_MARK))


def print_report(rep: dict, name: str, elapsed: float) -> None:
    print(f"Grading {name}")
    for f in rep.get("tampering", []):
        print(f"  ! your code in cell [{f['number']}], line {f['line']}, {f['what']}: the notebook is not graded")
    for p in rep["cell_errors"][:4]:
        first = p["error"].splitlines()[0][:300] if p["error"] else "an error"
        if p["solution"] and first.startswith("NotImplementedError"):
            print(f"  ! your code in cell [{p['number']}] is not written yet (NotImplementedError)")
        else:
            where = "your code in cell" if p["solution"] else "setup cell"
            print(f"  ! {where} [{p['number']}] raised {first}")
    for c in rep["checks"]:
        mark = "✓" if c["passed"] else "✗"
        print(f"  {mark} {c['name']} (cell [{c['number']}])")
        if c["passed"]:
            for ln in c["verified"]:
                print(f"      {ln}")
        else:
            lines = (c["error"] or "").splitlines()
            print(f"      {lines[0][:400] if lines else 'failed'}")
            for ln in lines[1:3]:
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


def _labengine_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("labengine") is not None


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
    if not _labengine_importable():
        print(f"grade: labengine is not installed for {sys.executable}; run `bash tools/lab.sh` or "
              "`python -m pip install -e '.[lab]'` from the repository first.", file=sys.stderr)
        return 2
    learner = nbformat.read(path, as_version=4)
    sol = Path(args.solution) if args.solution else find_solution(path, learner)
    if sol is None or not sol.exists():
        print(f"grade: which exercise is {path.name}? No solution notebook matches it; "
              "pass --solution solutions/<exercise>.ipynb", file=sys.stderr)
        return 2
    solution = nbformat.read(sol, as_version=4)
    nb = merge(learner, solution)
    findings = scan_solution_cells(nb)
    t0 = time.perf_counter()
    runs = execute(nb, sol.resolve().parent, args.timeout)
    rep = report(nb, runs, findings)
    rep["notebook"] = str(path)
    print_report(rep, str(path), time.perf_counter() - t0)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rep, indent=2, ensure_ascii=False))
    if args.executed:
        strip_nonces(nb)
        nbformat.write(nb, args.executed)
    ok = rep["total"] > 0 and rep["passed"] == rep["total"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
