"""Small helpers shared across the engine: device facts, counters, logging."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("labengine")


def is_hip() -> bool:
    """True on an AMD ROCm build of PyTorch."""
    return torch.version.hip is not None


def is_cpu() -> bool:
    """True when the engine will run on the CPU (no CUDA GPU is visible)."""
    return not torch.cuda.is_available()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Counter:
    """Monotonic counter; `next(counter)` gives 0, 1, 2, ... (request and sequence ids)."""

    def __init__(self, start: int = 0) -> None:
        self.counter = start

    def __next__(self) -> int:
        i = self.counter
        self.counter += 1
        return i

    def reset(self) -> None:
        self.counter = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
