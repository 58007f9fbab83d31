"""Programmatic dependent launch (kernels/pdl.py): which launches use it, and that a chain of the
decode step's kernels computes the same with and without it, eagerly and replayed as a CUDA graph."""
from __future__ import annotations

import torch
from kernel_test_utils import DEVICE, requires_cuda

from labengine.kernels import pdl, rms_norm, silu_and_mul, store_kv


def test_pdl_only_on_hopper_cuda_when_enabled(monkeypatch):
    assert pdl.pdl_args(torch.device("cpu")) == dict(PDL=False)  # the interpreter has no PDL
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert pdl.pdl_args(torch.device(DEVICE)) == dict(PDL=False)
    if DEVICE == "cuda":
        monkeypatch.setattr(pdl, "ENABLED", True)
        hopper = torch.cuda.get_device_capability()[0] >= 9 and pdl.gdc_wait is not None
        assert pdl.pdl_args(torch.device("cuda")) == (dict(PDL=True, launch_pdl=True) if hopper else dict(PDL=False))


def _chain(x, res, w, gate_up, k_cache, v_cache, slots):
    """rms -> silu -> KV store -> rms, each reading the previous one's output (as in a layer)."""
    h, res = rms_norm(x, w, 1e-6, res)
    a = silu_and_mul(torch.cat([h, h], dim=-1) * 0.5 + gate_up)
    store_kv(a.view(-1, 2, 64), a.view(-1, 2, 64), k_cache, v_cache, slots)
    return rms_norm(a, w, 1e-6, res)


@requires_cuda
def test_chain_same_with_and_without_pdl_and_in_a_graph(monkeypatch):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    T, N = 64, 128
    x = torch.randn(T, N, device=DEVICE, generator=gen).bfloat16()
    res = torch.randn(T, N, device=DEVICE, generator=gen).bfloat16()
    w = torch.rand(N, device=DEVICE, generator=gen).bfloat16()
    gate_up = torch.randn(T, 2 * N, device=DEVICE, generator=gen).bfloat16()
    slots = torch.randperm(128, device=DEVICE, generator=gen)[:T]
    caches = {}
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(pdl, "ENABLED", on)
        k_cache = torch.zeros(8, 16, 2, 64, device=DEVICE, dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        outs[on] = _chain(x, res, w, gate_up, k_cache, v_cache, slots)
        caches[on] = (k_cache, v_cache)
        # the same chain captured and replayed 3 times on fresh inputs
        g = torch.cuda.CUDAGraph()
        xs, rs = x.clone(), res.clone()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            got = _chain(xs, rs, w, gate_up, k_cache, v_cache, slots)
        for _ in range(3):
            xs.copy_(x)
            rs.copy_(res)
            g.replay()
        torch.cuda.synchronize()
        for a, b in zip(got, outs[on]):
            assert torch.equal(a, b)
    for a, b in zip(outs[True], outs[False]):
        assert torch.equal(a, b)
    assert torch.equal(caches[True][0], caches[False][0]) and torch.equal(caches[True][1], caches[False][1])
