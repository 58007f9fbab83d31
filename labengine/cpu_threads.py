"""How many PyTorch threads a lesson should run with on a CPU.

PyTorch starts one intra-op thread per core. For a small model on a laptop that is the wrong
choice twice over: a step's matrices are too small for a second thread to pay for its
synchronisation, and when other programs keep the cores busy the threads spin waiting for
each other. Measured on a 2-core machine with the embedded model (tinylab, ~7 M parameters):
quiet, one and two threads give the same step time within 7%; with two busy-loop processes
beside it, one thread runs a lone decode step in 3.7 ms and two threads in 205 ms. A lesson
that times batching against a loop then measures the thread pile-up instead of batching.

    from labengine.cpu_threads import use_lesson_threads
    print(use_lesson_threads(llm))     # sets torch.set_num_threads on a CPU engine, says why

`LABENGINE_NUM_THREADS=N` in the environment overrides the choice.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

# Below this many parameters one thread is used whatever the machine: see the module docstring.
SMALL_MODEL_PARAMS = 50_000_000
ENV_VAR = "LABENGINE_NUM_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    num_threads: int
    previous: int
    cores: int
    busy: float          # runnable tasks besides this one when measured (other work on the cores)
    model_params: int
    reason: str

    def __str__(self) -> str:
        return f"PyTorch threads: {self.num_threads} (PyTorch's default here: {self.previous}). {self.reason}"


def choose_num_threads(cores: int, busy: float, model_params: int, override: "str | None" = None) -> tuple[int, str]:
    """The thread count for a model of `model_params` parameters on `cores` cores of which
    `busy` are taken by other work, and why. `override` (the environment variable's value) wins."""
    if override:
        try:
            n = int(override)
        except ValueError:
            raise ValueError(f"{ENV_VAR} must be a whole number of threads, got {override!r}") from None
        if n < 1:
            raise ValueError(f"{ENV_VAR} must be at least 1, got {n}")
        return n, f"{ENV_VAR}={n} is set."
    cores = max(1, int(cores))
    if model_params < SMALL_MODEL_PARAMS:
        return 1, (f"A model of {model_params / 1e6:.1f} M parameters: its matrices are too small for a second "
                   "thread to pay off, and on a busy CPU extra threads wait for each other.")
    n = max(1, min(cores, cores - math.ceil(max(0.0, busy) - 0.25)))
    return n, f"{cores} cores, about {busy:.1f} of them busy with other work: one thread per free core."


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval_s: float = 0.02) -> float:
    """How many tasks besides this one want a core right now: the median of a few readings of
    the kernel's runnable-task count (/proc/loadavg, Linux), which unlike the load average does
    not lag a minute behind. Elsewhere: the 1-minute load average."""
    readings = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            break
        readings.append(max(0, running - 1))   # the reading process itself is running
        if i + 1 < samples:
            time.sleep(interval_s)
    if readings:
        return float(statistics.median(readings))
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def _model_of(target):
    engine = getattr(target, "llm_engine", None) or getattr(target, "engine", None) or target
    runner = getattr(engine, "model_runner", None)
    model = getattr(runner, "model", None) if runner is not None else target
    device = getattr(getattr(engine, "config", None), "device", None)
    return model, device


def use_lesson_threads(target) -> ThreadChoice:
    """Choose and set the PyTorch thread count for `target` (an LLM, an LLMEngine, or an
    nn.Module on the CPU). On a GPU engine the count is left alone: the model runs on the GPU."""
    model, device = _model_of(target)
    params = sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0
    previous = torch.get_num_threads()
    cores = available_cores()
    if device is not None and torch.device(device).type != "cpu":
        return ThreadChoice(previous, previous, cores, 0.0, params, "The model runs on the GPU: left as it is.")
    busy = busy_cores()
    n, reason = choose_num_threads(cores, busy, params, os.environ.get(ENV_VAR))
    torch.set_num_threads(n)
    return ThreadChoice(n, previous, cores, busy, params, reason)
