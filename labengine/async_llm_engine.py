"""AsyncLLMEngine: the online entry point (vLLM V0's `vllm.engine.async_llm_engine`).

One `LLMEngine` does the work; this module only decides *when* it works and *who hears
about it*:

- A background task (`run_engine_loop`) on the caller's asyncio event loop takes the
  requests and aborts queued since the last step, hands them to the engine and runs one
  `engine.step()`, then routes each RequestOutput to its request's stream. New requests
  therefore join the running batch between two steps (continuous batching).
- Every call into the engine (add_request, abort_request, step, ...) runs on ONE worker
  thread (a single-thread executor), so the engine is never used by two threads at once,
  and the event loop stays free while a step computes: a notebook cell, an HTTP server or
  other coroutines keep running.
- The loop is started lazily, on the first `generate` call, on whatever event loop is
  running then: Jupyter's (top-level `await` in a cell) or the one of `asyncio.run`. When
  that loop is closed (the end of `asyncio.run`), the next `generate` from a new loop
  starts a fresh background task; requests left over from the old loop are aborted.

Behaviour (vLLM v0.5.4, see the reference, section 5):

- `engine.generate(prompt, params, request_id)` yields **cumulative** RequestOutputs, one
  per step in which the request ran; the last has `finished=True`. The engine holds back
  characters that could still become a stop string, so the text never moves backwards.
- `await engine.abort(request_id)` ends that stream quietly (the consumer's `async for`
  just stops) and, by the time it returns, the request's KV blocks are free. Unknown ids
  are ignored. Cancelling the consumer task, or leaving the `async for` early, aborts too.
- A second live request with the same id raises `KeyError("Request {id} already exists.")`.
- A request the engine rejects (empty or too long prompt, too many logprobs) raises that
  ValueError from its own stream only. An error the engine pins on one request while
  stepping (e.g. its own `logits_processors` raised) fails that request only: its stream
  raises that exception and the rest of the batch carries on.
- If a step itself raises, the engine's state is unknown, so the loop stops: every waiter
  gets `AsyncEngineDeadError` (caused by the original exception), and so does every later
  call.

labengine extra (documented deviation): what `generate` returns is both an async iterator
and an awaitable. `await engine.generate(...)` runs the request to the end and returns its
final RequestOutput, so the lesson's `await asyncio.gather(*[engine.generate(...)])`
works. (In vLLM the same line raises TypeError: an async generator is not awaitable.)
An awaited request that is aborted returns the last output it produced (finished=False),
or None if it produced none.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Dict, Iterable, List, Optional, Union

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLMEngine", "AsyncEngineDeadError", "AsyncStream", "GenerateStream"]


class AsyncEngineDeadError(RuntimeError):
    """The background loop has stopped because of an error; the engine takes no more requests."""


_FINISHED = object()  # end-of-stream marker in an AsyncStream's queue


class AsyncStream:
    """The outputs of one request, as the background loop delivers them (vLLM's AsyncStream)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def put(self, item: Any) -> None:
        if not self._finished:
            self._queue.put_nowait(item)

    def finish(self, exception: Optional[BaseException] = None) -> None:
        """End the stream: quietly, or with `exception` raised to the consumer."""
        if not self._finished:
            self._finished = True
            self._queue.put_nowait(_FINISHED if exception is None else exception)

    def __aiter__(self) -> "AsyncStream":
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is _FINISHED:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class GenerateStream:
    """What `AsyncLLMEngine.generate` returns: an async iterator of cumulative
    RequestOutputs that can also be awaited for the final one.

    `async for out in engine.generate(...)` streams; `await engine.generate(...)` returns the
    final RequestOutput (or, if the request was aborted, the last one seen, or None).
    Nothing is sent to the engine until the first `__anext__` / `await`.
    """

    def __init__(self, agen, request_id: str) -> None:
        self._agen = agen
        self.request_id = request_id

    def __aiter__(self) -> "GenerateStream":
        return self

    def __anext__(self):
        return self._agen.__anext__()

    async def aclose(self) -> None:
        """Stop consuming; aborts the request if it is still running."""
        await self._agen.aclose()

    async def _final(self):
        last = None
        async for out in self._agen:
            last = out
        return last

    def __await__(self):
        return self._final().__await__()

    def __iter__(self):
        raise TypeError("engine.generate(...) is asynchronous: use `async for out in engine.generate(...)` "
                        "or `out = await engine.generate(...)` (top-level await works in Jupyter; in a "
                        "script, inside a coroutine run with asyncio.run).")

    def __repr__(self) -> str:
        return f"GenerateStream(request_id={self.request_id!r})"


class AsyncLLMEngine:
    """Runs an LLMEngine in a background asyncio task and streams each request's outputs.

    Build it with `AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=...))`.
    """

    def __init__(self, engine, *, start_engine_loop: bool = True, log_requests: bool = True) -> None:
        self.engine = engine
        self.start_engine_loop = start_engine_loop
        self.log_requests = log_requests
        # One thread runs every engine call, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labengine-engine")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._task: Optional[asyncio.Task] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._errored_with: Optional[BaseException] = None
        self._stopped_by_user = False
        # Request bookkeeping (touched only from the event loop's thread):
        self._streams: Dict[str, AsyncStream] = {}  # live requests, as users see them
        self._pending_adds: Dict[str, tuple] = {}  # request_id -> (stream, prompt, params, arrival_time)
        self._pending_aborts: set = set()  # ids to abort in the engine before the next step
        self._in_engine: Dict[str, AsyncStream] = {}  # ids handed to the engine and not yet done
        self._abort_waiters: List[asyncio.Future] = []  # resolved once the next batch of aborts is applied
        # Written by the worker thread only:
        self._stats: Dict[str, Any] = {}
        self._worker_thread: Optional[threading.Thread] = None
        # time.monotonic() of the last sign of life: a step finished, or work arrived at an
        # idle loop (read by the server's /health to tell a stalled engine from a busy one).
        self.last_progress = time.monotonic()
        self._snapshot_stats()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_engine_args(cls, engine_args, start_engine_loop: bool = True, usage_context=None) -> "AsyncLLMEngine":
        from labengine.llm_engine import LLMEngine

        if getattr(engine_args, "engine_use_ray", False):
            raise ValueError("engine_use_ray=True is not supported: labengine runs its engine in-process.")
        engine = LLMEngine.from_engine_args(engine_args)
        return cls(engine, start_engine_loop=start_engine_loop,
                   log_requests=not getattr(engine_args, "disable_log_requests", False))

    # ------------------------------------------------------------------ state
    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done() and self._errored_with is None

    @property
    def is_stopped(self) -> bool:
        return self._errored_with is not None or (self._task is not None and self._task.done())

    @property
    def errored(self) -> bool:
        return self._errored_with is not None

    @property
    def has_work(self) -> bool:
        """Whether any request is live (queued, waiting for a step, or running)."""
        return bool(self._streams or self._pending_adds or self._in_engine)

    def seconds_without_progress(self) -> float:
        """Seconds since the engine last finished a step with work live (0 when idle)."""
        return time.monotonic() - self.last_progress if self.has_work else 0.0

    def _dead_error(self) -> AsyncEngineDeadError:
        cause = self._errored_with
        err = AsyncEngineDeadError(
            "The AsyncLLMEngine background loop has stopped because of an error "
            f"({type(cause).__name__}: {cause}); no request can run on this engine any more. "
            "Create a new engine.")
        err.__cause__ = cause
        return err

    async def check_health(self) -> None:
        """Raise AsyncEngineDeadError if the background loop died."""
        if self._errored_with is not None:
            raise self._dead_error()

    # ------------------------------------------------------------------ background loop
    def start_background_loop(self) -> None:
        """Start the engine loop on the running event loop (done for you by `generate`)."""
        if self._errored_with is not None:
            raise self._dead_error()
        loop = asyncio.get_running_loop()
        if self.is_running:
            if self._loop is not loop:
                raise RuntimeError("This AsyncLLMEngine's loop runs on another event loop (thread); "
                                   "use the engine from that event loop.")
            raise RuntimeError("Background loop is already running.")
        if self._task is not None:
            self._reset_after_loop_exit()
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._stopped_by_user = False
        self._task = loop.create_task(self.run_engine_loop(), name="labengine-engine-loop")
        self._task.add_done_callback(self._on_loop_done)

    def _reset_after_loop_exit(self) -> None:
        """Forget the streams of a loop that ended; abort what it left in the engine."""
        for stream in list(self._streams.values()):
            stream.finish(AsyncEngineDeadError("The engine loop that served this request has stopped."))
        self._streams.clear()
        self._pending_adds.clear()
        self._pending_aborts |= set(self._in_engine)
        self._in_engine.clear()
        for fut in self._abort_waiters:
            if not fut.done():
                fut.cancel()
        self._abort_waiters = []

    def shutdown_background_loop(self) -> None:
        """Stop the background task. Live requests end with AsyncEngineDeadError; the engine itself
        stays usable and the next `generate` starts a new loop (aborting what was left)."""
        if self._task is not None and not self._task.done():
            self._stopped_by_user = True
            self._task.cancel()

    def _on_loop_done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            # asyncio.run() shutting down its loop, or shutdown_background_loop(): the
            # engine itself is fine; a later generate() restarts the loop.
            self._reset_after_loop_exit()
            return
        exc = task.exception()
        if exc is None:
            exc = RuntimeError("the engine loop returned unexpectedly")
        self._set_dead(exc)

    def _set_dead(self, exc: BaseException) -> None:
        if self._errored_with is None:
            self._errored_with = exc
            logger.error("AsyncLLMEngine background loop died: %r", exc, exc_info=exc)
        for stream in list(self._streams.values()):
            stream.finish(self._dead_error())
        self._streams.clear()
        self._pending_adds.clear()
        self._pending_aborts.clear()
        self._in_engine.clear()
        for fut in self._abort_waiters:
            if not fut.done():
                fut.set_result(None)
        self._abort_waiters = []

    async def run_engine_loop(self) -> None:
        has_unfinished = True
        while True:
            if not has_unfinished and not self._pending_adds and not self._pending_aborts:
                self._wakeup.clear()
                await self._wakeup.wait()
                self.last_progress = time.monotonic()
            has_unfinished = await self.engine_step()
            self.last_progress = time.monotonic()
            # Let consumers and new requests in before the next step.
            await asyncio.sleep(0)

    async def engine_step(self, *, run_step: bool = True) -> bool:
        """Apply queued aborts and requests, run one engine step, route the outputs.

        Returns whether the engine still has unfinished requests. The background loop calls
        this; call it yourself only with start_engine_loop=False.
        """
        loop = asyncio.get_running_loop()
        aborts = list(self._pending_aborts)
        self._pending_aborts.clear()
        adds = list(self._pending_adds.items())
        self._pending_adds.clear()
        waiters, self._abort_waiters = self._abort_waiters, []
        for rid in aborts:
            self._in_engine.pop(rid, None)
        for rid, (stream, *_rest) in adds:
            self._in_engine[rid] = stream
        step_streams = dict(self._in_engine)
        try:
            outputs, add_errors, request_errors, has_unfinished = await loop.run_in_executor(
                self._executor, self._worker_step, aborts,
                [(rid, prompt, params, arrival) for rid, (_s, prompt, params, arrival) in adds], run_step)
        finally:
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

        for rid, exc in list(add_errors.items()) + list(request_errors.items()):
            stream = step_streams.get(rid)
            if stream is None:
                continue
            self._forget(rid, stream)
            stream.finish(exc)
        for out in outputs:
            rid = out.request_id
            stream = step_streams.get(rid)
            if stream is None or stream.finished or rid in request_errors:
                continue
            stream.put(out)
            if out.finished:
                self._forget(rid, stream)
                stream.finish()
                if self.log_requests:
                    logger.info("Finished request %s.", rid)
        return has_unfinished

    def _forget(self, rid: str, stream: AsyncStream) -> None:
        if self._streams.get(rid) is stream:
            del self._streams[rid]
        if self._in_engine.get(rid) is stream:
            del self._in_engine[rid]

    # ------------------------------------------------------------------ the worker thread
    def _worker_step(self, aborts, adds, run_step):
        """Runs on the engine thread: the only place the engine is touched while running."""
        engine = self.engine
        self._worker_thread = threading.current_thread()
        if aborts:
            self._engine_abort(aborts)
        add_errors: Dict[str, BaseException] = {}
        for rid, prompt, params, arrival in adds:
            try:
                engine.add_request(rid, prompt, params, arrival_time=arrival)
            except Exception as e:  # rejected request: its own stream raises it
                add_errors[rid] = e
        outputs = []
        if run_step and engine.has_unfinished_requests():
            outputs = engine.step()
        # The engine fails only the request at fault (e.g. its logits_processor raised) and
        # records why; that request's stream raises it.
        request_errors = {}
        engine_errors = getattr(engine, "request_errors", None)
        if engine_errors:
            for rid in list(engine_errors):
                request_errors[rid] = engine_errors.pop(rid)
            self._engine_abort(list(request_errors))
        self._snapshot_stats()
        return outputs, add_errors, request_errors, engine.has_unfinished_requests()

    def _engine_abort(self, request_ids: List[str]) -> None:
        try:
            self.engine.abort_request(request_ids)
        except Exception:  # the engine should ignore unknown ids; be safe, one at a time
            for rid in request_ids:
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    logger.exception("abort_request(%r) failed", rid)

    def _snapshot_stats(self) -> None:
        """Queue lengths and KV-cache use after a step (read by /metrics without touching the engine)."""
        try:
            sched = self.engine.scheduler
            bm = sched.block_manager
            total = bm.num_gpu_blocks
            free = bm.get_num_free_gpu_blocks()
            self._stats = {
                "num_running": len(sched.running),
                "num_waiting": len(sched.waiting),
                "num_swapped": len(getattr(sched, "swapped", ())),
                "num_gpu_blocks": total,
                "num_free_gpu_blocks": free,
                "kv_cache_usage": (1.0 - free / total) if total else 0.0,
                # vLLM's gpu_prefix_cache_hit_rate: -1 with prefix caching off
                "gpu_prefix_cache_hit_rate": bm.prefix_cache_hit_rate if bm.enable_caching else -1.0,
                "time": time.time(),
            }
        except Exception:  # an engine without these attributes: stats stay empty
            self._stats = {}

    def get_stats(self) -> Dict[str, Any]:
        """The engine's queue lengths and KV-cache use as of the last step (a copy)."""
        return dict(self._stats)

    # ------------------------------------------------------------------ requests
    async def add_request(self, request_id: str, inputs, params, arrival_time: Optional[float] = None,
                          lora_request=None) -> AsyncStream:
        """Queue a request for the next step; returns its AsyncStream (vLLM's add_request)."""
        if lora_request is not None:
            raise ValueError("LoRA is not supported by labengine.")
        if self._errored_with is not None:
            raise self._dead_error()
        if not self.is_running:
            if self.start_engine_loop:
                self.start_background_loop()
            else:
                raise AsyncEngineDeadError(
                    "Background loop is not running. If it was running, inspect the output to find the "
                    "stacktrace of the error that caused the background loop to stop (AsyncEngineDeadError).")
        elif self._loop is not asyncio.get_running_loop():
            raise RuntimeError("This AsyncLLMEngine's loop runs on another event loop; "
                               "use the engine from that event loop.")
        request_id = str(request_id)
        if request_id in self._streams:
            raise KeyError(f"Request {request_id} already exists.")
        if params is None:
            from labengine.sampling_params import SamplingParams

            params = SamplingParams()
        if arrival_time is None:
            arrival_time = time.time()
        if self.log_requests:
            logger.info("Received request %s: prompt: %r, sampling_params: %r.", request_id,
                        _short(inputs), params)
        if not self.has_work:  # an idle engine has not stalled: its clock starts now
            self.last_progress = time.monotonic()
        stream = AsyncStream(request_id)
        self._streams[request_id] = stream
        self._pending_adds[request_id] = (stream, inputs, params, arrival_time)
        self._wakeup.set()
        return stream

    def generate(self, prompt, sampling_params=None, request_id: Optional[str] = None, lora_request=None,
                 *, arrival_time: Optional[float] = None, inputs=None) -> GenerateStream:
        """Stream the cumulative RequestOutputs of one request (see the module docstring).

        `prompt` is a str, {"prompt": str} or {"prompt_token_ids": [...]}. Use it with
        `async for out in engine.generate(...)`, or `await engine.generate(...)` for the
        final output only.
        """
        if inputs is not None:  # vLLM >= 0.4.3 keyword name
            prompt = inputs
        if request_id is None:
            raise TypeError("generate() needs a request_id")
        request_id = str(request_id)
        return GenerateStream(self._generate(prompt, sampling_params, request_id, arrival_time, lora_request),
                              request_id)

    async def _generate(self, prompt, params, request_id, arrival_time, lora_request) -> AsyncIterator:
        stream = await self.add_request(request_id, prompt, params, arrival_time, lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            # Cancelled, closed early, or finished: abort is a no-op unless still live.
            if not stream.finished:
                self._abort(request_id, stream)

    def _abort(self, request_id: str, stream: Optional[AsyncStream] = None) -> bool:
        """Synchronous part of abort: end the stream now, queue the engine abort."""
        live = self._streams.get(request_id)
        if live is None or (stream is not None and live is not stream):
            return False
        del self._streams[request_id]
        live.finish()
        if request_id in self._pending_adds and self._pending_adds[request_id][0] is live:
            del self._pending_adds[request_id]  # never reached the engine
        else:
            self._pending_aborts.add(request_id)
        if self._wakeup is not None:
            self._wakeup.set()
        if self.log_requests:
            logger.info("Aborted request %s.", request_id)
        return True

    async def abort(self, request_id: Union[str, Iterable[str]]) -> None:
        """Abort request(s): their streams end quietly; when this returns their blocks are free.

        Unknown or finished ids are ignored.
        """
        if self._errored_with is not None:
            raise self._dead_error()
        ids = [request_id] if isinstance(request_id, str) else [str(r) for r in request_id]
        queued = [self._abort(rid) for rid in ids]
        if not any(queued) and not self._pending_aborts:
            return
        if self.is_running and self._loop is asyncio.get_running_loop():
            fut = self._loop.create_future()
            self._abort_waiters.append(fut)
            self._wakeup.set()
            await fut
        else:  # no background loop: apply the aborts directly, without a step
            await self.engine_step(run_step=False)

    # ------------------------------------------------------------------ engine passthroughs
    async def get_tokenizer(self, lora_request=None):
        return self.engine.get_tokenizer()

    async def get_model_config(self):
        return self.engine.model_config

    def get_num_unfinished_requests(self) -> int:
        """Requests queued here or unfinished in the engine (approximate while a step runs)."""
        return len(self._streams)

    def trace(self, *args, **kwargs):
        """The engine's `trace()` context manager (events are delivered on the engine thread)."""
        return self.engine.trace(*args, **kwargs)

    def add_event_listener(self, fn) -> None:
        self.engine.add_event_listener(fn)

    def remove_event_listener(self, fn) -> None:
        self.engine.remove_event_listener(fn)

    async def wait_until_idle(self, timeout: float = 60.0) -> None:
        """Wait until nothing is queued or running (aborts applied); for tests and notebooks."""
        deadline = time.monotonic() + timeout
        while True:
            if self._errored_with is not None:
                raise self._dead_error()
            if (not self._streams and not self._pending_adds and not self._pending_aborts
                    and not self._in_engine):
                # The worker may still be finishing a step; ask the engine on its own thread.
                busy = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.engine.has_unfinished_requests)
                if not busy and not self._pending_aborts:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError("the engine did not become idle in time")
            await asyncio.sleep(0.01)

    def __repr__(self) -> str:
        state = "dead" if self.errored else ("running" if self.is_running else "idle")
        return f"AsyncLLMEngine({state}, {len(self._streams)} live requests)"


def _short(inputs, limit: int = 80):
    if isinstance(inputs, str):
        return inputs if len(inputs) <= limit else inputs[:limit] + "..."
    return inputs
