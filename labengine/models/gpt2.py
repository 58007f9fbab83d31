"""GPT-2 on flattened tokens.

GPT-2 checkpoints store their projections as `Conv1D` weights, `[in, out]`, the transpose of
`nn.Linear`'s `[out, in]`; we transpose them once at load time and use plain Linear layers.
Positions are a learned table (`wpe`), the FFN is GELU (tanh approximation, `gelu_new`),
q/k/v are already one fused projection (`c_attn`), and the LM head is tied to `wte`.
For tensor parallelism the fused c_attn is cut into q/k/v at load time so each rank takes
its heads of each; c_fc is column-parallel, both c_proj row-parallel.
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

# Conv1D modules whose weights need transposing when loaded
CONV1D_MODULES = (".c_attn.", ".c_proj.", ".c_fc.")


class GPT2Attention(nn.Module):
    def __init__(self, cfg, attn_backend, layer_idx: int):
        super().__init__()
        self.embed_dim = cfg.hidden_size
        self.head_dim = self.embed_dim // cfg.num_attention_heads
        # same scale transformers uses, including the per-layer option of some GPT-2 variants
        self.scale = self.head_dim**-0.5 if cfg_get(cfg, "scale_attn_weights", default=True) else 1.0
        if cfg_get(cfg, "scale_attn_by_inverse_layer_idx", default=False):
            self.scale /= float(layer_idx + 1)
        self.attn = attn_backend
        # the checkpoint's fused c_attn is split into q/k/v at load time, so each rank takes its heads of each
        self.c_attn = QKVParallelLinear(self.embed_dim, self.head_dim, cfg.num_attention_heads,
                                        cfg.num_attention_heads, bias=True)
        self.num_heads = self.c_attn.num_heads  # this rank's heads
        self.c_proj = RowParallelLinear(self.embed_dim, self.embed_dim, bias=True)

    def forward(self, x, kv_cache, meta):
        T = x.shape[0]
        q, k, v = self.c_attn(x).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        o = self.attn.forward(q, k, v.contiguous(), kv_cache, meta, self.scale)
        return self.c_proj(o.reshape(T, self.num_heads * self.head_dim))


class GPT2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        inner = cfg_get(cfg, "n_inner", default=4 * cfg.hidden_size)
        self.c_fc = ColumnParallelLinear(cfg.hidden_size, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, cfg.hidden_size, bias=True)
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
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
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

    # the three thirds of the checkpoint's c_attn (see _split_c_attn) -> their block of our c_attn
    packed_modules = {"c_attn_q": ("c_attn", 0), "c_attn_k": ("c_attn", 1), "c_attn_v": ("c_attn", 2)}

    def __init__(self, hf_config, attn_backend):
        super().__init__()
        cfg = hf_config
        self.config = cfg
        self.transformer = GPT2Model(cfg, attn_backend)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = self.transformer.h[0].attn.num_heads  # this rank's
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

        load_weights_into(self, _split_c_attn(weights), packed=self.packed_modules, rename=rename,
                          transform=transform)


def _split_c_attn(weights):
    """Cut each fused c_attn tensor (Conv1D weight [E, 3E] or bias [3E]) into its q, k and v thirds,
    named `c_attn_q/k/v`, so that each lands in its block and a tensor-parallel rank takes its heads
    of each (a contiguous slice of the fused tensor would mix q with k)."""
    for name, tensor in weights:
        if ".c_attn." not in name:
            yield name, tensor
            continue
        for part, third in zip("qkv", tensor.chunk(3, dim=-1)):  # the output dim is last in Conv1D
            yield name.replace(".c_attn.", f".c_attn_{part}."), third.t() if third.dim() == 2 else third
