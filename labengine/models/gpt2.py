"""GPT-2 on flattened tokens.

GPT-2 checkpoints store their projections as `Conv1D` weights, `[in, out]`, the transpose of
`nn.Linear`'s `[out, in]`; we transpose them once at load time and use plain Linear layers.
Positions are a learned table (`wpe`), the FFN is GELU (tanh approximation, `gelu_new`),
q/k/v are already one fused projection (`c_attn`), and the LM head is tied to `wte`.
"""
from __future__ import annotations

import torch
from torch import nn

from labengine.models.layers import cfg_get, get_activation, load_weights_into

# Conv1D modules whose weights need transposing when loaded
CONV1D_MODULES = (".c_attn.", ".c_proj.", ".c_fc.")


class GPT2Attention(nn.Module):
    def __init__(self, cfg, attn_backend, layer_idx: int):
        super().__init__()
        self.embed_dim = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        # same scale transformers uses, including the per-layer option of some GPT-2 variants
        self.scale = self.head_dim**-0.5 if cfg_get(cfg, "scale_attn_weights", default=True) else 1.0
        if cfg_get(cfg, "scale_attn_by_inverse_layer_idx", default=False):
            self.scale /= float(layer_idx + 1)
        self.attn = attn_backend
        self.c_attn = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.c_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x, kv_cache, meta):
        T = x.shape[0]
        q, k, v = self.c_attn(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        o = self.attn.forward(q, k, v.contiguous(), kv_cache, meta, self.scale)
        return self.c_proj(o.reshape(T, self.embed_dim))


class GPT2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner = cfg_get(cfg, "n_inner", default=4 * cfg.hidden_size)
        self.c_fc = nn.Linear(cfg.hidden_size, inner)
        self.c_proj = nn.Linear(inner, cfg.hidden_size)
        self.act = get_activation(cfg.activation_function)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg, attn_backend, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg, attn_backend, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, h, kv_cache, meta):
        h = h + self.attn(self.ln_1(h), kv_cache, meta)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(nn.Module):
    def __init__(self, cfg, attn_backend):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg, attn_backend, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, positions, kv_caches, meta):
        h = self.wte(input_ids) + self.wpe(positions)
        for block, kv_cache in zip(self.h, kv_caches):
            h = block(h, kv_cache, meta)
        return self.ln_f(h)


class GPT2LMHeadModel(nn.Module):
    """`model(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, n_embd]`."""

    def __init__(self, hf_config, attn_backend):
        super().__init__()
        cfg = hf_config
        self.config = cfg
        self.transformer = GPT2Model(cfg, attn_backend)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_attention_heads
        self.head_size = cfg.hidden_size // cfg.num_attention_heads
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.sliding_window = None

    def forward(self, input_ids, positions, kv_caches, meta):
        return self.transformer(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # model dtype; the sampler upcasts where it computes

    def load_weights(self, weights):
        def rename(name):
            if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
                return None
            if not name.startswith(("transformer.", "lm_head.")):  # the `gpt2` repo saved GPT2Model
                name = "transformer." + name
            if self.tie_word_embeddings and name == "lm_head.weight":
                return None
            return name

        def transform(name, tensor):
            if name.endswith(".weight") and any(m in name for m in CONV1D_MODULES):
                return tensor.t()
            return tensor

        load_weights_into(self, weights, rename=rename, transform=transform)
