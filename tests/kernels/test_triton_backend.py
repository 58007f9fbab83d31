"""TritonAttentionBackend vs TorchAttentionBackend through the attention interface, over
several engine-like steps: a prefill with a cached prefix and a skipped slot, then decodes."""
from __future__ import annotations

import pytest
import torch
from kernel_test_utils import DEVICE, DTYPES, DT_IDS, TOL, requires_cuda

from labengine.attention import AttentionMetadata, get_attn_backend
from labengine.attention.torch_backend import TorchAttentionBackend
from labengine.attention.triton_backend import TritonAttentionBackend


def test_get_attn_backend_triton():
    backend = get_attn_backend("triton", DEVICE)
    assert isinstance(backend, TritonAttentionBackend) and backend.name == "triton"


class Batch:
    """A few sequences with block tables, stepping like the ModelRunner would."""

    def __init__(self, prompt_lens, cached_lens, block_size, max_blocks, gen):
        self.block_size = block_size
        self.seq_lens = list(cached_lens)  # tokens in the cache
        free = (torch.randperm(max_blocks * len(prompt_lens), generator=gen) + 1).tolist()
        self.tables = [free[i * max_blocks : (i + 1) * max_blocks] for i in range(len(prompt_lens))]
        self.prompt_lens = prompt_lens

    def slot(self, b, pos):
        return self.tables[b][pos // self.block_size] * self.block_size + pos % self.block_size

    def meta(self, q_lens, skip=()):
        ctx = list(self.seq_lens)
        seq = [c + q for c, q in zip(ctx, q_lens)]
        slots = [self.slot(b, c + i) for b, (c, q) in enumerate(zip(ctx, q_lens)) for i in range(q)]
        # a skipped slot (-1) is a token whose K/V are already in the cache: store_kv must not
        # write it, and attention must see the cached values (the prefill kernel reads the step's
        # new K/V from the key/value tensors, so the test puts the same values in the cache)
        self.skipped = [(t, slots[t]) for t in skip]
        for t in skip:
            slots[t] = -1
        self.seq_lens = seq
        qsl = [0]
        for q in q_lens:
            qsl.append(qsl[-1] + q)
        i32 = dict(dtype=torch.int32, device=DEVICE)
        return AttentionMetadata(
            is_prefill=max(q_lens) > 1 or any(c == 0 for c in ctx),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
            query_start_loc=torch.tensor(qsl, **i32),
            seq_lens=torch.tensor(seq, **i32),
            context_lens=torch.tensor(ctx, **i32),
            block_tables=torch.tensor(self.tables, **i32),
            max_query_len=max(q_lens),
            max_seq_len=max(seq),
            seq_lens_list=seq,
            query_lens_list=list(q_lens),
        )


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_backend_matches_torch_over_steps(dtype, block_size):
    gen = torch.Generator().manual_seed(block_size)
    Hq, Hkv, D, num_layers_blocks = 8, 2, 64, 8
    batch = Batch([9, 30, 1], [0, 17, 40], block_size, num_layers_blocks, gen)
    num_blocks = num_layers_blocks * 3 + 1
    kc = torch.randn(num_blocks, block_size, Hkv, D, generator=gen).to(dtype).to(DEVICE)
    vc = torch.randn(num_blocks, block_size, Hkv, D, generator=gen).to(dtype).to(DEVICE)
    caches = {"triton": (kc.clone(), vc.clone()), "torch": (kc.clone(), vc.clone())}
    backends = {"triton": TritonAttentionBackend(), "torch": TorchAttentionBackend()}
    steps = [([9, 30, 1], (3,)), ([1, 1, 1], ()), ([1, 1, 1], ()), ([1, 1, 1], ())]
    for q_lens, skip in steps:
        meta = batch.meta(q_lens, skip)
        T = sum(q_lens)
        q = torch.randn(T, Hq, D, generator=gen).to(dtype).to(DEVICE)
        k = torch.randn(T, Hkv, D, generator=gen).to(dtype).to(DEVICE)
        v = torch.randn(T, Hkv, D, generator=gen).to(dtype).to(DEVICE)
        for t, slot in batch.skipped:
            for kc_, vc_ in caches.values():
                kc_.view(-1, Hkv, D)[slot], vc_.view(-1, Hkv, D)[slot] = k[t], v[t]
        outs = {n: b.forward(q, k, v, caches[n], meta, D**-0.5) for n, b in backends.items()}
        assert torch.equal(caches["triton"][0], caches["torch"][0])
        assert torch.equal(caches["triton"][1], caches["torch"][1])
        assert torch.isfinite(outs["triton"]).all()
        rel_tol, atol = TOL[dtype]
        # the torch backend computes in fp32, the kernels in fp32 with bf16/fp16 P.V operands
        torch.testing.assert_close(outs["triton"].float(), outs["torch"].float(), rtol=rel_tol * 4, atol=atol)

    # copy-on-write then swap through the backend
    tb, rb = backends["triton"], backends["torch"]
    tb.copy_blocks([caches["triton"]], [(1, 2), (3, 4)])
    rb.copy_blocks([caches["torch"]], [(1, 2), (3, 4)])
    assert torch.equal(caches["triton"][0], caches["torch"][0])
    dst_t = (torch.zeros_like(kc), torch.zeros_like(vc))
    dst_r = (torch.zeros_like(kc), torch.zeros_like(vc))
    tb.swap_blocks([caches["triton"]], [dst_t], [(5, 0), (6, 1)])
    rb.swap_blocks([caches["torch"]], [dst_r], [(5, 0), (6, 1)])
    assert torch.equal(dst_t[0], dst_r[0]) and torch.equal(dst_t[1], dst_r[1])


@requires_cuda
@pytest.mark.gpu
def test_backend_decode_under_cuda_graph():
    """Capture backend.forward for a decode step the way the runner does, replay with new data."""
    dtype, B, Hq, Hkv, D, bs, max_model_len = torch.bfloat16, 8, 32, 8, 128, 16, 4096
    gen = torch.Generator().manual_seed(0)
    nb = B * max_model_len // bs + 1
    kc = torch.randn(nb, bs, Hkv, D, generator=gen).to(dtype).cuda()
    vc = torch.randn(nb, bs, Hkv, D, generator=gen).to(dtype).cuda()
    table = (torch.randperm(nb - 1, generator=gen)[: B * (max_model_len // bs)] + 1).view(B, -1).int().cuda()
    i32 = dict(dtype=torch.int32, device="cuda")
    seq = torch.full((B,), 1, **i32)
    meta = AttentionMetadata(
        is_prefill=False, slot_mapping=torch.zeros(B, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.arange(B + 1, **i32), seq_lens=seq, context_lens=seq - 1,
        block_tables=table, max_query_len=1, max_seq_len=max_model_len,
        seq_lens_list=[1] * B, query_lens_list=[1] * B,
    )
    q = torch.randn(B, Hq, D, generator=gen).to(dtype).cuda()
    k = torch.randn(B, Hkv, D, generator=gen).to(dtype).cuda()
    v = torch.randn(B, Hkv, D, generator=gen).to(dtype).cuda()
    backend = TritonAttentionBackend()
    backend.forward(q, k, v, (kc, vc), meta, D**-0.5)  # warm up (compile) outside the graph
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = backend.forward(q, k, v, (kc, vc), meta, D**-0.5)
    lens = torch.randint(1, max_model_len + 1, (B,), generator=gen)
    lens[0] = max_model_len
    seq.copy_(lens.to(torch.int32))
    slots = table.long().gather(1, ((lens - 1) // bs).view(-1, 1).cuda()).view(-1) * bs + ((lens - 1) % bs).cuda()
    meta.slot_mapping.copy_(slots)
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
    g.replay()
    ref_meta = AttentionMetadata(**{**meta.__dict__, "seq_lens_list": lens.tolist()})
    ref = TorchAttentionBackend().forward(q, k, v, (kc.clone(), vc.clone()), ref_meta, D**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=6e-2, atol=6e-2)


def test_engine_greedy_matches_torch_backend(tmp_path):
    """The whole engine on a tiny random-weight GQA Llama: greedy tokens with the Triton
    backend (interpreter on CPU, kernels on a GPU) equal those of the PyTorch reference (fp32)."""
    from labengine import llm as llm_mod
    from labengine import testing
    from labengine.sampling_params import SamplingParams

    path = testing.make_random_model("llama", tmp_path / "m", seed=0)
    prompts = ["the kv cache holds", "paged attention is a way", "hello"]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = llm_mod.LLM(str(path), attention_backend=backend, dtype="float32", seed=0,
                          num_gpu_blocks_override=64, enforce_eager=True)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert tokens["triton"] == tokens["torch"]
