"""Tensor parallelism on CPU: `device="cpu", tensor_parallel_size=2` through gloo (and the
greedy-equality cases on two GPUs through NCCL, where a machine has them).

Greedy outputs and logprobs with two ranks equal one rank's (float32) for every architecture,
under preemption (recompute and swap) and aborts; the KV cache is split by KV heads (and a
single KV head replicated); the vocabulary is padded when it does not divide; the step
events carry per-rank compute/communication time; configs that cannot be split are refused
with vLLM's messages; the workers never outlive the engine (`del llm`, an exception, a
killed parent, Ctrl-C); the async engine and the server run with two ranks.

Every test that starts processes has a timeout; worker pids are checked to be gone.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from labengine import LLM, SamplingParams
from labengine.testing import make_random_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Hello, my name is", "The capital of France is", "Once upon a time there was",
           "What is the meaning of life?", "The quick brown fox jumps", "A kernel is a small"]
# small blocks and few of them: six requests of ~30 tokens need ~50 blocks, the cache has 24
ENGINE_KW = dict(device="cpu", dtype="float32", block_size=4, num_gpu_blocks_override=24, max_model_len=64,
                 seed=0)
TOL = 1e-5

# (name, arch, config overrides, preemption mode)
CASES = [
    ("llama", "llama", {}, "recompute"),
    ("mistral", "mistral", {}, "swap"),
    ("qwen2", "qwen2", {}, "recompute"),
    ("qwen3", "qwen3", {}, "swap"),
    ("opt", "opt", {}, "swap"),
    ("gpt2", "gpt2", {}, "recompute"),
    # one KV head for two ranks (replicated) and a vocabulary that two ranks cannot split evenly
    ("llama-mqa-odd-vocab", "llama", dict(num_key_value_heads=1, vocab_size=513), "swap"),
]


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (an exited child nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _pid_alive(p)]
        time.sleep(0.1)
    return alive


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _worker_pids(llm) -> list[int]:
    return [w.pid for w in llm.llm_engine.model_runner.workers]


# ---------------------------------------------------------------------- one workload, both sizes


def _workload(llm) -> dict:
    """Greedy generations with logprobs and prompt logprobs under cache pressure, then an
    engine-level run with an abort; returns everything comparable and what happened."""
    kinds = []
    listener = lambda e: kinds.append(e.kind)  # noqa: E731
    llm.add_event_listener(listener)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    result = {"generate": [(o.prompt_token_ids, o.outputs[0].token_ids,
                            [{t: lp.logprob for t, lp in d.items()} for d in o.outputs[0].logprobs],
                            [None if d is None else {t: lp.logprob for t, lp in d.items()} for d in o.prompt_logprobs])
                           for o in outs]}
    engine = llm.llm_engine
    short = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    for i, p in enumerate(PROMPTS[:4]):
        engine.add_request(f"r{i}", p, short)
    finished, steps = {}, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o
        steps += 1
        if steps == 3:
            engine.abort_request("r1")
    result["abort"] = {rid: (o.outputs[0].token_ids, [d[t].logprob for d, t in zip(o.outputs[0].logprobs,
                                                                                    o.outputs[0].token_ids)],
                             o.outputs[0].finish_reason)
                       for rid, o in sorted(finished.items())}
    bm = engine.scheduler.block_manager
    result["blocks_all_free"] = bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks
    llm.remove_event_listener(listener)
    result["kinds"] = set(kinds)
    return result


def _assert_close(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}[{k}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= TOL, f"{where}: {a} vs {b}"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("name,arch,overrides,preemption", CASES, ids=[c[0] for c in CASES])
def test_tp2_equals_tp1(tmp_path, name, arch, overrides, preemption):
    _check_tp2_equals_tp1(tmp_path, name, arch, overrides, preemption, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("name,arch,overrides,preemption", CASES, ids=[c[0] for c in CASES])
def test_tp2_equals_tp1_on_two_gpus(tmp_path, name, arch, overrides, preemption):
    """The same on two GPUs (NCCL), float32: rank r on cuda:r, the one-rank engine on cuda:0."""
    _check_tp2_equals_tp1(tmp_path, name, arch, overrides, preemption, "cuda")


def _check_tp2_equals_tp1(tmp_path, name, arch, overrides, preemption, device):
    path = str(make_random_model(arch, tmp_path / name, **overrides))
    kw = dict(ENGINE_KW, preemption_mode=preemption, device=device)
    ref = _workload(LLM(path, tensor_parallel_size=1, **kw))
    llm = LLM(path, tensor_parallel_size=2, **kw)
    try:
        runner = llm.llm_engine.model_runner
        m = runner.model
        # each rank holds its share of the KV heads (one replicated head when there are fewer heads than ranks)
        total_kv = getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads
        assert m.num_kv_heads == max(1, total_kv // 2)
        assert tuple(runner.kv_cache.shape[2:]) == (24, 4, m.num_kv_heads, m.head_size)
        got = _workload(llm)
        workers = _worker_pids(llm)
    finally:
        del llm, runner, m  # the last references: the runner's finalizer stops the workers
    assert "preempted" in got["kinds"], "the workload was meant to preempt"
    if preemption == "swap":
        assert "block_swapped_out" in got["kinds"] and "block_swapped_in" in got["kinds"]
    assert got["blocks_all_free"] and ref["blocks_all_free"]
    assert set(got["abort"]) == {"r0", "r2", "r3"}
    _assert_close(ref["generate"], got["generate"], "generate")
    _assert_close(ref["abort"], got["abort"], "abort")
    gc.collect()
    assert not _wait_gone(workers), "workers outlived the LLM"


# ---------------------------------------------------------------------- instrumentation


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    return str(make_random_model("llama", tmp_path_factory.mktemp("tp_llama")))


def test_step_events_carry_per_rank_compute_and_communication(llama_path):
    llm = LLM(llama_path, tensor_parallel_size=2, device="cpu", max_model_len=64)
    try:
        with llm.trace() as trace:
            llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        steps = [e for e in trace.events if e.kind == "step_finished"]
        assert steps
        for e in steps:
            assert len(e.rank_forward_s) == 2 and len(e.rank_comm_s) == 2
            for fwd, comm in zip(e.rank_forward_s, e.rank_comm_s):
                assert 0.0 < comm <= fwd
        table = trace.rank_timings()
        assert list(table.columns) == ["step", "rank", "forward_s", "comm_s", "compute_s"]
        assert len(table) == 2 * len(steps) and set(table["rank"]) == {0, 1}
        assert (table["compute_s"] >= 0).all()
        workers = _worker_pids(llm)
    finally:
        del llm
    assert not _wait_gone(workers), "workers outlived `del llm`"
    # one rank: no per-rank fields, no collectives
    llm1 = LLM(llama_path, device="cpu", max_model_len=64)
    with llm1.trace() as trace:
        llm1.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    assert all(e.rank_forward_s == () for e in trace.events if e.kind == "step_finished")
    assert trace.rank_timings().empty


def test_one_rank_model_is_the_plain_model(llama_path):
    """With tensor_parallel_size=1 nothing is split and no collective runs."""
    from labengine.distributed import parallel_state

    llm = LLM(llama_path, device="cpu", max_model_len=64)
    m = llm.llm_engine.model_runner.model
    attn = m.model.layers[0].self_attn
    assert m.model.embed_tokens.weight.shape[0] == m.vocab_size
    assert attn.qkv_proj.weight.shape[0] == (attn.num_heads + 2 * attn.num_kv_heads) * attn.head_dim
    assert attn.num_heads == m.config.num_attention_heads
    calls = []
    original = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: calls.append(a)
    try:
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        torch.distributed.all_reduce = original
    assert calls == [] and parallel_state.get_tp_size() == 1


def test_one_rank_engine_beside_a_tensor_parallel_one(llama_path):
    """A process holding a tp=2 engine can still build a plain one; a second tp engine is refused
    before it starts anything, and the first keeps working."""
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tp2 = LLM(llama_path, tensor_parallel_size=2, device="cpu", max_model_len=64)
    try:
        first = [o.outputs[0].token_ids for o in tp2.generate(PROMPTS[:2], params, use_tqdm=False)]
        children = set(_children(os.getpid()))
        with pytest.raises(RuntimeError, match="one tensor-parallel engine per process"):
            LLM(llama_path, tensor_parallel_size=2, device="cpu", max_model_len=64)
        assert set(_children(os.getpid())) <= children
        tp1 = LLM(llama_path, device="cpu", max_model_len=64)
        m = tp1.llm_engine.model_runner.model
        assert m.num_kv_heads == m.config.num_key_value_heads  # not split
        assert [o.outputs[0].token_ids for o in tp1.generate(PROMPTS[:2], params, use_tqdm=False)] == first
        assert [o.outputs[0].token_ids for o in tp2.generate(PROMPTS[:2], params, use_tqdm=False)] == first
        workers = _worker_pids(tp2)
    finally:
        del tp2
    assert not _wait_gone(workers)


def test_a_dead_worker_is_an_error_naming_it(llama_path):
    llm = LLM(llama_path, tensor_parallel_size=2, device="cpu", max_model_len=64)
    try:
        (worker,) = _worker_pids(llm)
        os.kill(worker, signal.SIGKILL)
        assert not _wait_gone([worker])
        with pytest.raises(RuntimeError, match=rf"worker rank 1 \(pid {worker}, exit code -9\) is no longer running"):
            llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2), use_tqdm=False)
        bm = llm.llm_engine.scheduler.block_manager
        assert bm.get_num_free_gpu_blocks() == bm.num_gpu_blocks  # the failed call's request was aborted
    finally:
        del llm


def test_script_without_main_guard_fails_with_a_clear_error(tmp_path, llama_path):
    script = tmp_path / "no_guard.py"
    script.write_text(f"from labengine import LLM\nLLM({llama_path!r}, device='cpu', tensor_parallel_size=2)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert 'if __name__ == "__main__":' in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides,tp,match", [
    (dict(num_attention_heads=4, num_key_value_heads=2), 3,
     r"Total number of attention heads \(4\) must be divisible by tensor parallel size \(3\)\."),
    (dict(num_attention_heads=6, num_key_value_heads=3, hidden_size=48), 2,
     r"Total number of key/value heads \(3\) must be divisible by tensor parallel size \(2\)"),
    (dict(intermediate_size=130), 4, r"intermediate_size \(130\) must be divisible by tensor parallel size \(4\)"),
])
def test_unsplittable_configs_are_refused_before_any_worker_starts(tmp_path, overrides, tp, match):
    path = str(make_random_model("llama", tmp_path / "m", **overrides))
    before = set(_children(os.getpid()))
    with pytest.raises(ValueError, match=match):
        LLM(path, device="cpu", tensor_parallel_size=tp)
    assert set(_children(os.getpid())) <= before


def test_more_ranks_than_gpus_is_an_error(monkeypatch, llama_path):
    from labengine.arg_utils import EngineArgs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"The number of required GPUs exceeds the total number of available "
                                         r"GPUs: tensor_parallel_size=2 but 1 GPU\(s\) are available\."):
        EngineArgs(model=llama_path, device="cuda", tensor_parallel_size=2)
    # on the CPU the ranks are processes: no GPU needed
    EngineArgs(model=llama_path, device="cpu", tensor_parallel_size=2)


# ---------------------------------------------------------------------- shutdown

_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from labengine import LLM, SamplingParams
    mode, path = sys.argv[1], sys.argv[2]
    if __name__ == "__main__":
        llm = LLM(path, device="cpu", tensor_parallel_size=2, max_model_len=64)
        print("WORKERS", *[w.pid for w in llm.llm_engine.model_runner.workers], flush=True)
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        prompts = ["Hello, my name is", "The capital of France is"]
        if mode == "exception":
            raise RuntimeError("boom")
        if mode == "sleep":
            time.sleep(120)
        if mode == "ctrl-c":
            reference = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            layer = llm.llm_engine.model_runner.model.model.layers[0]
            calls = []
            def interrupt(module, args, output):  # Ctrl-C in the middle of a forward pass
                calls.append(1)
                if len(calls) == 3:
                    os.kill(os.getpid(), signal.SIGINT)
            handle = layer.register_forward_hook(interrupt)
            try:
                llm.generate(prompts, params, use_tqdm=False)
                print("NOT INTERRUPTED", flush=True)
            except KeyboardInterrupt:
                print("INTERRUPTED", flush=True)
            handle.remove()
            again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            print("SAME" if again == reference else "DIFFERENT", flush=True)
            del llm
            print("DELETED", flush=True)
            time.sleep(60)  # the test checks the workers are gone while this process lives
""")


