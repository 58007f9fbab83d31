"""Engine events: what learners watch.

Every component publishes small frozen dataclasses on the engine's EventBus; a Trace,
the invariant checker or a live widget subscribes. Publishing is guarded by
`if bus.active:` so an engine that nobody watches pays one attribute read per site.
The bus stamps each event with the engine step and the seconds since the engine started.
This module imports nothing from labengine.
"""
from __future__ import annotations

import dataclasses
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
    # prefix caching: the request let go of the block. cached=True: nobody holds it any more
    # but it stays registered (in the evictor), reusable by a later request with that prefix.
    cached: bool = False


@dataclass(frozen=True)
class PrefixCacheLookup(Event):
    """Prefix caching: a waiting sequence looked its full prompt blocks up at admission."""
    kind: ClassVar[str] = "prefix_cache_lookup"
    request_id: str
    seq_id: int
    num_queried_blocks: int  # full blocks looked up (the last token is always computed)
    num_hit_blocks: int  # leading blocks found: hits; the rest of the queried ones are misses
    hit_blocks: tuple  # the physical blocks reused, in logical order
    num_cached_tokens: int  # tokens not computed thanks to the hits
    num_tokens: int  # the sequence's length


@dataclass(frozen=True)
class BlockReused(Event):
    """Prefix caching: a request took a registered block (a cache hit) instead of a fresh one."""
    kind: ClassVar[str] = "block_reused"
    request_id: str
    seq_id: int
    block: int
    logical_index: int
    from_evictor: bool  # True: the block was free (cached); False: other requests hold it too
    num_holders: int  # requests holding the block now, this one included


@dataclass(frozen=True)
class BlockEvicted(Event):
    """Prefix caching: a cached free block lost its registration to make a fresh block."""
    kind: ClassVar[str] = "block_evicted"
    block: int
    block_hash: int
    request_id: str  # the request that needed the fresh block


@dataclass(frozen=True)
class PrefillChunk(Event):
    """A prompt (or recomputed sequence) goes through the model in this step, whole or a chunk."""
    kind: ClassVar[str] = "prefill_chunk"
    request_id: str
    start: int  # first position computed this step (tokens before it are cached or done)
    num_tokens: int
    total_len: int  # the sequence's length: the prefill ends when start + num_tokens == total_len
    is_last: bool  # this chunk ends the prefill (the step samples a token)


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
               BlockSwappedIn, Preempted, StepFinished, RequestFinished, PrefixCacheLookup, BlockReused,
               BlockEvicted, PrefillChunk)


class EventBus:
    """Synchronous publish/subscribe; one per engine.

    Async scheduling decides step s+1 (and allocates its blocks) before step s completes.
    So that a trace reads the same with async scheduling on and off, the engine wraps that
    early decision in hold() ... end_hold(): its events are kept back and delivered by
    release(), after step s's step_finished, stamped with step s+1. A block allocated while
    held and freed before the release (its request finished in step s, so a synchronous
    engine would never have allocated it) is delivered neither allocated nor freed.
    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []
        self.active = False  # True while anyone listens: publishers check it first
        self.step = 0
        self.t0 = time.perf_counter()
        self._holding = False
        self._held: list[Event] = []  # events of the step decided ahead, not yet delivered

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
        if self._holding:
            self._held.append(event)
            return
        if self._held and event_cls is BlockFreed:
            for i, e in enumerate(self._held):
                if (e.kind == "block_allocated" and (e.device, e.block, e.seq_id) ==
                        (event.device, event.block, event.seq_id)):
                    del self._held[i]  # allocated ahead, never used: neither event is delivered
                    return
        self._deliver(event)

    def _deliver(self, event: Event) -> None:
        for fn in list(self._subscribers):
            fn(event)

    # async scheduling: the next step's events, kept back until the current step is published
    def hold(self) -> None:
        """Keep back the events emitted from now until end_hold() (they belong to the next step)."""
        self._holding = True

    def end_hold(self) -> None:
        """Deliver events again; what was held waits for release()."""
        self._holding = False

    def held_blocks(self, device: str = "gpu", kinds: tuple = ("block_allocated",)) -> set:
        """The blocks of held events of these kinds (already done in the block manager, not yet
        published): block_allocated blocks and blocks reused from the evictor (block_reused:
        only those; a shared block was in use already) are in use, and block_evicted blocks
        and blocks reused from the evictor have left the evictor."""
        return {e.block for e in self._held if e.kind in kinds and getattr(e, "device", "gpu") == device
                and getattr(e, "from_evictor", True)}

    def release(self) -> None:
        """Deliver the held events, stamped with the current step and time."""
        held, self._held = self._held, []
        t = time.perf_counter() - self.t0
        for e in held:
            self._deliver(dataclasses.replace(e, step=self.step, t=t))
