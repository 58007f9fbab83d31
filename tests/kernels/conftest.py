"""Kernel tests: on a machine without CUDA they run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 must be set before any Triton kernel is defined, so it is set here (if no
GPU is present) before `labengine.kernels` is imported. From a source checkout where the
package is not installed, `labengine.kernels` is registered from the repo's kernels/ folder.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[2]


def _register_kernels() -> None:
    try:
        import labengine.kernels  # noqa: F401

        return
    except ImportError:
        pass
    folder = ROOT / "kernels"
    spec = importlib.util.spec_from_file_location(
        "labengine.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["labengine.kernels"] = module
    spec.loader.exec_module(module)
    import labengine

    labengine.kernels = module


_register_kernels()
