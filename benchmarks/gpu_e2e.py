"""End to end on a CUDA GPU: labengine vs transformers, both attention backends, CUDA graphs.

    python benchmarks/gpu_e2e.py            (needs a CUDA GPU)

For random-weight models of several architectures (built from small configs, as the CPU
tests do): labengine's greedy tokens against transformers' greedy `generate` on the same
GPU, in float32 (must be identical) and bfloat16 (reported: sequences identical, and the
position of the first divergence when not), with the PyTorch and the Triton backends,
with CUDA graphs and eager. The KV cache is sized by gpu_memory_utilization after the
profiling pass (no override). Then decode throughput of the embedded model with graphs
vs eager. Prints one table; exits 1 if any float32 comparison differs.
"""
import sys
import tempfile
import time

import torch

import labengine
from labengine import LLM, SamplingParams
from labengine.testing import make_random_model

PROMPTS = ["The capital of France is", "Once upon a time there was a little robot who wanted to",
           "Hello", "A block table maps the logical blocks of a sequence to physical blocks in memory, the way an "
           "operating system maps pages. When memory runs out, the scheduler"] * 2
NEW = 32


def hf_greedy(path, prompt_ids, dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").cuda()
    m.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids], device="cuda")
            o = m.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=NEW, pad_token_id=0)
            outs.append(o[0, len(ids):].tolist())
    del m
    torch.cuda.empty_cache()
    return outs


def first_divergence(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main():
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    root = tempfile.mkdtemp()
    rows, failures = [], 0
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    for arch in ("llama", "qwen3", "opt"):
        path = str(make_random_model(arch, f"{root}/{arch}"))
        for dtype in (torch.float32, torch.bfloat16):
            ref = None
            for backend, eager in (("torch", True), ("triton", True), ("triton", False)):
                llm = LLM(model=path, dtype=dtype, attention_backend=backend, enforce_eager=eager,
                          gpu_memory_utilization=0.1, max_model_len=256, max_num_seqs=16)
                if ref is None:
                    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
                    ref = hf_greedy(path, ids, dtype)
                t0 = time.perf_counter()
                outs = llm.generate(PROMPTS, params, use_tqdm=False)
                dt = time.perf_counter() - t0
                got = [o.outputs[0].token_ids for o in outs]
                same = sum(g == r for g, r in zip(got, ref))
                divs = [first_divergence(g, r) for g, r in zip(got, ref)]
                graphs = len(llm.llm_engine.model_runner.graphs)
                blocks = llm.llm_engine.config.cache_config.num_gpu_blocks
                rows.append((arch, str(dtype).replace("torch.", ""), backend, "graphs" if graphs else "eager",
                             f"{same}/{len(ref)}", min((d for d in divs if d is not None), default="-"), blocks,
                             f"{dt:.2f}"))
                if dtype == torch.float32 and same != len(ref):
                    failures += 1
                print(" | ".join(map(str, rows[-1])), flush=True)
                del llm
                torch.cuda.empty_cache()
    print("\nembedded model, 64 prompts x 128 tokens, greedy, ignore_eos")
    tput = []
    for backend, eager in (("torch", True), ("triton", True), ("triton", False)):
        llm = LLM(model=labengine.DEFAULT_MODEL, attention_backend=backend, enforce_eager=eager,
                  gpu_memory_utilization=0.1, max_num_seqs=64)
        p = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
        prompts = [f"Question {i}: What is the capital of France?" for i in range(64)]
        llm.generate(prompts[:8], p, use_tqdm=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, p, use_tqdm=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tput.append((backend, "eager" if eager else "graphs", 64 * 128 / dt, outs[0].outputs[0].text[:40]))
        del llm
        torch.cuda.empty_cache()
    print("\narch | dtype | backend | mode | identical to HF | first divergence | KV blocks | seconds")
    for r in rows:
        print(" | ".join(map(str, r)))
    print("\nbackend | mode | output tokens/s | sample text")
    base = tput[0][2]
    for b, m, t, s in tput:
        print(f"{b} | {m} | {t:.0f} ({t / base:.2f}x torch eager) | {s!r}")
    print(f"\nfloat32 mismatches: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
