"""Helpers that the exercises' check cells call.

A check cell asserts on the learner's *results* (objects, numbers, traces), never on printed
text, and prints what it verified:

    from labengine.grading import check, check_equal, check_close
    check("three outputs", len(outputs) == 3, f"{len(outputs)} RequestOutputs")
    # prints "✓ three outputs: 3 RequestOutputs", or raises CheckFailed (an AssertionError)

Trace helpers (they read `trace.to_dataframe()` or a Trace, like labengine.viz) answer the
questions the instrumentation exercises ask: how many KV blocks did each request hold at its
peak, how many were in use at once, which requests were preempted and when.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import pandas as pd

__all__ = ["CheckFailed", "check", "check_equal", "check_close", "check_type", "blocks_needed",
           "as_dataframe", "peak_blocks_per_request", "max_blocks_in_use", "preemptions",
           "preempted_request_ids", "blocks_freed_by", "max_batch_size", "intervals_overlap",
           "summary", "capture_logs", "greedy_agreement", "exact_greedy_expected", "check_same_greedy"]

_results: list[tuple[str, bool, str]] = []


class CheckFailed(AssertionError):
    """A check cell's condition does not hold (the message says what was expected)."""


def _short(x: Any, limit: int = 160) -> str:
    s = repr(x)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def check(name: str, condition: Any, detail: str = "", hint: str = "") -> None:
    """Pass: print "✓ name: detail". Fail: raise CheckFailed("✗ name: detail (hint)").

    `condition` must be a real bool (or numpy bool): a check never passes on a truthy
    object by accident (a non-empty list, a string, NotImplemented ...)."""
    try:
        import numpy as np
        bool_types: tuple = (bool, np.bool_)
    except ImportError:  # pragma: no cover
        bool_types = (bool,)
    if not isinstance(condition, bool_types):
        raise CheckFailed(f"✗ {name}: the check's condition is {_short(condition)}, not True/False "
                          "(this is a bug in the check cell)")
    ok = bool(condition)
    _results.append((name, ok, detail))
    if not ok:
        msg = f"✗ {name}" + (f": {detail}" if detail else "")
        if hint:
            msg += f"\n  hint: {hint}"
        raise CheckFailed(msg)
    print(f"✓ {name}" + (f": {detail}" if detail else ""))


def check_equal(name: str, got: Any, expected: Any, hint: str = "") -> None:
    """check that got == expected; the message shows both."""
    ok = got == expected
    if not isinstance(ok, bool):  # numpy arrays, DataFrames: require all equal
        try:
            ok = bool(getattr(ok, "all")())
        except Exception:  # noqa: BLE001
            ok = False
    check(name, ok, f"{_short(got)}" if ok else f"got {_short(got)}, expected {_short(expected)}", hint)


def check_close(name: str, got: float, expected: float, rel: float = 1e-6, abs_: float = 1e-9,
                hint: str = "") -> None:
    """check that two numbers agree to a relative (or absolute) tolerance."""
    try:
        ok = math.isclose(float(got), float(expected), rel_tol=rel, abs_tol=abs_)
    except (TypeError, ValueError):
        ok = False
    check(name, ok, f"{got!r}" + ("" if ok else f", expected {expected!r} (rel tol {rel})"), hint)


def check_type(name: str, obj: Any, cls, hint: str = "") -> None:
    """check that obj is an instance of cls."""
    names = cls.__name__ if isinstance(cls, type) else "/".join(c.__name__ for c in cls)
    check(name, isinstance(obj, cls), f"a {type(obj).__name__}" + ("" if isinstance(obj, cls) else
                                                                    f", expected a {names}"), hint)


def summary() -> dict:
    """Counts of the checks run in this kernel so far: {"passed": n, "failed": m}."""
    return {"passed": sum(ok for _, ok, _ in _results), "failed": sum(not ok for _, ok, _ in _results)}


# ------------------------------------------------------------------------------------------
# comparing greedy runs


def _token_lists(outputs) -> list:
    out = []
    for o in outputs:
        if hasattr(o, "outputs"):  # RequestOutput: its first completion
            o = o.outputs[0]
        out.append(list(getattr(o, "token_ids", o)))
    return out


def greedy_agreement(outputs_a, outputs_b) -> float:
    """The fraction of requests whose (first) completions have identical token ids.
    Accepts RequestOutputs, CompletionOutputs, token-id lists or texts."""
    a, b = _token_lists(outputs_a), _token_lists(outputs_b)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} outputs vs {len(b)}: compare the same requests")
    return sum(x == y for x, y in zip(a, b)) / len(a) if a else 1.0


def exact_greedy_expected(llm) -> bool:
    """True when greedy results must not depend on the batch: the engine computes in float32
    (the CPU default). In half precision (the GPU default) a different batch shape changes
    the order of floating-point sums, and a near-tie between two tokens can flip."""
    import torch

    engine = getattr(llm, "llm_engine", None) or getattr(llm, "engine", None) or llm
    return engine.model_config.dtype == torch.float32


