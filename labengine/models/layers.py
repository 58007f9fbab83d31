"""Building blocks shared by the models: norms, rotary embeddings, fused linears, weight loading.

Every model works on *flattened* tokens: activations are `[T, hidden]` with the tokens of
all sequences of a step side by side, so nothing here knows about batches or padding.
The numerics follow Hugging Face transformers (same op order, float32 where it upcasts),
because our correctness bar is "logits match transformers to 1e-4 in float32".
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- config helpers


def cfg_get(hf_config, *names, default=None):
    """The first of `names` that the config has and is not None (HF configs rename fields across models)."""
    for name in names:
        value = getattr(hf_config, name, None)
        if value is not None:
            return value
    return default


def head_dim_of(hf_config) -> int:
    """Explicit `head_dim` (Qwen3, Mistral-Nemo: may differ from hidden/heads) or hidden/heads."""
    return cfg_get(hf_config, "head_dim") or hf_config.hidden_size // hf_config.num_attention_heads


# ----------------------------------------------------------------------------- norms and activations


class RMSNorm(nn.Module):
    """RMSNorm as Llama defines it: normalise in float32, cast back, then scale.

    `norm(x, residual)` is the decoder layer's "add to the residual stream, then normalise":
    it returns (norm(x + residual), x + residual). With `kernels` set (the Triton path, see
    `use_fused_kernels`) each call is one fused kernel instead of ~8 elementwise ones.
    """

    kernels = None  # labengine.kernels on the Triton path

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.kernels is not None and x.dim() == 2:
            return self.kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = residual + x
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def use_fused_kernels(model: nn.Module, attn_backend) -> None:
    """On the Triton path, point every module that has a fused kernel at labengine.kernels.

    The PyTorch path (any device) keeps plain PyTorch ops: it is the reference the kernels
    are tested against. Modules opt in with a class attribute `kernels = None`.
    """
    kernels = getattr(attn_backend, "kernels", None)
    if kernels is None:
        return
    for module in model.modules():
        if hasattr(type(module), "kernels"):
            module.kernels = kernels


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# HF `activation_function` names we accept (OPT: relu; GPT-2: gelu_new, the tanh approximation).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "silu": F.silu,
    "swish": F.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation_function={name!r} is not supported; allowed: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- fused linears


class MergedLinear(nn.Linear):
    """One matmul for several projections that read the same input (q/k/v, gate/up).

    `output_sizes` lists the row blocks of the fused weight, in order; the checkpoint's
    separate tensors are copied into their block by `load_weights` (shard index = position).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = list(output_sizes)


# ----------------------------------------------------------------------------- rotary embeddings

ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_parameters(hf_config) -> dict:
    """One dict with `rope_type`, `rope_theta` and the scaling fields, from either config style.

    transformers 5 puts everything in `rope_parameters` (theta included); older configs have
    `rope_theta` plus an optional `rope_scaling` dict (`type` or `rope_type`).
    """
    params: dict = {}
    scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params.update(scaling)
    rp = getattr(hf_config, "rope_parameters", None)
    if isinstance(rp, dict):
        params.update(rp)
    if params.get("rope_theta") is None:
        params["rope_theta"] = cfg_get(hf_config, "rope_theta", default=10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_inv_freq(hf_config, rotary_dim: int) -> torch.Tensor:
    """Inverse frequencies [rotary_dim // 2] (float32), with the config's rope scaling applied.

    Mirrors transformers' `modeling_rope_utils` so the angles match bit for bit.
    """
    p = rope_parameters(hf_config)
    rope_type, base = p["rope_type"], float(p["rope_theta"])
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling rope_type={rope_type!r} is not supported; allowed: {', '.join(ROPE_TYPES)}"
        )
    # "dynamic" (NTK) keeps the default frequencies up to max_position_embeddings, which is
    # what transformers does too; only past that length would it raise theta per batch, and
    # we do not follow it there (documented limit: exact within max_position_embeddings).
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / float(p["factor"])
    elif rope_type == "llama3":
        factor = float(p["factor"])
        low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old_ctx = float(p["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves), as Llama/Mistral/Qwen use it.

    cos/sin are computed from the positions each step (`positions * inv_freq`, exactly what
    transformers does) rather than looked up in a table: it costs T x D/2 cos/sin per step,
    needs no maximum length, and is identical to the reference bit for bit.
    """

    def __init__(self, hf_config, head_dim: int):
        super().__init__()
        self.rotary_dim = int(head_dim * rope_parameters(hf_config).get("partial_rotary_factor", 1.0))
        self.register_buffer("inv_freq", rope_inv_freq(hf_config, self.rotary_dim), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, 1, rotary_dim // 2] for positions [T]; computed once per step, shared by all layers."""
        freqs = positions[:, None].float() * self.inv_freq.float()[None, :]
        return freqs.cos().to(dtype)[:, None, :], freqs.sin().to(dtype)[:, None, :]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, head_dim] (its first rotary_dim channels)."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = rot.chunk(2, dim=-1)
        # same products and sums as transformers' q*cos + rotate_half(q)*sin
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)


# ----------------------------------------------------------------------------- weight loading


def load_weights_into(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    *,
    packed: dict[str, tuple[str, int]] | None = None,
    rename: Callable[[str], str | None] | None = None,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Copy checkpoint tensors into the model's parameters, then check that all were filled.

    packed:    checkpoint module name -> (our fused module name, shard index), e.g.
               {"q_proj": ("qkv_proj", 0)}; the shard lands in its row block of the fused weight.
    rename:    maps a checkpoint name to ours (prefix fixes), or None to skip it on purpose.
    transform: adjusts a tensor before the copy (GPT-2's Conv1D weights are transposed).
    A name that matches no parameter is logged and skipped; a parameter that nothing filled is
    an error (it would silently keep its random init).
    """
    packed = packed or {}
    params = dict(model.named_parameters())
    filled: dict[str, set] = {}
    unexpected: list[str] = []
    with torch.no_grad():
        for ckpt_name, tensor in weights:
            name = rename(ckpt_name) if rename else ckpt_name
            if name is None:
                continue
            if transform is not None:
                tensor = transform(name, tensor)
            shard = None
            for ckpt_part, (our_part, idx) in packed.items():
                if f".{ckpt_part}." in name:
                    name, shard = name.replace(f".{ckpt_part}.", f".{our_part}."), idx
                    break
            param = params.get(name)
            if param is None:
                unexpected.append(ckpt_name)
                continue
            target = param
            if shard is not None:
                sizes = model.get_submodule(name.rsplit(".", 1)[0]).output_sizes
                start = sum(sizes[:shard])
                target = param.narrow(0, start, sizes[shard])
            if tuple(target.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"checkpoint tensor {ckpt_name!r} has shape {tuple(tensor.shape)} but the model's "
                    f"{name!r}{'' if shard is None else f' (shard {shard})'} expects {tuple(target.shape)}; "
                    "does config.json match the weights?"
                )
            target.copy_(tensor)
            filled.setdefault(name, set()).add(shard)
    if unexpected:
        logger.warning("ignored %d checkpoint tensors the model has no place for: %s", len(unexpected), unexpected[:8])
    missing = []
    for name in params:
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        needed = set(range(len(module.output_sizes))) if isinstance(module, MergedLinear) else {None}
        if not needed <= filled.get(name, set()):
            missing.append(name)
    if missing:
        raise ValueError(
            f"the checkpoint has no weights for {len(missing)} parameters of {type(model).__name__}: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
