"""Cache operations (store_kv, copy_blocks, swap_blocks) vs their PyTorch references."""
from __future__ import annotations

import pytest
import torch
from kernel_test_utils import DEVICE, DTYPES, DT_IDS, requires_cuda

from labengine.kernels.cache_ops import (
    copy_blocks,
    copy_blocks_ref,
    store_kv,
    store_kv_ref,
    swap_blocks,
    swap_blocks_ref,
)


def rand(*shape, dtype, gen, device=DEVICE):
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def run_store(T, Hkv, D, block_size, num_blocks, dtype, seed, fused_qkv=False, **kw):
    gen = torch.Generator().manual_seed(seed)
    if fused_qkv:  # key/value as strided views of one [T, (Hq + 2 Hkv) * D] projection
        Hq = 2 * Hkv
        qkv = rand(T, (Hq + 2 * Hkv) * D, dtype=dtype, gen=gen)
        key = qkv[:, Hq * D : (Hq + Hkv) * D].view(T, Hkv, D)
        value = qkv[:, (Hq + Hkv) * D :].view(T, Hkv, D)
    else:
        key, value = rand(T, Hkv, D, dtype=dtype, gen=gen), rand(T, Hkv, D, dtype=dtype, gen=gen)
    # distinct random slots, a few of them -1 (skip)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[torch.rand(T, generator=gen) < 0.2] = -1
    slots = slots.to(DEVICE)
    # caches hold random "old" data, so a write to a wrong slot or a skipped -1 is visible
    k_cache = rand(num_blocks, block_size, Hkv, D, dtype=dtype, gen=gen)
    v_cache = rand(num_blocks, block_size, Hkv, D, dtype=dtype, gen=gen)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv(key, value, k_cache, v_cache, slots, **kw)
    store_kv_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("Hkv,D", [(1, 64), (2, 80), (4, 96), (2, 128), (1, 256)])
def test_store_kv(Hkv, D, dtype):
    run_store(37, Hkv, D, 16, 8, dtype, seed=D + Hkv)


@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_fused_qkv_views(block_size):
    run_store(29, 2, 64, block_size, 5, torch.bfloat16, seed=block_size, fused_qkv=True)


@pytest.mark.parametrize("block_t", [1, 2, 8])
def test_store_kv_tokens_per_program(block_t):
    # 37 tokens: the last program is partial for every BLOCK_T > 1
    run_store(37, 2, 64, 16, 8, torch.float16, seed=block_t, block_t=block_t)


def test_store_kv_many_heads_split_over_programs():
    # 32 KV heads x 256 > 4096 elements: the heads are split over a second grid axis
    run_store(9, 32, 256, 16, 2, torch.float16, seed=4)


def make_layers(num_layers, num_blocks, block_size, Hkv, D, dtype, gen, device=DEVICE):
    # like the ModelRunner: one [2, L, ...] tensor, each layer a (strided) view of it
    kv = rand(2, num_layers, num_blocks, block_size, Hkv, D, dtype=dtype, gen=gen, device=device)
    return kv, [(kv[0, l], kv[1, l]) for l in range(num_layers)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_copy_blocks(dtype):
    gen = torch.Generator().manual_seed(1)
    kv, layers = make_layers(3, 10, 16, 2, 80, dtype, gen)
    kv_ref = kv.clone()
    layers_ref = [(kv_ref[0, l], kv_ref[1, l]) for l in range(3)]
    pairs = [(1, 7), (2, 8), (1, 9), (5, 0)]
    copy_blocks(layers, pairs)
    copy_blocks_ref(layers_ref, pairs)
    assert torch.equal(kv, kv_ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_swap_blocks_same_device_pools(dtype):
    gen = torch.Generator().manual_seed(2)
    _, src = make_layers(2, 6, 16, 4, 64, dtype, gen)
    dst_kv, dst = make_layers(2, 9, 16, 4, 64, dtype, gen)
    ref_kv = dst_kv.clone()
    ref = [(ref_kv[0, l], ref_kv[1, l]) for l in range(2)]
    pairs = [(0, 8), (3, 1), (5, 2)]
    swap_blocks(src, dst, pairs)
    swap_blocks_ref(src, ref, pairs)
    assert torch.equal(dst_kv, ref_kv)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["out", "in"])
def test_swap_blocks_gpu_cpu(direction):
    gen = torch.Generator().manual_seed(3)
    gpu_kv, gpu = make_layers(2, 64, 16, 8, 128, torch.bfloat16, gen, device="cuda")
    cpu_kv, cpu = make_layers(2, 32, 16, 8, 128, torch.bfloat16, gen, device="cpu")
    pairs = [(3, 0), (10, 31), (63, 7)]
    src, dst, dst_kv = (gpu, cpu, cpu_kv) if direction == "out" else (cpu, gpu, gpu_kv)
    if direction == "in":
        pairs = [(d % 32, s) for s, d in pairs]
    ref_kv = dst_kv.clone()
    swap_blocks_ref(src, [(ref_kv[0, l], ref_kv[1, l]) for l in range(2)], pairs)
    swap_blocks(src, dst, pairs)
    assert torch.equal(dst_kv, ref_kv)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_store_kv_real_size(dtype):
    run_store(4096, 8, 128, 16, 4096, dtype, seed=9)
    run_store(4096, 8, 128, 16, 4096, dtype, seed=10, fused_qkv=True)
