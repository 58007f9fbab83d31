"""Where a decode step's GPU time goes, on the throughput workload (needs a CUDA GPU).

    python benchmarks/profile_decode.py [--steps 5] [--warm-steps 40]

Builds the Qwen3-0.6B-shaped random model and the 256-request workload of throughput.py,
runs the prefills and --warm-steps decode steps, then:
  * times one decode step's parts on the GPU with CUDA events (graph replay = the whole
    forward incl. logits; the sampler), synchronising between them;
  * times the decode attention kernel alone on that step's real block tables and lengths,
    and reports its bandwidth against the device copy bandwidth;
  * records --steps decode steps with torch.profiler and prints the kernels by GPU time.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as tp  # noqa: E402


def cuda_ms(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warm-steps", type=int, default=20)
    args = ap.parse_args()
    from labengine.attention.triton_backend import kernels

    decode_attention = kernels.decode_attention

    prompts, outputs = tp.workload(256)
    path = tempfile.mkdtemp() + "/qwen3-0.6b-random"
    tp.make_model(path, tp.QWEN3_0_6B)
    bw = tp.copy_bandwidth()
    llm = tp.make_llm(path, 2048, async_scheduling=False)
    engine = llm.llm_engine
    runner = engine.model_runner
    for i, (p, sp) in enumerate(zip(prompts, tp.params_for(outputs))):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
    n = 0
    while n < args.warm_steps:
        engine.step()
        n += 1
    # One decode step by hand, part by part.
    out = engine.scheduler.schedule()
    assert not out.is_prefill

    tables = engine.scheduler.block_manager.block_tables
    ids, pos, meta, rows, smeta = runner.prepare_inputs(out, tables)
    bs = runner._graph_batch_size(meta)
    fwd = cuda_ms(lambda: runner._replay_graph(bs, ids, pos, meta))
    logits = runner._replay_graph(bs, ids, pos, meta)[: ids.shape[0]]
    samp = cuda_ms(lambda: engine.sampler(logits, smeta))
    print(f"decode step, batch {meta.num_seqs} (graph {bs}), max context {meta.max_seq_len}, "
          f"mean {sum(meta.seq_lens_list) / meta.num_seqs:.0f}: graph replay {fwd:.3f} ms, sampler {samp:.3f} ms")
    m = runner.model
    k, v = runner.kv_caches[0]
    q = torch.randn(meta.num_seqs, tp.QWEN3_0_6B["num_attention_heads"], k.shape[-1],
                    dtype=k.dtype, device=k.device)
    scale = k.shape[-1] ** -0.5
    for label, maxlen in (("max_seq_len = this step's", meta.max_seq_len), ("max_seq_len = captured", 2048)):
        att = cuda_ms(lambda: decode_attention(q, k, v, meta.block_tables, meta.seq_lens, scale,
                                               max_seq_len=maxlen), reps=20)
        nbytes = sum(meta.seq_lens_list) * 2 * k.shape[2] * k.shape[3] * k.element_size() + 2 * q.numel() * 2
        print(f"decode attention alone, one layer ({label}): {1e3 * att:.1f} us, {nbytes / att / 1e6:.0f} GB/s "
              f"= {100 * nbytes / att / 1e-3 / bw:.1f}% of copy ({bw / 1e12:.2f} TB/s); x{m.num_layers} layers = "
              f"{att * m.num_layers:.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    for key in ("device_time_total", "cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
            break
        except Exception as e:  # the key's name changed across torch versions
            print(f"sort_by={key}: {e!r}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
