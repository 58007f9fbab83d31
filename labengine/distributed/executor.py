"""Tensor-parallel execution: one process per rank, rank 0 in the engine's process.

`TensorParallelModelRunner` is the engine's ModelRunner when tensor_parallel_size > 1. It
starts ranks 1..N-1 as worker processes (multiprocessing "spawn", as vLLM's mp executor and
nano-vllm do), joins them in one process group (NCCL on GPUs, gloo on CPU), and is itself
rank 0: the scheduler and the block manager live only here. Each step it prepares the batch
as the single-device runner does, then broadcasts it (one small header object, then the
token ids / positions / slot mapping and the block tables as tensors) and every rank runs
its slice of the model on it; the LM head's logits are gathered on rank 0 for the sampler.
Cache operations (swap in/out, copy-on-write copies) are broadcast the same way, so every
rank moves the same blocks of its own slice of the KV cache. Each rank's KV cache holds its
KV heads, [blocks, block_size, kv_heads / tp, head_dim]; the number of blocks is the
minimum over the ranks.

Shutdown: workers are daemon processes that ignore Ctrl-C (the engine's process handles it)
and exit when their parent dies (PR_SET_PDEATHSIG on Linux, and a watchdog thread). The
runner terminates them when it is garbage-collected (`del llm`), on `shutdown()`, when
start-up fails, and at interpreter exit. A Ctrl-C during a step is held back until every
rank has finished the step, so the ranks never fall out of step.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import socket
import sys
import threading
import time
import types
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from labengine.config import EngineConfig
from labengine.distributed import parallel_state
from labengine.model_runner import ModelRunner, StepTimings

logger = logging.getLogger("labengine")

_FORWARD, _CACHE_OPS = "forward", "cache_ops"  # the kinds of message rank 0 broadcasts


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r uses GPU r (of those CUDA_VISIBLE_DEVICES shows); all CPU ranks use the CPU."""
    return torch.device("cuda", rank) if device.type == "cuda" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_for_rank(config: EngineConfig, rank: int) -> EngineConfig:
    cfg = copy.copy(config)
    cfg.device = rank_device(config.device, rank)
    return cfg


def _agree_on_num_blocks(runner: ModelRunner) -> tuple[int, int]:
    """Every rank sizes its own cache; all use the smallest count (one block table for all)."""
    num_gpu, num_cpu = ModelRunner.determine_num_blocks(runner)
    counts = torch.tensor([num_gpu, num_cpu], dtype=torch.int64, device=runner.device)
    dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    return int(counts[0]), int(counts[1])


