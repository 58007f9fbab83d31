"""Experiment (issue 20): paged causal prefill attention against SDPA, and time to first token.

    PYTHONPATH=. python benchmarks/exp_prefill.py [--part kernels,ttft] [--quick]

--part kernels: bf16, 32 query / 8 KV heads, head size 128, block size 16, pages shuffled.
For each shape, the launcher's default tiling and several other tilings of
kernels/prefill_attention.py are checked against SDPA's output on the same random inputs
(rel. error < 2e-2, every element written) and then timed (triton's do_bench median, L2
flushed) against SDPA on the same K/V laid out contiguously:
  * 4 x 2048 and 1 x 16384 new tokens, no context: SDPA `is_causal=True, enable_gqa=True`;
  * chunks after cached context (4 x 1024 after 3072 cached, 1 x 4096 after 12288): SDPA
    with a lower-right causal mask (`causal_lower_right`: torch runs flash attention on it),
    K/V repeated to the query heads (that path takes no GQA);
the first shape's SDPA and default-tiling timings are repeated at the end (the spread).
TFLOP/s counts the causal half: 4 * heads * D * (keys each query row attends), summed.

--part ttft: one 16,384-token prompt on Qwen3-0.6B's shapes with random bf16 weights (as
benchmarks/throughput.py builds them): labengine's time to first token (LLM.generate,
max_tokens=1, a fresh random prompt each time) against transformers' forward pass over
the same prompt (sdpa attention, logits of the last position only, no cache).
Prints one table per part; the last lines are the summary.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys

SMOKE = "--smoke" in sys.argv  # CPU, Triton's interpreter, tiny shapes: checks the script itself
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEV = torch.device("cpu" if SMOKE else "cuda")
import labengine.attention.triton_backend  # noqa: E402,F401  (registers kernels/ as labengine.kernels)
from labengine.kernels import prefill_attention  # noqa: E402
from labengine.kernels.prefill_attention import prefill_config  # noqa: E402

# tilings: (label, launcher kwargs); the first is the launcher's default. new_kv says where the
# step's own keys/values are read: "paged" (through the block table, the kernel before
# 2026-12-04), "pointers" or "tma" (from the step's K/V tensors, strided views of a fused QKV
# row as the model passes them; the context always goes through the block table)
def tiling(new_kv, m, n, w, s, note="", **extra):
    """(label, launcher kwargs) of one tiling; extra: q_tma, o_tma, warp_specialize, maxnreg."""
    kw = dict(new_kv=new_kv, block_m=m, block_n=n, num_warps=w, num_stages=s, **extra)
    flags = "".join(f" +{k}" if v is True else f" {k}{v}" for k, v in extra.items())
    return f"{new_kv} M{m} N{n} w{w} s{s}{flags}{note}", kw


QO = dict(q_tma=True, o_tma=True)
WS = dict(warp_specialize=True)
VARIANTS = [("default", {}), tiling("paged", 128, 64, 8, 3, " (before)"), tiling("pointers", 128, 128, 8, 3)] + [
    tiling("tma", *t) for t in ((128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 3))
] + [
    # third session (2026-12-04), call 1: the query and output tiles by TMA, and triton's warp specialization
    tiling("tma", 64, 64, 4, 3, q_tma=True), tiling("tma", 64, 64, 4, 3, o_tma=True),
    tiling("tma", 64, 64, 4, 3, **QO), tiling("tma", 64, 64, 4, 4, **QO), tiling("tma", 64, 64, 4, 2, **QO),
    tiling("tma", 64, 128, 4, 2, **QO), tiling("tma", 128, 64, 8, 3, **QO), tiling("tma", 128, 128, 8, 3, **QO),
    tiling("tma", 128, 128, 8, 2, **QO), tiling("tma", 128, 64, 4, 3, **QO), tiling("tma", 128, 128, 4, 2, **QO),
    tiling("tma", 64, 64, 4, 3, **WS), tiling("tma", 64, 64, 4, 3, **QO, **WS), tiling("tma", 128, 64, 4, 3, **QO, **WS),
    tiling("tma", 128, 128, 4, 3, **QO, **WS), tiling("tma", 128, 128, 8, 3, **QO, **WS),
    tiling("tma", 128, 128, 8, 3, **QO, maxnreg=168), tiling("pointers", 128, 128, 8, 3, **QO),
    # third session, call 2: 32-key tiles (three programs of 4 warps fit an SM's shared memory)
    tiling("tma", 64, 32, 4, 3, **QO), tiling("tma", 64, 32, 4, 4, **QO), tiling("tma", 64, 32, 4, 5, **QO),
    tiling("tma", 128, 64, 8, 2, **QO), tiling("tma", 64, 64, 4, 3, **QO, maxnreg=128),
    # (fourth session, 2026-12-04: six rows with the whole tiles of new keys pipelined by hand,
    # `qk_ahead`, all slower than these; the switch was removed again, figures in RESULTS.md)
    # (sixth and seventh sessions, 2026-12-04: rows 30-45, several query heads of one KV head per
    # program (pack_heads) and the query tile held in registers (q_reg); neither faster than the
    # default on the H200, both removed again; figures in RESULTS.md)
]


def new_kv_views(kc, vc, table, B, q_len, ctx, Hq):
    """The new tokens' K/V [B * q_len, Hkv, D] as strided views of one fused QKV buffer."""
    bs, Hkv, D = kc.shape[1:]
    pos = torch.arange(ctx, ctx + q_len, device=DEV)
    slots = (table.long()[:, pos // bs] * bs + pos % bs).reshape(-1)  # [B * q_len]
    fused = torch.empty(B * q_len, Hq + 2 * Hkv, D, device=DEV, dtype=kc.dtype)
    fused[:, Hq : Hq + Hkv] = kc.reshape(-1, Hkv, D)[slots]
    fused[:, Hq + Hkv :] = vc.reshape(-1, Hkv, D)[slots]
    return fused[:, Hq : Hq + Hkv], fused[:, Hq + Hkv :]


def bench(fn, rep=150):
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return do_bench(fn, warmup=30, rep=rep, return_mode="median") * 1e-3


def paged_inputs(B, q_len, ctx, Hq=32, Hkv=8, D=128, bs=16, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    L = ctx + q_len
    nper = triton.cdiv(L, bs)
    nblk = B * nper
    kc = torch.randn(nblk + 1, bs, Hkv, D, device=DEV, dtype=dtype, generator=g)
    vc = torch.randn(nblk + 1, bs, Hkv, D, device=DEV, dtype=dtype, generator=g)
    table = (torch.randperm(nblk, device=DEV, generator=g) + 1).view(B, nper).to(torch.int32)
    q = torch.randn(B * q_len, Hq, D, device=DEV, dtype=dtype, generator=g)
    qsl = torch.arange(0, B * q_len + 1, q_len, dtype=torch.int32, device=DEV)
    lens = torch.full((B,), L, dtype=torch.int32, device=DEV)
    return q, kc, vc, table, qsl, lens


def contiguous_kv(cache, table, L):
    """[B, Hkv, L, D] from the paged cache."""
    bs, Hkv, D = cache.shape[1:]
    pos = torch.arange(L, device=DEV)
    slots = table.long()[:, pos // bs] * bs + pos % bs  # [B, L]
    return cache.reshape(-1, Hkv, D)[slots].permute(0, 2, 1, 3).contiguous()


def kernel_part(quick, pick=""):
    from torch.nn.attention.bias import causal_lower_right

    cases = [(4, 2048, 0), (1, 16384, 0), (4, 1024, 3072), (1, 4096, 12288)]
    Hq, Hkv, D = 32, 8, 128
    if SMOKE:
        cases, Hq, Hkv = [(4, 40, 0), (1, 33, 0), (2, 24, 19), (1, 17, 50)], 4, 2
    scale = D**-0.5
    rows, summary = [], []
    variants = VARIANTS[:3] if quick else VARIANTS  # quick: the default, the kernel before, pointers
    if pick:  # --pick 0,5,7: the default and these rows of VARIANTS only
        variants = [VARIANTS[0]] + [VARIANTS[int(i)] for i in pick.split(",") if int(i) != 0]
    keep = {}
    for B, q_len, ctx in cases:
        L = ctx + q_len
        q, kc, vc, table, qsl, lens = paged_inputs(B, q_len, ctx, Hq, Hkv, D)
        k, v = contiguous_kv(kc, table, L), contiguous_kv(vc, table, L)
        q4 = q.view(B, q_len, Hq, D).transpose(1, 2)
        if ctx == 0:
            sd = lambda q4=q4, k=k, v=v: F.scaled_dot_product_attention(  # noqa: E731
                q4, k, v, scale=scale, is_causal=True, enable_gqa=True)
            sd_name = "SDPA is_causal enable_gqa"
        else:
            kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
            mask = causal_lower_right(q_len, L)
            sd = lambda q4=q4, kr=kr, vr=vr, mask=mask: F.scaled_dot_product_attention(  # noqa: E731
                q4, kr, vr, attn_mask=mask, scale=scale)
            sd_name = "SDPA causal_lower_right (K/V repeated)"
        ref = sd().transpose(1, 2).reshape(B * q_len, Hq, D).float()
        attended = B * (q_len * ctx + q_len * q_len / 2)  # keys per query row, summed (causal half)
        flops = 4 * Hq * D * attended
        t_sd = bench(sd)
        shape = f"{B} x {q_len}" + (f" after {ctx}" if ctx else "")
        rows.append((shape, sd_name, t_sd, flops / t_sd / 1e12, 1.0, "the baseline"))
        if not SMOKE and not quick:  # which backend SDPA's default dispatch competes with
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                try:
                    with sdpa_kernel([be]):
                        sd()
                        t_be = bench(sd)
                    rows.append((shape, f"{sd_name}, only {be.name}", t_be, flops / t_be / 1e12, t_sd / t_be, ""))
                except Exception as e:  # a backend that does not take these inputs
                    rows.append((shape, f"{sd_name}, only {be.name}", float("nan"), float("nan"), float("nan"),
                                 f"{type(e).__name__}: {str(e)[:60]}"))
        key, value = new_kv_views(kc, vc, table, B, q_len, ctx, Hq)
        best = None
        for label, kw in variants:
            out = torch.full_like(q, float("nan"))
            if SMOKE:
                kw = {k2: v2 for k2, v2 in kw.items() if k2 != "maxnreg"}
                kw.update(block_m=16, block_n=16) if kw else None
            fn = lambda: prefill_attention(q, kc, vc, table, qsl, lens, scale, max_query_len=q_len, out=out,  # noqa: E731
                                           max_context_len=ctx, key=key, value=value, **kw)
            try:
                fn()
                if not SMOKE:
                    sync()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ok = bool(torch.isfinite(out).all()) and err < 2e-2
                if not ok:
                    rows.append((shape, label, float("nan"), float("nan"), float("nan"), f"WRONG err={err:.2e}"))
                    continue
                t = bench(fn)
            except Exception as e:  # a tiling that does not compile or launch on this GPU
                rows.append((shape, label, float("nan"), float("nan"), float("nan"), f"{type(e).__name__}: {str(e)[:80]}"))
                continue
            rows.append((shape, label, t, flops / t / 1e12, t_sd / t, f"err {err:.1e}"))
            if label == "default":
                summary.append((shape, t, t_sd))
            if best is None or t < best[1]:
                best = (label, t)
        rows.append((shape, f"best: {best[0]}" if best else "best: none", best[1] if best else float("nan"),
                     flops / best[1] / 1e12 if best else float("nan"), t_sd / best[1] if best else float("nan"), ""))
        if "first" not in keep:
            keep["first"] = (q, kc, vc, table, qsl, lens, q_len, sd, flops, shape, key, value)
        del k, v
    # the first shape again: the spread of repeated timings
    q, kc, vc, table, qsl, lens, q_len, sd, flops, shape, key, value = keep["first"]
    out = torch.empty_like(q)
    t = bench(lambda: prefill_attention(q, kc, vc, table, qsl, lens, scale, max_query_len=q_len, out=out,
                                        key=key, value=value))
    t_sd = bench(sd)
    rows.append((shape + " (again)", "SDPA is_causal enable_gqa", t_sd, flops / t_sd / 1e12, 1.0, ""))
    rows.append((shape + " (again)", "default", t, flops / t / 1e12, t_sd / t, ""))
    summary.append((shape + " (again)", t, t_sd))

    print("\n| shape | kernel | time (us) | TFLOP/s | SDPA time / this | note |")
    print("|---|---|---|---|---|---|")
    for shape, label, t, tf, ratio, note in rows:
        print(f"| {shape} | {label} | {t * 1e6:.1f} | {tf:.0f} | {ratio:.3f} | {note} |")
    print("\nsummary, launcher default vs SDPA (>= 0.90 wanted):")
    for shape, t, t_sd in summary:
        print(f"  {shape}: ours {t * 1e6:.1f} us, SDPA {t_sd * 1e6:.1f} us, SDPA/ours {t_sd / t:.3f}")
    print("default config, no context:", prefill_config(16384, 128, True),
          "| after 3072 cached:", prefill_config(1024, 128, True, 3072))


def sync():
    if not SMOKE:
        torch.cuda.synchronize()


def ttft_part(prompt_len=16384, reps=3):
    from throughput import QWEN3_0_6B, SMOKE as SMOKE_CFG, make_model
    from transformers import AutoModelForCausalLM

    from labengine import LLM, SamplingParams

    if SMOKE:
        prompt_len = 64
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 10000, (prompt_len,), generator=gen).tolist() for _ in range(reps + 1)]
    with tempfile.TemporaryDirectory() as path:
        make_model(path, SMOKE_CFG if SMOKE else QWEN3_0_6B)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").to(DEV)
        model.eval()
        hf = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], device=DEV)
                sync()
                t0 = time.perf_counter()
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits
                sync()
                hf.append(time.perf_counter() - t0)
        del model, logits
        if not SMOKE:
            torch.cuda.empty_cache()
        t_hf = statistics.median(hf[1:])

        llm = LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=prompt_len + 64,
                  max_num_batched_tokens=prompt_len + 64, max_num_seqs=16, gpu_memory_utilization=0.6, device=DEV.type)
        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, detokenize=False)
        ours = []
        for p in prompts:
            sync()
            t0 = time.perf_counter()
            out = llm.generate([{"prompt_token_ids": p}], sp, use_tqdm=False)
            sync()
            ours.append(time.perf_counter() - t0)
            assert len(out[0].outputs[0].token_ids) == 1
        t_ours = statistics.median(ours[1:])
    print("\n| TTFT, one 16,384-token prompt, Qwen3-0.6B shapes, bf16 | median (ms) | all runs (ms; first = warm-up) |")
    print("|---|---|---|")
    print(f"| transformers forward (sdpa, logits_to_keep=1, no cache) | {t_hf * 1e3:.1f} | "
          f"{', '.join(f'{x * 1e3:.1f}' for x in hf)} |")
    print(f"| labengine LLM.generate(max_tokens=1) | {t_ours * 1e3:.1f} | {', '.join(f'{x * 1e3:.1f}' for x in ours)} |")
    print(f"TTFT ratio labengine / transformers: {t_ours / t_hf:.3f} (lower is better)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--part", default="kernels,ttft")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--pick", default="", help="comma list of indices into VARIANTS to time (the default always)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    props = torch.cuda.get_device_properties(DEV) if not SMOKE else type("cpu", (), dict(name="CPU (smoke)", multi_processor_count=0))
    src = (ROOT / "kernels/prefill_attention.py").read_bytes()
    print(f"{props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, triton {triton.__version__}, "
          f"prefill_attention.py md5 {hashlib.md5(src).hexdigest()[:10]}", flush=True)
    parts = args.part.split(",")
    if "kernels" in parts:
        kernel_part(args.quick, args.pick)
    if "ttft" in parts:
        try:
            ttft_part()
        except Exception as e:  # report, do not hide the kernel table above
            import traceback

            traceback.print_exc()
            print(f"TTFT part failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
