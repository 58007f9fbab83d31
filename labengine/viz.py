"""Charts of what the engine did, drawn from a trace's DataFrame (`trace.to_dataframe()`).

Every chart has a `*_data` function that returns exactly what it draws, so a notebook's
check cell (and the tests) can assert on data, not pixels:

    block_map_data(df)            -> BlockMapData (grid [blocks, steps] of request index or -1, ...)
    plot_block_map(df)            the KV-cache block map: physical block x step, coloured by request
    block_table_data(df, rid, s)  -> DataFrame: one request's block table at step s (logical -> physical)
    plot_block_table(df, rid, s)
    timeline_data(df)             -> DataFrame of segments (request, state, start, end)
    plot_timeline(df)             the scheduler timeline: waiting / prefill / decode / idle / preempted
    step_latency_data(df)         -> DataFrame: per-step latency parts in ms, batch size, KV usage
    plot_step_latency(df)
    latency_distribution_data(df) -> DataFrame: TTFT and end-to-end latency per request
    plot_latency_distributions(df)

    sampling_stages(tokens, logprobs, ...) -> DataFrame: a next-token distribution through
        penalties -> temperature -> top-k -> top-p -> min-p (vLLM's order), which tokens survive
    plot_sampling_stages(stages)

Each plot function returns the matplotlib Figure (pass `ax=` to draw into your own axes).
Nothing here imports the engine: only labengine.trace's DataFrame helpers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from labengine.trace import (REQUEST_STATES, STEP_PARTS, block_intervals, request_states,
                             requests, steps)

__all__ = ["BlockMapData", "block_map_data", "plot_block_map", "block_table_data",
           "plot_block_table", "timeline_data", "plot_timeline", "step_latency_data",
           "plot_step_latency", "latency_distribution_data", "plot_latency_distributions",
           "request_colors", "sampling_stages", "plot_sampling_stages", "STATE_COLORS"]

STATE_COLORS = {
    "waiting": "#d9d9d9",
    "prefill": "#ff7f0e",
    "decode": "#1f77b4",
    "idle": "#aec7e8",
    "preempted": "#d62728",
    "finished": "#2ca02c",
}
PART_COLORS = {"schedule_s": "#9467bd", "prepare_s": "#8c564b", "forward_s": "#1f77b4",
               "sample_s": "#ff7f0e", "detokenize_s": "#2ca02c", "other_s": "#c7c7c7"}
PART_LABELS = {"schedule_s": "schedule", "prepare_s": "prepare inputs", "forward_s": "forward",
               "sample_s": "sample", "detokenize_s": "detokenize", "other_s": "other"}


def _plt():
    import matplotlib.pyplot as plt
    return plt


def _fig_ax(ax, figsize):
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    else:
        fig = ax.figure
    return fig, ax


def request_colors(n: int) -> np.ndarray:
    """RGBA colour of request i (arrival order): tab20, cycling, so requests that run at the
    same time (close in arrival order) get different colours even at 100 requests."""
    from matplotlib import colormaps
    base = colormaps["tab20"].colors
    # even entries first (the saturated half of tab20), then the light half
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    cols = np.array([(*base[order[i % 20]], 1.0) for i in range(n)]) if n else np.zeros((0, 4))
    return cols


# ----------------------------------------------------------------------------------------
# the block map


@dataclass
class BlockMapData:
    """What plot_block_map draws.

    grid[b, j]: index into `requests` of the owner of physical block b at the end of step
    steps[j], or -1 when free. shared[b, j]: the block is shared by several sequences of its
    request (inferred: see block_map_data). swapped_out / swapped_in / copied: (block, step)
    points where a block was swapped to the CPU pool, swapped back into, or written by a
    copy-on-write. cpu_grid: the same map for the CPU swap pool (None when it was never used).
    """

    grid: np.ndarray
    requests: list
    steps: np.ndarray
    shared: np.ndarray
    swapped_out: list = field(default_factory=list)
    swapped_in: list = field(default_factory=list)
    copied: list = field(default_factory=list)
    cpu_grid: Optional[np.ndarray] = None
    logical: Optional[np.ndarray] = None  # logical index of the block in its owner's table, -1 when free
    # prefix caching: held by several requests at once (a cached prefix reused), and free but
    # still cached (in the evictor, reusable until evicted); None without prefix caching
    multi_request: Optional[np.ndarray] = None
    cached: Optional[np.ndarray] = None

    @property
    def num_blocks(self) -> int:
        return self.grid.shape[0]

    def used(self) -> np.ndarray:
        """Blocks in use at each step."""
        return (self.grid >= 0).sum(axis=0)

    def owners_at(self, step: int) -> dict:
        """{block: request_id} at the end of `step`."""
        j = int(np.searchsorted(self.steps, step))
        if j >= len(self.steps) or self.steps[j] != step:
            raise KeyError(f"step {step} is not in the trace ({self.steps[:1]}..{self.steps[-1:]})")
        col = self.grid[:, j]
        return {int(b): self.requests[col[b]] for b in np.flatnonzero(col >= 0)}


def _num_blocks(df: pd.DataFrame, device: str, iv: pd.DataFrame) -> int:
    n = 0
    if device == "gpu" and "kv_blocks_total" in df.columns:
        tot = df.loc[df["event"] == "step_finished", "kv_blocks_total"].dropna()
        if len(tot):
            n = int(tot.max())
    key = "num_gpu_blocks" if device == "gpu" else "num_cpu_blocks"
    if key in df.attrs:
        n = max(n, int(df.attrs[key]))
    if len(iv):
        n = max(n, int(iv["block"].max()) + 1)
    return n


def _steps_of(df: pd.DataFrame) -> np.ndarray:
    if df.empty:
        return np.arange(0)
    return np.arange(int(df["step"].min()), int(df["step"].max()) + 1)


def _fill(iv: pd.DataFrame, n_blocks: int, steps_: np.ndarray, req_index: dict):
    grid = np.full((n_blocks, len(steps_)), -1, dtype=np.int32)
    logical = np.full((n_blocks, len(steps_)), -1, dtype=np.int32)
    if not len(steps_):
        return grid, logical
    s0, s_end = int(steps_[0]), int(steps_[-1]) + 1
    for r in iv.itertuples(index=False):
        a = int(r.start_step) - s0
        b = (s_end if r.end_step is None or pd.isna(r.end_step) else int(r.end_step)) - s0
        if b > a:  # a block held by several requests (prefix caching) keeps its first holder's colour
            free = grid[r.block, a:b] < 0
            grid[r.block, a:b][free] = req_index[r.request_id]
            logical[r.block, a:b][free] = -1 if pd.isna(r.logical_index) else int(r.logical_index)
    return grid, logical


def _prefix_cache_masks(df: pd.DataFrame, iv: pd.DataFrame, shape, steps_: np.ndarray):
    """(held by several requests, free but cached) per (block, step), or (None, None) when the
    trace has no prefix caching."""
    if not (df["event"] == "block_reused").any() and not (
            "cached" in df.columns and (df["cached"] == True).any()):  # noqa: E712 (object column)
        return None, None
    s0, s_end = int(steps_[0]), int(steps_[-1]) + 1
    count = np.zeros(shape, dtype=np.int32)
    for r in iv.itertuples(index=False):
        a = int(r.start_step) - s0
        b = (s_end if r.end_step is None or pd.isna(r.end_step) else int(r.end_step)) - s0
        if b > a:
            count[r.block, a:b] += 1
    cached = np.zeros(shape, dtype=bool)
    since: dict[int, int] = {}
    ev = df[df["event"].isin(["block_freed", "block_reused", "block_evicted", "block_allocated"])]
    for r in ev.itertuples(index=False):
        blk = int(r.block)
        if r.event == "block_freed":
            if r.device == "gpu" and getattr(r, "cached", False) is True:
                since[blk] = int(r.step)
        elif r.event != "block_allocated" or r.device == "gpu":
            a = since.pop(blk, None)
            if a is not None:
                cached[blk, a - s0:int(r.step) - s0] = True
    for blk, a in since.items():
        cached[blk, a - s0:] = True
    return count > 1, cached


def _shared_mask(grid: np.ndarray, logical: np.ndarray) -> np.ndarray:
    """Blocks shared by several sequences of their request (after a fork: n > 1, best_of,
    beam search). The events do not announce forks, so this is inferred from the ledger:
    sharing is always a prefix of the block table (a fork copies the whole table, and
    copy-on-write only ever splits the last block), so a request's block at logical index i
    is shared when the request holds more distinct blocks at some later logical index than
    at i. A fork whose sequences have not yet written a block of their own shows no sharing
    until they do."""
    shared = np.zeros(grid.shape, dtype=bool)
    b_idx, j_idx = np.nonzero(grid >= 0)
    if not len(b_idx):
        return shared
    cells = pd.DataFrame({"j": j_idx, "req": grid[b_idx, j_idx], "li": logical[b_idx, j_idx], "b": b_idx})
    counts = cells.groupby(["j", "req", "li"], sort=True).size().rename("count").reset_index()
    if counts["count"].max() < 2:
        return shared
    counts = counts.iloc[::-1]  # li descending within each (j, req)
    later_max = counts.groupby(["j", "req"], sort=False)["count"].transform(
        lambda c: c.shift(1, fill_value=0).cummax())
    counts = counts.assign(shared=counts["count"].to_numpy() < later_max.to_numpy())
    hit = cells.merge(counts[counts["shared"]][["j", "req", "li"]], on=["j", "req", "li"])
    shared[hit["b"].to_numpy(), hit["j"].to_numpy()] = True
    return shared


def block_map_data(df: pd.DataFrame, device: str = "gpu") -> BlockMapData:
    """The KV-cache block map as arrays: replay of the block ledger (see BlockMapData)."""
    iv_all = block_intervals(df, None)
    rids = [r for r in requests(df)["request_id"]]
    req_index = {rid: i for i, rid in enumerate(rids)}
    for rid in iv_all["request_id"]:
        if rid not in req_index:
            req_index[rid] = len(rids)
            rids.append(rid)
    steps_ = _steps_of(df)
    iv = iv_all[iv_all["device"] == device]
    grid, logical = _fill(iv, _num_blocks(df, device, iv), steps_, req_index)
    s0 = int(steps_[0]) if len(steps_) else 0
    multi = (df["event"] == "block_copied").any() or (
        df.loc[df["event"] == "request_added", ["n", "best_of"]].fillna(1).to_numpy() > 1).any()
    shared = _shared_mask(grid, logical) if multi else np.zeros(grid.shape, dtype=bool)
    outs = [(int(r.gpu_block if device == "gpu" else r.cpu_block), int(r.step))
            for r in df[df["event"] == "block_swapped_out"].itertuples(index=False)]
    ins = [(int(r.gpu_block if device == "gpu" else r.cpu_block), int(r.step))
           for r in df[df["event"] == "block_swapped_in"].itertuples(index=False)]
    copied = [(int(r.dst), int(r.step)) for r in df[df["event"] == "block_copied"].itertuples(index=False)]
    cpu_grid = None
    iv_cpu = iv_all[iv_all["device"] == "cpu"]
    if device == "gpu" and len(iv_cpu):
        cpu_grid, _ = _fill(iv_cpu, _num_blocks(df, "cpu", iv_cpu), steps_, req_index)
    multi_request, cached = (_prefix_cache_masks(df, iv, grid.shape, steps_) if device == "gpu" and len(steps_)
                             else (None, None))
    return BlockMapData(grid=grid, requests=rids, steps=steps_, shared=shared, swapped_out=outs,
                        swapped_in=ins, copied=copied if device == "gpu" else [], cpu_grid=cpu_grid,
                        logical=logical, multi_request=multi_request, cached=cached)


def _rgba(grid: np.ndarray, colors: np.ndarray) -> np.ndarray:
    img = np.ones(grid.shape + (4,))
    owned = grid >= 0
    img[owned] = colors[grid[owned]]
    return img


def plot_block_map(df: pd.DataFrame, ax=None, step: Optional[int] = None, show_cpu: bool = True,
                   max_legend: int = 20, title: Optional[str] = None):
    """Physical KV block (rows) x engine step (columns), coloured by the owning request
    (arrival order), blank when free, grey when free but still cached (prefix caching). Dots
    mark blocks shared by several sequences of a request, white + blocks held by several
    requests (a reused cached prefix); v / ^ mark swap-out / swap-in, x a copy-on-write. `step` draws a cursor.
    The CPU swap pool, when used, gets its own panel below."""
    plt = _plt()
    data = block_map_data(df)
    colors = request_colors(len(data.requests))
    with_cpu = show_cpu and data.cpu_grid is not None and ax is None
    if ax is None:
        if with_cpu:
            ratios = [3, 1]
            fig, (ax, ax_cpu) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, layout="constrained",
                                             gridspec_kw={"height_ratios": ratios})
        else:
            fig, ax = plt.subplots(figsize=(11, 5), layout="constrained")
    else:
        fig = ax.figure
    x0 = data.steps[0] if len(data.steps) else 0
    x1 = data.steps[-1] + 1 if len(data.steps) else 1
    extent = (x0 - 0.5, x1 - 0.5, max(data.num_blocks, 1) - 0.5, -0.5)
    if data.grid.size:
        img = _rgba(data.grid, colors)
        if data.cached is not None:
            img[data.cached & (data.grid < 0)] = (0.78, 0.78, 0.78, 1.0)  # free, still cached
        ax.imshow(img, aspect="auto", interpolation="nearest", extent=extent)
    else:
        ax.text(0.5, 0.5, "no blocks in this trace", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("physical KV block (device cache)")
    ax.set_xlabel("engine step")
    used = data.used()
    peak = int(used.max()) if used.size else 0
    ax.set_title(title or f"KV-cache block map: {len(data.requests)} requests, {data.num_blocks} blocks, "
                          f"peak {peak} in use")
    if data.shared.any():
        b, j = np.nonzero(data.shared)
        ax.scatter(data.steps[j], b, s=6, c="black", marker=".", linewidths=0, label="shared (forked)")
    if data.multi_request is not None and data.multi_request.any():
        b, j = np.nonzero(data.multi_request)
        ax.scatter(data.steps[j], b, s=14, c="white", marker="+", linewidths=0.9,
                   label="shared by several requests (cached prefix)")
    if data.swapped_out:
        b, s = zip(*data.swapped_out)
        ax.scatter(s, b, s=28, marker="v", facecolors="none", edgecolors="#d62728", label="swapped out")
    if data.swapped_in:
        b, s = zip(*data.swapped_in)
        ax.scatter(s, b, s=28, marker="^", facecolors="none", edgecolors="#2ca02c", label="swapped in")
    if data.copied:
        b, s = zip(*data.copied)
        ax.scatter(s, b, s=24, marker="x", c="black", linewidths=0.8, label="copy-on-write")
    if step is not None:
        ax.axvline(step, color="black", lw=1.2, ls="--")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.patches import Patch
    n = len(data.requests)
    req_handles = [Patch(facecolor=colors[i], label=f"req {data.requests[i]}") for i in range(min(n, max_legend))]
    if n > max_legend:
        req_handles.append(Patch(facecolor="white", edgecolor="grey",
                                 label=f"... {n} requests (colours repeat every 20)"))
    req_handles.append(Patch(facecolor="white", edgecolor="grey", label="free"))
    if data.cached is not None:
        req_handles.append(Patch(facecolor=(0.78, 0.78, 0.78), edgecolor="grey", label="free, cached (reusable)"))
    ax.legend(handles=req_handles + handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              title="owner", title_fontsize=8, frameon=False, ncol=1 if len(req_handles) <= 14 else 2)
    if with_cpu:
        rows_used = np.flatnonzero((data.cpu_grid >= 0).any(axis=1))
        nc = int(rows_used.max()) + 1 if len(rows_used) else 1  # only the part of the pool used
        ax_cpu.imshow(_rgba(data.cpu_grid[:nc], colors), aspect="auto", interpolation="nearest",
                      extent=(extent[0], extent[1], nc - 0.5, -0.5))
        ax_cpu.set_ylabel(f"CPU block\n(0..{nc - 1} of {data.cpu_grid.shape[0]})")
        ax_cpu.set_xlabel("engine step")
        ax_cpu.set_title("CPU swap pool (preemption by swap)", fontsize=9)
        ax.set_xlabel("")
        if step is not None:
            ax_cpu.axvline(step, color="black", lw=1.2, ls="--")
    return fig


# ----------------------------------------------------------------------------------------
# one request's block table


def block_table_data(df: pd.DataFrame, request_id, step: int,
                     intervals: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """The block table(s) of one request at the end of `step`: one row per (sequence,
    logical block) with the physical block, its device and whether it is shared.

    Sequences are those seen in the ledger. A forked sequence shares its parent's blocks
    without an event, so at a logical index where a sequence has no block of its own it is
    given the block its siblings share there (inferred=True); blocks that no seen sequence
    claims (a fork that has not yet allocated a block of its own) are listed under seq_id -1.
    A block listed for several sequences is shared. `intervals` (block_intervals(df, None))
    saves recomputing the ledger replay when called for many steps."""
    iv = block_intervals(df, None) if intervals is None else intervals
    end = pd.to_numeric(iv["end_step"], errors="coerce").to_numpy(dtype=float)
    keep = ((iv["request_id"] == request_id).to_numpy() & (iv["start_step"].to_numpy() <= step)
            & (np.isnan(end) | (end > step)))
    iv = iv[keep]
    cols = ["seq_id", "logical_index", "block", "device", "shared", "inferred"]
    if iv.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    seqs = sorted(int(x) for x in iv["seq_id"].unique())
    by_li: dict[int, list] = {}
    for r in iv.itertuples(index=False):
        by_li.setdefault(int(r.logical_index), []).append(r)
    used: set = set()
    for sid in seqs:
        for li in sorted(by_li):
            here = by_li[li]
            own = [r for r in here if int(r.seq_id) == sid]
            if own:  # the latest: a copy-on-write replaces the block at that index
                r, inferred = max(own, key=lambda r: int(r.event_index)), False
            else:  # shared with the sequence it was forked from (the lowest seq id here)
                r, inferred = min(here, key=lambda r: int(r.seq_id)), True
            used.add((r.device, int(r.block)))
            rows.append((sid, li, int(r.block), r.device, False, inferred))
    # blocks no seen sequence claims belong to a forked sequence that never allocated a block
    # of its own (the ledger names the block's first owner): show them as seq -1
    left = {li: [r for r in here if (r.device, int(r.block)) not in used] for li, here in by_li.items()}
    if any(left.values()):
        for li in sorted(by_li):
            if left[li]:
                r, inferred = left[li][0], True
            else:
                r, inferred = min(by_li[li], key=lambda r: int(r.seq_id)), True
            rows.append((-1, li, int(r.block), r.device, False, inferred))
    out = pd.DataFrame(rows, columns=cols).sort_values(["seq_id", "logical_index"]).reset_index(drop=True)
    # a block listed for several sequences is shared
    dup = out.duplicated(["device", "block"], keep=False)
    out["shared"] = out["shared"] | dup
    return out


# points; the explorer shows the table at 80 dpi, so 10 pt is ~11 px of text
TABLE_FONTSIZE = 10


def plot_block_table(df: pd.DataFrame, request_id, step: int, ax=None):
    """One request's block table at a step: logical blocks (top, one row per sequence) with
    arrows to the physical blocks (bottom strip of the whole device cache)."""
    from matplotlib.patches import Rectangle
    table = block_table_data(df, request_id, step)
    data = block_map_data(df)
    n_blocks = data.num_blocks
    fig, ax = _fig_ax(ax, (11, 3.6))
    colors = request_colors(len(data.requests))
    rid_idx = data.requests.index(request_id) if request_id in data.requests else 0
    color = colors[rid_idx] if len(colors) else (0.5, 0.5, 0.5, 1)
    ax.set_title(f"request {request_id!r} at step {step}: block table (logical -> physical)",
                 fontsize=TABLE_FONTSIZE + 2)
    ax.axis("off")
    if table.empty:
        ax.text(0.5, 0.5, f"request {request_id!r} holds no blocks at step {step}", ha="center",
                va="center", transform=ax.transAxes, fontsize=TABLE_FONTSIZE + 2)
        return fig
    # bottom strip: every physical block, coloured by owner at that step
    j = int(np.searchsorted(data.steps, step))
    col = data.grid[:, min(j, data.grid.shape[1] - 1)] if data.grid.shape[1] else np.full(n_blocks, -1)
    w = max(n_blocks, int(table["logical_index"].max()) + 1)
    for b in range(n_blocks):
        fc = colors[col[b]] if col[b] >= 0 else (1, 1, 1, 1)
        alpha = 1.0 if col[b] == rid_idx else 0.25
        ax.add_patch(Rectangle((b, 0), 0.9, 0.9, facecolor=fc, alpha=alpha, edgecolor="grey", lw=0.5))
        # every number fits up to 32 blocks; beyond, the request's own blocks and every 8th
        if n_blocks <= 32 or col[b] == rid_idx or b % 8 == 0:
            ax.text(b + 0.45, 0.45, str(b), ha="center", va="center", fontsize=TABLE_FONTSIZE - 2,
                    fontweight="bold" if col[b] == rid_idx else "normal")
    ax.text(-0.5, 0.45, "physical\n(gpu)", ha="right", va="center", fontsize=TABLE_FONTSIZE)
    seqs = list(dict.fromkeys(table["seq_id"]))
    for k, sid in enumerate(seqs):
        y = 2.2 + 1.2 * k
        name = f"seq {sid}" if sid >= 0 else "forked seq"
        ax.text(-0.5, y + 0.45, f"{name}\nlogical", ha="right", va="center", fontsize=TABLE_FONTSIZE)
        spacing = max(1.0, w / max(1, table["logical_index"].max() + 1) * 0.5)
        box = max(0.9, min(4.0, 0.8 * spacing))   # wide enough for its label when there is room
        for r in table[table["seq_id"] == sid].itertuples(index=False):
            x = r.logical_index * spacing
            ax.add_patch(Rectangle((x, y), box, 0.9, facecolor=color, edgecolor="black", lw=0.8,
                                   hatch="//" if r.shared else None))
            label = (f"{r.logical_index} -> {r.block}" if box >= 3 else f"{r.logical_index}\n->{r.block}") + (
                " cpu" if r.device == "cpu" else "")
            ax.text(x + box / 2, y + 0.45, label, ha="center", va="center", fontsize=TABLE_FONTSIZE,
                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", alpha=0.8, linewidth=0))
            if r.device == "gpu":
                ax.annotate("", xy=(r.block + 0.45, 0.95), xytext=(x + box / 2, y - 0.05),
                            arrowprops=dict(arrowstyle="->", lw=0.6, color="black", alpha=0.6))
    ax.set_xlim(-3, w + 1)
    ax.set_ylim(-0.3, 2.2 + 1.2 * len(seqs) + 0.2)
    return fig


# ----------------------------------------------------------------------------------------
# scheduler timeline


def timeline_data(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of equal state per request: request_id, row (arrival order), state, start_step,
    end_step (exclusive). Finished requests get one 'finished' segment of length 1 at their
    finishing step (drawn as a marker)."""
    states = request_states(df)
    rows = []
    steps_ = states.index.to_numpy()
    for k, rid in enumerate(states.columns):
        col = list(states[rid].to_numpy()) + [None]
        start = 0
        for i in range(1, len(col)):
            cur = col[start]
            if col[i] == cur and i < len(col) - 1:
                continue
            if cur is not None and not (isinstance(cur, float) and np.isnan(cur)):
                end = int(steps_[start]) + 1 if cur == "finished" else int(steps_[i - 1]) + 1
                rows.append((rid, k, cur, int(steps_[start]), end))
                if cur == "finished":
                    break
            start = i
    # the end mark: right after the request's finishing step (even the trace's last one)
    rows = [r for r in rows if r[2] != "finished"]
    col_of = {rid: k for k, rid in enumerate(states.columns)}
    for r in df[df["event"] == "request_finished"].itertuples(index=False):
        if r.request_id not in col_of:
            continue
        fin = int(r.step)
        ran = fin in states.index and states.loc[fin, r.request_id] in ("prefill", "decode")
        start = fin + 1 if ran else fin
        rows.append((r.request_id, col_of[r.request_id], "finished", start, start + 1))
    out = pd.DataFrame(rows, columns=["request_id", "row", "state", "start_step", "end_step"])
    return out.sort_values(["row", "start_step"], kind="stable").reset_index(drop=True)