class TensorParallelModelRunner(ModelRunner):
    """Rank 0 of a tensor-parallel group: the engine's ModelRunner, driving N-1 worker processes."""

    def __init__(self, config: EngineConfig) -> None:
        tp = config.tensor_parallel_size
        if dist.is_initialized():  # checked before any worker starts
            raise RuntimeError("torch.distributed is already initialized in this process: one tensor-parallel "
                               "engine per process. Shut the other one down first (`del llm`).")
        config.device = rank_device(config.device, 0)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = torch.multiprocessing.get_context("spawn")
        ready = [ctx.Event() for _ in range(1, tp)]  # set by each worker once it has started up
        self.workers = [ctx.Process(target=_worker_main, name=f"labengine-tp-rank{rank}", daemon=True,
                                    args=(_config_for_rank(config, rank), rank, tp, init_method, os.getpid(),
                                          ready[rank - 1]))
                        for rank in range(1, tp)]
        # Stops the workers and leaves the process group when this runner is collected, on
        # shutdown() and at exit; it holds the worker handles, not the runner.
        owns_group = []  # filled once this runner has joined the process group
        self._finalizer = weakref.finalize(self, _stop_workers, self.workers, owns_group)
        try:
            for w in self.workers:
                w.start()
            _wait_for_workers(self.workers, ready)
            parallel_state.init_tensor_parallel(0, tp, init_method, config.device)
            owns_group.append(True)
            with parallel_state.tensor_parallel_layout(tp, 0):
                super().__init__(config)
        except BaseException:
            self._finalizer()
            raise
        self.tp_size = tp
        logger.info("Tensor parallelism: %d ranks (%s), worker pids %s", tp,
                    parallel_state.backend_for(self.device), [w.pid for w in self.workers])

    def shutdown(self) -> None:
        """Stop the workers and leave the process group (also done on garbage collection)."""
        self._finalizer()

    @property
    def is_alive(self) -> bool:
        return self._finalizer.alive and all(w.is_alive() for w in self.workers)

    # ------------------------------------------------------------------ start-up
    def determine_num_blocks(self) -> tuple[int, int]:
        with self._collective("sizing the KV cache"):
            return _agree_on_num_blocks(self)

    def capture_graphs(self) -> None:
        # CUDA graphs are captured with one rank only: capturing NCCL collectives is left to the
        # multi-GPU work (decode steps run eagerly with tensor parallelism).
        return

    # ------------------------------------------------------------------ each step
    def apply_cache_ops(self, out) -> None:
        if out.blocks_to_swap_out or out.blocks_to_swap_in or out.blocks_to_copy:
            with self._collective("broadcasting cache operations"):
                dist.broadcast_object_list([(_CACHE_OPS, list(out.blocks_to_swap_out), list(out.blocks_to_swap_in),
                                             list(out.blocks_to_copy))], src=0, device=self._object_device)
                super().apply_cache_ops(out)

    def run_model(self, ids, pos, meta, logits_rows, timings: StepTimings):
        with self._collective("running a step"):
            t0 = time.perf_counter()
            parallel_state.take_comm_seconds()
            num_tokens = ids.shape[0]
            header = (_FORWARD, dict(
                is_prefill=meta.is_prefill, num_tokens=num_tokens, table_shape=tuple(meta.block_tables.shape),
                seq_lens=meta.seq_lens_list, query_lens=meta.query_lens_list,
                logits_rows=None if len(logits_rows) == num_tokens else logits_rows))
            dist.broadcast_object_list([header], src=0, device=self._object_device)
            token_inputs = torch.stack([ids, pos, meta.slot_mapping])  # [3, T] int64
            dist.broadcast(token_inputs, src=0)
            dist.broadcast(meta.block_tables, src=0)
            broadcast_s = time.perf_counter() - t0
            logits = super().run_model(ids, pos, meta, logits_rows, timings)
            forward_s = time.perf_counter() - t0
            comm_s = broadcast_s + parallel_state.take_comm_seconds()
            timings.rank_forward_s, timings.rank_comm_s = _gather_timings(forward_s, comm_s, self.tp_size,
                                                                          self.device)
            return logits

    @property
    def _object_device(self):
        return self.device if self.device.type == "cuda" else None

    @contextlib.contextmanager
    def _collective(self, what: str):
        """Run a collective section: refuse if a worker is gone, name it if one dies inside,
        and hold back Ctrl-C until every rank is through (a half-broadcast step would leave
        the ranks out of step for good)."""
        if not self.is_alive:
            raise RuntimeError(self._dead_message(what))
        try:
            with _sigint_deferred():
                yield
        except KeyboardInterrupt:
            raise
        except Exception as e:
            # A rank that failed half-way through a step leaves the others waiting in a
            # collective that will never match: the group cannot be trusted any more.
            dead = not all(w.is_alive() for w in self.workers)
            message = self._dead_message(what) if dead else (
                f"rank 0 failed while {what} ({type(e).__name__}: {e}); the tensor-parallel ranks are out of "
                "step, so the workers were stopped. Create a new LLM.")
            self._finalizer()
            raise RuntimeError(message) from e

    def _dead_message(self, what: str) -> str:
        if not self._finalizer.alive:
            return f"the tensor-parallel workers were shut down; cannot go on {what}. Create a new LLM."
        gone = [f"rank {r} (pid {w.pid}, exit code {w.exitcode})"
                for r, w in enumerate(self.workers, start=1) if not w.is_alive()]
        return (f"tensor-parallel worker {', '.join(gone)} is no longer running while {what}; "
                "its log is above. The engine cannot continue: create a new LLM.")


