"""Programmatic dependent launch (PDL, Hopper and newer): the next kernel starts while this one drains.

A decode step is ~300 kernels replayed as one CUDA graph; at small batches most of them run
for a microsecond or two, and the gap between one kernel's last block and the next one's
first block (launch, then the new grid's blocks filling the SMs) is a large share of the
step. With PDL a kernel launched with `launch_pdl=True` may be scheduled before the kernel
ahead of it in the stream has finished: as soon as every block of that kernel has called
`gdc_launch_dependents` (or exited). It must then call `gdc_wait` before it touches memory,
which returns once the kernel ahead has completed and its writes are visible.

`pdl_prologue(PDL)` does both, first thing in each kernel that uses it (the decode step's
layer kernels, KV store, decode attention and sampling): it releases its own dependents at
once (they are scheduled only after all of this grid's blocks are resident, so they never
take an SM from it) and then waits for the kernel ahead. Waiting before any load or store
keeps every ordering a plain launch gives: no read of a buffer before its producer is done,
no write to a buffer before its earlier readers are. cuBLAS kernels between them launch as
usual (they wait for the whole kernel ahead). On a GPU without PDL, in triton's interpreter
or with `ENABLED = False`, the kernels are launched as before and the prologue is compiled out.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:  # triton >= 3.3 on NVIDIA
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None

ENABLED = True  # a switch for A/B measurements (benchmarks/throughput.py --ab pdl)


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (launched with launch_pdl=True)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@functools.lru_cache(maxsize=None)
def _capable(device_index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def pdl_args(device: torch.device) -> dict:
    """Launch keywords for a kernel with a `PDL` constexpr: PDL on Hopper+ CUDA tensors when ENABLED."""
    on = ENABLED and device.type == "cuda" and _capable(device.index if device.index is not None
                                                        else torch.cuda.current_device())
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)
