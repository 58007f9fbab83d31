"""The model layer: architecture registry and `get_model`.

`get_model` picks the class for the config's architecture, builds it directly on the
target device and dtype, loads the checkpoint and returns it in eval mode with gradients
off. Every model has the flattened-token interface of ARCHITECTURE.md:

    model(input_ids [T] int64, positions [T] int64, kv_caches, meta) -> hidden [T, H]
    model.compute_logits(hidden [N, H]) -> logits [N, V] in the model's dtype (as vLLM and
        transformers; the sampler computes in float32)
    model.load_weights(iterable of (hf_name, tensor))
    model.num_layers, model.num_kv_heads, model.head_size   (to size the KV cache)
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from labengine.models.gpt2 import GPT2LMHeadModel
from labengine.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from labengine.models.loader import (
    LOAD_FORMATS,
    ModelNotFoundError,
    WeightsNotFoundError,
    iterate_weights,
    load_hf_config,
    resolve_model_path,
)
from labengine.models.opt import OPTForCausalLM

# HF `architectures` name -> our class
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}

# configs built in code often lack `architectures`; their model_type still says what they are
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

SUPPORTED_ARCHITECTURES = tuple(MODEL_REGISTRY)


def get_model_class(hf_config) -> type[nn.Module]:
    """The class for the first supported name in `hf_config.architectures` (else by model_type)."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    model_type = getattr(hf_config, "model_type", None)
    if not archs and model_type in _BY_MODEL_TYPE:
        return MODEL_REGISTRY[_BY_MODEL_TYPE[model_type]]
    what = f"architectures={archs}" if archs else f"model_type={model_type!r} (config has no 'architectures')"
    raise ValueError(
        f"Model architecture {what} is not supported by labengine; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (no float32 copy first, which would double peak memory)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
        dtype, dtype
    )
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype; allowed: float32, float16, bfloat16")
    return value


def get_model(model_path, hf_config, device, dtype, attn_backend, load_format: str = "auto") -> nn.Module:
    """Build the model for `hf_config` on `device`/`dtype`, load the weights of `model_path`, eval mode.

    model_path: a local folder or a hub id in the local HF cache (see `resolve_model_path`).
    """
    cls = get_model_class(hf_config)
    path = resolve_model_path(str(model_path)) if not Path(model_path).is_dir() else Path(model_path)
    weights = iterate_weights(path, load_format)  # fails fast on a bad format / missing files
    dtype = _as_dtype(dtype)
    with _default_dtype(dtype), torch.device(device):
        model = cls(hf_config, attn_backend)
    model.load_weights(weights)
    model.eval()
    model.requires_grad_(False)
    return model


__all__ = [
    "MODEL_REGISTRY",
    "SUPPORTED_ARCHITECTURES",
    "LOAD_FORMATS",
    "ModelNotFoundError",
    "WeightsNotFoundError",
    "get_model_class",
    "get_model",
    "resolve_model_path",
    "load_hf_config",
    "iterate_weights",
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "OPTForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
]
