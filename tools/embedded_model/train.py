"""Train the embedded model (a small Llama with grouped-query attention) on the generated corpus.

    # after make_corpus.py and train_tokenizer.py:
    python tools/embedded_model/train.py --data corpus_out --tokenizer corpus_out/tokenizer \
        --out corpus_out/tinylab --device cuda --minutes 5.5

Plain PyTorch around transformers.LlamaForCausalLM: AdamW, linear warm-up then cosine
decay (over --steps, or over the --minutes budget when training by time), bf16 autocast
on CUDA, float32 on CPU. Each training row is --seq-len + 1 tokens of the token stream
starting at a document's BOS, so every row starts like a prompt does at inference.
The held-out 1% of documents gives the validation loss logged every --eval-every steps;
the checkpoint with the best validation loss is the one written.

Writes to --out a Hugging Face folder: config.json, generation_config.json,
model.safetensors (in --save-dtype), the tokenizer files (if --tokenizer), and
loss_log.csv (step, tokens, seconds, lr, train loss, val loss). --save-fp32 DIR also
writes the float32 weights, in two files of under 16 MiB each.
It runs on a CPU too, just slower: e.g. --device cpu --minutes 60 --batch-size 16.
"""
import argparse
import csv
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F


def model_config(vocab_size, args):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, max_position_embeddings=args.max_positions,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=True,
    )


def write_generation_config(out):
    # Token ids only: no sampling defaults, so an engine that reads this file keeps its own.
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f, indent=2)


def save_hf(model, out, save_dtype, tokenizer_dir=None):
    """Write the HF folder; config.json also carries the keys older transformers read."""
    os.makedirs(out, exist_ok=True)
    from safetensors.torch import save_file
    sd = {k: v.detach().to("cpu", save_dtype).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}  # tied to model.embed_tokens.weight
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    dt = str(save_dtype).replace("torch.", "")
    cfg["dtype"] = dt
    cfg["torch_dtype"] = dt  # transformers 4.x
    cfg["rope_theta"] = 10000.0  # transformers 4.x
    cfg["architectures"] = ["LlamaForCausalLM"]
    for k in ("_name_or_path", "id2label", "label2id", "problem_type", "output_attentions",
              "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder"):
        cfg.pop(k, None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    write_generation_config(out)
    if tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out, name))


def save_fp32(model, out):
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    parts, sizes = ([], []), [0, 0]
    for k in sorted(sd, key=lambda k: -sd[k].numel()):  # balance the two files by size
        j = 0 if sizes[0] <= sizes[1] else 1
        parts[j].append(k)
        sizes[j] += sd[k].numel() * 4
    for i, part in enumerate(parts):
        save_file({k: sd[k] for k in part}, os.path.join(out, f"fp32-{i}.safetensors"))


def load_split(data, split):
    arr = np.fromfile(os.path.join(data, f"{split}.bin"), dtype=np.uint16).astype(np.int64)
    starts = np.load(os.path.join(data, f"{split}.idx.npy"))
    return torch.from_numpy(arr), torch.from_numpy(starts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="corpus_out")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder to copy into --out")
    ap.add_argument("--out", default="corpus_out/tinylab")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=0, help="number of steps (0: train by --minutes)")
    ap.add_argument("--minutes", type=float, default=0.0, help="time budget for training (0: by --steps)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--save-fp32", default=None, help="also write float32 weights to this folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if not args.steps and not args.minutes:
        ap.error("give --steps or --minutes")

    from transformers import LlamaForCausalLM
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    train, starts = load_split(args.data, "train")
    val, vstarts = load_split(args.data, "val")
    tok_json = os.path.join(args.tokenizer or os.path.join(args.data, "tokenizer"), "tokenizer.json")
    with open(tok_json) as f:
        tj = json.load(f)
    vocab_size = len(tj["model"]["vocab"])
    ids = {t["content"]: t["id"] for t in tj["added_tokens"]}
    assert ids == {"<pad>": 0, "<s>": 1, "</s>": 2}, ids
    assert int(train.max()) < vocab_size

    config = model_config(vocab_size, args)
    model = LlamaForCausalLM(config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {vocab_size}, {len(train)} train tokens "
          f"({len(starts)} documents), {len(val)} val tokens, device {dev}", flush=True)

    train_d = train.to(dev)
    L = args.seq_len
    ok = starts[starts + L + 1 <= len(train)].to(dev)
    # Validation: the held-out stream cut into rows of L + 1 tokens, each starting at a document.
    vrows = []
    vs = vstarts.tolist() + [len(val)]
    i = 0
    while i < len(vs) - 1:
        s = vs[i]
        e = s + L + 1
        if e > len(val):
            break
        vrows.append(val[s:e])
        # next row starts at the first document after this row's end
        while i < len(vs) - 1 and vs[i] < e:
            i += 1
    vrows = torch.stack(vrows).to(dev)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda)

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def loss_of(x):
        with amp:
            logits = model(input_ids=x[:, :-1]).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate():
        model.eval()
        tot, n = 0.0, 0
        for j in range(0, len(vrows), 16):
            x = vrows[j:j + 16]
            tot += loss_of(x).item() * x.size(0)
            n += x.size(0)
        model.train()
        return tot / n

    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "loss_log.csv")
    logf = open(log_path, "w", newline="")
    log = csv.writer(logf)
    log.writerow(["step", "tokens", "seconds", "lr", "train_loss", "val_loss"])
    save_dtype = getattr(torch, args.save_dtype)

    best = float("inf")
    t0 = time.time()
    step, run_loss, run_n = 0, 0.0, 0
    budget = args.minutes * 60.0
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    model.train()
    while True:
        elapsed = time.time() - t0
        prog = max(step / args.steps if args.steps else 0.0, elapsed / budget if budget else 0.0)
        done = prog >= 1.0
        if step % args.eval_every == 0 or done:
            vl = evaluate() if step > 0 else float("nan")
            tl = run_loss / max(run_n, 1) if run_n else float("nan")
            lr_now = opt.param_groups[0]["lr"]
            log.writerow([step, step * args.batch_size * L, round(elapsed, 1), f"{lr_now:.6f}", f"{tl:.4f}", f"{vl:.4f}"])
            logf.flush()
            print(f"step {step:6d}  {elapsed:7.1f}s  lr {lr_now:.2e}  train {tl:.4f}  val {vl:.4f}", flush=True)
            run_loss, run_n = 0.0, 0
            if step > 0 and vl < best:
                best = vl
                save_hf(model, args.out, save_dtype, args.tokenizer)
                if args.save_fp32:
                    save_fp32(model, args.save_fp32)
        if done:
            break
        # learning rate: warm-up, then cosine from lr to min_lr over the progress
        if step < args.warmup:
            lr = args.lr * (step + 1) / args.warmup
        else:
            lr = args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(prog, 1.0)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = ok[torch.randint(len(ok), (args.batch_size,), device=dev, generator=gen)]
        x = train_d[idx[:, None] + torch.arange(L + 1, device=dev)[None, :]]
        loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        run_loss += loss.item() if (step % 10 == 0) else 0.0
        run_n += 1 if (step % 10 == 0) else 0
        step += 1
    logf.close()
    print(f"done: {step} steps, {step * args.batch_size * L / 1e6:.0f}M tokens, {time.time() - t0:.0f} s, "
          f"best val loss {best:.4f} (perplexity {math.exp(best):.2f}); wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
