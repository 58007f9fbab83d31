"""Offline throughput on a GPU: labengine vs transformers, the small-engine benchmark.

    python benchmarks/throughput.py [--num-seqs 256] [--baselines generate,generate_batch]

The workload small engines compare on (nano-vllm's bench): 256 requests, prompt and output
lengths uniform in 100..1024 with seed 0, token ids uniform in 0..10000, temperature 0.6,
ignore_eos; Qwen3-0.6B's architecture and shapes with random bf16 weights (config below).
Prints output tokens/s for labengine, transformers `generate` (static padded batches) and
transformers continuous batching (`generate_batch`), their ratios, and the roofline: the
least time implied by the KV-cache and weight bytes every decode step must read, at the
device-to-device copy bandwidth measured in the same run.
"""
import argparse
import random
import tempfile
import time

import torch

QWEN3_0_6B = dict(
    architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
    intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False, bos_token_id=151643, eos_token_id=151645)


def workload(num_seqs, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_seqs)]
    outputs = [rng.randint(100, 1024) for _ in range(num_seqs)]
    return prompts, outputs


def copy_bandwidth():
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / 10
    del x, y
    return 2 * 2 * 1024**3 / sec  # bytes read + written per second


def roofline_seconds(prompts, outputs, cfg, weight_bytes, bandwidth):
    """Every decode step reads all weights once and each running sequence's KV cache."""
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    kv_bytes = sum(sum(p + i for i in range(o)) for p, o in zip(map(len, prompts), outputs)) * kv_per_token
    steps = max(outputs)
    return (kv_bytes + steps * weight_bytes) / bandwidth


def make_model(path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    cfg = Qwen3Config(**{k: v for k, v in QWEN3_0_6B.items() if k != "model_type"})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def run_labengine(path, prompts, outputs):
    from labengine import LLM, SamplingParams

    llm = LLM(model=path, dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096, max_num_seqs=256,
              max_num_batched_tokens=16384, gpu_memory_utilization=0.85)
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8), use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=o, detokenize=False) for o in outputs]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    assert [len(o.outputs[0].token_ids) for o in outs] == outputs
    del llm
    torch.cuda.empty_cache()
    return dt


def run_hf_generate(path, prompts, outputs, batch_size=64):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    model.generation_config.eos_token_id = None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, outs = prompts[i:i + batch_size], outputs[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device="cuda")  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.6, max_new_tokens=max(outs),
                       pad_token_id=0)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return dt


def run_hf_generate_batch(path, prompts, outputs):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda",
                                                 attn_implementation="paged|sdpa")
    gen = GenerationConfig(max_new_tokens=max(outputs), do_sample=True, temperature=0.6, eos_token_id=None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate_batch(inputs=prompts, generation_config=gen)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--baselines", default="generate,generate_batch")
    args = ap.parse_args()
    prompts, outputs = workload(args.num_seqs)
    total_out = sum(outputs)
    path = tempfile.mkdtemp() + "/qwen3-0.6b-random"
    weight_bytes = make_model(path)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s; {args.num_seqs} requests, "
          f"{sum(map(len, prompts))} prompt / {total_out} output tokens", flush=True)
    results = {"labengine": run_labengine(path, prompts, outputs)}
    print(f"labengine: {total_out / results['labengine']:.0f} tok/s", flush=True)
    # The baselines generate max(outputs) tokens for every request of a batch (they cannot stop
    # each request at its own length); only the requested tokens are counted, as users would.
    if "generate" in args.baselines:
        results["hf generate"] = run_hf_generate(path, prompts, outputs)
        print(f"hf generate: {total_out / results['hf generate']:.0f} tok/s", flush=True)
    if "generate_batch" in args.baselines:
        results["hf generate_batch"] = run_hf_generate_batch(path, prompts, outputs)
        print(f"hf generate_batch: {total_out / results['hf generate_batch']:.0f} tok/s", flush=True)
    roof = roofline_seconds(prompts, outputs, QWEN3_0_6B, weight_bytes, bw)
    print("\nengine | seconds | output tok/s | labengine speed-up")
    for name, sec in results.items():
        print(f"{name} | {sec:.2f} | {total_out / sec:.0f} | {sec / results['labengine']:.2f}x")
    print(f"roofline: {roof:.2f} s ({total_out / roof:.0f} tok/s); labengine at "
          f"{100 * roof / results['labengine']:.1f}% of it")


if __name__ == "__main__":
    main()
