"""BlockManager: the paged KV cache's bookkeeping (plain Python, no tensors).

The cache is cut into physical blocks of `block_size` token slots. Each sequence has a
block table (logical block i -> physical block). Sequences of one request share blocks
after a fork, counted by reference; the first one to write into a shared block copies it
(copy-on-write). Preemption by swap moves a request's blocks to a CPU pool and back.
Every block that leaves or returns to a free pool is published as an event.

Automatic prefix caching (enable_caching=True, vLLM's enable_prefix_caching): a full block
whose keys/values have been computed is registered under a hash of its tokens and of every
token before it. A new sequence reuses the blocks of its longest registered prefix (reference
counts go up, nothing is computed for them) and computes only the rest. A registered block
whose last holder lets go is not wiped: it waits in the evictor, still reusable, until a
fresh block is needed and the free pool is empty; then the least recently freed one is
evicted (vLLM's LRU evictor; among blocks freed together the deepest in its prefix goes
first).
"""
from __future__ import annotations

import enum
from collections import OrderedDict, deque
from typing import Optional

from labengine.events import (BlockAllocated, BlockCopied, BlockEvicted, BlockFreed, BlockReused,
                              BlockSwappedIn, BlockSwappedOut, EventBus, PrefixCacheLookup)
from labengine.sequence import Sequence, SequenceGroup, SequenceStatus
from labengine.utils import cdiv


class AllocStatus(enum.Enum):
    OK = enum.auto()  # can allocate now
    LATER = enum.auto()  # not enough free blocks now, but enough once others finish
    NEVER = enum.auto()  # more blocks than the whole cache has


