"""Small helpers shared across the engine: device facts, counters, logging."""
from __future__ import annotations

import logging

import numpy as np
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


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(data) (a list or a numpy array) on `device` without a host sync: on CUDA through pinned memory with
    non_blocking=True (a plain copy from pageable memory waits for the whole stream to drain,
    which would stall the host behind the GPU). PyTorch's pinned-memory cache keeps the
    buffer until the copy has run."""
    host = torch.from_numpy(data).to(dtype) if isinstance(data, np.ndarray) else None
    if device.type != "cuda":
        return host if host is not None else torch.tensor(data, dtype=dtype, device=device)
    if host is not None:
        return host.pin_memory().to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
