"""The set-up as a learner gets it: the `[lab]` install (no triton), from the repo root,
in a new terminal.

These tests run subprocesses the way the learner's commands do. "No triton" is simulated
by wrapping every import finder so that `triton` is not found, exactly as if it were not
installed (find_spec returns None, `import triton` raises ModuleNotFoundError); CI also
runs the real thing in a fresh `[lab]` venv (tools/ci_lab_install.sh).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Prepended to a `python -c` program: from here on triton is not installed.
HIDE_TRITON = textwrap.dedent("""
    import sys

    class _WithoutTriton:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                return None
            find_spec = getattr(self.finder, "find_spec", None)
            return find_spec(name, path, target) if find_spec else None

        def __getattr__(self, attr):
            return getattr(self.finder, attr)

    for _name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[_name]
    sys.meta_path[:] = [_WithoutTriton(f) for f in sys.meta_path]
    try:
        import triton
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the triton blocker did not work")
""")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def run_without_triton(program: str, cwd: Path = ROOT, **env) -> subprocess.CompletedProcess:
    """`python -c PROGRAM` in `cwd` (so cwd is sys.path[0], as for `python -m` from the clone)."""
    return subprocess.run([sys.executable, "-c", HIDE_TRITON + textwrap.dedent(program)], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=300)


def _check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


# ---------------------------------------------------------------- item 1: kernels/ at the top


def test_transformers_loads_llama_config_from_the_repo_root_without_triton():
    """From the repo root the top-level folder kernels/ is importable as `kernels`, and
    transformers probes for Hugging Face's `kernels` package by importing it: before the fix
    that import pulled in triton and AutoConfig failed with "Could not import module 'LlamaConfig'"."""
    out = _check(run_without_triton("""
        import sys, os
        assert os.path.realpath(sys.path[0] or os.curdir) == os.path.realpath(os.getcwd())
        import importlib.util
        assert importlib.util.find_spec("kernels").origin.endswith(os.path.join("kernels", "__init__.py"))
        from transformers import AutoConfig, LlamaConfig
        import labengine
        config = AutoConfig.from_pretrained(labengine.DEFAULT_MODEL)
        from transformers.utils import import_utils
        print(type(config).__name__, import_utils.is_kernels_available())
        k = sys.modules.get("kernels")
        ours = os.path.realpath(os.path.join(os.getcwd(), "kernels", "__init__.py"))  # (CI's .venv is in the clone)
        print("repo" if k is not None and os.path.realpath(getattr(k, "__file__", "") or "") == ours else "elsewhere")
    """))
    # transformers >= 5.25 depends on Hugging Face's `kernels`: then that package is the one it
    # gets (ours steps aside) and the Hub kernels are available; without it, ours is an empty
    # package and they are not.
    hf_kernels = _hf_kernels_installed()
    expected = ["True", "elsewhere"] if hf_kernels else ["False", "repo"]
    assert out.split()[1:] == expected and out.split()[0].endswith("Config"), out


def test_llm_runs_from_the_repo_root_without_triton():
    out = _check(run_without_triton("""
        from labengine import LLM, SamplingParams
        llm = LLM("tinylab")
        out = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        print(len(out[0].outputs[0].token_ids))
    """))
    assert out.strip().splitlines()[-1] == "4"


def test_labengine_kernels_imports_without_triton_and_names_what_is_missing():
    out = _check(run_without_triton("""
        import torch
        import labengine.kernels as kernels
        for name in kernels.__all__:
            try:
                getattr(kernels, name)
            except ImportError as e:
                assert "triton" in str(e) and name in str(e), e
            else:
                raise AssertionError(name + " should need triton")
        from labengine.attention import get_attn_backend
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            get_attn_backend("triton", torch.device("cpu"))
        except ImportError as e:
            print("backend:", e)
    """, cwd=Path("/")))
    assert "backend: labengine.kernels.store_kv needs triton" in out, out
    assert "attention_backend='torch'" in out


def test_top_level_kernels_hands_over_to_a_real_kernels_package(tmp_path):
    """With Hugging Face's `kernels` installed, the repo's folder must not shadow it."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("__version__ = '0.18.3'\nTHE_REAL_ONE = True\n")
    out = _check(run_without_triton("""
        import kernels
        print(kernels.__file__, kernels.THE_REAL_ONE)
    """, PYTHONPATH=str(site)))
    assert out.split() == [str(site / "kernels" / "__init__.py"), "True"]


