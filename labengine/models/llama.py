"""The Llama family: Llama, Mistral, Qwen2 and Qwen3 on flattened tokens.

One implementation covers the four; they differ only in config switches:
- GQA (`num_key_value_heads` < `num_attention_heads`) and an explicit `head_dim`;
- q/k/v bias: always for Qwen2, `attention_bias` for Llama/Qwen3 (which also biases o_proj);
- Qwen3's per-head RMSNorm of q and k (`q_norm`, `k_norm`) before RoPE;
- RoPE scaling (default, linear, llama3; dynamic within max_position_embeddings);
- tied input/output embeddings (`tie_word_embeddings`).
q/k/v are one matmul (`qkv_proj`) and gate/up another (`gate_up_proj`); the checkpoint's
separate tensors are copied into their blocks at load time. With tensor parallelism these
are column-parallel (split by heads / channels) and o_proj, down_proj row-parallel (one
all-reduce each); the embedding and LM head are split by vocabulary. Attention itself is the
backend's (`attn_backend.forward`), which also writes the paged KV cache, except on the
Triton path, where the fused q/k-norm + rotary kernel writes it (`kv_stored=True`).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from labengine.models.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
    RotaryEmbedding,
    cfg_get,
    head_dim_of,
    load_weights_into,
    use_fused_kernels,
)

logger = logging.getLogger(__name__)


class LlamaAttention(nn.Module):
    kernels = None  # labengine.kernels on the Triton path: q/k norm + rotary in one kernel

    def __init__(self, cfg, attn_backend, qkv_bias: bool, o_bias: bool, qk_norm: bool):
        super().__init__()
        total_heads = cfg.num_attention_heads
        self.head_dim = head_dim_of(cfg)
        # split by heads over the tensor-parallel ranks: num_heads/num_kv_heads are this rank's
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, total_heads,
                                          cfg_get(cfg, "num_key_value_heads", default=total_heads), bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.attn = attn_backend
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, cfg.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, rotary: RotaryEmbedding, kv_cache, meta):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        kv_stored = False
        if self.kernels is not None:
            # the same kernel writes k and v into the paged cache when the backend allows it and
            # the cache fits the kernel (else the backend stores them, as before): one launch fewer
            kv_stored = self.attn.stores_kv_in_rope and self.kernels.kv_store_fits(
                qkv, kv_cache, self.num_heads, self.num_kv_heads, self.head_dim)
            q, k = self.kernels.qk_norm_rope(
                qkv, cos, sin, self.num_heads, self.num_kv_heads, self.head_dim,
                *((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.q_norm is not None else ()),
                **(dict(kv_cache=kv_cache, slot_mapping=meta.slot_mapping) if kv_stored else {}))
            # v stays a strided view of qkv: the Triton backend reads it in place
            v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)
            k = k.view(T, self.num_kv_heads, self.head_dim)
            # contiguous: the reference backend assumes dense [T, H, D] rows (a split leaves a strided view)
            v = v.reshape(T, self.num_kv_heads, self.head_dim).contiguous()
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        o = self.attn.forward(q, k, v, kv_cache, meta, self.scale, kv_stored=kv_stored)
        return self.o_proj(o.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    kernels = None  # labengine.kernels on the Triton path: silu(gate) * up in one kernel

    def __init__(self, cfg, bias: bool):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias)
        self.intermediate_size = self.gate_up_proj.output_sizes[0]  # this rank's channels
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        act = cfg_get(cfg, "hidden_act", default="silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act={act!r} is not supported for the Llama family; allowed: 'silu'")

    def forward(self, x):
        gate_up = self.gate_up_proj(x)
        if self.kernels is not None:
            return self.down_proj(self.kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, attn_backend, qkv_bias, o_bias, qk_norm, mlp_bias):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, attn_backend, qkv_bias, o_bias, qk_norm)
        self.mlp = LlamaMLP(cfg, mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, cos, sin, rotary, kv_cache, meta):
        """x: the previous layer's MLP output (the embeddings for layer 0, residual None);
        returns (this layer's MLP output, the residual stream before it). Each residual add
        is fused with the norm that follows it, as vLLM does."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, rotary, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, attn_backend, qkv_bias, o_bias, qk_norm, mlp_bias):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, attn_backend, qkv_bias, o_bias, qk_norm, mlp_bias)
            for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # one rotary module for all layers: cos/sin are computed once per step
        self.rotary_emb = RotaryEmbedding(cfg, head_dim_of(cfg))

    def forward(self, input_ids, positions, kv_caches, meta):
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_sin(positions, h.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, cos, sin, self.rotary_emb, kv_cache, meta)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    """`model(input_ids [T], positions [T], kv_caches, meta) -> hidden [T, hidden_size]`."""

    # per-family switches, overridden by the subclasses below
    always_qkv_bias = False  # Qwen2: q/k/v have a bias whatever the config says
    has_qk_norm = False  # Qwen3

    # checkpoint module -> (our fused module, shard)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config, attn_backend):
        super().__init__()
        cfg = hf_config
        self.config = cfg
        attention_bias = bool(cfg_get(cfg, "attention_bias", default=False))
        qkv_bias = self.always_qkv_bias or attention_bias
        self.model = LlamaModel(
            cfg,
            attn_backend,
            qkv_bias=qkv_bias,
            o_bias=attention_bias,
            qk_norm=self.has_qk_norm,
            mlp_bias=bool(cfg_get(cfg, "mlp_bias", default=False)),
        )
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # what the ModelRunner needs to size the KV cache (num_kv_heads: this rank's)
        attn = self.model.layers[0].self_attn
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads
        self.head_size = attn.head_dim
        self.hidden_size = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.sliding_window = self._active_sliding_window(cfg)
        use_fused_kernels(self, attn_backend)

    @staticmethod
    def _active_sliding_window(cfg):
        """The sliding window if the config asks for one shorter than the context, else None.

        The attention backends attend over the whole sequence, so beyond the window our
        output differs from transformers'; the engine can cap max_model_len with this.
        """
        window = getattr(cfg, "sliding_window", None)
        if window is None or getattr(cfg, "use_sliding_window", True) is False:
            return None
        layer_types = getattr(cfg, "layer_types", None)
        if layer_types is not None and "sliding_attention" not in layer_types:
            return None
        if window >= cfg.max_position_embeddings:
            return None
        logger.warning(
            "sliding_window=%d < max_position_embeddings=%d: labengine attends over the full sequence, "
            "so outputs past %d tokens differ from transformers'",
            window,
            cfg.max_position_embeddings,
            window,
        )
        return window

    def forward(self, input_ids, positions, kv_caches, meta):
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # model dtype; the sampler upcasts where it computes

    def load_weights(self, weights):
        def rename(name):
            if "rotary_emb.inv_freq" in name:  # a buffer old checkpoints saved; we compute it
                return None
            if self.tie_word_embeddings and name == "lm_head.weight":
                return None
            return name

        load_weights_into(self, weights, packed=self.packed_modules, rename=rename)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    always_qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    has_qk_norm = True
