"""Issue 17 item 4: the measured lessons hold on a busy CPU.

Notebooks 04 (batching against a loop) and 06 (offline against online) each assert their own
claim right under the text that makes it: fewer engine steps and more tokens per step, and a
wall-time ratio measured best of 3 in the same run. Here they run, as nbval runs them (nbclient,
the current environment), with two busy-loop processes taking the cores beside them. The test
has no time threshold of its own: it passes when every cell, those asserts included, runs.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
LESSONS = [ROOT / "labs" / "04_batch_inference.ipynb", ROOT / "labs" / "06_offline_vs_online.ipynb"]
NUM_HOGS = 2


def _busy_loop() -> None:  # pragma: no cover - runs in the hog processes
    x = 0
    while True:
        x = (x + 1) % 1_000_003


@pytest.fixture
def cpu_hogs():
    """Two processes that spin on the CPU until the test ends (killed in a finally)."""
    ctx = mp.get_context("spawn")
    hogs = [ctx.Process(target=_busy_loop, daemon=True) for _ in range(NUM_HOGS)]
    try:
        for h in hogs:
            h.start()
        yield hogs
    finally:
        for h in hogs:
            if h.is_alive():
                h.kill()
        for h in hogs:
            h.join(timeout=10)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_lesson_claims_hold_beside_two_cpu_hogs(path, cpu_hogs):
    from nbclient import NotebookClient

    os.environ.setdefault("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    assert all(h.is_alive() for h in cpu_hogs), "the CPU hogs must be running"
    # raises CellExecutionError (with the failing cell and its traceback) if any claim fails
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert all(h.is_alive() for h in cpu_hogs), "the hogs ran for the whole notebook"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "every code cell ran"
