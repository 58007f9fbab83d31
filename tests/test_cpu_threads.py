"""labengine.cpu_threads: the thread count a lesson runs with on a CPU."""
from __future__ import annotations

import pytest
import torch

from labengine import cpu_threads
from labengine.cpu_threads import SMALL_MODEL_PARAMS, choose_num_threads, use_lesson_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cores,busy", [(1, 0.0), (2, 0.0), (2, 2.0), (8, 0.0), (8, 6.0)])
def test_a_small_model_gets_one_thread_on_any_machine(cores, busy):
    n, reason = choose_num_threads(cores, busy, 7_000_000)
    assert n == 1 and "7.0 M parameters" in reason


@pytest.mark.parametrize("cores,busy,expected", [
    (8, 0.0, 8), (8, 0.5, 7), (8, 1.0, 7), (8, 2.0, 6), (8, 7.0, 1), (8, 20.0, 1),
    (2, 0.0, 2), (2, 2.0, 1), (1, 0.0, 1), (4, 0.2, 4),
])
def test_a_large_model_gets_one_thread_per_free_core(cores, busy, expected):
    n, reason = choose_num_threads(cores, busy, 10 * SMALL_MODEL_PARAMS)
    assert n == expected and f"{cores} cores" in reason


def test_the_environment_variable_overrides_and_is_validated():
    assert choose_num_threads(2, 2.0, 1000, override="3")[0] == 3
    for bad in ("zero", "0", "-2"):
        with pytest.raises(ValueError, match=cpu_threads.ENV_VAR):
            choose_num_threads(2, 0.0, 1000, override=bad)


def test_busy_cores_reads_the_runnable_count(monkeypatch, tmp_path):
    readings = iter(["0.50 0.40 0.30 3/200 99\n", "0.5 0.4 0.3 4/200 99\n", "0.5 0.4 0.3 3/200 99\n"])
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/loadavg":
            f = tmp_path / "loadavg"
            f.write_text(next(readings))
            return real_open(f, *a, **k)
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    assert cpu_threads.busy_cores(samples=3, interval_s=0) == 2.0   # median of 2, 3, 2 (minus the reader)


def test_busy_cores_without_proc_falls_back_to_the_load_average(monkeypatch):
    def no_proc(path, *a, **k):
        raise FileNotFoundError(path)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (1.5, 1.0, 0.5))
    assert cpu_threads.busy_cores(samples=2, interval_s=0) == 1.5


def test_use_lesson_threads_sets_the_count_for_the_embedded_model(restore_threads, monkeypatch):
    from labengine import LLM
    import labengine

    monkeypatch.delenv(cpu_threads.ENV_VAR, raising=False)
    llm = LLM(labengine.DEFAULT_MODEL, device="cpu", num_gpu_blocks_override=16, max_model_len=64)
    torch.set_num_threads(2)
    choice = use_lesson_threads(llm)
    assert choice.num_threads == 1 == torch.get_num_threads() and choice.previous == 2
    assert choice.model_params == sum(p.numel() for p in llm.llm_engine.model_runner.model.parameters())
    assert choice.model_params < SMALL_MODEL_PARAMS and "PyTorch threads: 1" in str(choice)
    monkeypatch.setenv(cpu_threads.ENV_VAR, "2")
    assert use_lesson_threads(llm.llm_engine).num_threads == 2 == torch.get_num_threads()


def test_use_lesson_threads_on_a_bare_module(restore_threads, monkeypatch):
    monkeypatch.delenv(cpu_threads.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_threads, "busy_cores", lambda: 0.0)
    monkeypatch.setattr(cpu_threads, "available_cores", lambda: 4)
    monkeypatch.setattr(cpu_threads, "SMALL_MODEL_PARAMS", 10)
    choice = use_lesson_threads(torch.nn.Linear(8, 8))
    assert (choice.num_threads, choice.model_params, choice.cores) == (4, 72, 4)
