"""BlockManager: the paged KV cache's bookkeeping (plain Python, no tensors).

The cache is cut into physical blocks of `block_size` token slots. Each sequence has a
block table (logical block i -> physical block). Sequences of one request share blocks
after a fork, counted by reference; the first one to write into a shared block copies it
(copy-on-write). Preemption by swap moves a request's blocks to a CPU pool and back.
Every block that leaves or returns to a free pool is published as an event.
"""
from __future__ import annotations

import enum
from collections import deque
from typing import Optional

from labengine.events import (BlockAllocated, BlockCopied, BlockFreed, BlockSwappedIn, BlockSwappedOut,
                              EventBus)
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus
from labengine.utils import cdiv


class AllocStatus(enum.Enum):
    OK = enum.auto()  # can allocate now
    LATER = enum.auto()  # not enough free blocks now, but enough once others finish
    NEVER = enum.auto()  # more blocks than the whole cache has


class BlockAllocator:
    """The free pool of one device, with a reference count per physical block."""

    def __init__(self, device: str, num_blocks: int) -> None:
        self.device = device
        self.num_blocks = num_blocks
        # FIFO: a freed block goes to the back, so reuse is visible on the block map.
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    def allocate(self) -> int:
        if not self.free_blocks:
            raise RuntimeError(f"Out of memory: no free {self.device} KV blocks (all {self.num_blocks} in use).")
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"{self.device} block {block} is free; it cannot be shared"
        self.ref_counts[block] += 1

    def decref(self, block: int) -> bool:
        """Drop one reference; True when the block went back to the free pool."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"Double free: {self.device} block {block} is already free.")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)
            return True
        return False

    def get_num_free_blocks(self) -> int:
        return len(self.free_blocks)


class BlockManager:
    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01, event_bus: Optional[EventBus] = None) -> None:
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        # Keep a few blocks free when admitting prompts so running sequences can grow
        # without an immediate preemption (vLLM's watermark; 0 for the lab's tiny caches).
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.gpu_allocator = BlockAllocator("gpu", num_gpu_blocks)
        self.cpu_allocator = BlockAllocator("cpu", num_cpu_blocks)
        self.block_tables: dict[int, list[int]] = {}  # seq_id -> physical blocks (cpu ones while swapped)
        self.seq_request: dict[int, str] = {}  # seq_id -> request_id, for the event ledger
        self.swapped_seqs: set[int] = set()  # seq_ids whose table holds cpu blocks
        self.bus = event_bus or EventBus()

    # ---- one block in, one block out: every change goes through these two ----
    def _take(self, allocator: BlockAllocator, seq_id: int, logical_index: int) -> int:
        block = allocator.allocate()
        if self.bus.active:
            self.bus.emit(BlockAllocated, request_id=self.seq_request[seq_id], seq_id=seq_id, block=block,
                          logical_index=logical_index, device=allocator.device)
        return block

    def _release(self, allocator: BlockAllocator, block: int, seq_id: int, reason: str) -> None:
        if allocator.decref(block) and self.bus.active:
            self.bus.emit(BlockFreed, request_id=self.seq_request[seq_id], seq_id=seq_id, block=block,
                          device=allocator.device, reason=reason)

    # ---- admission ----
    def can_allocate(self, seq_group: SequenceGroup) -> AllocStatus:
        needed = sum(cdiv(s.get_len(), self.block_size) for s in seq_group.get_seqs(SequenceStatus.WAITING))
        if self.num_gpu_blocks - needed < self.watermark_blocks:
            return AllocStatus.NEVER
        if self.gpu_allocator.get_num_free_blocks() - needed >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def allocate(self, seq_group: SequenceGroup) -> None:
        """Give every waiting sequence of the group blocks for all its tokens."""
        for seq in seq_group.get_seqs(SequenceStatus.WAITING):
            self.seq_request[seq.seq_id] = seq_group.request_id
            n = cdiv(seq.get_len(), self.block_size)
            self.block_tables[seq.seq_id] = [self._take(self.gpu_allocator, seq.seq_id, i) for i in range(n)]

    # ---- decode ----
    def _needs_new_block(self, seq: Sequence) -> bool:
        table = self.block_tables[seq.seq_id]
        return cdiv(seq.get_len(), self.block_size) > len(table) or self.gpu_allocator.ref_counts[table[-1]] > 1

    def can_append_slots_ahead(self, seqs: list[Sequence]) -> bool:
        """Whether every sequence can get a slot for one token beyond its length (async
        scheduling: that token is still being sampled) without copy-on-write."""
        needed = 0
        bs, ref = self.block_size, self.gpu_allocator.ref_counts
        for seq in seqs:
            table = self.block_tables[seq.seq_id]
            if cdiv(seq.get_len() + 1, bs) > len(table):
                needed += 1
            elif ref[table[-1]] > 1:
                return False
        return needed <= self.gpu_allocator.get_num_free_blocks()

    def append_slot_ahead(self, seq: Sequence) -> None:
        """Room for the token after the sequence's last one (checked by can_append_slots_ahead)."""
        table = self.block_tables[seq.seq_id]
        if cdiv(seq.get_len() + 1, self.block_size) > len(table):
            table.append(self._take(self.gpu_allocator, seq.seq_id, len(table)))

    def can_append_slots(self, seq_group: SequenceGroup) -> bool:
        needed = sum(self._needs_new_block(s) for s in seq_group.get_seqs(SequenceStatus.RUNNING))
        return needed <= self.gpu_allocator.get_num_free_blocks()

    def append_slots(self, seq: Sequence) -> Optional[tuple[int, int]]:
        """Make room for the sequence's newest token; returns (src, dst) when a block must be copied."""
        table = self.block_tables[seq.seq_id]
        if cdiv(seq.get_len(), self.block_size) > len(table):
            table.append(self._take(self.gpu_allocator, seq.seq_id, len(table)))
            return None
        last = table[-1]
        if self.gpu_allocator.ref_counts[last] == 1:
            return None
        # The last block is shared with a sibling and this sequence is about to write into it.
        new = self._take(self.gpu_allocator, seq.seq_id, len(table) - 1)
        self._release(self.gpu_allocator, last, seq.seq_id, "copy_on_write")
        table[-1] = new
        if self.bus.active:
            self.bus.emit(BlockCopied, request_id=self.seq_request[seq.seq_id], seq_id=seq.seq_id, src=last, dst=new)
        return last, new

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares all the parent's blocks (reference counts go up, nothing is copied)."""
        table = self.block_tables[parent.seq_id]
        for block in table:
            self.gpu_allocator.incref(block)
        self.block_tables[child.seq_id] = list(table)
        self.seq_request[child.seq_id] = self.seq_request[parent.seq_id]

    def free(self, seq: Sequence, reason: str = "finished") -> None:
        table = self.block_tables.pop(seq.seq_id, None)
        if table is None:
            return
        allocator = self.cpu_allocator if seq.seq_id in self.swapped_seqs else self.gpu_allocator
        self.swapped_seqs.discard(seq.seq_id)
        for block in reversed(table):
            self._release(allocator, block, seq.seq_id, reason)
        del self.seq_request[seq.seq_id]

    # ---- swapping ----
    def _unique_blocks(self, seq_group: SequenceGroup, status: SequenceStatus) -> set[int]:
        return {b for s in seq_group.get_seqs(status) for b in self.block_tables[s.seq_id]}

    def can_swap_in(self, seq_group: SequenceGroup) -> bool:
        # One extra block per sequence, for the token it will write next.
        needed = len(self._unique_blocks(seq_group, SequenceStatus.SWAPPED)) + seq_group.num_seqs(SequenceStatus.SWAPPED)
        return self.gpu_allocator.get_num_free_blocks() - needed >= self.watermark_blocks

    def swap_in_never_fits(self, seq_group: SequenceGroup) -> bool:
        needed = len(self._unique_blocks(seq_group, SequenceStatus.SWAPPED)) + seq_group.num_seqs(SequenceStatus.SWAPPED)
        return needed > self.num_gpu_blocks - self.watermark_blocks

    def can_swap_out(self, seq_group: SequenceGroup) -> bool:
        return len(self._unique_blocks(seq_group, SequenceStatus.RUNNING)) <= self.cpu_allocator.get_num_free_blocks()

    def _move(self, seq_group, status, src: BlockAllocator, dst: BlockAllocator, reason: str) -> dict[int, int]:
        mapping: dict[int, int] = {}
        for seq in seq_group.get_seqs(status):
            table = self.block_tables[seq.seq_id]
            for i, block in enumerate(table):
                if block in mapping:
                    dst.incref(mapping[block])
                else:
                    mapping[block] = self._take(dst, seq.seq_id, i)
                self._release(src, block, seq.seq_id, reason)
                table[i] = mapping[block]
            if dst is self.cpu_allocator:
                self.swapped_seqs.add(seq.seq_id)
            else:
                self.swapped_seqs.discard(seq.seq_id)
        return mapping

    def swap_out(self, seq_group: SequenceGroup) -> list[tuple[int, int]]:
        """Move the group's blocks to the CPU pool; returns (gpu_block, cpu_block) pairs to copy."""
        mapping = self._move(seq_group, SequenceStatus.RUNNING, self.gpu_allocator, self.cpu_allocator, "swapped_out")
        if self.bus.active:
            for gpu, cpu in mapping.items():
                self.bus.emit(BlockSwappedOut, request_id=seq_group.request_id, gpu_block=gpu, cpu_block=cpu)
        return list(mapping.items())

    def swap_in(self, seq_group: SequenceGroup) -> list[tuple[int, int]]:
        """Bring the group's blocks back; returns (cpu_block, gpu_block) pairs to copy."""
        mapping = self._move(seq_group, SequenceStatus.SWAPPED, self.cpu_allocator, self.gpu_allocator, "swapped_in")
        if self.bus.active:
            for cpu, gpu in mapping.items():
                self.bus.emit(BlockSwappedIn, request_id=seq_group.request_id, gpu_block=gpu, cpu_block=cpu)
        return list(mapping.items())

    # ---- queries ----
    def get_block_table(self, seq: Sequence) -> list[int]:
        return self.block_tables[seq.seq_id]

    def get_num_free_gpu_blocks(self) -> int:
        return self.gpu_allocator.get_num_free_blocks()

    def get_num_free_cpu_blocks(self) -> int:
        return self.cpu_allocator.get_num_free_blocks()

    def get_num_used_gpu_blocks(self) -> int:
        return self.num_gpu_blocks - self.gpu_allocator.get_num_free_blocks()