def _start(mode, path):
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, mode, path], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _read_until(proc, marker, timeout=120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith(marker):
            return lines
    proc.kill()
    raise AssertionError(f"no {marker!r} from the script: {lines}\n{proc.stderr.read()[-3000:]}")


def _workers_from(lines) -> list[int]:
    return [int(p) for p in next(l for l in lines if l.startswith("WORKERS")).split()[1:]]


def test_workers_die_with_an_uncaught_exception(llama_path):
    proc = _start("exception", llama_path)
    try:
        workers = _workers_from(_read_until(proc, "WORKERS"))
        assert proc.wait(timeout=60) == 1
        assert "RuntimeError: boom" in proc.stderr.read()
        assert not _wait_gone(workers), "workers outlived the engine's process"
    finally:
        proc.kill()


def test_workers_die_when_the_parent_is_killed(llama_path):
    proc = _start("sleep", llama_path)
    try:
        workers = _workers_from(_read_until(proc, "WORKERS"))
        assert all(_pid_alive(p) for p in workers)
        proc.kill()  # SIGKILL: no atexit, no finalizer; the workers must notice on their own
        proc.wait(timeout=30)
        assert not _wait_gone(workers), "workers outlived a killed parent"
    finally:
        proc.kill()


def test_ctrl_c_mid_step_keeps_ranks_in_step_and_del_stops_workers(llama_path):
    proc = _start("ctrl-c", llama_path)
    try:
        lines = _read_until(proc, "DELETED", timeout=180)
        workers = _workers_from(lines)
        assert "INTERRUPTED" in lines and "SAME" in lines, lines
        assert proc.poll() is None  # the engine's process lives on; its workers must not
        assert not _wait_gone(workers), "workers outlived `del llm`"
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ---------------------------------------------------------------------- async engine and server


def test_async_engine_with_two_ranks(llama_path):
    from labengine import AsyncEngineArgs, AsyncLLMEngine

    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in
                LLM(llama_path, device="cpu", max_model_len=64).generate(PROMPTS[:3], params, use_tqdm=False)]
    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=llama_path, device="cpu", max_model_len=64,
                                                             tensor_parallel_size=2, disable_log_requests=True))

    async def one(i, prompt):
        final = None
        async for out in engine.generate(prompt, params, request_id=f"a{i}"):
            final = out
        return final.outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS[:3])))

    try:
        got = asyncio.run(asyncio.wait_for(main(), 120))
        workers = [w.pid for w in engine.engine.model_runner.workers]
    finally:
        engine.shutdown_background_loop()
    assert [list(g) for g in got] == [list(e) for e in expected]
    engine.engine.model_runner.shutdown()
    assert not _wait_gone(workers)


def test_server_cli_with_tensor_parallel_size_2(llama_path):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "labengine.serve", "--model", llama_path, "--device", "cpu",
                             "--tensor-parallel-size", "2", "--max-model-len", "64", "--port", str(port)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert len(workers) >= 1
        body = dict(model=llama_path, prompt=PROMPTS[0], max_tokens=6, temperature=0.0)
        got = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        params = SamplingParams(temperature=0.0, max_tokens=6)
        expected = LLM(llama_path, device="cpu", max_model_len=64).generate([PROMPTS[0]], params, use_tqdm=False)
        assert got["choices"][0]["text"] == expected[0].outputs[0].text, json.dumps(got)
        proc.send_signal(signal.SIGINT)  # Ctrl-C in the server's terminal
        proc.wait(timeout=60)
        assert not _wait_gone(workers), "workers outlived the server"
    finally:
        proc.kill()
        proc.wait(timeout=30)
