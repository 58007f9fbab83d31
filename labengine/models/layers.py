"""Building blocks shared by the models: norms, rotary embeddings, parallel linears, weight loading.

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

from labengine.distributed.parallel_state import all_reduce, gather_to_first_rank, get_tp_rank, get_tp_size

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


# ----------------------------------------------------------------------------- parallel linears and embeddings
#
# Megatron-style tensor parallelism: each rank holds a slice of every weight. A column-parallel
# linear splits its outputs (q/k/v heads, gate/up channels), so each rank computes its slice of
# the activations with no communication; the row-parallel linear that follows (o_proj, down)
# splits its inputs to match, and one all-reduce sums the ranks' partial outputs. The
# vocabulary-parallel embedding and LM head split the vocabulary. With one rank (no process
# group: `get_tp_size() == 1`) every class here is exactly the nn.Linear / nn.Embedding it
# subclasses: full shapes, the same forward, no collective.
# `shard_checkpoint_tensor(leaf, tensor, shard)` cuts this rank's part out of a checkpoint
# tensor; `load_weights_into` calls it.


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) must be divisible by tensor parallel size ({denominator}).")
    return numerator // denominator


class ColumnParallelLinear(nn.Linear):
    """y = x W^T with W's rows (the outputs) split over the ranks; no communication.

    `output_sizes` lists the row blocks of the full weight (one block, or several fused
    projections that read the same input: q/k/v, gate/up); each rank holds its slice of every
    block, side by side, so `self.output_sizes` are the per-rank block sizes. The checkpoint's
    separate tensors are copied into their block by `load_weights_into` (shard index = position).
    """

    packed = False  # True: the weight is several checkpoint tensors (see MergedColumnParallelLinear)

    def __init__(self, in_features: int, output_sizes, bias: bool, *, checkpoint_offsets=None):
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        local = [divide(s, self.tp_size, "Output size of a column-parallel linear") for s in sizes]
        super().__init__(in_features, sum(local), bias=bias)
        self.output_sizes = local
        # where this rank's rows start inside each block of the checkpoint
        self.checkpoint_offsets = checkpoint_offsets or [self.tp_rank * n for n in local]

    def shard_checkpoint_tensor(self, leaf: str, tensor: torch.Tensor, shard) -> torch.Tensor:
        if self.tp_size == 1 and len(self.output_sizes) == 1:
            return tensor
        i = 0 if shard is None else shard
        return tensor.narrow(0, self.checkpoint_offsets[i], self.output_sizes[i])


class MergedColumnParallelLinear(ColumnParallelLinear):
    """One matmul for several projections that read the same input (gate/up; q/k/v of OPT and GPT-2)."""

    packed = True

    def shard_checkpoint_tensor(self, leaf, tensor, shard):
        if self.tp_size == 1:
            return tensor
        return tensor.narrow(0, self.checkpoint_offsets[shard], self.output_sizes[shard])


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v in one matmul, split by heads: each rank holds num_heads/tp query heads and
    num_kv_heads/tp KV heads, or, when there are fewer KV heads than ranks, one KV head that
    tp/num_kv_heads ranks share (replicated, as vLLM does)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool):
        tp, rank = get_tp_size(), get_tp_rank()
        self.num_heads = divide(num_heads, tp, "Total number of attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "Total number of key/value heads")
            kv_start = rank * self.num_kv_heads
        else:
            if tp % num_kv_heads != 0:
                raise ValueError(f"Tensor parallel size ({tp}) must be divisible by the total number of "
                                 f"key/value heads ({num_kv_heads}) when it is larger.")
            self.num_kv_heads = 1
            kv_start = rank // (tp // num_kv_heads)
        q, kv = self.num_heads * head_dim, self.num_kv_heads * head_dim
        # full sizes as the parent splits them; then the per-rank sizes and offsets set exactly
        super().__init__(hidden_size, [q * tp, kv * tp, kv * tp], bias,
                         checkpoint_offsets=[rank * q, kv_start * head_dim, kv_start * head_dim])


class RowParallelLinear(nn.Linear):
    """y = x W^T + b with W's columns (the inputs) split over the ranks: each rank multiplies
    its slice of x (a column-parallel layer's output) and one all-reduce sums the parts; the
    bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        super().__init__(divide(in_features, self.tp_size, "Input size of a row-parallel linear"),
                         out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias

    def shard_checkpoint_tensor(self, leaf, tensor, shard):
        if self.tp_size == 1 or leaf == "bias":
            return tensor
        n = self.in_features
        return tensor.narrow(1, self.tp_rank * n, n)


class _VocabShard:
    """Rows [vocab_start, vocab_end) of the vocabulary on this rank, padded to cdiv(vocab, tp) rows
    so every rank's slice has one shape (vLLM pads the vocabulary too; nothing has to divide)."""

    def _init_vocab_shard(self, vocab_size: int) -> int:
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        self.org_vocab_size = vocab_size
        rows = -(-vocab_size // self.tp_size)
        self.vocab_start = min(self.tp_rank * rows, vocab_size)
        self.vocab_end = min(self.vocab_start + rows, vocab_size)
        return rows

    def shard_checkpoint_tensor(self, leaf, tensor, shard):
        if self.tp_size == 1:
            return tensor
        part = tensor[self.vocab_start : self.vocab_end]
        rows = self.weight.shape[0]
        if part.shape[0] < rows:  # the last rank's padding rows: zero (their logits are cut off)
            part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
        return part


class VocabParallelEmbedding(_VocabShard, nn.Embedding):
    """Token embeddings split by vocabulary: each rank looks up the ids it holds (zeros for the
    others) and one all-reduce assembles the rows."""

    def __init__(self, vocab_size: int, embedding_dim: int):
        rows = self._init_vocab_shard(vocab_size)
        nn.Embedding.__init__(self, rows, embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        out = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        out.mul_(mine.unsqueeze(-1).to(out.dtype))
        return all_reduce(out)


class ParallelLMHead(_VocabShard, nn.Linear):
    """The LM head split by vocabulary: each rank computes the logits of its rows, rank 0
    gathers them for the sampler (the other ranks return None)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        rows = self._init_vocab_shard(vocab_size)
        nn.Linear.__init__(self, hidden_size, rows, bias=False)

    def forward(self, hidden: torch.Tensor):
        if self.tp_size == 1:
            return F.linear(hidden, self.weight)
        logits = gather_to_first_rank(F.linear(hidden, self.weight))
        if logits is None or logits.shape[-1] == self.org_vocab_size:
            return logits
        return logits[..., : self.org_vocab_size].contiguous()


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
    Tensor-parallel modules (`shard_checkpoint_tensor`) receive only this rank's slice.
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
            owner_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            owner = model.get_submodule(owner_name)
            if shard is not None:
                sizes = owner.output_sizes
                target = param.narrow(0, sum(sizes[:shard]), sizes[shard])
            if hasattr(owner, "shard_checkpoint_tensor"):  # this rank's part of a tensor-parallel weight
                tensor = owner.shard_checkpoint_tensor(leaf, tensor, shard)
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
        needed = set(range(len(module.output_sizes))) if getattr(module, "packed", False) else {None}
        if not needed <= filled.get(name, set()):
            missing.append(name)
    if missing:
        raise ValueError(
            f"the checkpoint has no weights for {len(missing)} parameters of {type(model).__name__}: "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
