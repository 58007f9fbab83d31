"""Experiment (issue 20 item 2): a decode step as two half batches on two streams, so that one
half's attention (HBM-bound) runs while the other half's GEMMs and small kernels (compute- and
L2-bound) do.

    PYTHONPATH=. python benchmarks/exp_overlap.py [--batches 256,192,128,64] [--layers 28] [--smoke]

At batch 129-256 the throughput workload's decode steps run at ~76 % of the roofline: per step
(~5.9 ms at batch 256) decode attention reads the KV cache for ~4.2 ms at ~95 % of copy
bandwidth, and the ~1.4 ms of projection GEMMs, logits, sampling and small kernels run after it,
in series. This builds Qwen3-0.6B's decode layers from the engine's own kernels (fused RMSNorm,
cuBLAS QKV/O/gate-up/down, q/k norm + rotary, KV store, decode attention with the engine's
longest-first order and balanced splits, SiLU-and-multiply) over random weights and a paged
cache of mid-run lengths (100-1,100 keys), and times, as CUDA graph replays of all layers:

  one stream        the whole batch, layer after layer (what the engine does)
  two streams       each half batch on its own stream, no other dependency (free-running)
  two streams, alternating attention
                    the same, but half B's attention of layer l waits for half A's, and A's
                    attention of layer l + 1 for B's of layer l: the attention kernels run one
                    after the other (each alone on the HBM), the other half's GEMMs beside them

Each variant's output is checked against one stream's (equal up to the GEMMs' accumulation order
at half the rows). Prints ms per step and the speed-up.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

HIDDEN, HQ, HKV, D, INTER, EPS = 1024, 16, 8, 128, 3072, 1e-6


class Layer:
    """One Qwen3 decoder layer's weights and KV cache (random)."""

    def __init__(self, num_blocks, page, dev, dtype, gen):
        def w(*shape):
            return (torch.randn(*shape, device=dev, generator=gen) * 0.02).to(dtype)

        self.qkv = w((HQ + 2 * HKV) * D, HIDDEN)
        self.o = w(HIDDEN, HQ * D)
        self.gate_up = w(2 * INTER, HIDDEN)
        self.down = w(HIDDEN, INTER)
        self.norm1 = 1 + w(HIDDEN)
        self.norm2 = 1 + w(HIDDEN)
        self.q_norm = 1 + w(D)
        self.k_norm = 1 + w(D)
        self.k_cache = w(num_blocks, page, HKV, D) * 50
        self.v_cache = w(num_blocks, page, HKV, D) * 50


class Batch:
    """One (half) batch's step inputs: token rows, positions' cos/sin, slots, tables, lengths."""

    def __init__(self, K, rows, lens, tables, slots, cos, sin, dev):
        self.rows = rows
        self.rows_t = torch.tensor(rows, dtype=torch.int64, device=dev)  # no host copy inside a capture
        self.n = len(rows)
        self.lens_list = [lens[i] for i in rows]
        self.seq_lens = torch.tensor(self.lens_list, dtype=torch.int32, device=dev)
        self.tables = tables[rows].contiguous()
        self.slots = slots[rows].contiguous()
        self.cos, self.sin = cos[rows].contiguous(), sin[rows].contiguous()
        self.order = torch.tensor(K.longest_first(self.lens_list), dtype=torch.int32, device=dev)
        split = K.decode_split_len(self.lens_list, HKV, D, torch.bfloat16, torch.device(dev))
        self.split_len = torch.tensor([split], dtype=torch.int32, device=dev)
        self.max_len = max(self.lens_list)


def pre_attention(K, layer, b, h, res):
    """RMSNorm (+ residual), QKV, q/k norm + rotary, KV store; returns (q, residual)."""
    if res is None:  # the first layer: the embeddings are the residual
        x, res = K.rms_norm(h, layer.norm1, EPS), h
    else:
        x, res = K.rms_norm(h, layer.norm1, EPS, res)
    qkv = F.linear(x, layer.qkv)
    q, k = K.qk_norm_rope(qkv, b.cos, b.sin, HQ, HKV, D, layer.q_norm, layer.k_norm, EPS)
    v = qkv[:, (HQ + HKV) * D:].view(b.n, HKV, D)
    K.store_kv(k, v, layer.k_cache, layer.v_cache, b.slots)
    return q, res


def attention(K, layer, b, q):
    return K.decode_attention(q, layer.k_cache, layer.v_cache, b.tables, b.seq_lens, D**-0.5,
                              max_seq_len=b.max_len, order=b.order, split_len=b.split_len)


def post_attention(K, layer, b, o, res):
    """O projection, RMSNorm (+ residual), gate-up, SiLU-and-multiply, down."""
    x = F.linear(o.reshape(b.n, HQ * D), layer.o)
    x, res = K.rms_norm(x, layer.norm2, EPS, res)
    return F.linear(K.silu_and_mul(F.linear(x, layer.gate_up)), layer.down), res


