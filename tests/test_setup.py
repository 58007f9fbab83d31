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
    """))
    assert out.split() == [type_name := out.split()[0], "False"] and type_name.endswith("Config"), out


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


def test_top_level_kernels_alone_is_an_empty_package_without_a_version():
    out = _check(run_without_triton("""
        import sys, kernels
        print(kernels.__all__, hasattr(kernels, "__version__"), "triton" in sys.modules)
    """))
    assert out.split() == ["[]", "False", "False"]


def test_nothing_puts_the_repo_root_on_the_path():
    """The Makefile, the tools and the tests run with the installed package; none sets PYTHONPATH
    (python -m from the clone already puts the root on sys.path, and that must be harmless)."""
    files = [ROOT / "Makefile", ROOT / ".ci" / "run", *sorted((ROOT / "tools").glob("*.sh")),
             *sorted((ROOT / "tools").glob("*.py")), *sorted((ROOT / "tests").rglob("*.py"))]
    offenders = []
    for path in files:
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "PYTHONPATH" in line and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


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
