"""Where a decode step's GPU time goes, on the throughput workload (needs a CUDA GPU).

    python benchmarks/profile_decode.py [--steps 5] [--warm-steps 40] [--prefill]

Builds the Qwen3-0.6B-shaped random model and the 256-request workload of throughput.py,
runs the prefills and --warm-steps decode steps, then:
  * times one decode step's parts on the GPU with CUDA events (graph replay = the whole
    forward incl. logits; the sampler), synchronising between them;
  * times the decode attention kernel alone on that step's real block tables and lengths, in
    batch order and longest first, and reports its bandwidth against the device copy bandwidth;
    the graph replay too in both orders;
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


def measure_step(engine, runner, decode_attention, bw, n):
    """One decode step by hand, part by part, after n engine steps; the decode kernel with the
    sequences in batch order and longest first (the launcher's `order`), on the step's own tables."""
    import dataclasses

    out = engine.scheduler.schedule()
    assert not out.is_prefill
    tables = engine.scheduler.block_manager.block_tables
    ids, pos, meta, rows, smeta = runner.prepare_inputs(out, tables)
    bs = runner._graph_batch_size(meta)
    plain = dataclasses.replace(meta, decode_order=None)
    fwd = cuda_ms(lambda: runner._replay_graph(bs, ids, pos, meta), reps=20)
    fwd_plain = cuda_ms(lambda: runner._replay_graph(bs, ids, pos, plain), reps=20)
    logits = runner._replay_graph(bs, ids, pos, meta)[: ids.shape[0]]
    samp = cuda_ms(lambda: engine.sampler(logits, smeta))
    lens = meta.seq_lens_list
    print(f"after {n} steps: decode step, batch {meta.num_seqs} (graph {bs}), context max {max(lens)}, "
          f"mean {sum(lens) / len(lens):.0f}, min {min(lens)}: graph replay {fwd:.3f} ms "
          f"({fwd_plain:.3f} ms in batch order), sampler {samp:.3f} ms")
    m = runner.model
    k, v = runner.kv_caches[0]
    q = torch.randn(meta.num_seqs, tp.QWEN3_0_6B["num_attention_heads"], k.shape[-1],
                    dtype=k.dtype, device=k.device)
    scale = k.shape[-1] ** -0.5
    nbytes = sum(lens) * 2 * k.shape[2] * k.shape[3] * k.element_size() + 2 * q.numel() * 2
    for label, maxlen in (("max_seq_len = this step's", meta.max_seq_len),
                          ("max_seq_len = captured", runner._graph_max_len)):
        for oname, order in (("batch order", None), ("longest first", meta.decode_order)):
            att = cuda_ms(lambda: decode_attention(q, k, v, meta.block_tables, meta.seq_lens, scale,
                                                   max_seq_len=maxlen, order=order), reps=20)
            print(f"  decode attention alone, one layer ({label}, {oname}): {1e3 * att:.1f} us, "
                  f"{100 * nbytes / att / 1e-3 / bw:.1f}% of copy ({bw / 1e12:.2f} TB/s); "
                  f"x{m.num_layers} layers = {att * m.num_layers:.2f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warm-steps", type=int, default=20)
    ap.add_argument("--prefill", action="store_true",
                    help="also profile the workload's second prefill step (16k tokens) and print its kernels")
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
    if args.prefill:  # the first step compiles what the warm-up did not; the second is a plain one
        engine.step()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.step()
            torch.cuda.synchronize()
        print("prefill step (second of the workload):")
        print_kernels(prof)
        n = 2
    while n < args.warm_steps:
        engine.step()
        n += 1
    measure_step(engine, runner, decode_attention, bw, n)
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    print_kernels(prof)


def print_kernels(prof):
    for key in ("device_time_total", "cuda_time_total"):
        try:
            print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=70))
            break
        except Exception as e:  # the key's name changed across torch versions
            print(f"sort_by={key}: {e!r}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