class BlockAllocator:
    """The free pool of one device, with a reference count per physical block.

    With prefix caching (the gpu pool) a block that is free but still registered under a
    hash sits in `evictor` (least recently freed first) instead of `free_blocks`; both
    count as free. A fresh block comes from `free_blocks` first, then by evicting.
    """

    def __init__(self, device: str, num_blocks: int) -> None:
        self.device = device
        self.num_blocks = num_blocks
        # FIFO: a freed block goes to the back, so reuse is visible on the block map.
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.evictor: OrderedDict[int, None] = OrderedDict()  # cached free blocks, LRU first
        self.block_hash: dict[int, int] = {}  # block -> hash of its tokens and all before
        self.cached_blocks: dict[int, int] = {}  # hash -> block

    def allocate(self) -> tuple[int, Optional[int]]:
        """A fresh block (ref count 1) and the hash it was evicted from (None if it was not)."""
        evicted = None
        if self.free_blocks:
            block = self.free_blocks.popleft()
        elif self.evictor:
            block, _ = self.evictor.popitem(last=False)
            evicted = self.block_hash.pop(block)
            del self.cached_blocks[evicted]
        else:
            raise RuntimeError(f"Out of memory: no free {self.device} KV blocks (all {self.num_blocks} in use).")
        self.ref_counts[block] = 1
        return block, evicted

    def incref(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"{self.device} block {block} is free; it cannot be shared"
        self.ref_counts[block] += 1

    def reuse(self, block: int) -> bool:
        """Take one more reference to a registered block; True when it came out of the evictor."""
        if self.ref_counts[block] == 0:
            del self.evictor[block]
            self.ref_counts[block] = 1
            return True
        self.ref_counts[block] += 1
        return False

    def decref(self, block: int) -> bool:
        """Drop one reference; True when the block went back to the free pool (or the evictor)."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"Double free: {self.device} block {block} is already free.")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.block_hash:
                self.evictor[block] = None
            else:
                self.free_blocks.append(block)
            return True
        return False

    def register(self, block: int, block_hash: int) -> bool:
        """Register a computed full block under its hash (unless the hash already has a block)."""
        if block_hash in self.cached_blocks or block in self.block_hash:
            return False
        self.cached_blocks[block_hash] = block
        self.block_hash[block] = block_hash
        return True

    def get_num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictor)


def hash_block_tokens(prev_hash: Optional[int], tokens) -> int:
    """The hash of a full block: its tokens and (through prev_hash) every token before them."""
    return hash((prev_hash, tuple(tokens)))


def seq_block_hashes(seq: Sequence, num_blocks: int, block_size: int) -> list[int]:
    """Hashes of the sequence's first num_blocks full blocks, computed once and kept on the
    sequence (tokens are only ever appended, so a full block's hash never changes)."""
    hashes = seq.block_hashes
    if len(hashes) < num_blocks:
        tokens = seq.get_token_ids()
        prev = hashes[-1] if hashes else None
        for i in range(len(hashes), num_blocks):
            prev = hash_block_tokens(prev, tokens[i * block_size:(i + 1) * block_size])
            hashes.append(prev)
    return hashes[:num_blocks]


class BlockManager:
    def __init__(self, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int,
                 watermark: float = 0.01, event_bus: Optional[EventBus] = None,
                 enable_caching: bool = False) -> None:
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
        self.enable_caching = enable_caching
        # prefix caching: gpu block -> {request_id: references held by that request's seqs}
        # (a block is published as freed for a request when its last reference goes), and
        # per seq the number of its leading blocks already offered to the cache
        self.holders: dict[int, dict[str, int]] = {}
        self.num_registered: dict[int, int] = {}
        # hit rate (vLLM's gpu_prefix_cache_hit_rate): full prompt blocks looked up / found
        self.num_queried_blocks = 0
        self.num_hit_blocks = 0

    # ---- one block in, one block out: every change goes through these ----
    def _take(self, allocator: BlockAllocator, seq_id: int, logical_index: int) -> int:
        block, evicted = allocator.allocate()
        rid = self.seq_request[seq_id]
        if self.bus.active:
            if evicted is not None:
                self.bus.emit(BlockEvicted, block=block, block_hash=evicted, request_id=rid)
            self.bus.emit(BlockAllocated, request_id=rid, seq_id=seq_id, block=block,
                          logical_index=logical_index, device=allocator.device)
        if self.enable_caching and allocator is self.gpu_allocator:
            self.holders[block] = {rid: 1}
        return block

    def _share(self, allocator: BlockAllocator, block: int, seq_id: int) -> None:
        """One more reference to a block that a sequence of the same request holds (fork, swap)."""
        allocator.incref(block)
        if self.enable_caching and allocator is self.gpu_allocator:
            h = self.holders[block]
            rid = self.seq_request[seq_id]
            h[rid] = h.get(rid, 0) + 1

    def _reuse(self, block: int, seq_id: int, logical_index: int) -> None:
        """A prefix-cache hit: the sequence takes a reference to a registered gpu block."""
        from_evictor = self.gpu_allocator.reuse(block)
        rid = self.seq_request[seq_id]
        h = self.holders.setdefault(block, {})
        first = rid not in h
        h[rid] = h.get(rid, 0) + 1
        if first and self.bus.active:
            self.bus.emit(BlockReused, request_id=rid, seq_id=seq_id, block=block, logical_index=logical_index,
                          from_evictor=from_evictor, num_holders=len(h))

    def _release(self, allocator: BlockAllocator, block: int, seq_id: int, reason: str) -> None:
        rid = self.seq_request[seq_id]
        last_for_request = allocator.decref(block)
        if self.enable_caching and allocator is self.gpu_allocator:
            h = self.holders[block]
            h[rid] -= 1
            if h[rid] == 0:
                del h[rid]
                last_for_request = True
            else:
                last_for_request = False
            if not h:
                del self.holders[block]
        if last_for_request and self.bus.active:
            self.bus.emit(BlockFreed, request_id=rid, seq_id=seq_id, block=block, device=allocator.device,
                          reason=reason, cached=block in allocator.evictor)

    # ---- prefix caching ----
    def _cached_prefix(self, seq_group: SequenceGroup, seq: Sequence) -> tuple[list[int], int]:
        """(blocks of the longest registered prefix of seq, number of full blocks looked up).
        At least the last token is left to compute (its logits are needed), and a request
        whose prompt logprobs are still wanted computes its whole prompt (they come from
        the logits of every prompt position)."""
        if not self.enable_caching:
            return [], 0
        params = seq_group.sampling_params
        if params.prompt_logprobs is not None and (seq_group.prompt_logprobs is None
                                                   or len(seq_group.prompt_logprobs) < seq.get_prompt_len()):
            return [], 0
        num_full = (seq.get_len() - 1) // self.block_size
        cached = self.gpu_allocator.cached_blocks
        blocks = []
        for h in seq_block_hashes(seq, num_full, self.block_size):
            block = cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks, num_full

    def cached_tokens_per_seq(self, seq_group: SequenceGroup) -> list[int]:
        """Per waiting sequence, the tokens that a prefix-cache hit would spare it."""
        waiting = seq_group.get_seqs(SequenceStatus.WAITING)
        if not self.enable_caching:
            return [0] * len(waiting)
        return [len(self._cached_prefix(seq_group, s)[0]) * self.block_size for s in waiting]

    def num_cached_tokens(self, seq_group: SequenceGroup) -> int:
        """Tokens of the group's waiting sequences that a prefix-cache hit would spare."""
        return sum(self.cached_tokens_per_seq(seq_group)) if self.enable_caching else 0

    def mark_blocks_computed(self, seq: Sequence) -> None:
        """Register the sequence's full blocks whose keys/values are now in the cache."""
        num_full = seq.num_computed_tokens // self.block_size
        done = self.num_registered.get(seq.seq_id, 0)
        if num_full <= done or seq.seq_id in self.swapped_seqs:
            return
        table = self.block_tables[seq.seq_id]
        hashes = seq_block_hashes(seq, num_full, self.block_size)
        for i in range(done, num_full):
            self.gpu_allocator.register(table[i], hashes[i])
        self.num_registered[seq.seq_id] = num_full

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Full prompt blocks found in the cache / looked up, since the start (0.0 before any)."""
        return self.num_hit_blocks / self.num_queried_blocks if self.num_queried_blocks else 0.0

    def reset_prefix_cache(self) -> bool:
        """Forget every registered block that nobody holds; False if some are still held."""
        alloc = self.gpu_allocator
        for block in list(alloc.evictor):
            del alloc.cached_blocks[alloc.block_hash.pop(block)]
            alloc.free_blocks.append(block)
        alloc.evictor.clear()
        return not alloc.cached_blocks

    # ---- admission ----
    def can_allocate(self, seq_group: SequenceGroup) -> AllocStatus:
        waiting = seq_group.get_seqs(SequenceStatus.WAITING)
        needed = sum(cdiv(s.get_len(), self.block_size) for s in waiting)
        if self.num_gpu_blocks - needed < self.watermark_blocks:
            return AllocStatus.NEVER
        if self.enable_caching:
            # A hit on a block some running sequence holds costs no free block (one that
            # waits in the evictor does: it leaves the free count).
            ref, from_evictor = self.gpu_allocator.ref_counts, set()
            for s in waiting:
                for b in self._cached_prefix(seq_group, s)[0]:
                    if ref[b] > 0 or b in from_evictor:
                        needed -= 1
                    else:
                        from_evictor.add(b)
        if self.gpu_allocator.get_num_free_blocks() - needed >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def allocate(self, seq_group: SequenceGroup) -> None:
        """Give every waiting sequence blocks for all its tokens: the blocks of its longest
        cached prefix (prefix caching), fresh ones for the rest. Sets num_computed_tokens."""
        for seq in seq_group.get_seqs(SequenceStatus.WAITING):
            self.seq_request[seq.seq_id] = seq_group.request_id
            n = cdiv(seq.get_len(), self.block_size)
            hits, num_queried = self._cached_prefix(seq_group, seq)
            for i, block in enumerate(hits):
                self._reuse(block, seq.seq_id, i)
            table = hits + [self._take(self.gpu_allocator, seq.seq_id, i) for i in range(len(hits), n)]
            self.block_tables[seq.seq_id] = table
            seq.num_computed_tokens = len(hits) * self.block_size
            if self.enable_caching:
                self.num_registered[seq.seq_id] = len(hits)
                self.num_queried_blocks += num_queried
                self.num_hit_blocks += len(hits)
                if self.bus.active:
                    self.bus.emit(PrefixCacheLookup, request_id=seq_group.request_id, seq_id=seq.seq_id,
                                  num_queried_blocks=num_queried, num_hit_blocks=len(hits), hit_blocks=tuple(hits),
                                  num_cached_tokens=len(hits) * self.block_size, num_tokens=seq.get_len())

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
        self.seq_request[child.seq_id] = self.seq_request[parent.seq_id]
        for block in table:
            self._share(self.gpu_allocator, block, child.seq_id)
        self.block_tables[child.seq_id] = list(table)
        if self.enable_caching:
            self.num_registered[child.seq_id] = self.num_registered.get(parent.seq_id, 0)

    def free(self, seq: Sequence, reason: str = "finished") -> None:
        table = self.block_tables.pop(seq.seq_id, None)
        if table is None:
            return
        allocator = self.cpu_allocator if seq.seq_id in self.swapped_seqs else self.gpu_allocator
        self.swapped_seqs.discard(seq.seq_id)
        for block in reversed(table):  # deepest block first: the evictor then drops it first
            self._release(allocator, block, seq.seq_id, reason)
        del self.seq_request[seq.seq_id]
        self.num_registered.pop(seq.seq_id, None)

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
                    self._share(dst, mapping[block], seq.seq_id)
                else:
                    mapping[block] = self._take(dst, seq.seq_id, i)
                self._release(src, block, seq.seq_id, reason)
                table[i] = mapping[block]
            if dst is self.cpu_allocator:
                self.swapped_seqs.add(seq.seq_id)
            else:
                self.swapped_seqs.discard(seq.seq_id)
            if self.enable_caching:  # blocks back on the gpu are offered to the cache again
                self.num_registered[seq.seq_id] = 0
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
