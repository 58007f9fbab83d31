"""Helpers for tests: tiny random-weight Hugging Face models and hand-built attention batches.

`make_random_model("llama", folder)` writes a complete, offline-loadable HF model folder
(config.json, model.safetensors, generation_config.json and a real byte-level BPE
tokenizer trained here on a few KB of English) in well under a second or two, so every test
can exercise the real loading path without the network. Weights are seeded; calling it
again with the same arguments on the same folder reuses what is there.

`make_kv_caches` and `make_attention_metadata` build the inputs the ModelRunner would, for
tests that drive a model (or an attention backend) directly.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"  # ids 0, 1, 2, 3 in every tokenizer made here

# Training text for the tokenizer: plain English about the lab's own subject, so common
# words become single tokens and the lesson's prompts tokenize into short sequences.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model reads a prompt and writes
the next word, then the next, one token at a time. Each new token depends on every token
before it, so the model keeps the keys and values of earlier tokens in a cache.
The cache is split into blocks of sixteen tokens. A block table maps the logical blocks of
a sequence to physical blocks in memory, the way an operating system maps pages.
When memory runs out, the scheduler preempts the newest request and recomputes it later.
Continuous batching lets new requests join the batch at every step, so the engine stays busy.
Hello, my name is Ada. I like to read books about science, history and the sea.
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
Once upon a time there was a little robot who wanted to learn how to paint the sky.
It painted the sky blue in the morning, gold in the evening and dark at night.
Attention lets every token look at the tokens before it and decide which ones matter.
The query of a token is compared with the keys of all earlier tokens; the scores become
weights, and the weighted sum of the values is the output of the attention head.
Grouped query attention shares one key and value head among several query heads, which makes
the cache smaller and decoding faster. Rotary embeddings turn the position of a token into
a rotation of its query and key vectors. A kernel is a small program that runs on the GPU.
Python is a popular programming language. Students open a notebook, run a cell, and see the
result at once. Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in text too.
What is the meaning of life? Why is the sky blue? How does a computer work? Where do birds go
in winter? Who wrote this story? When will the train arrive? Please answer in one sentence.
Sampling picks the next token at random from the distribution; greedy decoding picks the most
likely one. Temperature makes the distribution sharper or flatter, and top p keeps only the
smallest set of tokens whose probabilities add up to p. Beam search keeps several candidates.
"""

VOCAB_SIZE = 512  # 4 specials + 256 bytes + ~250 merges


@functools.lru_cache(maxsize=None)
def _tokenizer_json(add_bos: bool) -> str:
    """A trained byte-level BPE tokenizer as JSON (trained once per process per flavour)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    if add_bos:  # like Llama/Mistral/OPT tokenizers: encode() starts with BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def make_tokenizer(add_bos: bool = True):
    """A `PreTrainedTokenizerFast` with <pad>=0, <s>=1, </s>=2, <unk>=3, built offline.

    Byte-level BPE never produces <unk>; it is declared so that tokenizer classes with their
    own default unk (transformers 5 loads Qwen2Tokenizer for qwen2 folders, whose default is
    "<|endoftext|>") do not add a token the model's embedding has no row for.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(add_bos)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=512,
    )


