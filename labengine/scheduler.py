"""Scheduler: continuous batching over the paged KV cache (plain Python, no tensors).

Every step it decides what the model runs: either a batch of prompts to prefill
(waiting requests admitted first-come first-served while the token budget
`max_num_batched_tokens`, the sequence budget `max_num_seqs` and the free blocks allow),
or one decode token for every running sequence. Requests join and leave the running batch
between steps. When a running sequence needs a block and none is free, the newest running
request is preempted: its blocks are freed and it is recomputed later ("recompute"), or
its blocks are moved to the CPU pool and brought back later ("swap").

With prefix caching a prompt's cached blocks are reused at admission and only its other
tokens count against the token budget. With chunked prefill (vLLM 0.5.4's policy) a step
mixes both kinds: every running decode first, then the chunk of a prompt already being
prefilled, then swapped-in requests, then new prompts; a prompt that does not fit in what
is left of `max_num_batched_tokens` is cut, and its next chunk comes next step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Optional

from labengine.block_manager import AllocStatus, BlockManager
from labengine.config import SchedulerConfig
from labengine.events import EventBus, Preempted, PrefillChunk, Scheduled
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus


@dataclass
class ScheduledSequenceGroup:
    seq_group: SequenceGroup
    token_chunk_size: int  # tokens of this group that go through the model this step
    # False for a prompt chunk that does not reach the end of the prompt: nothing to sample
    do_sample: bool = True
    is_prefill: bool = False  # a prompt (or recomputed sequence) rather than decode tokens
    # a chunk that is not the last: tokens per seq_id (a sequence may get none); None: every
    # sequence runs to its end
    chunk_sizes: Optional[dict] = None


@dataclass
class SchedulerOutputs:
    scheduled_seq_groups: list[ScheduledSequenceGroup] = field(default_factory=list)
    is_prefill: bool = False  # some group is in its prefill (with chunked prefill, decodes may join it)
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), copy-on-write
    ignored_seq_groups: list[SequenceGroup] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    # async scheduling: running sequences left out of this step (the token being sampled
    # ahead of it ends them by length, so they have nothing to run)
    skipped_seq_ids: frozenset = frozenset()

    def is_empty(self) -> bool:
        return not (self.scheduled_seq_groups or self.blocks_to_swap_in or self.blocks_to_swap_out
                    or self.blocks_to_copy)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 event_bus: EventBus | None = None, watermark: float = 0.01, enable_caching: bool = False) -> None:
        self.config = config
        self.bus = event_bus or EventBus()
        self.block_manager = BlockManager(block_size, num_gpu_blocks, num_cpu_blocks, watermark, self.bus,
                                          enable_caching=enable_caching)
        self.chunked_prefill = getattr(config, "enable_chunked_prefill", False)
        self.waiting: deque[SequenceGroup] = deque()
        self.running: deque[SequenceGroup] = deque()
        self.swapped: deque[SequenceGroup] = deque()

    # ---- requests in and out ----
    def add_seq_group(self, seq_group: SequenceGroup) -> None:
        self.waiting.append(seq_group)

    def abort_seq_group(self, request_ids: str | Iterable[str]) -> list[SequenceGroup]:
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        aborted = []
        for queue in (self.waiting, self.running, self.swapped):
            for group in [g for g in queue if g.request_id in ids]:
                queue.remove(group)
                for seq in group.get_seqs():
                    if not seq.is_finished():
                        self.free_seq(seq, "aborted")
                        seq.status = SequenceStatus.FINISHED_ABORTED
                aborted.append(group)
        return aborted

    def has_unfinished_seqs(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def get_num_unfinished_seq_groups(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def fork_seq(self, parent: Sequence, child: Sequence) -> None:
        self.block_manager.fork(parent, child)

    def free_seq(self, seq: Sequence, reason: str = "finished") -> None:
        self.block_manager.free(seq, reason)

    def free_finished_seq_groups(self) -> list[SequenceGroup]:
        finished = [g for g in self.running if g.is_finished()]
        if finished:
            self.running = deque(g for g in self.running if not g.is_finished())
        return finished

    # ---- the decision ----
    def schedule(self) -> SchedulerOutputs:
        out = SchedulerOutputs()
        if self.chunked_prefill:
            self._schedule_chunked(out)
            if self.bus.active:
                self._emit_scheduled(out)
            return out
        if not self.swapped:
            self._schedule_prefills(out)
        if not out.scheduled_seq_groups:
            self._schedule_decodes(out)
        if self.bus.active:
            self._emit_scheduled(out)
        return out

    def _emit_scheduled(self, out: SchedulerOutputs) -> None:
        prefills = [s for s in out.scheduled_seq_groups if s.is_prefill]
        for s in prefills:
            for seq in s.seq_group.get_seqs(SequenceStatus.RUNNING):
                start = seq.num_computed_tokens
                n = seq.get_len() - start if s.chunk_sizes is None else s.chunk_sizes[seq.seq_id]
                self.bus.emit(PrefillChunk, request_id=s.seq_group.request_id, start=start, num_tokens=n,
                              total_len=seq.get_len(), is_last=s.do_sample)
        self.bus.emit(Scheduled, prefill_request_ids=tuple(s.seq_group.request_id for s in prefills),
                      decode_request_ids=tuple(s.seq_group.request_id for s in out.scheduled_seq_groups
                                               if not s.is_prefill),
                      num_batched_tokens=out.num_batched_tokens,
                      token_budget=self.config.max_num_batched_tokens, seq_budget=self.config.max_num_seqs,
                      num_running=len(self.running), num_waiting=len(self.waiting),
                      num_swapped=len(self.swapped))

    def schedule_lookahead(self) -> SchedulerOutputs | None:
        """Async scheduling: the next decode step, decided while the current one still runs.

        Every running sequence is one token longer than the host knows (the token being
        sampled now), so each gets a slot one position further. Returns None when the step
        must be decided normally, after the current one: requests are waiting or swapped
        out (they may be admitted), or the cache cannot give every sequence its slot
        (preemption) or a block is shared (copy-on-write).
        """
        if self.waiting or self.swapped or not self.running:
            return None
        if self.chunked_prefill and any(g.is_prefill() for g in self.running):
            return None  # a prompt is being prefilled in chunks: its next chunk is decided normally
        running = SequenceStatus.RUNNING
        cap = self.config.max_model_len
        seqs: list[Sequence] = []
        skipped: set[int] = set()
        groups: list[ScheduledSequenceGroup] = []
        for g in self.running:
            max_tokens = g.sampling_params.max_tokens
            n = 0
            for s in g.seqs_dict.values():
                if s.status is not running:
                    continue
                if s.get_len() + 1 > cap or (max_tokens is not None and s.get_output_len() + 1 >= max_tokens):
                    skipped.add(s.seq_id)
                else:
                    seqs.append(s)
                    n += 1
            if n:
                groups.append(ScheduledSequenceGroup(g, n))
        bm = self.block_manager
        if not seqs or not bm.can_append_slots_ahead(seqs):
            return None
        for seq in seqs:
            bm.append_slot_ahead(seq)
        out = SchedulerOutputs(scheduled_seq_groups=groups, num_batched_tokens=len(seqs),
                               skipped_seq_ids=frozenset(skipped))
        if self.bus.active:
            self._emit_scheduled(out)
        return out

    def _num_running_seqs(self) -> int:
        return sum(g.get_max_num_running_seqs() for g in self.running)

    def _schedule_prefills(self, out: SchedulerOutputs) -> None:
        num_tokens, num_seqs = 0, self._num_running_seqs()
        while self.waiting:
            group = self.waiting[0]
            status = self.block_manager.can_allocate(group)
            if status == AllocStatus.LATER:
                break
            new_tokens = sum(s.get_num_uncomputed_tokens() for s in group.get_seqs(SequenceStatus.WAITING))
            new_seqs = group.get_max_num_running_seqs()
            if (status == AllocStatus.NEVER or new_seqs > self.config.max_num_seqs
                    or new_tokens > self.config.max_num_batched_tokens):
                # It can never be scheduled: more blocks than the whole cache (a recomputed group
                # that grew past it), more sequences than max_num_seqs or more tokens than one
                # step's budget (add_request refuses these; this is the safety net). Finish it
                # rather than retry forever and hold up every request behind it.
                self.waiting.popleft()
                for seq in group.get_seqs(SequenceStatus.WAITING):
                    seq.status = SequenceStatus.FINISHED_IGNORED
                out.ignored_seq_groups.append(group)
                continue
            # Tokens of a cached prefix are not computed: they do not count against the budget.
            new_tokens -= self.block_manager.num_cached_tokens(group)
            if (num_tokens + new_tokens > self.config.max_num_batched_tokens
                    or num_seqs + new_seqs > self.config.max_num_seqs):
                break
            self.waiting.popleft()
            self.block_manager.allocate(group)
            for seq in group.get_seqs(SequenceStatus.WAITING):
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            out.scheduled_seq_groups.append(ScheduledSequenceGroup(group, new_tokens, is_prefill=True))
            num_tokens += new_tokens
            num_seqs += new_seqs
        out.is_prefill = bool(out.scheduled_seq_groups)
        out.num_batched_tokens = out.num_prefill_tokens = num_tokens if out.is_prefill else 0

    def _schedule_chunked(self, out: SchedulerOutputs) -> None:
        """Chunked prefill (vLLM 0.5.4's policy): decodes first, prefill chunks fill the rest
        of the token budget."""
        bm, budget = self.block_manager, self.config.max_num_batched_tokens
        # 1. every running decode, oldest first; the newest running request is preempted
        #    when blocks run out (a prompt being prefilled holds all its blocks already)
        self._run_decodes(out, skip_prefills=True)  # swapped requests come back as decodes
        decodes = [g for g in self.running if not g.is_prefill()]
        num_tokens = sum(g.num_seqs(SequenceStatus.RUNNING) for g in decodes)  # <= max_num_seqs <= budget
        prefills: list[ScheduledSequenceGroup] = []

        # 2. the next chunk of every prompt already being prefilled
        for group in list(self.running):
            if not group.is_prefill():
                continue
            scheduled = _chunk(group, group.get_seqs(SequenceStatus.RUNNING), budget - num_tokens)
            if scheduled is None:
                break
            prefills.append(scheduled)
            num_tokens += scheduled.token_chunk_size
        # 3. new prompts, first come first served, while budget, max_num_seqs and blocks allow
        num_seqs = self._num_running_seqs()
        while self.waiting and not self.swapped:
            group = self.waiting[0]
            status = bm.can_allocate(group)
            if status == AllocStatus.LATER:
                break
            if status == AllocStatus.NEVER:
                self.waiting.popleft()
                for seq in group.get_seqs(SequenceStatus.WAITING):
                    seq.status = SequenceStatus.FINISHED_IGNORED
                out.ignored_seq_groups.append(group)
                continue
            seqs = group.get_seqs(SequenceStatus.WAITING)
            new_seqs = group.get_max_num_running_seqs()
            scheduled = _chunk(group, seqs, budget - num_tokens, bm.cached_tokens_per_seq(group))
            if scheduled is None or num_seqs + new_seqs > self.config.max_num_seqs:
                break
            self.waiting.popleft()
            bm.allocate(group)
            for seq in seqs:
                seq.status = SequenceStatus.RUNNING
            self.running.append(group)
            prefills.append(scheduled)
            num_tokens += scheduled.token_chunk_size
            num_seqs += new_seqs
        out.scheduled_seq_groups = prefills + [ScheduledSequenceGroup(g, g.num_seqs(SequenceStatus.RUNNING))
                                               for g in decodes]
        out.is_prefill = bool(prefills)
        out.num_prefill_tokens = sum(p.token_chunk_size for p in prefills)
        out.num_batched_tokens = num_tokens

    def _run_decodes(self, out: SchedulerOutputs, skip_prefills: bool = False) -> None:
        """A slot for every running decode, oldest first, preempting the newest running request
        while blocks run out; then swapped requests come back if nothing was preempted.
        `skip_prefills`: a prompt still being prefilled in chunks keeps its place untouched
        (it holds all its blocks already)."""
        queue = list(self.running)  # oldest first
        kept: list[SequenceGroup] = []
        while queue:
            group = queue.pop(0)
            if skip_prefills and group.is_prefill():
                kept.append(group)
                continue
            while not self.block_manager.can_append_slots(group):
                victim = queue.pop() if queue else group  # the newest running request
                self._preempt(victim, out)
                if victim is group:
                    break
            else:
                self._append_slots(group, out)
                kept.append(group)
        self.running = deque(kept)
        if not out.preempted:
            self._schedule_swapped(out)
        if out.preempted:
            # Recomputed requests go back to the front of the queue, in arrival order.
            self.waiting = deque(sorted(self.waiting, key=lambda g: g.arrival_time))

    def _schedule_decodes(self, out: SchedulerOutputs) -> None:
        self._run_decodes(out)
        out.scheduled_seq_groups = [ScheduledSequenceGroup(g, g.num_seqs(SequenceStatus.RUNNING))
                                    for g in self.running]
        out.num_batched_tokens = sum(s.token_chunk_size for s in out.scheduled_seq_groups)

    def _schedule_swapped(self, out: SchedulerOutputs) -> None:
        num_seqs = self._num_running_seqs()
        while self.swapped:
            group = self.swapped[0]
            if self.block_manager.swap_in_never_fits(group):
                # Its sequences together outgrew the whole cache: end them where they are.
                self.swapped.popleft()
                for seq in group.get_seqs(SequenceStatus.SWAPPED):
                    self.free_seq(seq, "finished")
                    seq.status = SequenceStatus.FINISHED_LENGTH_CAPPED
                out.ignored_seq_groups.append(group)
                continue
            new_seqs = group.get_max_num_running_seqs()
            if num_seqs + new_seqs > self.config.max_num_seqs or not self.block_manager.can_swap_in(group):
                break
            self.swapped.popleft()
            out.blocks_to_swap_in.extend(self.block_manager.swap_in(group))
            for seq in group.get_seqs(SequenceStatus.SWAPPED):
                seq.status = SequenceStatus.RUNNING
            self._append_slots(group, out)
            self.running.append(group)
            num_seqs += new_seqs

    def _append_slots(self, group: SequenceGroup, out: SchedulerOutputs) -> None:
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            copy = self.block_manager.append_slots(seq)
            if copy is not None:
                out.blocks_to_copy.append(copy)

    def _preempt(self, group: SequenceGroup, out: SchedulerOutputs) -> None:
        mode = self.config.preemption_mode
        if mode == "swap" and not self.block_manager.can_swap_out(group):
            mode = "recompute"  # the CPU pool is full: fall back rather than fail the request
        if mode == "swap" and self.chunked_prefill and group.is_prefill():
            mode = "recompute"  # a prompt cut in chunks is simply started again
        if self.bus.active:
            self.bus.emit(Preempted, request_id=group.request_id, mode=mode)
        group.num_preemptions += 1
        out.preempted.append(group)
        if mode == "swap":
            out.blocks_to_swap_out.extend(self.block_manager.swap_out(group))
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                seq.status = SequenceStatus.SWAPPED
            self.swapped.append(group)
        else:
            for seq in group.get_seqs(SequenceStatus.RUNNING):
                self.free_seq(seq, "preempted")
                seq.reset_for_recompute()
            self.waiting.appendleft(group)


def _chunk(group: SequenceGroup, seqs: list[Sequence], left: int,
           cached: Optional[list[int]] = None) -> Optional[ScheduledSequenceGroup]:
    """What of the group's prefill fits in `left` tokens (None: nothing). `cached`: per
    sequence, the tokens a prefix-cache hit will spare (a group not yet allocated). The last
    chunk computes every sequence's remaining tokens at once and samples; until then each
    sequence stops one token short of its end (its last token's logits are needed when it
    is sampled), sequences filled in order."""
    remaining = [s.get_num_uncomputed_tokens() for s in seqs]
    if cached:
        remaining = [r - c for r, c in zip(remaining, cached)]
    total = sum(remaining)
    if total <= left:
        return ScheduledSequenceGroup(group, total, do_sample=True, is_prefill=True) if total else None
    sizes = {}
    for seq, r in zip(seqs, remaining):
        take = min(max(r - 1, 0), left)
        sizes[seq.seq_id] = take
        left -= take
    chunk = sum(sizes.values())
    if chunk == 0:
        return None
    return ScheduledSequenceGroup(group, chunk, do_sample=False, is_prefill=True, chunk_sizes=sizes)
