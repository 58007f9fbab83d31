"""ModelRunner: from the scheduler's decision to logits.

It owns the model and the KV cache. Each step it flattens the scheduled sequences into
one batch of tokens (input_ids, positions), says where each new token's key/value goes
(slot_mapping) and where each sequence's cached tokens are (block_tables, seq_lens), runs
the model, and computes logits only for the rows the sampler needs. On CUDA the KV cache
is sized from gpu_memory_utilization after profiling a forward pass, and decode steps
replay CUDA graphs (unless enforce_eager=True).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from labengine.attention import AttentionMetadata, get_attn_backend
from labengine.config import EngineConfig
from labengine.sampler import SamplingMetadata, SequenceGroupToSample
from labengine.scheduler import SchedulerOutputs
from labengine.sequence import SequenceStatus
from labengine.utils import cdiv, logger, to_device

_GRAPH_BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 513, 16))


@dataclass
class StepTimings:
    prepare_s: float = 0.0
    forward_s: float = 0.0
    # tensor parallelism: per rank (rank 0 first), the forward's seconds and the part of them
    # spent in collectives (broadcast of the inputs, all-reduces, the logits gather); empty with one rank
    rank_forward_s: tuple = ()
    rank_comm_s: tuple = ()


class ModelRunner:
    def __init__(self, config: EngineConfig, block_manager=None) -> None:
        from labengine.models import get_model

        self.config = config
        self.device = config.device
        mc = config.model_config
        self.dtype = mc.dtype
        self.block_size = config.cache_config.block_size
        self.max_model_len = mc.max_model_len
        self.attn_backend = get_attn_backend(config.attention_backend, self.device)
        t0 = time.perf_counter()
        torch.manual_seed(mc.seed)
        self.model = get_model(mc.model_path, mc.hf_config, self.device, self.dtype, self.attn_backend,
                               load_format=mc.load_format)
        self.load_time_s = time.perf_counter() - t0
        self.vocab_size = mc.hf_config.vocab_size
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_caches: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_io: dict = {}
        self._pending_forward_events = None

    # ---------------------------------------------------------------- KV cache
    @property
    def block_bytes(self) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_size * self.dtype.itemsize

    def determine_num_blocks(self) -> tuple[int, int]:
        cc, sc = self.config.cache_config, self.config.scheduler_config
        # Never more blocks (in the cache or the swap pool) than max_num_seqs sequences of
        # max_model_len tokens can fill: a small model would otherwise get millions of
        # blocks nobody can use, and bookkeeping that grows with them.
        enough = sc.max_num_seqs * cdiv(sc.max_model_len, self.block_size)
        if cc.num_gpu_blocks_override is not None:
            num_gpu = cc.num_gpu_blocks_override
        elif self.device.type == "cuda":
            num_gpu = min(self._profile_num_gpu_blocks(), enough)
        else:
            # CPU default: cpu_kv_cache_space GiB (1 by default).
            num_gpu = max(1, min(cc.cpu_kv_cache_space_bytes // self.block_bytes, enough))
        num_cpu = int(min(cc.swap_space_bytes // self.block_bytes, enough))
        if num_gpu * self.block_size < self.max_model_len:
            raise ValueError(
                f"The model's max seq len ({self.max_model_len}) is larger than the maximum number of tokens "
                f"that can be stored in KV cache ({num_gpu * self.block_size}). Try increasing "
                "`gpu_memory_utilization` (or num_gpu_blocks_override) or decreasing `max_model_len` when "
                "initializing the engine.")
        return num_gpu, num_cpu

    def _profile_num_gpu_blocks(self) -> int:
        """Run the largest prefill the scheduler allows, then give the KV cache what is left."""
        sc = self.config.scheduler_config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = sc.max_num_batched_tokens
        num_seqs = max(1, min(sc.max_num_seqs, num_tokens // max(1, min(sc.max_model_len, num_tokens))))
        seq_len = num_tokens // num_seqs
        blocks_per_seq = cdiv(seq_len, self.block_size)
        m = self.model
        tmp = [(torch.empty(num_seqs * blocks_per_seq, self.block_size, m.num_kv_heads, m.head_size,
                            dtype=self.dtype, device=self.device),) * 2 for _ in range(m.num_layers)]
        tmp_bytes = num_seqs * blocks_per_seq * self.block_bytes // 2  # K and V alias one buffer here
        ids = torch.randint(0, self.vocab_size, (num_seqs * seq_len,), device=self.device)
        pos = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        tables = torch.arange(num_seqs * blocks_per_seq, device=self.device, dtype=torch.int32).view(num_seqs, -1)
        slots = (tables.long()[:, :, None] * self.block_size
                 + torch.arange(self.block_size, device=self.device)).view(num_seqs, -1)[:, :seq_len].reshape(-1)
        meta = self._metadata(True, slots, [seq_len] * num_seqs, [seq_len] * num_seqs, tables)
        with torch.inference_mode():
            hidden = self.model(ids, pos, tmp, meta)
            self.model.compute_logits(hidden[-num_seqs:])
        torch.cuda.synchronize()
        del tmp, hidden
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated() - tmp_bytes
        current = torch.cuda.memory_allocated()
        used = total - free
        available = total * self.config.cache_config.gpu_memory_utilization - used - (peak - current)
        num = int(available // self.block_bytes)
        if num <= 0:
            raise ValueError("No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
                             "when initializing the engine.")
        logger.info("Memory profile: peak activations %.2f GiB, %.2f GiB of %.2f GiB in use on the device",
                    (peak - current) / 2**30, used / 2**30, total / 2**30)
        return num

    def allocate_kv_cache(self, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
        m = self.model
        shape = (2, m.num_layers, num_gpu_blocks, self.block_size, m.num_kv_heads, m.head_size)
        # Zeroed on a GPU (cheap there) so padded rows of a captured decode batch read finite
        # numbers; left uninitialised on a CPU, where touching a GiB of pages would slow start-up.
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        self.kv_cache = alloc(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = [(self.kv_cache[0, i], self.kv_cache[1, i]) for i in range(m.num_layers)]
        self.num_cpu_blocks = num_cpu_blocks  # the swap pool is allocated on first use

    def _cpu_cache(self):
        if self.cpu_caches is None:
            m = self.model
            shape = (2, m.num_layers, self.num_cpu_blocks, self.block_size, m.num_kv_heads, m.head_size)
            pin = self.device.type == "cuda"
            self.cpu_kv_cache = torch.empty(shape, dtype=self.dtype, device="cpu", pin_memory=pin)
            self.cpu_caches = [(self.cpu_kv_cache[0, i], self.cpu_kv_cache[1, i]) for i in range(m.num_layers)]
        return self.cpu_caches

    @torch.inference_mode()
    def apply_cache_ops(self, out: SchedulerOutputs) -> None:
        if out.blocks_to_swap_out:
            self.attn_backend.swap_blocks(self.kv_caches, self._cpu_cache(), out.blocks_to_swap_out)
        if out.blocks_to_swap_in:
            self.attn_backend.swap_blocks(self._cpu_cache(), self.kv_caches, out.blocks_to_swap_in)
        if out.blocks_to_copy:
            self.attn_backend.copy_blocks(self.kv_caches, out.blocks_to_copy)

    # ---------------------------------------------------------------- inputs
    def _metadata(self, is_prefill, slot_mapping, seq_lens, query_lens, block_tables) -> AttentionMetadata:
        dev = self.device
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        context_lens = [s - q for s, q in zip(seq_lens, query_lens)]
        order = split_len = None
        if not is_prefill:
            m = self.model
            order = self.attn_backend.decode_launch_order(seq_lens)
            split_len = self.attn_backend.decode_split_len(seq_lens, m.num_kv_heads, m.head_size, self.dtype, dev)
        return AttentionMetadata(
            is_prefill=is_prefill,
            slot_mapping=slot_mapping,
            query_start_loc=to_device(qsl, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            context_lens=to_device(context_lens, torch.int32, dev),
            block_tables=block_tables,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            max_context_len=max(context_lens),
            seq_lens_list=list(seq_lens),
            query_lens_list=list(query_lens),
            decode_order=None if order is None else to_device(order, torch.int32, dev),
            decode_split_len=None if split_len is None else to_device([split_len], torch.int32, dev),
        )

    def prepare_inputs(self, out: SchedulerOutputs, block_tables: dict[int, list[int]], pending=None):
        """Flatten the scheduled sequences into one batch. Returns tensors, metadata and logits rows.

        pending = (tokens, rows): a decode step scheduled while the previous one still runs
        (async scheduling). Every sequence then has one token more than it holds on the host:
        the one the previous step is sampling, tokens[rows[seq_id]] on the device, which is
        this step's input.
        """
        if not out.is_prefill:
            return self._prepare_decode(out, block_tables, pending)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        logits_rows: list[int] = []  # flattened token index of every row the sampler needs
        groups: list[SequenceGroupToSample] = []
        for scheduled in out.scheduled_seq_groups:
            group = scheduled.seq_group
            params = group.sampling_params
            seqs = group.get_seqs(SequenceStatus.RUNNING)
            sample_rows, prompt_rows = [], []
            is_prompt = seqs[0].get_output_len() == 0
            prompt_start = 0
            for seq in seqs:
                table = block_tables[seq.seq_id]
                start = seq.num_computed_tokens  # tokens before it are cached (a prefix, earlier chunks)
                # a prompt chunk (chunked prefill) stops short of the sequence's end; a decode
                # mixed into the step (chunked prefill) or a whole prefill runs to the end
                sizes = scheduled.chunk_sizes
                end = seq.get_len() if sizes is None else start + sizes[seq.seq_id]
                if end == start:
                    continue  # this chunk is for the group's other sequences
                n = len(input_ids)
                input_ids.extend(seq.get_token_ids()[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
                seq_lens.append(end)
                query_lens.append(end - start)
                tables.append(table)
                # Prompt logprobs the group still lacks (row of position p predicts token p+1):
                # from the first missing token on (a recompute has them all already).
                if is_prompt and params.prompt_logprobs is not None and len(seqs) == 1:
                    first = max(len(group.prompt_logprobs or ()), 1) - 1  # position predicting it
                    count = min(end, seq.get_prompt_len() - 1) - first
                    if first >= start and count > 0:
                        prompt_start = first
                        prompt_rows.extend(range(len(logits_rows), len(logits_rows) + count))
                        logits_rows.extend(range(n + first - start, n + first - start + count))
                if end == seq.get_len():
                    sample_rows.append(len(logits_rows))
                    logits_rows.append(len(input_ids) - 1)
            groups.append(SequenceGroupToSample(seq_group=group, seq_ids=[s.seq_id for s in seqs],
                                                is_prompt=is_prompt, prompt_logprob_rows=prompt_rows,
                                                sample_rows=sample_rows, prompt_logprob_start=prompt_start))
        dev = self.device
        meta = self._metadata(True, to_device(slots, torch.int64, dev),
                              seq_lens, query_lens, self._table_tensor(tables))
        ids = to_device(input_ids, torch.int64, dev)
        pos = to_device(positions, torch.int64, dev)
        return ids, pos, meta, logits_rows, SamplingMetadata(groups=groups)

    def _table_tensor(self, tables: list[list[int]]) -> torch.Tensor:
        """[num_seqs, max_blocks] int32 on the device, rows padded with block 0 (never read).
        Filled row by row in numpy: 3x faster than one flat Python list at 256 sequences."""
        rows = np.zeros((len(tables), max(map(len, tables))), dtype=np.int32)
        for i, t in enumerate(tables):
            rows[i, : len(t)] = t
        return to_device(rows, torch.int32, self.device)

    def _prepare_decode(self, out: SchedulerOutputs, block_tables: dict[int, list[int]], pending):
        """One new token per running sequence (the hot loop of a long generation)."""
        bs = self.block_size
        ahead = 0 if pending is None else 1
        pending_rows = None if pending is None else pending[1]
        input_ids: list[int] = []
        src_rows: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        groups: list[SequenceGroupToSample] = []
        running = SequenceStatus.RUNNING
        skipped = out.skipped_seq_ids
        for scheduled in out.scheduled_seq_groups:
            group = scheduled.seq_group
            seq_ids, rows = [], []
            for seq in group.seqs_dict.values():
                if seq.status is not running or seq.seq_id in skipped:
                    continue
                table = block_tables[seq.seq_id]
                p = seq.get_len() - 1 + ahead  # this step's position
                rows.append(len(positions))
                if pending_rows is None:
                    input_ids.append(seq.get_last_token_id())
                else:
                    src_rows.append(pending_rows[seq.seq_id])
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
                seq_lens.append(p + 1)
                tables.append(table)
                seq_ids.append(seq.seq_id)
            groups.append(SequenceGroupToSample(seq_group=group, seq_ids=seq_ids, is_prompt=False,
                                                prompt_logprob_rows=[], sample_rows=rows))
        dev = self.device
        n = len(positions)
        meta = self._metadata(False, to_device(slots, torch.int64, dev), seq_lens, [1] * n,
                              self._table_tensor(tables))
        if pending_rows is None:
            ids = to_device(input_ids, torch.int64, dev)
        else:
            ids = pending[0].index_select(0, to_device(src_rows, torch.int64, dev))
        pos = to_device(positions, torch.int64, dev)
        return ids, pos, meta, list(range(n)), SamplingMetadata(groups=groups)

    # ---------------------------------------------------------------- running
    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutputs, block_tables: dict[int, list[int]], timings: StepTimings,
                      pending=None):
        """Launch the step's forward pass; returns (logits, sampling metadata). On CUDA the
        logits may still be being computed when this returns (nothing here syncs)."""
        t0 = time.perf_counter()
        self.apply_cache_ops(out)
        ids, pos, meta, logits_rows, sampling_metadata = self.prepare_inputs(out, block_tables, pending)
        t1 = time.perf_counter()
        timings.prepare_s = t1 - t0
        logits = self.run_model(ids, pos, meta, logits_rows, timings)
        timings.forward_s = time.perf_counter() - t1
        return logits, sampling_metadata

    def run_model(self, ids, pos, meta: AttentionMetadata, logits_rows: list[int], timings: StepTimings):
        """The forward pass and the logits of `logits_rows` (the executor boundary: the
        tensor-parallel runner broadcasts these inputs to the other ranks first)."""
        num_tokens = ids.shape[0]
        graph_bs = self._graph_batch_size(meta)
        if graph_bs is not None:
            return self._replay_graph(graph_bs, ids, pos, meta)[:num_tokens]
        hidden = self.model(ids, pos, self.kv_caches, meta)
        if len(logits_rows) != num_tokens:
            hidden = hidden.index_select(0, to_device(logits_rows, torch.int64, self.device))
        return self.model.compute_logits(hidden)

    # ---------------------------------------------------------------- CUDA graphs (decode only)
    def _graphs_enabled(self) -> bool:
        return (self.device.type == "cuda" and not self.config.enforce_eager
                and self.attn_backend.name == "triton")

    def _graph_batch_size(self, meta: AttentionMetadata) -> Optional[int]:
        if not self.graphs or meta.is_prefill or meta.max_seq_len > self._graph_max_len:
            return None
        n = meta.num_seqs
        for size in sorted(self.graphs):
            if size >= n:
                return size
        return None

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Record one decode step per batch-size bucket; later steps copy inputs in and replay."""
        if not self._graphs_enabled():
            return
        t0 = time.perf_counter()
        sc = self.config.scheduler_config
        self._graph_max_len = min(self.config.max_seq_len_to_capture, self.max_model_len)
        max_bs = min(sc.max_num_seqs, _GRAPH_BATCH_SIZES[-1])
        sizes = [s for s in _GRAPH_BATCH_SIZES if s <= max_bs]
        if max_bs not in sizes:
            sizes.append(max_bs)
        max_blocks = cdiv(self._graph_max_len, self.block_size)
        dev = self.device
        io = dict(
            ids=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            pos=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            slots=torch.full((max_bs,), -1, dtype=torch.int64, device=dev),
            seq_lens=torch.ones(max_bs, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(max_bs, dtype=torch.int32, device=dev),
            tables=torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=dev),
            qsl=torch.arange(max_bs + 1, dtype=torch.int32, device=dev),
            # the decode kernel's launch order; padding rows (seq_len 1) go last, in index order
            order=torch.arange(max_bs, dtype=torch.int32, device=dev),
            identity=torch.arange(max_bs, dtype=torch.int32, device=dev),
            # the decode kernel's keys per program (balanced splits); set at every replay
            split_len=torch.full((1,), self._graph_max_len, dtype=torch.int32, device=dev),
        )
        # No garbage collection while capturing (as vLLM's capture): a collection that frees an
        # earlier engine's objects in the middle of a capture (its pinned buffers, events,
        # graphs) makes CUDA calls that are illegal then, and the capture fails with
        # CUBLAS_STATUS_EXECUTION_FAILED (seen on the H200 with engines built one after another)
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._capture_sizes(sorted(sizes, reverse=True), io)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._graph_io = io
        torch.cuda.synchronize()
        logger.info("Captured CUDA graphs for decode batch sizes %s in %.1f s", sorted(sizes),
                    time.perf_counter() - t0)

    def _capture_sizes(self, sizes, io) -> None:
        """Capture the sizes largest first; the smaller graphs share the first one's memory pool."""
        pool = None
        m = self.model
        # the backend balances decode splits by a per-step split length: the graphs read it from io
        balanced = self.attn_backend.decode_split_len(
            [self._graph_max_len], m.num_kv_heads, m.head_size, self.dtype, self.device) is not None
        for size in sizes:
            meta = AttentionMetadata(
                is_prefill=False, slot_mapping=io["slots"][:size], query_start_loc=io["qsl"][:size + 1],
                seq_lens=io["seq_lens"][:size], context_lens=io["context_lens"][:size],
                block_tables=io["tables"][:size], max_query_len=1, max_seq_len=self._graph_max_len,
                seq_lens_list=[self._graph_max_len] * size, query_lens_list=[1] * size,
                decode_order=io["order"][:size], decode_split_len=io["split_len"] if balanced else None)
            # Warm up outside the graph (Triton compiles here), then capture.
            self.model.compute_logits(self.model(io["ids"][:size], io["pos"][:size], self.kv_caches, meta))
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model.compute_logits(self.model(io["ids"][:size], io["pos"][:size], self.kv_caches, meta))
            pool = graph.pool()
            self.graphs[size] = graph
            io[("logits", size)] = logits

    def _replay_graph(self, size: int, ids, pos, meta: AttentionMetadata) -> torch.Tensor:
        io = self._graph_io
        n = ids.shape[0]
        io["ids"][:n].copy_(ids)
        io["pos"][:n].copy_(pos)
        io["slots"][:n].copy_(meta.slot_mapping)
        io["slots"][n:size].fill_(-1)
        io["seq_lens"][:n].copy_(meta.seq_lens)
        io["seq_lens"][n:size].fill_(1)
        io["context_lens"][:n].copy_(meta.context_lens)
        io["tables"][:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        # the captured kernels read io["order"][:size]: it must stay a permutation of range(size)
        if meta.decode_order is not None:
            io["order"][:n].copy_(meta.decode_order)
            io["order"][n:size].copy_(io["identity"][n:size])
        else:
            io["order"][:size].copy_(io["identity"][:size])
        if meta.decode_split_len is not None:
            io["split_len"].copy_(meta.decode_split_len)
        else:  # no split: one program per sequence and KV head
            io["split_len"].fill_(self._graph_max_len)
        self.graphs[size].replay()
        return io[("logits", size)]