def _config(arch: str, vocab_size: int, overrides: dict):
    """A tiny config per architecture; GQA for the Llama family, odd shapes where they catch bugs."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: 2 query heads per kv head
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        **ids,
    )
    if arch == "llama":
        cls, kw = LlamaConfig, dict(llama_like, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    elif arch == "mistral":
        cls, kw = MistralConfig, dict(llama_like, tie_word_embeddings=False, architectures=["MistralForCausalLM"])
    elif arch == "qwen2":  # qkv bias, tied embeddings (as Qwen2-0.5B)
        cls, kw = Qwen2Config, dict(llama_like, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"])
    elif arch == "qwen3":  # explicit head_dim != hidden/heads, q/k norms, tied (as Qwen3-0.6B)
        cls, kw = Qwen3Config, dict(
            llama_like, head_dim=32, tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"]
        )
    elif arch == "opt":  # the opt-125m shape, scaled down: pre-LN, ReLU, no projections
        cls, kw = OPTConfig, dict(
            vocab_size=vocab_size,
            hidden_size=64,
            word_embed_proj_dim=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            do_layer_norm_before=True,
            activation_function="relu",
            architectures=["OPTForCausalLM"],
            **ids,
        )
    elif arch == "gpt2":
        cls, kw = GPT2Config, dict(
            vocab_size=vocab_size,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            architectures=["GPT2LMHeadModel"],
            **ids,
        )
    else:
        raise ValueError(f"arch={arch!r} is not one make_random_model knows; allowed: {', '.join(ARCHS)}")
    kw.update(overrides)
    return cls(**kw)


def make_random_model(arch: str, path, *, seed: int = 0, weight_std: float | None = 0.2, **overrides) -> Path:
    """Write a tiny random-weight HF model folder for `arch` at `path` and return the path.

    arch: one of ARCHS. overrides: config fields (e.g. num_hidden_layers=3,
    rope_scaling={...}, word_embed_proj_dim=32). Weights are float32, seeded by `seed`.
    weight_std: matrices are drawn from N(0, weight_std) and every 1-D parameter (norm
    scales, biases) gets N(0, 0.1) noise on top of its init. transformers' own init (std
    0.02, zero biases, unit norms) makes attention almost uniform and hides a misloaded bias
    or norm; these weights make such bugs show in the logits. None keeps transformers' init.
    A folder already made with the same arguments is reused as is.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    args = {"arch": arch, "seed": seed, "weight_std": weight_std, "overrides": overrides}
    stamp = json.dumps(args, sort_keys=True, default=str)
    marker = path / "labengine_random_model.json"
    if marker.is_file() and marker.read_text() == stamp and (path / "model.safetensors").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer(add_bos=arch in ("llama", "mistral", "opt"))
    config = _config(arch, len(tokenizer), overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if weight_std is not None:
        with torch.no_grad():
            for param in model.parameters():  # tied weights are one parameter, drawn once
                if param.ndim >= 2:
                    param.normal_(0.0, weight_std)
                else:
                    param.add_(0.1 * torch.randn_like(param))
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a shard bar per tiny model is noise in tests and notebooks
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(path)
    marker.write_text(stamp)
    return path


# ----------------------------------------------------------------------------- batches by hand


def make_kv_caches(model, num_blocks: int, block_size: int, dtype=torch.float32, device="cpu"):
    """Per-layer (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_size], zeroed."""
    shape = (2, model.num_layers, num_blocks, block_size, model.num_kv_heads, model.head_size)
    kv = torch.zeros(shape, dtype=dtype, device=device)
    return [(kv[0, i], kv[1, i]) for i in range(model.num_layers)]


def make_attention_metadata(context_lens, query_lens, block_tables, block_size: int, device="cpu", is_prefill=None):
    """AttentionMetadata for one step, as the ModelRunner would build it.

    context_lens[b]: tokens of sequence b already cached; query_lens[b]: its tokens this step;
    block_tables[b]: its physical blocks (list of ints, enough for context + query tokens).
    is_prefill defaults to "not every sequence has one query token on top of a cache".
    """
    from labengine.attention import AttentionMetadata

    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    slots = []
    for ctx, seq_len, table in zip(context_lens, seq_lens, block_tables):
        if len(table) * block_size < seq_len:
            raise ValueError(
                f"block table {table} holds {len(table) * block_size} tokens, the sequence needs {seq_len}"
            )
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx, seq_len)]
    max_blocks = max(len(t) for t in block_tables)
    padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
    if is_prefill is None:
        is_prefill = not all(q == 1 and c > 0 for c, q in zip(context_lens, query_lens))
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    i32 = dict(dtype=torch.int32, device=device)
    return AttentionMetadata(
        is_prefill=is_prefill,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        context_lens=torch.tensor(list(context_lens), **i32),
        block_tables=torch.tensor(padded, **i32),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        seq_lens_list=list(seq_lens),
        query_lens_list=list(query_lens),
    )


def flat_positions(context_lens, query_lens, device="cpu") -> torch.Tensor:
    """positions [T] int64 of this step's tokens, sequence after sequence."""
    pos = [p for c, q in zip(context_lens, query_lens) for p in range(c, c + q)]
    return torch.tensor(pos, dtype=torch.int64, device=device)