def _hf_kernels_installed() -> bool:
    """Is a `kernels` package (Hugging Face's) installed outside the repo?"""
    from importlib.machinery import PathFinder

    path = [p for p in sys.path if os.path.realpath(p or os.curdir) != str(ROOT)]
    spec = PathFinder.find_spec("kernels", path)
    return spec is not None and spec.origin is not None   # not a namespace folder such as tests/kernels


def test_top_level_kernels_alone_is_an_empty_package_without_a_version():
    """Without Hugging Face's `kernels` installed (hidden here when it is: transformers >= 5.25
    depends on it), the repo's folder imported as `kernels` is an empty package."""
    out = _check(run_without_triton("""
        import os, sys
        here = os.path.realpath(os.getcwd())
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) == here
                       or not os.path.isdir(os.path.join(p or os.curdir, "kernels"))]
        import kernels
        print(kernels.__all__, hasattr(kernels, "__version__"), "triton" in sys.modules)
    """))
    assert out.split() == ["[]", "False", "False"]


# A value that names the repo root: a name like ROOT/REPO/root, __file__, the working directory,
# "." or "$PWD", with no folder name below it (ROOT / "tools" is not the root). Taking the root
# OUT of PYTHONPATH (tools/grade.py's kernel_env) writes a value that names none of these.
_ROOTISH = re.compile(r"root|repo|__file__|cwd|\$PWD|\$\(pwd\)|\$\{?ROOT", re.I)
_SUBFOLDER = re.compile(r"^[A-Za-z_][\w-]*$")


def _names_the_root(node) -> bool:
    import ast

    rootish = subfolder = False
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and _ROOTISH.search(sub.id):
            rootish = True
        elif isinstance(sub, ast.Attribute) and _ROOTISH.search(sub.attr):
            rootish = True
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            if sub.value in ("", ".", "./") or _ROOTISH.search(sub.value):
                rootish = True
            elif _SUBFOLDER.match(sub.value) and sub.value != "PYTHONPATH":
                subfolder = True
    return rootish and not subfolder


def path_writes(source: str) -> list:
    """(line, what) for each place a Python source puts something that names the repo root on
    PYTHONPATH (an environ item, setdefault/putenv/update, a PYTHONPATH= keyword, a dict
    literal) or on sys.path (insert/append/extend, assignment)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        values = []
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant) and t.slice.value == "PYTHONPATH":
                    values.append(("PYTHONPATH", node.value))
                if isinstance(t, ast.Attribute) and t.attr == "path" and isinstance(t.value, ast.Name) and t.value.id == "sys":
                    values.append(("sys.path", node.value))
                if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "path":
                    values.append(("sys.path", node.value))
        elif isinstance(node, ast.Call):
            f = node.func
            args = node.args
            if isinstance(f, ast.Attribute) and f.attr in ("setdefault", "putenv") and args \
                    and isinstance(args[0], ast.Constant) and args[0].value == "PYTHONPATH":
                values += [("PYTHONPATH", a) for a in args[1:]]
            if isinstance(f, ast.Attribute) and f.attr in ("insert", "append", "extend") \
                    and isinstance(f.value, ast.Attribute) and f.value.attr == "path":
                values += [("sys.path", a) for a in args]
            values += [("PYTHONPATH", k.value) for k in node.keywords if k.arg == "PYTHONPATH"]
        elif isinstance(node, ast.Dict):
            values += [("PYTHONPATH", v) for k, v in zip(node.keys, node.values)
                       if isinstance(k, ast.Constant) and k.value == "PYTHONPATH"]
        found += [(node.lineno, what) for what, value in values if _names_the_root(value)]
    return found


def shell_path_writes(text: str) -> list:
    """(line, text) for each shell or Makefile line that sets PYTHONPATH at all."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if not line.lstrip().startswith("#") and re.search(r"(^|[\s;&(])(export\s+)?PYTHONPATH\s*[+:]?=", line)]


