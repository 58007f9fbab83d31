"""Kernel tests: on a machine without CUDA they run through Triton's interpreter on CPU tensors.

TRITON_INTERPRET=1 must be set before any Triton kernel is defined, so it is set here (if no
GPU is present) before `labengine.kernels` is imported. From a source checkout where the
package is not installed, `labengine.kernels` is registered from the repo's kernels/ folder.
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# From a source checkout where the package is not installed, the Triton backend registers the
# repo's kernels/ folder as labengine.kernels (one loader, in labengine/attention/triton_backend.py).
import labengine.attention.triton_backend  # noqa: E402,F401
