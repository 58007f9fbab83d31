"""Shared test set-up.

Without a CUDA GPU, Triton kernels run through Triton's interpreter on CPU tensors. The
switch must be set before any kernel is defined, so it is set here, before any test module
imports labengine.kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Notebooks under tests/ are fixtures for the browser test, not lessons for nbval.
collect_ignore_glob = ["browser_fixtures/*"]