def test_path_write_finder_flags_adding_the_root_and_not_removing_it():
    adds = [
        'os.environ["PYTHONPATH"] = str(ROOT)',
        'env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])',
        'os.environ.setdefault("PYTHONPATH", os.getcwd())',
        'subprocess.run(cmd, env=dict(os.environ, PYTHONPATH="."))',
        'sys.path.insert(0, str(Path(__file__).parents[1]))',
        'sys.path[:0] = [root]',
        'env = {"PYTHONPATH": repo_dir}',
        'sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))',
    ]
    for line in adds:
        assert path_writes(line), line
    removes = [
        'kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if os.path.realpath(p) != root]\n'
        'env["PYTHONPATH"] = os.pathsep.join(kept)',
        'env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}',
        'os.environ.pop("PYTHONPATH", None)',
        'sys.path.insert(0, str(ROOT / "tools"))',
        'sys.path.insert(0, os.path.join(os.path.dirname(__file__), "browser_fixtures"))',
    ]
    for source in removes:
        assert not path_writes(source), source
    assert shell_path_writes("PYTHONPATH=. pytest\nexport PYTHONPATH=$PWD\nmake X=1 PYTHONPATH=/x")  # 3 lines
    assert len(shell_path_writes("PYTHONPATH=. pytest\nexport PYTHONPATH=$PWD\n# PYTHONPATH=.\necho $PYTHONPATH")) == 2


