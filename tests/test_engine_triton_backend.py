"""The engine on the Triton attention backend, run on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, set in conftest.py): the same code path the GPU runs, checked against
the PyTorch reference backend token for token, including copy-on-write (n > 1) and swap."""
import os

import pytest

from labengine import LLM, SamplingParams
from labengine.attention import resolve_backend_name
from labengine.testing import make_random_model

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs TRITON_INTERPRET=1 (set by conftest.py when there is no GPU)")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_random_model("qwen3", tmp_path_factory.mktemp("tri") / "qwen3"))


def run(model_path, backend, sampling_method=None, **kw):
    llm = LLM(model=model_path, attention_backend=backend, max_model_len=64, block_size=16,
              num_gpu_blocks_override=4, preemption_mode="swap", swap_space=0.001, check_invariants=True, **kw)
    if sampling_method is not None:
        llm.llm_engine.sampler.sampling_method = sampling_method
    events = []
    llm.add_event_listener(lambda e: events.append(e.kind))
    prompts = ["The capital of France is", "Once upon a time there was a little robot"]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, n=2, seed=5, max_tokens=6, ignore_eos=True)
    outs = llm.generate(prompts + prompts[:1], [greedy, greedy, sampled], use_tqdm=False)
    assert llm.llm_engine.model_runner.attn_backend.name == backend
    return [[c.token_ids for c in o.outputs] for o in outs], events


def test_triton_backend_matches_torch_backend(model_path):
    # the same sampling method on both paths: every token, sampled ones included, must agree
    ref, _ = run(model_path, "torch")
    got, events = run(model_path, "triton", sampling_method="inverse_cdf")
    assert got == ref
    assert "block_copied" in events  # n=2 shared its prompt blocks, then copied on write
    assert "block_swapped_out" in events and "block_swapped_in" in events


@pytest.mark.parametrize("fused", [True, False], ids=["fused-store", "separate-store"])
def test_fused_layers_store_the_kv_cache_without_store_kv(model_path, monkeypatch, fused):
    """On the Triton path the Qwen3 layers write K/V into the paged cache in their q/k-norm +
    rotary kernel: the backend is told kv_stored=True and its separate store_kv never runs, in
    prefill and decode steps alike (copy-on-write and swap included). A backend that does not
    opt in (stores_kv_in_rope False) gets the old path. Every token equals the PyTorch path's."""
    from labengine.attention.triton_backend import TritonAttentionBackend, kernels

    ref, _ = run(model_path, "torch")
    if not fused:
        monkeypatch.setattr(TritonAttentionBackend, "stores_kv_in_rope", False)
    store_kv, stores = kernels.store_kv, []

    def counting_store_kv(*args, **kw):
        stores.append(1)
        return store_kv(*args, **kw)

    monkeypatch.setattr(kernels, "store_kv", counting_store_kv)
    forward, seen = TritonAttentionBackend.forward, []

    def spy(self, query, key, value, kv_cache, meta, scale, kv_stored=False):
        seen.append((meta.is_prefill, kv_stored))
        return forward(self, query, key, value, kv_cache, meta, scale, kv_stored=kv_stored)

    monkeypatch.setattr(TritonAttentionBackend, "forward", spy)
    got, _ = run(model_path, "triton", sampling_method="inverse_cdf")
    assert got == ref
    assert {prefill for prefill, _ in seen} == {True, False}  # prefill and decode steps ran
    assert all(stored == fused for _, stored in seen)
    assert (len(stores) == 0) == fused and (fused or len(stores) == len(seen))


def test_triton_path_samples_with_the_kernel(model_path):
    """By default the Triton path samples with labengine.kernels.sample: greedy tokens still
    equal the PyTorch path's; seeded samples are reproducible (a different random stream)."""
    ref, _ = run(model_path, "torch")
    got, _ = run(model_path, "triton")
    again, _ = run(model_path, "triton")
    assert got[:2] == ref[:2]  # greedy
    assert got == again  # seed 5 reproduces
    assert got[2][0] != got[2][1]  # n=2 draws two different sequences


def test_backend_choice(monkeypatch):
    import torch

    cpu = torch.device("cpu")
    assert resolve_backend_name(None, cpu) == "torch"
    monkeypatch.setenv("LABENGINE_ATTENTION_BACKEND", "triton")
    assert resolve_backend_name(None, cpu) == "triton"  # allowed here: TRITON_INTERPRET=1
    assert resolve_backend_name("torch", cpu) == "torch"  # an explicit argument wins
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend_name("triton", cpu)


def test_decode_steps_take_the_longest_sequences_first(model_path):
    """Each decode step hands the decode kernel its sequences longest first (the launch order
    of its programs), a permutation of the batch; prefill steps pass none. The outputs are
    those of the PyTorch path (test above), so the order changes the schedule only."""
    import numpy as np

    llm = LLM(model=model_path, attention_backend="triton", max_model_len=64, block_size=16)
    backend = llm.llm_engine.model_runner.attn_backend
    seen = []
    forward = backend.forward

    def spy(query, key, value, kv_cache, meta, scale, **kw):
        seen.append((meta.is_prefill, list(meta.seq_lens_list),
                     None if meta.decode_order is None else meta.decode_order.tolist()))
        return forward(query, key, value, kv_cache, meta, scale, **kw)

    backend.forward = spy
    prompts = ["Hi", "Once upon a time there was a little robot", "The capital of France is"]
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    decodes = [(lens, order) for prefill, lens, order in seen if not prefill]
    assert decodes and all(order is None for prefill, _, order in seen if prefill)
    for lens, order in decodes:
        assert sorted(order) == list(range(len(lens)))
        assert [lens[i] for i in order] == sorted(lens, reverse=True)
    assert any(order != sorted(order) for _, order in decodes)  # the longest prompt is not the first
    assert np.array_equal(decodes[0][1], [1, 2, 0])


def test_decode_steps_balance_long_sequences_across_programs(model_path, monkeypatch):
    """Decode steps pass a split length (keys per program of the decode kernel) chosen from the
    step's real lengths; with a minimum split low enough for these short sequences the long
    ones are split across programs, and every token still equals the PyTorch path's."""
    import importlib
    import random

    da = importlib.import_module("labengine.kernels.decode_attention")  # the module, not the launcher

    monkeypatch.setattr(da, "MIN_TOKENS_PER_SPLIT", 64)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1, 200) for _ in range(n)]} for n in (150, 20, 90)]
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = {}
    seen = []
    for backend in ("torch", "triton"):
        llm = LLM(model=model_path, attention_backend=backend, max_model_len=256, block_size=16, check_invariants=True)
        if backend == "triton":
            be = llm.llm_engine.model_runner.attn_backend
            forward = be.forward

            def spy(query, key, value, kv_cache, meta, scale, **kw):
                if not meta.is_prefill:
                    seen.append((list(meta.seq_lens_list), meta.decode_split_len.tolist()))
                return forward(query, key, value, kv_cache, meta, scale, **kw)

            be.forward = spy
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert outs["triton"] == outs["torch"]
    assert seen and all(sl[0] % 64 == 0 for _, sl in seen)
    assert any(sl[0] < max(lens) for lens, sl in seen)  # the 150-token prompt was split