def one_stream(K, layers, b, h0):
    h, res = h0.index_select(0, b.rows_t), None
    for layer in layers:
        q, res = pre_attention(K, layer, b, h, res)
        h, res = post_attention(K, layer, b, attention(K, layer, b, q), res)
    return h + res


def two_streams(K, layers, halves, h0, streams, alternate):
    """halves[i] on streams[i]; with `alternate`, the attention kernels take turns (A0 B0 A1 B1 ...)."""
    main = torch.cuda.current_stream()
    outs = [None, None]
    state = [(h0.index_select(0, hb.rows_t), None) for hb in halves]
    done = [None, None]  # the event after the last attention of each half
    for s in streams:
        s.wait_stream(main)
    for li, layer in enumerate(layers):
        for i, (hb, s) in enumerate(zip(halves, streams)):
            with torch.cuda.stream(s):
                h, res = state[i]
                q, res = pre_attention(K, layer, hb, h, res)
                if alternate:
                    # A's attention l waits for B's l - 1; B's l for A's l
                    other = done[1 - i]
                    if other is not None:
                        s.wait_event(other)
                o = attention(K, layer, hb, q)
                ev = torch.cuda.Event()
                ev.record(s)
                done[i] = ev
                state[i] = post_attention(K, layer, hb, o, res)
    for i, s in enumerate(streams):
        with torch.cuda.stream(s):
            h, res = state[i]
            outs[i] = h + res
        main.wait_stream(s)
    return torch.cat(outs)  # rows in halves' order


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="256,192,128,64")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    import bench_kernels as BK  # registers kernels/ as labengine.kernels in a source checkout
    import labengine.kernels as K

    if args.smoke or not torch.cuda.is_available():
        print("smoke: this experiment needs CUDA streams and graphs; nothing timed")
        return
    dev, dtype, page = "cuda", torch.bfloat16, 16
    print(f"{torch.cuda.get_device_name()}, {args.layers} layers, Qwen3-0.6B shapes, bf16", flush=True)
    rows_out = []
    for B in (int(x) for x in args.batches.split(",")):
        gen = torch.Generator(device=dev).manual_seed(B)
        cpu = torch.Generator().manual_seed(B)
        lens = torch.randint(100, 1101, (B,), generator=cpu).tolist()
        blocks_per = [-(-n // page) for n in lens]
        num_blocks = sum(blocks_per) + 1
        perm = torch.randperm(num_blocks - 1, generator=cpu) + 1  # pages shuffled, block 0 unused
        tables = torch.zeros(B, max(blocks_per), dtype=torch.int32)
        at = 0
        for i, nb in enumerate(blocks_per):
            tables[i, :nb] = perm[at:at + nb]
            at += nb
        tables = tables.to(dev)
        # the new token of sequence i goes to position lens[i] - 1 of its last page
        slots = torch.tensor([int(tables[i, (n - 1) // page]) * page + (n - 1) % page for i, n in enumerate(lens)],
                             dtype=torch.int64, device=dev)
        ang = torch.tensor(lens, device=dev, dtype=torch.float32)[:, None] * torch.rand(D // 2, device=dev, generator=gen)
        cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
        layers = [Layer(num_blocks, page, dev, dtype, gen) for _ in range(args.layers)]
        h0 = torch.randn(B, HIDDEN, device=dev, generator=gen).to(dtype)
        order = torch.randperm(B, generator=cpu)  # halves of mixed lengths
        full = Batch(K, list(range(B)), lens, tables, slots, cos, sin, dev)
        halves = [Batch(K, order[: B // 2].tolist(), lens, tables, slots, cos, sin, dev),
                  Batch(K, order[B // 2:].tolist(), lens, tables, slots, cos, sin, dev)]
        streams = [torch.cuda.Stream(), torch.cuda.Stream()]
        cat_rows = torch.tensor(halves[0].rows + halves[1].rows, device=dev)
        ref = one_stream(K, layers, full, h0).float()
        variants = [("one stream", lambda: one_stream(K, layers, full, h0)),
                    ("two streams", lambda: two_streams(K, layers, halves, h0, streams, False)),
                    ("two streams, alternating attention", lambda: two_streams(K, layers, halves, h0, streams, True))]
        base = None
        for label, fn in variants:
            out = fn().float()
            if label != "one stream":
                out_full = torch.empty_like(out)
                out_full[cat_rows] = out
                err = ((out_full - ref).abs().max() / ref.abs().max()).item()
                assert err < 5e-2, f"B={B} {label}: max error {err:.3g} against one stream"
            t = BK.bench_graph([fn]) * 1e3
            base = base or t
            rows_out.append((B, label, t, base / t))
            print(f"B={B} {label}: {t:.3f} ms per step ({base / t:.3f}x)", flush=True)
        layers = variants = None  # free this batch's caches before the next one's
        torch.cuda.empty_cache()
    print(f"\n| batch | decode step ({args.layers} layers) | ms | speed-up vs one stream |")
    print("|---|---|---|---|")
    for B, label, t, x in rows_out:
        print(f"| {B} | {label} | {t:.3f} | {x:.3f} |")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