def test_nothing_puts_the_repo_root_on_the_path():
    """The Makefile, the CI script, the tools and the tests run with the installed package;
    none puts the repo root on PYTHONPATH or sys.path (python -m from the clone already puts
    the root on sys.path, and that must be harmless). Taking it off is fine: the grader does."""
    offenders = []
    for path in [ROOT / "Makefile", ROOT / ".ci" / "run", *sorted((ROOT / "tools").glob("*.sh"))]:
        offenders += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in shell_path_writes(path.read_text())]
    for path in [*sorted((ROOT / "tools").glob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]:
        if path == Path(__file__).resolve():
            continue
        lines = path.read_text().splitlines()
        offenders += [f"{path.relative_to(ROOT)}:{n}: puts the root on {what}: {lines[n - 1].strip()}"
                      for n, what in path_writes(path.read_text())]
    assert not offenders, "\n".join(offenders)


def test_the_grading_kernel_never_has_the_repo_root_on_pythonpath():
    sys.path.insert(0, str(ROOT / "tools"))  # the tools folder, not the root
    try:
        import grade
    finally:
        sys.path.remove(str(ROOT / "tools"))
    sep = os.pathsep
    env = grade.kernel_env({"PYTHONPATH": sep.join([str(ROOT), "/opt/x", str(ROOT) + "/", ""]), "HOME": "/h"})
    assert env["PYTHONPATH"] == "/opt/x" and env["HOME"] == "/h" and env["MPLBACKEND"] == "Agg"
    assert "PYTHONPATH" not in grade.kernel_env({"PYTHONPATH": str(ROOT)})
    assert "PYTHONPATH" not in grade.kernel_env({})
    # one PyTorch thread for the exercises' small model, unless the learner chose a count
    assert grade.kernel_env({})["OMP_NUM_THREADS"] == "1"
    assert grade.kernel_env({"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"


def test_ci_runs_the_lab_install_job():
    """.ci/run runs tools/ci_lab_install.sh, which installs through tools/lab.sh itself (so
    the two cannot drift), checks triton is absent, and grades, serves and runs a notebook."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^bash tools/ci_lab_install\.sh", ci, re.M), ci
    job = (ROOT / "tools" / "ci_lab_install.sh").read_text()
    assert re.search(r'bash tools/lab\.sh --setup-only', job)
    assert "pip install" not in job, "the job must install exactly what lab.sh installs, nothing more"
    assert 'find_spec("triton")' in job
    assert "tools/grade.py" in job and "solutions/*.ipynb" in job
    assert "-m labengine.serve --model tinylab" in job and "/v1/completions" in job
    assert "nbconvert --to notebook --execute" in job


# ---------------------------------------------------------------- item 2: a new terminal


def _make_dry_run(tmp_path, *targets, venv=True, **env) -> str:
    """`make -n TARGETS` on a copy of the Makefile, with or without a .venv beside it."""
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    if venv:
        (tmp_path / ".venv" / "bin").mkdir(parents=True)
        (tmp_path / ".venv" / "bin" / "python").write_text("#!/bin/sh\n")
        (tmp_path / ".venv" / "bin" / "python").chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHON")}
    clean.update(env)
    proc = subprocess.run(["make", "-n", *targets], cwd=tmp_path, env=clean, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_uses_the_repo_venv_without_activation(tmp_path):
    out = _make_dry_run(tmp_path, "grade", "lab", "test", "EX=ex1_5_1")
    assert re.search(r'^\.venv/bin/python tools/grade\.py "ex1_5_1"$', out, re.M), out
    assert re.search(r"^\.venv/bin/python -m jupyter lab\b", out, re.M), out
    assert re.search(r"^\.venv/bin/python -m pytest", out, re.M), out


def test_make_uses_the_active_environment_first(tmp_path):
    out = _make_dry_run(tmp_path, "grade", "EX=x", VIRTUAL_ENV="/somewhere/venv")
    assert re.search(r'^python tools/grade\.py "x"$', out, re.M), out


def test_make_without_a_venv_says_how_to_make_one(tmp_path):
    out = _make_dry_run(tmp_path, "grade", "EX=x", venv=False)
    assert re.search(r'^python3 tools/grade\.py "x"$', out, re.M), out


def test_grade_py_in_a_new_terminal_runs_itself_with_the_repo_venv(tmp_path):
    """`python tools/grade.py` with a python that lacks nbformat (here: `python -S`, no
    site-packages) runs itself again with the repo's .venv/bin/python."""
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "grade.py", tmp_path / "tools" / "grade.py")
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    venv_python.chmod(0o755)
    env = {k: v for k, v in _env().items() if k not in ("VIRTUAL_ENV", "LABENGINE_GRADE_REEXEC")}
    proc = subprocess.run([sys.executable, "-S", str(tmp_path / "tools" / "grade.py"), "--help"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nbformat is not installed" in proc.stderr or "nbclient is not installed" in proc.stderr, proc.stderr
    assert f"running with {venv_python}" in proc.stderr
    assert "Grade an exercise notebook" in proc.stdout


def test_grade_py_without_any_venv_says_how_to_set_up(tmp_path):
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "grade.py", tmp_path / "tools" / "grade.py")
    proc = subprocess.run([sys.executable, "-S", str(tmp_path / "tools" / "grade.py"), "x.ipynb"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bash tools/lab.sh" in proc.stderr, proc.stderr


# ---------------------------------------------------------------- item 9: no noise


def test_package_builds_without_setuptools_warnings(tmp_path):
    """build_py is where setuptools warns "Package would be ignored"; the wheel must hold the
    embedded model's files and the kernels (as labengine.kernels)."""
    build = tmp_path / "build"
    proc = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "-d", str(build)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "would be ignored" not in output and "as data is deprecated" not in output, output
    embedded = build / "labengine" / "embedded" / "tinylab"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (embedded / name).is_file(), f"{name} missing from the built package"
    assert (build / "labengine" / "kernels" / "decode_attention.py").is_file()
    assert not (build / "kernels").exists(), "kernels/ must install as labengine.kernels only"


def test_launcher_installs_no_second_kernelspec():
    """tools/lab.sh opens JupyterLab with the venv's own `python3` kernel (the notebooks ask for
    it); a user-wide `labengine` kernelspec would be a second entry, pointing at one clone's venv."""
    script = (ROOT / "tools" / "lab.sh").read_text()
    assert "ipykernel install" not in script and "kernelspec install" not in script
    names = {json.loads(p.read_text())["metadata"]["kernelspec"]["name"]
             for folder in ("labs", "solutions", "exercises") for p in (ROOT / folder).glob("*.ipynb")}
    assert names == {"python3"}
