"""Watching the engine: Trace (events -> pandas) and InvariantChecker.

    with llm.trace() as trace:
        llm.generate(prompts, params)
    df = trace.to_dataframe()          # one tidy row per event; `event` holds the kind
    trace.steps()                      # one row per engine step (step_finished)
    trace.requests()                   # one row per request: arrival, first token, ttft, ...
    trace.block_owners()               # who owns every KV block at the end of every step
    trace.rank_timings()               # tensor parallelism: compute vs collectives per step and rank

Every helper is also a plain function of the DataFrame (`steps(df)`, `requests(df)`,
`block_owners(df)`, `request_states(df)`), so `labengine.viz` and the widgets can work
from a saved frame as well as from a live Trace.

Step convention: the state "at step s" is the state after every event stamped with step s,
i.e. at the end of that engine step (the moment `step_finished` for s is published).

InvariantChecker replays the block ledger (block_allocated / block_freed) as events arrive,
and at every step_finished also inspects the block manager, raising InvariantViolation
(an AssertionError) that names the step and the block.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from labengine.events import EVENT_TYPES, Event, EventBus

__all__ = ["Trace", "InvariantChecker", "InvariantViolation", "events_to_dataframe", "steps",
           "requests", "block_owners", "block_intervals", "request_states", "STEP_PARTS",
           "REQUEST_STATES"]

# the parts of step_finished.latency_s, in pipeline order
STEP_PARTS = ("schedule_s", "prepare_s", "forward_s", "sample_s", "detokenize_s")
# the states of request_states() / the scheduler timeline
REQUEST_STATES = ("waiting", "prefill", "decode", "idle", "preempted", "finished")

_BASE_COLUMNS = ["event", "step", "t"]


def _event_columns() -> list[str]:
    cols = list(_BASE_COLUMNS)
    for cls in EVENT_TYPES:
        for f in dataclasses.fields(cls):
            if f.name not in cols:
                cols.append(f.name)
    return cols


def _resolve_bus(source) -> EventBus:
    """An EventBus from an EventBus, an LLMEngine (.event_bus), an LLM (.llm_engine) or an
    AsyncLLMEngine (.engine)."""
    if source is None:
        return EventBus()
    if hasattr(source, "subscribe") and hasattr(source, "unsubscribe") and hasattr(source, "emit"):
        return source
    for path in (("event_bus",), ("llm_engine", "event_bus"), ("engine", "event_bus"),
                 ("engine", "llm_engine", "event_bus")):
        obj = source
        try:
            for name in path:
                obj = getattr(obj, name)
        except AttributeError:
            continue
        return obj
    raise TypeError(f"cannot find an EventBus in {type(source).__name__}: pass an EventBus, "
                    "an LLMEngine, an LLM or an AsyncLLMEngine")


def _resolve_engine(source):
    if source is None or isinstance(source, EventBus):
        return None
    if hasattr(source, "scheduler"):
        return source
    for name in ("llm_engine", "engine"):
        eng = getattr(source, name, None)
        if eng is not None:
            return _resolve_engine(eng)
    return None


def events_to_dataframe(events: Iterable[Event]) -> pd.DataFrame:
    """One row per event: `event` (the kind), `step`, `t`, then the union of all fields
    (missing ones are NaN/None; tuples stay tuples)."""
    rows = []
    for e in events:
        row = {"event": e.kind}
        row.update(e.__dict__)
        rows.append(row)
    cols = _event_columns()
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c == "step" else
                                          "float64" if c == "t" else "object")
                             for c in cols})
    df = pd.DataFrame.from_records(rows)
    extra = [c for c in df.columns if c not in cols]  # fields added to events later
    df = df.reindex(columns=cols + extra)
    df["step"] = df["step"].astype("int64")
    return df


class Trace:
    """Records the events of an engine while it is entered (or between start() and stop()).

    `Trace(x)` accepts an EventBus, an LLMEngine, an LLM or an AsyncLLMEngine.
    """

    def __init__(self, source=None):
        self.bus = _resolve_bus(source)
        self.events: list[Event] = []
        self.recording = False
        self._df: Optional[pd.DataFrame] = None
        self._df_len = -1
        self.metadata: dict[str, Any] = {}
        engine = _resolve_engine(source)
        bm = getattr(getattr(engine, "scheduler", None), "block_manager", None)
        for name in ("num_gpu_blocks", "num_cpu_blocks", "block_size"):
            if hasattr(bm, name):
                self.metadata[name] = getattr(bm, name)

    # recording
    def _record(self, event: Event) -> None:
        self.events.append(event)

    def start(self) -> "Trace":
        if not self.recording:
            self.bus.subscribe(self._record)
            self.recording = True
        return self

    def stop(self) -> "Trace":
        if self.recording:
            self.bus.unsubscribe(self._record)
            self.recording = False
        return self

    def __enter__(self) -> "Trace":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for e in self.events:
            kinds[e.kind] = kinds.get(e.kind, 0) + 1
        return f"Trace({len(self.events)} events, {kinds})"

    def clear(self) -> None:
        self.events.clear()
        self._df = None

    # frames
    def to_dataframe(self) -> pd.DataFrame:
        """One tidy row per event (a copy: edit it freely)."""
        if self._df is None or self._df_len != len(self.events):
            self._df = events_to_dataframe(self.events)
            self._df.attrs.update(self.metadata)
            self._df_len = len(self.events)
        return self._df.copy()

    def steps(self) -> pd.DataFrame:
        return steps(self.to_dataframe())

    def requests(self) -> pd.DataFrame:
        return requests(self.to_dataframe())

    def block_ledger(self, device: Optional[str] = "gpu") -> pd.DataFrame:
        """The block_allocated / block_freed rows in order (the ledger itself)."""
        df = self.to_dataframe()
        led = df[df["event"].isin(["block_allocated", "block_freed"])]
        if device is not None:
            led = led[led["device"] == device]
        return led[["event", "step", "t", "request_id", "seq_id", "block", "logical_index",
                    "device", "reason"]].reset_index(drop=True)

    def block_intervals(self, device: Optional[str] = "gpu") -> pd.DataFrame:
        return block_intervals(self.to_dataframe(), device)

    def block_owners(self, device: str = "gpu") -> pd.DataFrame:
        return block_owners(self.to_dataframe(), device)

    def request_states(self) -> pd.DataFrame:
        return request_states(self.to_dataframe())

    def rank_timings(self) -> pd.DataFrame:
        return rank_timings(self.to_dataframe())


# ----------------------------------------------------------------------------------------
# frames derived from the event DataFrame


def rank_timings(df: pd.DataFrame) -> pd.DataFrame:
    """Tensor parallelism: one row per (step, rank) with the forward's seconds, the part spent in
    collectives (comm_s: input broadcast, all-reduces, logits gather) and the rest (compute_s).
    Empty with one rank."""
    cols = ["step", "rank", "forward_s", "comm_s", "compute_s"]
    rows = []
    if "rank_forward_s" in df.columns:
        for step, fwd, comm in df.loc[df["event"] == "step_finished", ["step", "rank_forward_s", "rank_comm_s"]
                                      ].itertuples(index=False):
            for rank, (f, c) in enumerate(zip(fwd or (), comm or ())):
                rows.append((step, rank, f, c, max(0.0, f - c)))
    return pd.DataFrame(rows, columns=cols)


def steps(df: pd.DataFrame) -> pd.DataFrame:
    """One row per engine step (the step_finished events), plus derived columns:
    num_tokens, kv_usage (0..1), other_s (latency not in any part), and num_preempted."""
    cols = ["step", "t", "latency_s", *STEP_PARTS, "batch_size", "num_prefill_tokens",
            "num_decode_tokens", "kv_blocks_used", "kv_blocks_total", "num_running",
            "num_waiting", "num_swapped"]
    st = df.loc[df["event"] == "step_finished", [c for c in cols if c in df.columns]]
    st = st.reset_index(drop=True).copy()
    if st.empty:
        for c in ("num_tokens", "kv_usage", "other_s", "num_preempted", "is_prefill"):
            st[c] = pd.Series(dtype="float64")
        return st
    for c in cols[2:]:
        st[c] = pd.to_numeric(st[c])
    st["num_tokens"] = st["num_prefill_tokens"] + st["num_decode_tokens"]
    total = st["kv_blocks_total"].where(st["kv_blocks_total"] > 0)
    st["kv_usage"] = (st["kv_blocks_used"] / total).fillna(0.0)
    st["other_s"] = (st["latency_s"] - st[list(STEP_PARTS)].sum(axis=1)).clip(lower=0.0)
    pre = df.loc[df["event"] == "preempted"].groupby("step").size()
    st["num_preempted"] = st["step"].map(pre).fillna(0).astype(int)
    st["is_prefill"] = st["num_prefill_tokens"] > 0
    return st


def _request_order(df: pd.DataFrame) -> list[str]:
    """Request ids in arrival order (request_added), then any others in first-seen order."""
    order: dict[str, None] = {}
    for rid in df.loc[df["event"] == "request_added", "request_id"]:
        order.setdefault(rid, None)
    if "request_id" in df.columns:
        for rid in df["request_id"].dropna():
            order.setdefault(rid, None)
    sched = df[df["event"] == "scheduled"]
    for ids in list(sched.get("prefill_request_ids", [])) + list(sched.get("decode_request_ids", [])):
        if isinstance(ids, (tuple, list)):
            for rid in ids:
                order.setdefault(rid, None)
    return list(order)


def requests(df: pd.DataFrame) -> pd.DataFrame:
    """One row per request, in arrival order.

    Columns: request_id, prompt_len, n, max_tokens, arrival_step/_t, first_scheduled_step/_t,
    first_token_step/_t (end of the first step that ran its prefill), finish_step/_t,
    finish_reason, output_len, ttft_s and latency_s (the engine's own measurements, from
    request_finished), queue_s (first scheduled - arrival, trace clock), num_preemptions,
    preemption_modes, max_gpu_blocks (most device blocks held at once).
    """
    order = _request_order(df)
    rows: dict[str, dict] = {rid: {"request_id": rid} for rid in order}
    step_t = df.loc[df["event"] == "step_finished"].drop_duplicates("step").set_index("step")["t"]

    for r in df[df["event"] == "request_added"].itertuples(index=False):
        row = rows[r.request_id]
        if "arrival_step" not in row:
            row.update(arrival_step=r.step, arrival_t=r.t, prompt_len=r.prompt_len, n=r.n,
                       max_tokens=r.max_tokens)
    for r in df[df["event"] == "scheduled"].itertuples(index=False):
        for kind in ("prefill", "decode"):
            for rid in (getattr(r, f"{kind}_request_ids") or ()):
                row = rows.setdefault(rid, {"request_id": rid})
                if "first_scheduled_step" not in row:
                    row["first_scheduled_step"] = r.step
                    row["first_scheduled_t"] = r.t
                if kind == "prefill" and "first_token_step" not in row:
                    row["first_token_step"] = r.step
                    row["first_token_t"] = step_t.get(r.step, np.nan)
    for r in df[df["event"] == "request_finished"].itertuples(index=False):
        row = rows.setdefault(r.request_id, {"request_id": r.request_id})
        row.update(finish_step=r.step, finish_t=r.t, finish_reason=r.finish_reason,
                   output_len=r.output_len, ttft_s=r.ttft_s, latency_s=r.latency_s)
        row.setdefault("prompt_len", r.prompt_len)
    pre = df[df["event"] == "preempted"]
    for rid, g in pre.groupby("request_id", sort=False):
        row = rows.setdefault(rid, {"request_id": rid})
        row["num_preemptions"] = len(g)
        row["preemption_modes"] = tuple(g["mode"])
    # peak device blocks per request (ledger replay)
    led = df[(df["event"].isin(["block_allocated", "block_freed"]) & (df["device"] == "gpu"))
             | (df["event"] == "block_reused")]
    held: dict[str, int] = {}
    for ev, rid in zip(led["event"], led["request_id"]):
        held[rid] = held.get(rid, 0) + (-1 if ev == "block_freed" else 1)
        row = rows.setdefault(rid, {"request_id": rid})
        row["max_gpu_blocks"] = max(row.get("max_gpu_blocks", 0), held[rid])

    cols = ["request_id", "prompt_len", "n", "max_tokens", "arrival_step", "arrival_t",
            "first_scheduled_step", "first_scheduled_t", "first_token_step", "first_token_t",
            "finish_step", "finish_t", "finish_reason", "output_len", "ttft_s", "latency_s",
            "queue_s", "num_preemptions", "preemption_modes", "max_gpu_blocks"]
    out = pd.DataFrame(list(rows.values()), columns=cols)
    out["queue_s"] = out["first_scheduled_t"] - out["arrival_t"]
    out["num_preemptions"] = out["num_preemptions"].fillna(0).astype(int)
    out["max_gpu_blocks"] = out["max_gpu_blocks"].fillna(0).astype(int)
    out["preemption_modes"] = [m if isinstance(m, tuple) else () for m in out["preemption_modes"]]
    return out


def _all_steps(df: pd.DataFrame) -> np.ndarray:
    """The steps a trace covers: every step from the first to the last event."""
    if df.empty:
        return np.arange(0)
    return np.arange(int(df["step"].min()), int(df["step"].max()) + 1)


def block_intervals(df: pd.DataFrame, device: Optional[str] = "gpu") -> pd.DataFrame:
    """Replay of the ledger: one row per allocation of a block, with the steps it was held.

    Columns: device, block, request_id, seq_id, logical_index, start_step (the step of
    block_allocated), end_step (the step of block_freed, or None while still held at the
    end of the trace), reason (why it was freed), cow_src (a block_copied made this block
    from `cow_src`), copied_from (True when it was the source of a copy-on-write while held),
    swapped_to (the cpu/gpu block it was swapped to, if any), event_index (position of the
    block_allocated row in the frame; rows are in that order).

    The block is owned at step s when start_step <= s < end_step (end of step convention:
    a block allocated and freed within one step is never owned "at" a step).
    Frees of blocks that the trace never saw allocated (a trace started mid-run) are skipped.
    """
    # (device, block, request_id) -> open interval: with prefix caching several requests
    # may hold one block at once (block_reused), each with its own interval
    open_: dict[tuple, dict] = {}
    done: list[dict] = []
    mask = df["event"].isin(["block_allocated", "block_freed", "block_copied",
                             "block_swapped_out", "block_swapped_in", "block_reused"])
    need = ["event", "step", "request_id", "seq_id", "block", "logical_index", "device", "reason",
            "src", "dst", "gpu_block", "cpu_block"]
    sub = df.loc[mask, [c for c in need if c in df.columns]].reindex(columns=need)
    for pos, r in zip(np.flatnonzero(mask.to_numpy()), sub.itertuples(index=False)):
        ev = r.event
        if ev in ("block_allocated", "block_reused"):
            dev = "gpu" if ev == "block_reused" else r.device
            if ev == "block_allocated":
                for key in [k for k in open_ if k[:2] == (dev, int(r.block))]:
                    old = open_.pop(key)  # double allocation: close the old one (the checker flags it)
                    old.update(end_step=r.step, reason="reallocated")
                    done.append(old)
            open_[(dev, int(r.block), r.request_id)] = dict(
                device=dev, block=int(r.block), request_id=r.request_id, seq_id=r.seq_id,
                logical_index=r.logical_index, event_index=int(pos), start_step=r.step, end_step=None,
                reason=None, cow_src=None, copied_from=False, swapped_to=None, reused=ev == "block_reused")
        elif ev == "block_freed":
            iv = open_.pop((r.device, int(r.block), r.request_id), None)
            if iv is None:  # a source that names the freeing request differently: the only holder
                keys = [k for k in open_ if k[:2] == (r.device, int(r.block))]
                iv = open_.pop(keys[0]) if len(keys) == 1 else None
            if iv is not None:
                iv.update(end_step=r.step, reason=r.reason)
                done.append(iv)
        elif ev == "block_copied":
            # copy-on-write within one request: both on the device pool
            dst = open_.get(("gpu", int(r.dst), r.request_id))
            if dst is not None:
                dst["cow_src"] = int(r.src)
            src = open_.get(("gpu", int(r.src), r.request_id))
            if src is not None:
                src["copied_from"] = True
        elif ev in ("block_swapped_out", "block_swapped_in"):
            # the freed side may already be closed: find it among open or recent intervals
            src_key = ("gpu", int(r.gpu_block)) if ev == "block_swapped_out" else ("cpu", int(r.cpu_block))
            src_key = src_key + (r.request_id,)
            dst_blk = int(r.cpu_block) if ev == "block_swapped_out" else int(r.gpu_block)
            iv = open_.get(src_key)
            if iv is None:
                keys = [k for k in open_ if k[:2] == src_key[:2]]
                iv = open_[keys[0]] if len(keys) == 1 else None
            if iv is None:
                for cand in reversed(done):
                    if (cand["device"], cand["block"]) == src_key[:2]:
                        iv = cand
                        break
            if iv is not None:
                iv["swapped_to"] = dst_blk
    out = pd.DataFrame(done + list(open_.values()),
                       columns=["device", "block", "request_id", "seq_id", "logical_index",
                                "start_step", "end_step", "reason", "cow_src", "copied_from",
                                "swapped_to", "event_index", "reused"])
    out["reused"] = out["reused"].fillna(False).astype(bool)
    if device is not None:
        out = out[out["device"] == device]
    return out.sort_values("event_index", kind="stable").reset_index(drop=True)


def block_owners(df: pd.DataFrame, device: str = "gpu") -> pd.DataFrame:
    """Who owns each block at the end of each step: a DataFrame indexed by step, one column
    per physical block (0 .. num_blocks-1), holding the owning request_id or None when free.

    The number of blocks comes from step_finished.kv_blocks_total (device "gpu") or from the
    largest block seen. Steps cover the whole trace."""
    iv = block_intervals(df, device)
    steps_ = _all_steps(df)
    n_blocks = 0
    if device == "gpu" and "kv_blocks_total" in df.columns:
        tot = df.loc[df["event"] == "step_finished", "kv_blocks_total"].dropna()
        if len(tot):
            n_blocks = int(tot.max())
    if device == "gpu" and "num_gpu_blocks" in df.attrs:
        n_blocks = max(n_blocks, int(df.attrs["num_gpu_blocks"]))
    if device == "cpu" and "num_cpu_blocks" in df.attrs:
        n_blocks = max(n_blocks, int(df.attrs["num_cpu_blocks"]))
    if len(iv):
        n_blocks = max(n_blocks, int(iv["block"].max()) + 1)
    grid = np.full((len(steps_), n_blocks), None, dtype=object)
    if len(steps_):
        s0, s_end = steps_[0], steps_[-1] + 1
        for r in iv.itertuples(index=False):
            a = int(r.start_step) - s0
            b = (int(r.end_step) if r.end_step is not None and not pd.isna(r.end_step) else s_end) - s0
            if b > a:
                grid[a:b, r.block] = r.request_id
    out = pd.DataFrame(grid, index=pd.Index(steps_, name="step"),
                       columns=pd.Index(range(n_blocks), name="block"), dtype=object)
    return out


def request_states(df: pd.DataFrame) -> pd.DataFrame:
    """The scheduler's view of every request at every step: a DataFrame indexed by step,
    one column per request (arrival order), values in REQUEST_STATES or None (not arrived).

    waiting: arrived, never scheduled; prefill / decode: in this step's batch;
    idle: running but not in this step's batch (prefill steps stall decodes);
    preempted: from its preemption until it is scheduled again; finished: from its end on.
    """
    order = _request_order(df)
    steps_ = _all_steps(df)
    if not len(steps_):
        return pd.DataFrame(index=pd.Index(steps_, name="step"), columns=order, dtype=object)
    grid = np.full((len(steps_), len(order)), None, dtype=object)
    col = {rid: j for j, rid in enumerate(order)}
    # per-step happenings
    in_batch: dict[int, dict[str, str]] = {}
    for r in df[df["event"] == "scheduled"].itertuples(index=False):
        d = in_batch.setdefault(int(r.step), {})
        for rid in (r.prefill_request_ids or ()):
            d[rid] = "prefill"
        for rid in (r.decode_request_ids or ()):
            d.setdefault(rid, "decode")
    added = {r.request_id: int(r.step) for r in df[df["event"] == "request_added"].itertuples(index=False)}
    preempt: dict[int, list[str]] = {}
    for r in df[df["event"] == "preempted"].itertuples(index=False):
        preempt.setdefault(int(r.step), []).append(r.request_id)
    finished: dict[int, list[str]] = {}
    for r in df[df["event"] == "request_finished"].itertuples(index=False):
        finished.setdefault(int(r.step), []).append(r.request_id)

    state: dict[str, Optional[str]] = {rid: None for rid in order}
    for i, s in enumerate(steps_):
        s = int(s)
        for rid, st in added.items():
            if st == s and state[rid] is None:
                state[rid] = "waiting"
        batch = in_batch.get(s, {})
        for rid in preempt.get(s, ()):
            state[rid] = "preempted"
        for rid, cur in state.items():
            if rid in batch:
                grid[i, col[rid]] = batch[rid]
                state[rid] = "running"
            elif cur == "running":
                grid[i, col[rid]] = "idle"
            else:
                grid[i, col[rid]] = cur
        for rid in finished.get(s, ()):
            if grid[i, col[rid]] is None or grid[i, col[rid]] in ("waiting", "idle"):
                grid[i, col[rid]] = "finished"
            state[rid] = "finished"
    return pd.DataFrame(grid, index=pd.Index(steps_, name="step"), columns=order, dtype=object)


# ----------------------------------------------------------------------------------------
# invariant checking


class InvariantViolation(AssertionError):
    """A broken KV-cache invariant, naming the step and the block."""

    def __init__(self, message: str, step: Optional[int] = None, block: Optional[int] = None,
                 device: Optional[str] = None, request_id: Optional[str] = None):
        where = f"step {step}" if step is not None else "step ?"
        if block is not None:
            where += f", {device or 'gpu'} block {block}"
        super().__init__(f"KV-cache invariant violated at {where}: {message}")
        self.step = step
        self.block = block
        self.device = device
        self.request_id = request_id


_FREE_LIST_NAMES = ("free_blocks", "free_block_ids", "_free_blocks", "free_list", "free")


class InvariantChecker:
    """Checks the KV cache's bookkeeping while the engine runs.

    From the events (always): a block is never allocated while already owned, only owned
    blocks are freed (by their owner), copy-on-write and swaps involve the request's own
    blocks, and once a request has finished it owns nothing. With prefix caching a block
    may be owned by several requests (block_reused): a reused block is either held by
    others or cached and free, a cached free block is given out fresh only after it was
    evicted, and only cached free blocks are evicted. At every step_finished the ledger's
    count must equal kv_blocks_used and stay within kv_blocks_total.

    From the block manager (when given an engine or a block manager): free + used == total
    for the gpu and cpu pools, ref counts exact (a block's count is the number of block
    table entries naming it), a block is free exactly when no table names it, no block is
    in two requests' tables unless it is a registered (hashed) prefix block, no table belongs
    to a finished request, the ledger agrees with the manager about which blocks are in use
    and which are cached, and every registered block of a sequence holds the tokens its
    hash says (the hash of the sequence's own tokens up to there).

        checker = InvariantChecker(llm.llm_engine).attach()   # or LLM(..., check_invariants=True)
    """

    def __init__(self, source=None, block_manager=None, *, strict: bool = True):
        self.bus = _resolve_bus(source) if source is not None else None
        self.engine = _resolve_engine(source)
        sched = getattr(self.engine, "scheduler", None)
        self.block_manager = block_manager if block_manager is not None else getattr(sched, "block_manager", None)
        self.strict = strict
        # (device, block) -> {request_id: seq_id}: every request holding the block
        self.owners: dict[tuple[str, int], dict[str, int]] = {}
        self.cached_free: set[int] = set()  # gpu blocks free but registered (prefix caching)
        self.seq_request: dict[int, str] = {}
        self.finished: set[str] = set()
        self.finished_this_step: list[str] = []
        self.num_steps_checked = 0
        self.num_events = 0
        self._lenient_frees = False  # set when attached to a cache that is not empty
        self.attached = False

    @property
    def owner(self) -> dict[tuple[str, int], tuple[str, int]]:
        """(device, block) -> (request_id, seq_id) of its first holder."""
        return {k: next(iter(v.items())) for k, v in self.owners.items() if v}

    # subscription
    def attach(self, bus: Optional[EventBus] = None) -> "InvariantChecker":
        if bus is not None:
            self.bus = bus
        if self.bus is None:
            raise ValueError("InvariantChecker needs an engine or an EventBus to attach to")
        bm = self.block_manager
        if bm is not None:
            try:
                used = bm.num_gpu_blocks - bm.get_num_free_gpu_blocks()
                used += bm.num_cpu_blocks - bm.get_num_free_cpu_blocks()
                cached = len(getattr(getattr(bm, "gpu_allocator", None), "cached_blocks", None) or ())
                self._lenient_frees = (used > 0 or cached > 0) and not self.owners
            except Exception:  # pragma: no cover - a partial block manager
                pass
        if not self.attached:
            self.bus.subscribe(self)
            self.attached = True
        return self

    def detach(self) -> "InvariantChecker":
        if self.attached:
            self.bus.unsubscribe(self)
            self.attached = False
        return self

    def __enter__(self) -> "InvariantChecker":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # event handling
    def __call__(self, e: Event) -> None:
        self.num_events += 1
        handler = getattr(self, "_on_" + e.kind, None)
        if handler is not None:
            handler(e)

    def _on_request_added(self, e) -> None:
        # A request id may be used again once its request has finished (vLLM allows it).
        self.finished.discard(e.request_id)

    def _fail(self, msg, e_or_step, block=None, device=None, request_id=None):
        step = e_or_step.step if isinstance(e_or_step, Event) else e_or_step
        raise InvariantViolation(msg, step=step, block=block, device=device, request_id=request_id)

    def _check_range(self, e, device, block):
        bm = self.block_manager
        total = getattr(bm, "num_gpu_blocks" if device == "gpu" else "num_cpu_blocks", None)
        if block < 0 or (total is not None and block >= total):
            self._fail(f"block number out of range (pool of {total} {device} blocks)", e, block, device)

    def _on_block_allocated(self, e) -> None:
        if e.device not in ("gpu", "cpu"):
            self._fail(f"unknown device {e.device!r}", e, e.block, e.device)
        self._check_range(e, e.device, e.block)
        key = (e.device, e.block)
        if self.owners.get(key):
            rid, sid = next(iter(self.owners[key].items()))
            self._fail(f"allocated to request {e.request_id!r} (seq {e.seq_id}) but already owned "
                       f"by request {rid!r} (seq {sid}): a block owned twice",
                       e, e.block, e.device, e.request_id)
        if e.device == "gpu" and e.block in self.cached_free:
            self._fail(f"allocated fresh to request {e.request_id!r} while cached (reusable) and never "
                       "evicted", e, e.block, e.device, e.request_id)
        if e.request_id in self.finished:
            self._fail(f"allocated to request {e.request_id!r}, which has already finished",
                       e, e.block, e.device, e.request_id)
        self.owners[key] = {e.request_id: e.seq_id}
        self.seq_request[e.seq_id] = e.request_id

    def _on_block_reused(self, e) -> None:
        self._check_range(e, "gpu", e.block)
        key = ("gpu", e.block)
        holders = self.owners.get(key) or {}
        if e.request_id in holders:
            self._fail(f"reused by request {e.request_id!r}, which holds it already", e, e.block, "gpu",
                       e.request_id)
        if e.from_evictor:
            if holders:
                self._fail(f"reused from the evictor by request {e.request_id!r} but held by "
                           f"{sorted(holders)}", e, e.block, "gpu", e.request_id)
            if e.block not in self.cached_free and not self._lenient_frees:
                self._fail(f"reused from the evictor by request {e.request_id!r} but it is not a cached "
                           "free block", e, e.block, "gpu", e.request_id)
            self.cached_free.discard(e.block)
        elif not holders and not self._lenient_frees:
            self._fail(f"reused (shared) by request {e.request_id!r} but nobody holds it", e, e.block, "gpu",
                       e.request_id)
        if e.request_id in self.finished:
            self._fail(f"reused by request {e.request_id!r}, which has already finished",
                       e, e.block, "gpu", e.request_id)
        if len(holders) + 1 != e.num_holders and not self._lenient_frees:
            self._fail(f"reused by request {e.request_id!r}: the event says {e.num_holders} holders, the "
                       f"ledger {len(holders) + 1}", e, e.block, "gpu", e.request_id)
        self.owners.setdefault(key, {})[e.request_id] = e.seq_id
        self.seq_request[e.seq_id] = e.request_id

    def _on_block_evicted(self, e) -> None:
        if self.owners.get(("gpu", e.block)):
            self._fail(f"evicted while held by {sorted(self.owners[('gpu', e.block)])}", e, e.block, "gpu")
        if e.block not in self.cached_free and not self._lenient_frees:
            self._fail("evicted but it was not a cached free block", e, e.block, "gpu")
        self.cached_free.discard(e.block)

    def _on_block_freed(self, e) -> None:
        key = (e.device, e.block)
        holders = self.owners.get(key)
        if not holders:
            if self._lenient_frees:
                return
            self._fail(f"freed by request {e.request_id!r} (reason {e.reason!r}) but it was not "
                       f"allocated: freed twice, or freed without an allocation",
                       e, e.block, e.device, e.request_id)
        if e.request_id not in holders:
            self._fail(f"freed by request {e.request_id!r} but owned by request "
                       f"{', '.join(map(repr, sorted(holders)))}",
                       e, e.block, e.device, e.request_id)
        del holders[e.request_id]
        if not holders:
            del self.owners[key]
            if getattr(e, "cached", False):
                self.cached_free.add(e.block)
        elif getattr(e, "cached", False):
            self._fail(f"freed by request {e.request_id!r} as cached (free) but still held by "
                       f"{sorted(holders)}", e, e.block, e.device, e.request_id)

    def _on_block_copied(self, e) -> None:
        for which, blk in (("source", e.src), ("destination", e.dst)):
            holders = self.owners.get(("gpu", blk))
            if not holders:
                self._fail(f"copy-on-write {which} of request {e.request_id!r} is a free block",
                           e, blk, "gpu", e.request_id)
            if e.request_id not in holders:
                self._fail(f"copy-on-write {which} of request {e.request_id!r} is owned by "
                           f"request {sorted(holders)[0]!r}", e, blk, "gpu", e.request_id)
        if e.src == e.dst:
            self._fail("copy-on-write onto the same block", e, e.src, "gpu", e.request_id)

    def _on_block_swapped_out(self, e) -> None:
        self._check_swap(e, "cpu", e.cpu_block)

    def _on_block_swapped_in(self, e) -> None:
        self._check_swap(e, "gpu", e.gpu_block)

    def _check_swap(self, e, dst_device, dst_block) -> None:
        # The destination must be held by the request once the swap is announced. The
        # block manager may publish the swap before or after the matching allocation, so
        # allow a destination that is still free; a destination owned by another request is
        # always wrong.
        holders = self.owners.get((dst_device, dst_block))
        if holders and e.request_id not in holders:
            self._fail(f"{e.kind} of request {e.request_id!r} into a block owned by request "
                       f"{sorted(holders)[0]!r}", e, dst_block, dst_device, e.request_id)

    def _on_request_finished(self, e) -> None:
        self.finished.add(e.request_id)
        self.finished_this_step.append(e.request_id)

    def _on_step_finished(self, e) -> None:
        # requests that ended own nothing (checked at the end of the step, so the engine may
        # publish request_finished before or after freeing the blocks within the step)
        if self.finished_this_step:
            done = set(self.finished_this_step)
            for (dev, blk), holders in sorted(self.owners.items()):
                for rid, sid in holders.items():
                    if rid in done:
                        self._fail(f"request {rid!r} has finished but still owns this block (seq {sid})",
                                   e, blk, dev, rid)
            self.finished_this_step.clear()
        n_gpu = sum(1 for (dev, _), h in self.owners.items() if dev == "gpu" and h)
        if not 0 <= e.kv_blocks_used <= e.kv_blocks_total:
            self._fail(f"kv_blocks_used={e.kv_blocks_used} outside 0..kv_blocks_total="
                       f"{e.kv_blocks_total}", e)
        if not self._lenient_frees and n_gpu != e.kv_blocks_used:
            self._fail(f"the ledger (block_allocated - block_freed) holds {n_gpu} gpu blocks but "
                       f"step_finished reports kv_blocks_used={e.kv_blocks_used}", e)
        if self.block_manager is not None:
            self.check_block_manager(e.step)
        self.num_steps_checked += 1

    # live state
    def _groups(self):
        """(request_id, seq_ids, is_swapped, group) of every group the scheduler still holds."""
        sched = getattr(self.engine, "scheduler", None)
        out = []
        if sched is None:
            return out
        for qname, swapped in (("waiting", False), ("running", False), ("swapped", True)):
            for g in getattr(sched, qname, ()) or ():
                seqs = getattr(g, "seqs_dict", None)
                ids = list(seqs) if isinstance(seqs, dict) else [s.seq_id for s in getattr(g, "seqs", ())]
                out.append((g.request_id, ids, swapped, g))
        return out

    @staticmethod
    def _free_list(alloc):
        for name in _FREE_LIST_NAMES:
            fl = getattr(alloc, name, None)
            if fl is not None and not callable(fl):
                try:
                    return [int(b) for b in fl]
                except TypeError:
                    continue
        return None

    def check_block_manager(self, step: Optional[int] = None) -> None:
        """Check the block manager's live state now (called at every step_finished)."""
        bm = self.block_manager
        if step is None:
            step = getattr(self.bus, "step", None)
        pools = {}
        for dev in ("gpu", "cpu"):
            alloc = getattr(bm, f"{dev}_allocator", None)
            total = getattr(bm, f"num_{dev}_blocks", None)
            get_free = getattr(bm, f"get_num_free_{dev}_blocks", None)
            if total is None or get_free is None:
                continue
            n_free = get_free()
            refs = list(getattr(alloc, "ref_counts", None) or [])
            for blk, rc in enumerate(refs):
                if rc < 0:
                    self._fail(f"negative ref count {rc}", step, blk, dev)
            if refs:
                if len(refs) != total:
                    self._fail(f"{len(refs)} {dev} ref counts for a pool of {total} blocks", step)
                used = sum(1 for rc in refs if rc > 0)
                if n_free + used != total:
                    self._fail(f"{dev} pool: free ({n_free}) + used ({used}) != total ({total})", step)
            elif not 0 <= n_free <= total:
                self._fail(f"{dev} pool: {n_free} free blocks out of {total}", step)
            free_list = self._free_list(alloc) if alloc is not None else None
            evictor = [int(b) for b in (getattr(alloc, "evictor", None) or ())]
            if free_list is not None:
                if set(evictor) & set(free_list):
                    self._fail(f"{dev} blocks {sorted(set(evictor) & set(free_list))} both in the free list "
                               "and in the evictor", step)
                free_list = free_list + evictor
                if len(free_list) != n_free or len(set(free_list)) != len(free_list):
                    self._fail(f"{dev} free list holds {len(free_list)} entries "
                               f"({len(set(free_list))} distinct) but {n_free} blocks are free", step)
                for blk in free_list:
                    if refs and refs[blk] != 0:
                        self._fail(f"in the {dev} free list with ref count {refs[blk]}", step, blk, dev)
            self._check_hashes(alloc, dev, evictor, step)
            pools[dev] = (refs, set(free_list) if free_list is not None else None)
            # the ledger agrees with the manager about which blocks are in use (and cached)
            if refs and not self._lenient_frees:
                in_use = {b for b, rc in enumerate(refs) if rc > 0}
                ledger = {b for (d, b), h in self.owners.items() if d == dev and h}
                held = getattr(self.bus, "held_blocks", None)  # async scheduling: the next step's
                if held is not None:
                    ledger |= held(dev, ("block_allocated", "block_reused"))
                for blk in sorted(in_use ^ ledger):
                    what = ("in use (ref count %d) but the events never allocated it" % refs[blk]
                            if blk in in_use else
                            "owned according to the events but free in the block manager")
                    self._fail(what, step, blk, dev)
                # blocks the next step (held events) evicted or reused from the evictor have
                # left it already, though their events are not yet published
                cached_free = self.cached_free - (held(dev, ("block_evicted", "block_reused"))
                                                  if held is not None else set())
                if dev == "gpu" and evictor and set(evictor) != cached_free:
                    diff = sorted(set(evictor) ^ cached_free)
                    self._fail(f"the events' cached free blocks and the evictor differ on {diff}", step,
                               diff[0], dev)

        tables = getattr(bm, "block_tables", None)
        if tables is None:
            return
        seq_req = dict(self.seq_request)
        seq_req.update(getattr(bm, "seq_request", None) or {})
        swapped_seqs: set[int] = set(getattr(bm, "swapped_seqs", None) or ())
        seqs_by_id = {}
        for rid, ids, is_swapped, group in self._groups():
            for sid in ids:
                seq_req[sid] = rid
                if is_swapped:
                    swapped_seqs.add(sid)
            if group is not None:
                seqs_by_id.update(getattr(group, "seqs_dict", {}) or {})
        holder: dict[tuple[str, int], tuple[str, int]] = {}
        count: dict[tuple[str, int], int] = {}
        gpu_alloc = getattr(bm, "gpu_allocator", None)
        hashed = getattr(gpu_alloc, "block_hash", None) or {}
        bs = getattr(bm, "block_size", None)
        for sid, table in tables.items():
            blocks = [int(getattr(b, "block_number", b)) for b in table]
            rid = seq_req.get(sid)
            if rid is None and blocks:  # a forked child: the ledger knows its first block
                rid = self.owner.get(("gpu", blocks[0])) or self.owner.get(("cpu", blocks[0])) or (None,)
                rid = rid[0]
            if rid in self.finished:
                self._fail(f"request {rid!r} has finished but seq {sid} still has a block table",
                           step, blocks[0] if blocks else None, request_id=rid)
            dev = "cpu" if sid in swapped_seqs else "gpu"
            if sid not in swapped_seqs and blocks and ("gpu", blocks[0]) not in self.owners \
                    and ("cpu", blocks[0]) in self.owners:
                dev = "cpu"  # no scheduler queues to ask: the ledger says it is swapped
            refs, free = pools.get(dev, ([], None))
            for blk in blocks:
                count[(dev, blk)] = count.get((dev, blk), 0) + 1
                if refs and (blk >= len(refs) or refs[blk] < 1):
                    rc = refs[blk] if blk < len(refs) else "n/a"
                    self._fail(f"in seq {sid}'s block table (request {rid!r}) with ref count {rc}",
                               step, blk, dev, rid)
                if free is not None and blk in free:
                    self._fail(f"in seq {sid}'s block table (request {rid!r}) and in the free list",
                               step, blk, dev, rid)
                other = holder.get((dev, blk))
                if other is not None and rid is not None and other[0] is not None and other[0] != rid \
                        and not (dev == "gpu" and blk in hashed):
                    self._fail(f"in the block tables of two requests: {other[0]!r} (seq {other[1]}) "
                               f"and {rid!r} (seq {sid}), and not a cached prefix block", step, blk, dev, rid)
                holder.setdefault((dev, blk), (rid, sid))
                owners = self.owners.get((dev, blk))
                if owners and rid is not None and rid not in owners and not self._lenient_frees:
                    self._fail(f"in seq {sid}'s block table (request {rid!r}) but allocated to "
                               f"request {sorted(owners)[0]!r}", step, blk, dev, rid)
            # a registered block holds what its hash says: this sequence's tokens up to there
            seq = seqs_by_id.get(sid)
            if dev == "gpu" and hashed and seq is not None and bs:
                from labengine.block_manager import hash_block_tokens

                tokens, prev = seq.get_token_ids(), None
                for i in range(min(len(blocks), seq.num_computed_tokens // bs)):
                    prev = hash_block_tokens(prev, tokens[i * bs:(i + 1) * bs])
                    blk = blocks[i]
                    if blk in hashed and hashed[blk] != prev:
                        self._fail(f"logical block {i} of seq {sid} (request {rid!r}) is registered under "
                                   "a hash of other tokens", step, blk, dev, rid)
        # ref counts are exact, and every block in use is in some table (else it leaked)
        for dev, (refs, _free) in pools.items():
            for blk, rc in enumerate(refs):
                n = count.get((dev, blk), 0)
                if rc > 0 and n == 0:
                    owner = self.owner.get((dev, blk), (None, None))
                    self._fail(f"ref count {rc} but in no sequence's block table (leaked; the "
                               f"events say request {owner[0]!r} owns it)", step, blk, dev, owner[0])
                if rc != n:
                    self._fail(f"ref count {rc} but named {n} times in the block tables", step, blk, dev)
        holders = getattr(bm, "holders", None)
        if holders and getattr(bm, "enable_caching", False):
            # the manager's per-request reference counts (what block_freed is published from)
            per_req: dict[int, dict[str, int]] = {}
            for sid, table in tables.items():
                if sid in swapped_seqs:
                    continue
                rid = seq_req.get(sid)
                for blk in table:
                    d = per_req.setdefault(int(blk), {})
                    d[rid] = d.get(rid, 0) + 1
            if per_req != {b: dict(h) for b, h in holders.items()}:
                diff = sorted(b for b in set(per_req) | set(holders) if per_req.get(b) != holders.get(b))
                self._fail(f"per-request holders of gpu blocks {diff[:5]} disagree with the block tables",
                           step, diff[0] if diff else None, "gpu")

    def _check_hashes(self, alloc, dev, evictor, step) -> None:
        """Prefix caching: hash -> block and block -> hash agree, the evictor holds only
        registered free blocks, and no registered block sits in the plain free list."""
        cached = getattr(alloc, "cached_blocks", None)
        block_hash = getattr(alloc, "block_hash", None)
        if cached is None or block_hash is None:
            return
        if len(cached) != len(block_hash):
            self._fail(f"{dev}: {len(cached)} hashes registered but {len(block_hash)} blocks hashed", step)
        for h, blk in cached.items():
            if block_hash.get(blk) != h:
                self._fail("registered under a hash that the block does not carry", step, blk, dev)
        for blk in evictor:
            if blk not in block_hash:
                self._fail("in the evictor but not registered (nothing to reuse)", step, blk, dev)
        plain = set(getattr(alloc, "free_blocks", ()) or ())
        for blk in block_hash:
            if blk in plain:
                self._fail("registered but in the plain free list (its contents may be overwritten)",
                           step, blk, dev)