def plot_timeline(df: pd.DataFrame, ax=None, max_labels: int = 40):
    """Scheduler timeline: one row per request (arrival order, first at the top), coloured
    by state at each step; red triangles mark preemptions, black bars the end."""
    tl = timeline_data(df)
    n = int(tl["row"].max()) + 1 if len(tl) else 0
    fig, ax = _fig_ax(ax, (11, max(3.0, min(12.0, 0.12 * n + 2))))
    from matplotlib.collections import PolyCollection
    for state in ("waiting", "prefill", "decode", "idle", "preempted"):
        seg = tl[tl["state"] == state]
        if seg.empty:
            continue
        x0 = seg["start_step"].to_numpy() - 0.5
        x1 = seg["end_step"].to_numpy() - 0.5
        y0 = seg["row"].to_numpy() - 0.4
        y1 = y0 + 0.8
        verts = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x1, y1], 1),
                          np.stack([x0, y1], 1)], axis=1)
        ax.add_collection(PolyCollection(verts, facecolors=STATE_COLORS[state], linewidths=0))
    if len(tl):
        ax.set_xlim(tl["start_step"].min() - 1, tl["end_step"].max() + 1)
    fin = tl[tl["state"] == "finished"]
    if len(fin):
        ax.scatter(fin["start_step"] - 0.5, fin["row"], marker="|", s=60, c="black", linewidths=1.2)
    pre = df[df["event"] == "preempted"]
    if len(pre):
        rows = tl.drop_duplicates("request_id").set_index("request_id")["row"]
        ok = pre["request_id"].isin(rows.index)
        ax.scatter(pre.loc[ok, "step"], rows.loc[pre.loc[ok, "request_id"]].to_numpy(), marker="v",
                   s=22, c=STATE_COLORS["preempted"], edgecolors="black", linewidths=0.4, zorder=3)
    ax.set_ylim(max(n, 1) - 0.5, -0.5)
    ids = list(dict.fromkeys(tl["request_id"]))
    stride = max(1, int(np.ceil(n / max_labels)))
    ax.set_yticks(range(0, n, stride))
    ax.set_yticklabels([str(ids[i]) for i in range(0, n, stride)], fontsize=7 if n > 20 else 9)
    ax.set_ylabel("request (arrival order)")
    ax.set_xlabel("engine step")
    ax.set_title(f"Scheduler timeline: {n} requests")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(facecolor=STATE_COLORS[s], label=s if s != "idle" else "running, not in batch")
               for s in ("waiting", "prefill", "decode", "idle", "preempted")]
    handles.append(Line2D([], [], marker="v", ls="", color=STATE_COLORS["preempted"], label="preemption"))
    handles.append(Line2D([], [], marker="|", ls="", color="black", markersize=10, label="finished"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------
# per-step latency


def step_latency_data(df: pd.DataFrame) -> pd.DataFrame:
    """One row per step: the latency parts in milliseconds (schedule_ms ... other_ms, summing
    to latency_ms), batch_size, num_tokens and kv_usage_pct."""
    st = steps(df)
    out = pd.DataFrame({"step": st["step"]})
    for p in (*STEP_PARTS, "other_s"):
        out[p.replace("_s", "_ms")] = st[p] * 1e3 if len(st) else pd.Series(dtype=float)
    out["latency_ms"] = st["latency_s"] * 1e3 if len(st) else pd.Series(dtype=float)
    for c in ("batch_size", "num_tokens", "num_prefill_tokens", "num_decode_tokens", "kv_blocks_used",
              "kv_blocks_total", "is_prefill"):
        out[c] = st[c] if c in st else pd.Series(dtype=float)
    out["kv_usage_pct"] = st["kv_usage"] * 100 if len(st) else pd.Series(dtype=float)
    return out


def plot_step_latency(df: pd.DataFrame, ax=None):
    """Per-step latency stacked by part (bars, ms), with the batch size and the KV-cache
    usage (%) on second axes."""
    d = step_latency_data(df)
    fig, ax = _fig_ax(ax, (11, 4.2))
    bottom = np.zeros(len(d))
    x = d["step"].to_numpy()
    for p in (*STEP_PARTS, "other_s"):
        h = d[p.replace("_s", "_ms")].to_numpy()
        if len(d) <= 150:
            ax.bar(x, h, bottom=bottom, width=1.0, color=PART_COLORS[p], label=PART_LABELS[p], linewidth=0)
        else:  # many steps: one filled band per part draws much faster than thousands of bars
            ax.fill_between(x, bottom, bottom + h, step="mid", color=PART_COLORS[p], label=PART_LABELS[p],
                            linewidth=0)
        bottom = bottom + h
    ax.set_xlabel("engine step")
    ax.set_ylabel("step latency (ms)")
    ax.set_title(f"Step latency by part ({len(d)} steps, median {d['latency_ms'].median():.1f} ms)"
                 if len(d) else "Step latency by part (no steps)")
    ax2 = ax.twinx()
    ax2.step(x, d["batch_size"], where="mid", color="black", lw=1.2, label="batch size (seqs)")
    ax2.set_ylabel("batch size (sequences)")
    ax2.set_ylim(0, max(1, d["batch_size"].max() if len(d) else 1) * 1.15)
    ax3 = ax.twinx()
    ax3.spines["right"].set_position(("axes", 1.09))
    ax3.plot(x, d["kv_usage_pct"], color="#d62728", lw=1.2, ls="--", label="KV cache usage (%)")
    ax3.set_ylim(0, 105)
    ax3.set_ylabel("KV cache usage (%)", color="#d62728")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax.legend(h1 + h2 + h3, l1 + l2 + l3, loc="upper left", bbox_to_anchor=(1.2, 1.0), fontsize=8,
              frameon=False)
    return fig


# ----------------------------------------------------------------------------------------
# latency distributions


def latency_distribution_data(df: pd.DataFrame) -> pd.DataFrame:
    """request_id, ttft_s, latency_s (the engine's measurements) of every finished request."""
    rq = requests(df)
    rq = rq[rq["latency_s"].notna()]
    return rq[["request_id", "ttft_s", "latency_s", "prompt_len", "output_len"]].reset_index(drop=True)


def plot_latency_distributions(df: pd.DataFrame, bins: int = 30):
    """Histograms of time to first token and end-to-end latency, with median and p90."""
    plt = _plt()
    d = latency_distribution_data(df)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for ax, col, name in ((axes[0], "ttft_s", "time to first token (TTFT)"),
                          (axes[1], "latency_s", "end-to-end latency")):
        v = pd.to_numeric(d[col], errors="coerce").dropna().to_numpy() * 1e3
        if len(v):
            ax.hist(v, bins=min(bins, max(1, len(v))), color="#1f77b4", alpha=0.8, edgecolor="white")
            for q, ls in ((50, "-"), (90, "--")):
                val = np.percentile(v, q)
                ax.axvline(val, color="black", ls=ls, lw=1, label=f"p{q} = {val:.1f} ms")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no finished requests", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("requests")
        ax.set_title(f"{name}: {len(v)} requests")
    return fig


# ----------------------------------------------------------------------------------------
# sampling stages (used by widgets.SamplingExplorer)

SAMPLING_STAGES = ("raw", "penalties", "temperature", "top_k", "top_p", "min_p")


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    out = np.zeros_like(x)
    if finite.any():
        m = x[finite].max()
        e = np.exp(x[finite] - m)
        out[finite] = e / e.sum()
    return out


def apply_penalties(logits, token_ids, prompt_token_ids=(), output_token_ids=(), presence_penalty=0.0,
                    frequency_penalty=0.0, repetition_penalty=1.0) -> np.ndarray:
    """vLLM's penalties: repetition over prompt and output tokens (logit / r when positive,
    * r otherwise), then frequency (x count) and presence (once) over the output tokens."""
    x = np.array(logits, dtype=np.float64)
    ids = np.asarray(token_ids)
    out_counts = pd.Series(list(output_token_ids), dtype="int64").value_counts()
    count = np.array([out_counts.get(int(t), 0) for t in ids], dtype=np.float64)
    seen = np.isin(ids, np.asarray(list(prompt_token_ids) + list(output_token_ids), dtype=np.int64))
    if repetition_penalty != 1.0:
        r = np.where(seen, repetition_penalty, 1.0)
        x = np.where(x > 0, x / r, x * r)
    x = x - frequency_penalty * count - presence_penalty * (count > 0)
    return x


def apply_top_k(logits, top_k: int) -> np.ndarray:
    """Keep the k largest (ties with the k-th kept); top_k <= 0 or -1 keeps everything."""
    x = np.array(logits, dtype=np.float64)
    if top_k is None or top_k <= 0 or top_k >= np.isfinite(x).sum():
        return x
    kth = np.sort(x)[::-1][top_k - 1]
    return np.where(x < kth, -np.inf, x)


def apply_top_p(logits, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (the top
    token always stays): vLLM drops a token when the ascending cumulative mass up to it is
    <= 1 - top_p."""
    x = np.array(logits, dtype=np.float64)
    if top_p >= 1.0:
        return x
    p = _softmax(x)
    order = np.argsort(x, kind="stable")  # ascending
    cum = np.cumsum(p[order])
    drop = cum <= 1 - top_p
    drop[-1] = False
    out = x.copy()
    out[order[drop]] = -np.inf
    return out


def apply_min_p(logits, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p x the top token's."""
    x = np.array(logits, dtype=np.float64)
    if min_p <= 0:
        return x
    p = _softmax(x)
    return np.where(p < min_p * p.max(), -np.inf, x)


def sampling_stages(tokens: Sequence[str], logprobs: Sequence[float], token_ids: Optional[Sequence[int]] = None,
                    *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                    repetition_penalty: float = 1.0, prompt_token_ids: Sequence[int] = (),
                    output_token_ids: Sequence[int] = ()) -> pd.DataFrame:
    """Walk a next-token distribution through the sampler's stages, in vLLM's order:
    penalties -> temperature -> top-k -> top-p -> min-p.

    `logprobs` are the model's raw log-probabilities of `tokens` (the engine's top-K with
    temperature 1 and no filtering); the stages are computed over these K tokens (exact when
    K is the whole vocabulary; otherwise probabilities are relative to the tokens shown).
    Temperature below 1e-5 is greedy: only the most likely token survives.

    Returns one row per token, most likely first: token, token_id, logprob, p_<stage> for each
    stage (the distribution after it) and kept_<stage> (survived it), plus `kept` (survives
    every stage), `removed_by` (the first stage that removed it) and p_final.
    """
    tokens = list(tokens)
    lp = np.asarray(logprobs, dtype=np.float64)
    ids = np.arange(len(tokens)) if token_ids is None else np.asarray(token_ids)
    x = apply_penalties(lp, ids, prompt_token_ids, output_token_ids, presence_penalty,
                        frequency_penalty, repetition_penalty)
    stages = {"raw": lp, "penalties": x}
    greedy = temperature < 1e-5
    if greedy:
        t = np.full_like(x, -np.inf)
        t[int(np.argmax(x))] = x.max()
        stages["temperature"] = t
        x = t
    else:
        x = x / temperature
        stages["temperature"] = x
        x = apply_top_k(x, top_k)
        stages["top_k"] = x
        x = apply_top_p(x, top_p)
        stages["top_p"] = x
        x = apply_min_p(x, min_p)
        stages["min_p"] = x
    for s in SAMPLING_STAGES:  # greedy: later stages change nothing
        stages.setdefault(s, x)
    out = pd.DataFrame({"token": tokens, "token_id": ids, "logprob": lp})
    removed_by = np.array([None] * len(tokens), dtype=object)
    for s in SAMPLING_STAGES:
        out[f"p_{s}"] = _softmax(stages[s])
        kept = np.isfinite(stages[s])
        out[f"kept_{s}"] = kept
        newly = (~kept) & pd.isna(removed_by)
        removed_by[newly] = "greedy" if greedy and s == "temperature" else s
    out["kept"] = out["kept_min_p"]
    out["removed_by"] = removed_by
    out["p_final"] = out["p_min_p"]
    out = out.sort_values("logprob", ascending=False, kind="stable").reset_index(drop=True)
    return out


def plot_sampling_stages(stages: pd.DataFrame, ax=None, max_tokens: int = 20, title: Optional[str] = None):
    """Horizontal bars: the raw probability of each token (outline) and its final
    probability after all stages (filled); removed tokens are grey and say which stage
    removed them."""
    d = stages.head(max_tokens)
    fig, ax = _fig_ax(ax, (7, max(2.5, 0.28 * len(d) + 1)))
    y = np.arange(len(d))
    raw = d["p_raw"].to_numpy()
    fin = d["p_final"].to_numpy()
    ax.barh(y, raw, color="none", edgecolor="grey", label="raw (model)")
    ax.barh(y, fin, color=np.where(d["kept"], "#1f77b4", "#dddddd"), label="after sampling stages")
    for yi, (kept, by, f) in enumerate(zip(d["kept"], d["removed_by"], fin)):
        txt = f"{f:.2f}" if kept else ("greedy: not the top token" if by == "greedy" else f"removed by {str(by).replace('_', '-')}")
        ax.text(max(raw[yi], f) + 0.01, yi, txt, va="center", fontsize=7, color="black" if kept else "grey")
    ax.set_yticks(y)
    ax.set_yticklabels([repr(t) for t in d["token"]], fontsize=8)
    ax.set_ylim(len(d) - 0.5, -0.5)
    ax.set_xlim(0, min(1.0, max(0.05, float(max(raw.max(initial=0), fin.max(initial=0))) * 1.35)))
    ax.set_xlabel("probability")
    ax.set_title(title or f"next-token distribution: {int(stages['kept'].sum())} of {len(stages)} tokens kept")
    ax.legend(fontsize=8, loc="lower right")
    return fig
