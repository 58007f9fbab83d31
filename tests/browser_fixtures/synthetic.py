"""A toy scheduler + block manager that publishes the engine's events (no model, no torch).

It follows the event contract of DESIGN.md (block ledger, copy-on-write, swap, recompute
preemption, prefill-first steps that never mix prefill and decode), so the trace, the
invariant checker, the charts and the widgets can be tested without an engine, and
deliberately broken (`fault=`) to prove the checker catches each kind of mistake.
It also exposes `block_manager`-style attributes that InvariantChecker reads.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from labengine.events import (BlockAllocated, BlockCopied, BlockFreed, BlockSwappedIn,
                              BlockSwappedOut, EventBus, Preempted, RequestAdded,
                              RequestFinished, Scheduled, StepFinished)


class _Allocator:
    def __init__(self, n):
        self.ref_counts = [0] * n
        self.free_blocks = list(range(n - 1, -1, -1))

    def take(self):
        b = self.free_blocks.pop()
        self.ref_counts[b] = 1
        return b

    def release(self, b):
        """Decrement; True when the block returned to the free pool."""
        self.ref_counts[b] -= 1
        if self.ref_counts[b] == 0:
            self.free_blocks.append(b)
            return True
        return False


@dataclass
class _Seq:
    seq_id: int
    request_id: str
    length: int  # tokens (prompt + output so far)
    computed: int = 0


@dataclass
class _Req:
    request_id: str
    prompt_len: int
    max_tokens: int
    n: int
    arrival: int
    seqs: list = field(default_factory=list)
    seqs_dict: dict = field(default_factory=dict)
    output: int = 0
    first_token_t: float | None = None
    arrival_t: float = 0.0


class ToyEngine:
    """Publishes a plausible event stream on `event_bus`; `scheduler.block_manager` mimics
    the engine's block manager (num_*_blocks, get_num_free_*_blocks, block_tables,
    *_allocator.ref_counts / free_blocks)."""

    def __init__(self, num_gpu_blocks=16, num_cpu_blocks=16, block_size=4, max_num_seqs=8,
                 preemption_mode="recompute", seed=0, fault=None, fault_step=5):
        self.event_bus = EventBus()
        self.scheduler = self  # InvariantChecker looks for engine.scheduler.block_manager
        self.block_manager = self
        self.num_gpu_blocks, self.num_cpu_blocks, self.block_size = num_gpu_blocks, num_cpu_blocks, block_size
        self.gpu_allocator, self.cpu_allocator = _Allocator(num_gpu_blocks), _Allocator(num_cpu_blocks)
        self.block_tables: dict[int, list[int]] = {}
        self.max_num_seqs = max_num_seqs
        self.mode = preemption_mode
        self.rng = random.Random(seed)
        self.waiting: list[_Req] = []
        self.running: list[_Req] = []
        self.swapped: list[_Req] = []
        self.pending: list[_Req] = []
        self.next_seq = 0
        self.fault, self.fault_step = fault, fault_step
        self.clock = 0.0

    # block manager API read by the checker
    def get_num_free_gpu_blocks(self):
        return len(self.gpu_allocator.free_blocks)

    def get_num_free_cpu_blocks(self):
        return len(self.cpu_allocator.free_blocks)

    # helpers
    def _emit(self, cls, **kw):
        if self.event_bus.active:
            self.event_bus.emit(cls, **kw)

    def _blocks_needed(self, length):
        return -(-length // self.block_size)

    def _alloc(self, seq, logical_index, device="gpu"):
        alloc = self.gpu_allocator if device == "gpu" else self.cpu_allocator
        b = alloc.take()
        self._emit(BlockAllocated, request_id=seq.request_id, seq_id=seq.seq_id, block=b,
                   logical_index=logical_index, device=device)
        return b

    def _free_table(self, seq, reason, device="gpu"):
        alloc = self.gpu_allocator if device == "gpu" else self.cpu_allocator
        table = self.block_tables.pop(seq.seq_id, [])
        for b in table:
            if alloc.release(b):
                self._emit(BlockFreed, request_id=seq.request_id, seq_id=seq.seq_id, block=b,
                           device=device, reason=reason)
        return table

    def add_request(self, request_id, prompt_len, max_tokens, n=1, arrival_step=0):
        self.pending.append(_Req(request_id, prompt_len, max_tokens, n, arrival_step))

    # one step
    def step(self):
        bus = self.event_bus
        s = bus.step
        for r in [r for r in self.pending if r.arrival <= s]:
            self.pending.remove(r)
            seq = _Seq(self.next_seq, r.request_id, r.prompt_len)
            self.next_seq += 1
            r.seqs = [seq]
            r.seqs_dict = {seq.seq_id: seq}
            r.arrival_t = self.clock
            self.waiting.append(r)
            self._emit(RequestAdded, request_id=r.request_id, prompt_len=r.prompt_len, n=r.n,
                       best_of=r.n, max_tokens=r.max_tokens, temperature=1.0, use_beam_search=False)
        prefill, decode = [], []
        # a request that can no longer fit in the whole cache is aborted (a toy's way out)
        if not self.running:
            for queue, device in ((self.swapped, "cpu"), (self.waiting, "gpu")):
                if queue and not (queue is self.swapped and self.waiting):
                    r = queue[0]
                    need = (len({b for q in r.seqs for b in self.block_tables[q.seq_id]}) + len(r.seqs)
                            if device == "cpu" else self._blocks_needed(r.seqs[0].length))
                    if need > self.num_gpu_blocks:
                        queue.pop(0)
                        for q in r.seqs:
                            self._free_table(q, "aborted", device)
                        self._emit(RequestFinished, request_id=r.request_id, finish_reason="abort",
                                   prompt_len=r.prompt_len, output_len=r.output, ttft_s=None,
                                   latency_s=self.clock - r.arrival_t)
        # swap in first
        while self.swapped and not self.waiting:
            r = self.swapped[0]
            need = len({b for q in r.seqs for b in self.block_tables[q.seq_id]})
            if need + len(r.seqs) > self.get_num_free_gpu_blocks():
                break
            self.swapped.pop(0)
            mapping = {}
            cpu_tables = {q.seq_id: list(self.block_tables[q.seq_id]) for q in r.seqs}
            for q in r.seqs:
                self._free_table(q, "swapped_in", "cpu")
            for q in r.seqs:
                new = []
                for i, cb in enumerate(cpu_tables[q.seq_id]):
                    if cb in mapping:
                        self.gpu_allocator.ref_counts[mapping[cb]] += 1
                    else:
                        gb = self._alloc(q, i, "gpu")
                        self._emit(BlockSwappedIn, request_id=r.request_id, gpu_block=gb, cpu_block=cb)
                        mapping[cb] = gb
                    new.append(mapping[cb])
                self.block_tables[q.seq_id] = new
            self.running.append(r)
        # prefill
        while self.waiting and len(self.running) + len(prefill) < self.max_num_seqs:
            r = self.waiting[0]
            q = r.seqs[0]
            need = self._blocks_needed(q.length)
            if need > self.get_num_free_gpu_blocks():
                break
            self.waiting.pop(0)
            self.block_tables[q.seq_id] = [self._alloc(q, i) for i in range(need)]
            prefill.append(r)
        if not prefill:
            # decode: each sequence needs room for one more token
            for r in list(self.running):
                if r not in self.running:
                    continue
                # like the engine: a group gets room for all its sequences, or is preempted
                def need():
                    n = 0
                    for q in r.seqs:
                        t = self.block_tables[q.seq_id]
                        n += q.length % self.block_size == 0 or self.gpu_allocator.ref_counts[t[-1]] > 1
                    return n
                while r in self.running and need() > self.get_num_free_gpu_blocks():
                    self._preempt(self.running[-1])
                if r not in self.running:
                    continue
                for q in r.seqs:
                    table = self.block_tables[q.seq_id]
                    if q.length % self.block_size == 0:  # the last block is full
                        table.append(self._alloc(q, len(table)))
                    elif self.gpu_allocator.ref_counts[table[-1]] > 1:  # copy-on-write
                        src = table[-1]
                        dst = self._alloc(q, len(table) - 1)
                        self.gpu_allocator.release(src)
                        self._emit(BlockCopied, request_id=r.request_id, seq_id=q.seq_id, src=src, dst=dst)
                        table[-1] = dst
                decode.append(r)
        if self.fault == "double_alloc" and s == self.fault_step and self.block_tables:
            sid, table = next(iter(self.block_tables.items()))
            self._emit(BlockAllocated, request_id="intruder", seq_id=999, block=table[0],
                       logical_index=0, device="gpu")
        if self.fault == "leak_count" and s == self.fault_step and self.gpu_allocator.free_blocks:
            self.gpu_allocator.free_blocks.pop()  # a block vanishes from the pool
        if self.fault == "negative_ref" and s == self.fault_step:
            self.gpu_allocator.ref_counts[self.gpu_allocator.free_blocks[-1]] = -1
        self._emit(Scheduled, prefill_request_ids=tuple(r.request_id for r in prefill),
                   decode_request_ids=tuple(r.request_id for r in decode),
                   num_batched_tokens=sum(r.seqs[0].length for r in prefill) or sum(len(r.seqs) for r in decode),
                   token_budget=2048, seq_budget=self.max_num_seqs, num_running=len(self.running) + len(prefill),
                   num_waiting=len(self.waiting), num_swapped=len(self.swapped))
        # "run the model": prefill computes the prompt and samples the first token
        for r in prefill:
            self.running.append(r)
            q = r.seqs[0]
            q.computed = q.length
            if r.n > 1 and r.output == 0 and len(r.seqs) == 1:  # fork: share the prompt blocks
                for _ in range(r.n - 1):
                    child = _Seq(self.next_seq, r.request_id, q.length, q.computed)
                    self.next_seq += 1
                    r.seqs.append(child)
                    r.seqs_dict[child.seq_id] = child
                    self.block_tables[child.seq_id] = list(self.block_tables[q.seq_id])
                    for b in self.block_tables[q.seq_id]:
                        self.gpu_allocator.ref_counts[b] += 1
            if r.first_token_t is None:
                r.first_token_t = self.clock + 0.01
        for r in prefill + decode:
            for q in r.seqs:
                q.length += 1
            r.output += 1
        self.clock += 0.01 + 0.001 * len(prefill + decode)
        finished = [r for r in prefill + decode if r.output >= r.max_tokens]
        for r in finished:
            self.running.remove(r)
            for q in r.seqs:
                self._free_table(q, "finished")
            if self.fault == "finished_owner" and s >= self.fault_step:
                b = self.gpu_allocator.take()  # allocated but never given back
                self._emit(BlockAllocated, request_id=r.request_id, seq_id=r.seqs[0].seq_id,
                           block=b, logical_index=99, device="gpu")
                self.block_tables[r.seqs[0].seq_id] = [b]
                self.fault = None
            self._emit(RequestFinished, request_id=r.request_id, finish_reason="length",
                       prompt_len=r.prompt_len, output_len=r.output,
                       ttft_s=r.first_token_t - r.arrival_t, latency_s=self.clock - r.arrival_t)
        used = self.num_gpu_blocks - self.get_num_free_gpu_blocks()
        n_pre = sum(r.seqs[0].length for r in prefill) if prefill else 0
        parts = dict(schedule_s=0.001, prepare_s=0.0005 * (1 + len(prefill)),
                     forward_s=0.005 + 0.001 * len(prefill + decode), sample_s=0.0005, detokenize_s=0.0002)
        self._emit(StepFinished, latency_s=sum(parts.values()) + 0.0001, **parts,
                   batch_size=len(prefill) + len(decode), num_prefill_tokens=n_pre,
                   num_decode_tokens=0 if prefill else len(decode) and sum(len(r.seqs) for r in decode),
                   kv_blocks_used=used, kv_blocks_total=self.num_gpu_blocks,
                   num_running=len(self.running), num_waiting=len(self.waiting),
                   num_swapped=len(self.swapped))
        bus.step += 1

    def _preempt(self, r):
        self.running.remove(r)
        distinct = {b for q in r.seqs for b in self.block_tables[q.seq_id]}
        mode = self.mode if len(distinct) <= self.get_num_free_cpu_blocks() else "recompute"
        self._emit(Preempted, request_id=r.request_id, mode=mode)
        if mode == "swap":
            mapping = {}  # gpu block -> cpu block: shared blocks are swapped once
            gpu_tables = {q.seq_id: list(self.block_tables[q.seq_id]) for q in r.seqs}
            for q in r.seqs:
                self._free_table(q, "swapped_out", "gpu")
            for q in r.seqs:
                new = []
                for i, gb in enumerate(gpu_tables[q.seq_id]):
                    if gb in mapping:
                        self.cpu_allocator.ref_counts[mapping[gb]] += 1
                    else:
                        cb = self.cpu_allocator.take()
                        self._emit(BlockAllocated, request_id=r.request_id, seq_id=q.seq_id,
                                   block=cb, logical_index=i, device="cpu")
                        self._emit(BlockSwappedOut, request_id=r.request_id, gpu_block=gb, cpu_block=cb)
                        mapping[gb] = cb
                    new.append(mapping[gb])
                self.block_tables[q.seq_id] = new
            self.swapped.append(r)
        else:
            for q in r.seqs[1:]:
                self._free_table(q, "preempted")
            self._free_table(r.seqs[0], "preempted")
            q = r.seqs[0]
            r.seqs = [q]
            r.seqs_dict = {q.seq_id: q}
            q.length = r.prompt_len + r.output
            self.waiting.insert(0, r)

    def has_unfinished(self):
        return bool(self.pending or self.waiting or self.running or self.swapped)

    def run(self, max_steps=10_000):
        while self.has_unfinished() and self.event_bus.step < max_steps:
            self.step()


def simulate(num_requests=12, num_gpu_blocks=16, num_cpu_blocks=32, block_size=4, seed=0,
             preemption_mode="recompute", n=1, max_num_seqs=8, listeners=(), fault=None,
             fault_step=5, prompt_len=(3, 14), max_tokens=(4, 20), arrival_every=1):
    """Run a toy workload; returns the ToyEngine (listeners are subscribed before it runs)."""
    eng = ToyEngine(num_gpu_blocks, num_cpu_blocks, block_size, max_num_seqs, preemption_mode,
                    seed, fault, fault_step)
    rng = random.Random(seed)
    for i in range(num_requests):
        eng.add_request(str(i), rng.randint(*prompt_len), rng.randint(*max_tokens),
                        n=n if isinstance(n, int) else rng.choice(n),
                        arrival_step=(i // 2) * arrival_every)
    for fn in listeners:
        fn(eng)
    eng.run()
    return eng


# A fixed next-token distribution for the pure-Python SamplingExplorer (browser test fallback)
TOY_TOKENS = [" the", " a", " cat", " dog", " sat", " on", " mat", " and", " ran", " away",
              " quickly", " home", ".", ",", " it", " was"]
TOY_LOGPROBS = [-1.0, -1.4, -1.9, -2.1, -2.6, -2.9, -3.3, -3.6, -4.0, -4.4, -4.9, -5.3, -5.8,
                -6.2, -6.9, -7.5]
