"""OPT (facebook/opt-*) on flattened tokens.

Differences from the Llama family worth knowing:
- learned absolute positions, stored with an offset of 2 (row `p + 2` is position `p`);
- LayerNorm with bias; pre-LN (`do_layer_norm_before`, opt-125m) or post-LN (opt-350m);
- when `word_embed_proj_dim != hidden_size` (opt-350m) the embeddings are projected in
  (`project_in`) and the final hidden state projected out (`project_out`) before the
  tied LM head, so `forward` returns `[T, word_embed_proj_dim]`;
- a plain ReLU feed-forward (`fc1`, `fc2`); multi-head attention with biases.
With tensor parallelism q/k/v and fc1 are column-parallel, out_proj and fc2 row-parallel,
the token embedding and LM head split by vocabulary; positions and projections are replicated.
"""
from __future__ import annotations

import torch
from torch import nn

from labengine.models.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    cfg_get,
    get_activation,
    load_weights_into,
)

POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (a fairseq legacy)


class OPTAttention(nn.Module):
    def __init__(self, cfg, attn_backend, bias: bool):
        super().__init__()
        self.embed_dim = cfg.hidden_size
        self.head_dim = self.embed_dim // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.attn = attn_backend
        self.qkv_proj = QKVParallelLinear(self.embed_dim, self.head_dim, cfg.num_attention_heads,
                                          cfg.num_attention_heads, bias=bias)
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.out_proj = RowParallelLinear(self.embed_dim, self.embed_dim, bias=bias)

    def forward(self, x, kv_cache, meta):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        o = self.attn.forward(q, k, v.contiguous(), kv_cache, meta, self.scale)
        return self.out_proj(o.reshape(T, self.num_heads * self.head_dim))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg, attn_backend):
        super().__init__()
        bias = bool(cfg_get(cfg, "enable_bias", default=True))
        affine = bool(cfg_get(cfg, "layer_norm_elementwise_affine", default=True))
        self.pre_norm = bool(cfg.do_layer_norm_before)
        self.self_attn = OPTAttention(cfg, attn_backend, bias)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_dim, bias=bias)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.hidden_size, bias=bias)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        self.act = get_activation(cfg.activation_function)

    def forward(self, h, kv_cache, meta):
        if self.pre_norm:
            h = h + self.self_attn(self.self_attn_layer_norm(h), kv_cache, meta)
            return h + self.fc2(self.act(self.fc1(self.final_layer_norm(h))))
        h = self.self_attn_layer_norm(h + self.self_attn(h, kv_cache, meta))
        return self.final_layer_norm(h + self.fc2(self.act(self.fc1(h))))


class OPTDecoder(nn.Module):
    def __init__(self, cfg, attn_backend):
        super().__init__()
        proj_dim = cfg.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size)
        needs_proj = proj_dim != cfg.hidden_size
        self.project_in = nn.Linear(proj_dim, cfg.hidden_size, bias=False) if needs_proj else None
        self.project_out = nn.Linear(cfg.hidden_size, proj_dim, bias=False) if needs_proj else None
        # transformers drops the final norm for post-LN models and for `_remove_final_layer_norm`
        if cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False):
            affine = bool(cfg_get(cfg, "layer_norm_elementwise_affine", default=True))
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, attn_backend) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids, positions, kv_caches, meta):
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, kv_cache, meta)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, cfg, attn_backend):
        super().__init__()
        self.decoder = OPTDecoder(cfg, attn_backend)


class OPTForCausalLM(nn.Module):
    """`model(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, word_embed_proj_dim]`."""

    packed_modules = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2)}

    def __init__(self, hf_config, attn_backend):
        super().__init__()
        cfg = hf_config
        self.config = cfg
        self.model = OPTModel(cfg, attn_backend)
        # OPT's LM head is the embedding matrix (tie_word_embeddings defaults to True);
        # an untied checkpoint brings its own lm_head.weight
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.word_embed_proj_dim, cfg.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = self.model.decoder.layers[0].self_attn.num_heads  # this rank's
        self.head_size = cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.word_embed_proj_dim
        self.vocab_size = cfg.vocab_size
        self.sliding_window = None

    def forward(self, input_ids, positions, kv_caches, meta):
        return self.model.decoder(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # model dtype; the sampler upcasts where it computes

    def load_weights(self, weights):
        def rename(name):
            if name.startswith("decoder."):  # facebook/opt-* checkpoints were saved from OPTModel
                name = "model." + name
            if self.tie_word_embeddings and name == "lm_head.weight":
                return None
            return name

        load_weights_into(self, weights, packed=self.packed_modules, rename=rename)
