"""Engine events: what learners watch.

Every component publishes small frozen dataclasses on the engine's EventBus; a Trace,
the invariant checker or a live widget subscribes. Publishing is guarded by
`if bus.active:` so an engine that nobody watches pays one attribute read per site.
The bus stamps each event with the engine step and the seconds since the engine started.
This module imports nothing from labengine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    step: int
    t: float  # seconds since the engine started


@dataclass(frozen=True)
class RequestAdded(Event):
    kind: ClassVar[str] = "request_added"
    request_id: str
    prompt_len: int
    n: int
    best_of: int
    max_tokens: Optional[int]
    temperature: float
    use_beam_search: bool


@dataclass(frozen=True)
class Scheduled(Event):
    kind: ClassVar[str] = "scheduled"
    prefill_request_ids: tuple
    decode_request_ids: tuple
    num_batched_tokens: int
    token_budget: int  # max_num_batched_tokens
    seq_budget: int  # max_num_seqs
    num_running: int
    num_waiting: int
    num_swapped: int


@dataclass(frozen=True)
class BlockAllocated(Event):
    kind: ClassVar[str] = "block_allocated"
    request_id: str
    seq_id: int
    block: int
    logical_index: int
    device: str  # "gpu" (the engine's cache, also on CPU) or "cpu" (swap pool)


@dataclass(frozen=True)
class BlockFreed(Event):
    kind: ClassVar[str] = "block_freed"
    request_id: str
    seq_id: int
    block: int
    device: str
    reason: str  # "finished", "aborted", "preempted", "swapped_out", "swapped_in", "copy_on_write"


@dataclass(frozen=True)
class BlockCopied(Event):
    kind: ClassVar[str] = "block_copied"
    request_id: str
    seq_id: int
    src: int
    dst: int


@dataclass(frozen=True)
class BlockSwappedOut(Event):
    kind: ClassVar[str] = "block_swapped_out"
    request_id: str
    gpu_block: int
    cpu_block: int


@dataclass(frozen=True)
class BlockSwappedIn(Event):
    kind: ClassVar[str] = "block_swapped_in"
    request_id: str
    gpu_block: int
    cpu_block: int


@dataclass(frozen=True)
class Preempted(Event):
    kind: ClassVar[str] = "preempted"
    request_id: str
    mode: str  # "recompute" or "swap"


@dataclass(frozen=True)
class StepFinished(Event):
    kind: ClassVar[str] = "step_finished"
    latency_s: float
    schedule_s: float
    prepare_s: float
    forward_s: float
    sample_s: float
    detokenize_s: float
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_running: int
    num_waiting: int
    num_swapped: int
    # tensor parallelism (empty with one rank): per rank, rank 0 first, the forward's seconds and
    # the part spent in collectives (input broadcast, all-reduces, logits gather); compute is the rest
    rank_forward_s: tuple = ()
    rank_comm_s: tuple = ()


@dataclass(frozen=True)
class RequestFinished(Event):
    kind: ClassVar[str] = "request_finished"
    request_id: str
    finish_reason: Optional[str]
    prompt_len: int
    output_len: int
    ttft_s: Optional[float]
    latency_s: float


EVENT_TYPES = (RequestAdded, Scheduled, BlockAllocated, BlockFreed, BlockCopied, BlockSwappedOut,
               BlockSwappedIn, Preempted, StepFinished, RequestFinished)


class EventBus:
    """Synchronous publish/subscribe; one per engine."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []
        self.active = False  # True while anyone listens: publishers check it first
        self.step = 0
        self.t0 = time.perf_counter()

    def subscribe(self, fn: Callable[[Event], None]) -> None:
        self._subscribers.append(fn)
        self.active = True

    def unsubscribe(self, fn: Callable[[Event], None]) -> None:
        if fn in self._subscribers:
            self._subscribers.remove(fn)
        self.active = bool(self._subscribers)

    def emit(self, event_cls, **fields) -> None:
        """Build the event (stamped with step and t) and deliver it to every subscriber."""
        event = event_cls(step=self.step, t=time.perf_counter() - self.t0, **fields)
        for fn in list(self._subscribers):
            fn(event)