def check_same_greedy(name: str, outputs_a, outputs_b, llm, min_half_precision: float = 0.5) -> None:
    """check that two greedy runs of the same requests (batched differently, preempted or
    not ...) generated the same tokens: all of them in float32; in half precision at least
    `min_half_precision` of them (see exact_greedy_expected)."""
    frac = greedy_agreement(outputs_a, outputs_b)
    n = len(_token_lists(outputs_a))
    if exact_greedy_expected(llm):
        check(name, frac == 1.0, f"{round(frac * n)} of {n} requests identical (float32)")
    else:
        check(name, frac >= min_half_precision,
              f"{round(frac * n)} of {n} requests identical (half precision: a different batch may flip a "
              "near-tie between two tokens, after which the texts differ)")


# ------------------------------------------------------------------------------------------
# KV blocks and traces


def blocks_needed(num_tokens: int, block_size: int = 16) -> int:
    """Blocks that hold num_tokens tokens: ceil(num_tokens / block_size)."""
    if num_tokens < 0 or block_size < 1:
        raise ValueError("num_tokens must be >= 0 and block_size >= 1")
    return -(-int(num_tokens) // int(block_size))


def as_dataframe(trace_or_df) -> pd.DataFrame:
    """A trace's event DataFrame, from a Trace or the DataFrame itself."""
    if isinstance(trace_or_df, pd.DataFrame):
        return trace_or_df
    if hasattr(trace_or_df, "to_dataframe"):
        return trace_or_df.to_dataframe()
    raise TypeError(f"expected a labengine Trace or its DataFrame, got {type(trace_or_df).__name__}")


def peak_blocks_per_request(trace_or_df) -> dict:
    """{request_id: the most device KV blocks it held at once} (replay of the block ledger)."""
    df = as_dataframe(trace_or_df)
    led = df[df["event"].isin(["block_allocated", "block_freed"]) & (df["device"] == "gpu")]
    held: dict = {}
    peak: dict = {}
    for ev, rid in zip(led["event"], led["request_id"]):
        held[rid] = held.get(rid, 0) + (1 if ev == "block_allocated" else -1)
        peak[rid] = max(peak.get(rid, 0), held[rid])
    return peak


def max_blocks_in_use(trace_or_df) -> int:
    """The most device KV blocks in use at the end of any step (step_finished.kv_blocks_used)."""
    df = as_dataframe(trace_or_df)
    used = pd.to_numeric(df.loc[df["event"] == "step_finished", "kv_blocks_used"], errors="coerce").dropna()
    return int(used.max()) if len(used) else 0


def preemptions(trace_or_df) -> pd.DataFrame:
    """The preempted events: step, t, request_id, mode."""
    df = as_dataframe(trace_or_df)
    return df.loc[df["event"] == "preempted", ["step", "t", "request_id", "mode"]].reset_index(drop=True)


def preempted_request_ids(trace_or_df) -> set:
    """The ids of every request preempted at least once."""
    return set(preemptions(trace_or_df)["request_id"])


def blocks_freed_by(trace_or_df, reason: str, device: Optional[str] = "gpu") -> int:
    """How many block_freed events had this reason ("finished", "preempted", "swapped_out", ...)."""
    df = as_dataframe(trace_or_df)
    m = (df["event"] == "block_freed") & (df["reason"] == reason)
    if device is not None:
        m &= df["device"] == device
    return int(m.sum())


def max_batch_size(trace_or_df) -> int:
    """The most sequences any one step ran (step_finished.batch_size)."""
    df = as_dataframe(trace_or_df)
    bs = pd.to_numeric(df.loc[df["event"] == "step_finished", "batch_size"], errors="coerce").dropna()
    return int(bs.max()) if len(bs) else 0


def intervals_overlap(intervals: Iterable[tuple[float, float]]) -> bool:
    """True when any two (start, end) intervals overlap (e.g. requests running at the same
    time, from RequestOutput.metrics.first_scheduled_time and finished_time)."""
    iv = sorted((float(a), float(b)) for a, b in intervals)
    return any(iv[i + 1][0] < iv[i][1] for i in range(len(iv) - 1))


# ------------------------------------------------------------------------------------------
# logs


class capture_logs:
    """Collect the messages labengine logs (INFO and up) inside a `with` block:

        with capture_logs() as logs:
            llm = LLM(model=MODEL)
        logs.messages   # ["Initializing an LLM engine ...", "Model weights loaded in 0.41 s.", ...]
    """

    def __init__(self, logger: str = "labengine", level: int = 20):
        import logging

        self._logging = logging
        self.logger = logging.getLogger(logger)
        self.level = level
        self.records: list = []

    def __enter__(self) -> "capture_logs":
        outer = self

        class _Keep(self._logging.Handler):
            def emit(self, record):
                outer.records.append(record)

        self._handler = _Keep(level=self.level)
        self._old_level = self.logger.level
        if self.logger.getEffectiveLevel() > self.level:
            self.logger.setLevel(self.level)
        self.logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self._handler)
        self.logger.setLevel(self._old_level)

    @property
    def messages(self) -> list:
        return [r.getMessage() for r in self.records]

    def find(self, text: str) -> list:
        """The messages that contain `text`."""
        return [m for m in self.messages if text in m]
