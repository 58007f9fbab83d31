"""The tensor-parallel layout a model is built with, the process group, and the collectives the layers call.

One process per rank, each holding a slice of every weight. The layers ask `get_tp_size()`
and `get_tp_rank()` when they are built: inside `tensor_parallel_layout(size, rank)` (the
tensor-parallel runner builds its model there) they take their slice; anywhere else the
answer is size 1, rank 0 and the model is the single-device one, even in a process that
also holds a tensor-parallel engine. In their forward passes the layers call `all_reduce`
(row-parallel linears, the vocabulary-parallel embedding) and `gather_to_first_rank` (the
LM head's logits). Every collective adds its wall time to a counter (`take_comm_seconds`),
so a step can report compute versus communication per rank. gloo's collectives block
until every rank has arrived, so on CPU that time includes waiting for the slowest rank;
NCCL's are queued on the GPU stream, so on CUDA it is the host's time only.
"""
from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

_TP_SIZE = 1
_TP_RANK = 0
_comm_seconds = 0.0


def get_tp_size() -> int:
    """Ranks the model being built is split over (1 outside `tensor_parallel_layout`)."""
    return _TP_SIZE


def get_tp_rank() -> int:
    return _TP_RANK


@contextlib.contextmanager
def tensor_parallel_layout(size: int, rank: int):
    """Build a model inside this block to get rank `rank`'s slice of a `size`-way split."""
    global _TP_SIZE, _TP_RANK
    before = _TP_SIZE, _TP_RANK
    _TP_SIZE, _TP_RANK = size, rank
    try:
        yield
    finally:
        _TP_SIZE, _TP_RANK = before


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes (as vLLM)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float = 600.0) -> None:
    """Join the default process group as `rank` of `world_size`; blocks until all ranks have joined."""
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialized in this process: one tensor-parallel "
                           "engine per process (shut the other one down first, e.g. `del llm`).")
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device  # NCCL binds the communicator to this GPU
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def take_comm_seconds() -> float:
    """Seconds spent in collectives since the last call (and reset the counter)."""
    global _comm_seconds
    s, _comm_seconds = _comm_seconds, 0.0
    return s


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place (the one collective of a row-parallel layer)."""
    global _comm_seconds
    t0 = time.perf_counter()
    dist.all_reduce(x)
    _comm_seconds += time.perf_counter() - t0
    return x


def gather_to_first_rank(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Concatenate every rank's `x` along the last dimension on rank 0; None on the others."""
    global _comm_seconds
    t0 = time.perf_counter()
    x = x.contiguous()
    first = dist.get_rank() == 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())] if first else None
    dist.gather(x, parts, dst=0)
    _comm_seconds += time.perf_counter() - t0
    return torch.cat(parts, dim=-1) if first else None
