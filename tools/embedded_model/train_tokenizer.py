"""Train the embedded model's byte-level BPE tokenizer and tokenize the corpus.

    python tools/embedded_model/train_tokenizer.py --corpus corpus_out --out corpus_out/tokenizer

Writes, in Hugging Face format, tokenizer.json, tokenizer_config.json and
special_tokens_map.json to --out. Specials: <pad> (id 0), <s> (BOS, id 1), </s> (EOS, id 2).
Encoding a text adds BOS in front (like Llama tokenizers); it never adds EOS, so a
prompt can be continued. For training, every document is encoded as <s> ... </s>:
corpus_out/{train,val}.bin hold the token ids (uint16) of all documents one after
another, and {train,val}.idx.npy the offset of each document's BOS.
"""
import argparse
import json
import os
import time

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def read_docs(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def build(corpus_dir, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(read_docs(os.path.join(corpus_dir, "train.jsonl")), trainer=trainer)
    # Byte-level offsets, and BOS in front of every encoded text.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, tok.token_to_id(BOS))]),
    ])
    return tok


def save_hf(tok, out):
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "padding_side": "left",
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, f, indent=2)


def encode_split(tok, corpus_dir, split, out_dir):
    docs = list(read_docs(os.path.join(corpus_dir, f"{split}.jsonl")))
    eos = tok.token_to_id(EOS)
    ids, starts = [], []
    n = 0
    for i in range(0, len(docs), 4096):
        for enc in tok.encode_batch(docs[i:i + 4096]):
            starts.append(n)
            x = enc.ids + [eos]
            ids.append(np.asarray(x, dtype=np.uint16))
            n += len(x)
    arr = np.concatenate(ids)
    arr.tofile(os.path.join(out_dir, f"{split}.bin"))
    np.save(os.path.join(out_dir, f"{split}.idx.npy"), np.asarray(starts, dtype=np.int64))
    return len(docs), len(arr), [len(x) for x in ids]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="corpus_out")
    ap.add_argument("--out", default="corpus_out/tokenizer")
    ap.add_argument("--vocab-size", type=int, default=6144)
    args = ap.parse_args()
    t0 = time.time()
    tok = build(args.corpus, args.vocab_size)
    save_hf(tok, args.out)
    print(f"tokenizer: {tok.get_vocab_size()} tokens, trained in {time.time() - t0:.1f} s")
    for split in ("train", "val"):
        nd, nt, lens = encode_split(tok, args.corpus, split, args.corpus)
        print(f"{split}: {nd} documents, {nt} tokens (mean {nt / nd:.1f}, max {max(lens)} per document)")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