def _wait_for_workers(workers, ready, timeout_s: float = 300.0) -> None:
    """Wait until every worker has started (imported labengine, set its event), so that a worker
    that dies on start-up is an error now rather than a rendezvous that waits for it forever."""
    deadline = time.monotonic() + timeout_s
    for rank, (w, event) in enumerate(zip(workers, ready), start=1):
        while not event.wait(0.1):
            if not w.is_alive():
                raise RuntimeError(
                    f"tensor-parallel worker rank {rank} exited on start-up (exit code {w.exitcode}); its error is "
                    "above. A script that creates a tensor-parallel LLM must do so under "
                    "`if __name__ == \"__main__\":` (workers are spawned and re-import the script).")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel worker rank {rank} did not start within {timeout_s:.0f} s")


def _gather_timings(forward_s: float, comm_s: float, tp: int, device) -> tuple[tuple, tuple]:
    """Every rank's (forward seconds, collective seconds) of this step, on rank 0."""
    mine = torch.tensor([forward_s, comm_s], dtype=torch.float64, device=device)
    parts = [torch.empty_like(mine) for _ in range(tp)] if dist.get_rank() == 0 else None
    dist.gather(mine, parts, dst=0)
    if parts is None:
        return (), ()
    table = torch.stack(parts).cpu().tolist()
    return tuple(r[0] for r in table), tuple(r[1] for r in table)


@contextlib.contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C (SIGINT) until the block ends, then raise KeyboardInterrupt. Signal
    handlers belong to the main thread; elsewhere (the async engine's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _stop_workers(workers, owns_group) -> None:
    """Terminate the workers (they hold nothing that needs flushing), then leave the group."""
    for w in workers:
        if w.pid is not None and w.is_alive():
            w.terminate()
    deadline = time.monotonic() + 5.0
    for w in workers:
        if w.pid is not None:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                w.kill()
                w.join(1.0)
    if owns_group:
        parallel_state.destroy_tensor_parallel()


# ---------------------------------------------------------------------- the worker processes


def _exit_with_parent(parent_pid: int) -> None:
    """Die when the engine's process dies, however it dies (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="labengine-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the watch started
        os._exit(1)


def _worker_main(config: EngineConfig, rank: int, tp: int, init_method: str, parent_pid: int, ready) -> None:
    """Rank `rank`: build this rank's slice of the model and cache, then run what rank 0 broadcasts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the engine's process
    _exit_with_parent(parent_pid)
    ready.set()
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(message)s")
    if config.device.type == "cpu":
        # the ranks share the machine's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // tp))
    else:
        torch.cuda.set_device(config.device)
    try:
        parallel_state.init_tensor_parallel(rank, tp, init_method, config.device)
        with parallel_state.tensor_parallel_layout(tp, rank):
            runner = ModelRunner(config)
        runner.allocate_kv_cache(*_agree_on_num_blocks(runner))
        _worker_loop(runner, tp)  # until rank 0 terminates this process
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        os._exit(1)


@torch.inference_mode()
def _worker_loop(runner: ModelRunner, tp: int) -> None:
    device = runner.device
    object_device = device if device.type == "cuda" else None
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, device=object_device)
        kind, *payload = box[0]
        if kind == _CACHE_OPS:
            swap_out, swap_in, copies = payload
            runner.apply_cache_ops(types.SimpleNamespace(blocks_to_swap_out=swap_out, blocks_to_swap_in=swap_in,
                                                         blocks_to_copy=copies))
            continue
        spec = payload[0]
        t0 = time.perf_counter()
        parallel_state.take_comm_seconds()
        n = spec["num_tokens"]
        token_inputs = torch.empty(3, n, dtype=torch.int64, device=device)
        dist.broadcast(token_inputs, src=0)
        tables = torch.empty(spec["table_shape"], dtype=torch.int32, device=device)
        dist.broadcast(tables, src=0)
        broadcast_s = time.perf_counter() - t0
        ids, pos, slots = token_inputs.unbind(0)
        meta = runner._metadata(spec["is_prefill"], slots, spec["seq_lens"], spec["query_lens"], tables)
        rows = spec["logits_rows"]
        runner.run_model(ids, pos, meta, list(range(n)) if rows is None else rows, StepTimings())
        forward_s = time.perf_counter() - t0
        _gather_timings(forward_s, broadcast_s + parallel_state.take_comm_seconds(), tp, device)
