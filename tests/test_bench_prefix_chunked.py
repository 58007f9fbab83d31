"""benchmarks/bench_prefix_chunked.py: its GPU-memory note and its release check (no GPU needed:
the memory figures are stubbed, the release check runs on a CPU LLM)."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_prefix_chunked as bench  # noqa: E402

GiB = 2**30


def _stub_memory(monkeypatch, free_gib, total_gib, mine_gib):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (free_gib * GiB, total_gib * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: mine_gib * GiB)


def test_memory_note_on_a_free_gpu_says_how_much_is_left(monkeypatch):
    _stub_memory(monkeypatch, free_gib=139, total_gib=140, mine_gib=0)
    note = bench.gpu_memory_note("prefix caching off", 0.85)
    assert "139.00 GiB free of 140.00 GiB" in note and "leaves 118.00 GiB for this LLM" in note
    assert "WARNING" not in note


def test_memory_note_warns_when_another_process_holds_the_gpu(monkeypatch):
    _stub_memory(monkeypatch, free_gib=20, total_gib=140, mine_gib=2)
    note = bench.gpu_memory_note("prefix caching off", 0.85)
    assert "WARNING: GPU memory is short" in note
    assert "118.00 GiB of them by other processes" in note and "nvidia-smi" in note
    assert "No available memory for the cache blocks" in note


def test_release_notices_an_llm_still_referenced(tmp_path, capsys):
    args = bench.build_parser().parse_args(["--max-model-len", "128"])
    path = bench.make_model(str(tmp_path / "m"), dict(bench.SMALL, num_hidden_layers=1))
    llm = bench.make_llm(path, args, "kept", num_gpu_blocks_override=16)
    ref = bench.kv_cache_ref(llm)
    bench.release(ref, "kept")
    assert "still referenced" in capsys.readouterr().out
    del llm
    bench.release(ref, "kept")
    assert ref() is None and "still referenced" not in capsys.readouterr().out
