"""Engine configuration derived from EngineArgs and the model's Hugging Face config.

ModelConfig finds the model (local folder, the lab's embedded model, or the local HF
cache), resolves the dtype and derives max_model_len the way vLLM does. CacheConfig and
SchedulerConfig carry the paged-cache and batching limits. Nothing here touches weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from labengine.utils import logger

# Config keys that bound the sequence length, in vLLM's order.
_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                 "max_sequence_length", "max_seq_length", "seq_len")
_STR_DTYPES = {"half": torch.float16, "float16": torch.float16, "float": torch.float32,
               "float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype, hf_config, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU; on a GPU the config's dtype, with float32 mapped to float16 (as vLLM)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = dtype.lower()
    if dtype != "auto":
        return _STR_DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(cfg, str):
        cfg = _STR_DTYPES.get(cfg, None)
    if cfg in (None, torch.float32):
        return torch.float16
    return cfg


def derive_max_model_len(hf_config) -> tuple[int, str]:
    """The smallest length limit among the config's keys, times the RoPE scaling factor."""
    found = [(getattr(hf_config, k), k) for k in _MAX_LEN_KEYS if getattr(hf_config, k, None) is not None]
    if not found:
        logger.warning("The model's config names no maximum length; assuming 2048.")
        return 2048, "default"
    length, key = min(found)
    rope = getattr(hf_config, "rope_scaling", None)
    if isinstance(rope, dict) and "factor" in rope:
        kind = rope.get("rope_type", rope.get("type"))
        if kind not in ("su", "longrope", "llama3", "default", None):
            length = int(length * rope["factor"])
    return int(length), key


def resolve_model(model: str, revision: Optional[str], download_dir: Optional[str], weights: bool = True) -> Path:
    """The local folder of `model` (an alias, a folder, or a hub id: cached, else downloaded)."""
    from labengine.embedded import resolve_alias
    from labengine.models.loader import resolve_model_path

    return resolve_model_path(resolve_alias(model), revision=revision, download_dir=download_dir, weights=weights)


@dataclass
class ModelConfig:
    model: str
    model_path: Path
    tokenizer_path: Path
    hf_config: object
    dtype: torch.dtype
    max_model_len: int
    served_model_name: str
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    tokenizer_revision: Optional[str] = None
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    seed: int = 0


@dataclass
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    swap_space_bytes: int
    num_gpu_blocks_override: Optional[int]
    cpu_kv_cache_space_bytes: int
    num_gpu_blocks: int = 0  # set by the ModelRunner once the cache is sized
    num_cpu_blocks: int = 0
    enable_prefix_caching: bool = False


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    preemption_mode: str = "recompute"
    enable_chunked_prefill: bool = False


@dataclass
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    device: torch.device
    attention_backend: Optional[str]
    enforce_eager: bool
    max_seq_len_to_capture: int
    max_logprobs: int
    check_invariants: bool
    disable_log_stats: bool
    async_scheduling: bool = False
    guided_decoding_backend: str = "llguidance"
    tensor_parallel_size: int = 1

    @classmethod
    def from_engine_args(cls, args) -> "EngineConfig":
        from labengine.models.loader import load_hf_config

        device = resolve_device(args.device)
        model_path = resolve_model(args.model, args.revision, args.download_dir)
        tokenizer_path = (resolve_model(args.tokenizer, args.tokenizer_revision, args.download_dir, weights=False)
                          if args.tokenizer else model_path)
        hf_config = load_hf_config(model_path, trust_remote_code=args.trust_remote_code, revision=args.revision)
        _verify_heads(hf_config, args.tensor_parallel_size)
        derived, key = derive_max_model_len(hf_config)
        max_model_len = derived
        if args.max_model_len is not None:
            if args.max_model_len > derived:
                raise ValueError(
                    f"User-specified max_model_len ({args.max_model_len}) is greater than the derived "
                    f"max_model_len ({key}={derived} in model's config.json). This may lead to incorrect "
                    "model outputs or CUDA errors. Use max_model_len <= " + str(derived) + ".")
            max_model_len = args.max_model_len
        max_batched = args.max_num_batched_tokens
        if max_batched is None:
            # vLLM 0.5.4: 512 balances inter-token latency and TTFT once prompts are chunked;
            # otherwise a budget chosen from the device (see default_max_num_batched_tokens)
            max_batched = (512 if args.enable_chunked_prefill
                           else default_max_num_batched_tokens(max_model_len, *_cuda_facts(device)))
        if max_batched < max_model_len and not args.enable_chunked_prefill:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) is smaller than max_model_len ({max_model_len}). "
                "This effectively limits the maximum sequence length to max_num_batched_tokens and makes "
                "the engine reject longer sequences. Please increase max_num_batched_tokens or decrease "
                "max_model_len (or use enable_chunked_prefill=True, which prefills long prompts in chunks).")
        if max_batched < args.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_batched}) must be greater than or equal to "
                             f"max_num_seqs ({args.max_num_seqs}).")
        _verify_swap_space(args.swap_space)
        model_config = ModelConfig(
            model=args.model, model_path=model_path, tokenizer_path=tokenizer_path, hf_config=hf_config,
            dtype=resolve_dtype(args.dtype, hf_config, device), max_model_len=max_model_len,
            served_model_name=args.served_model_name or args.model, tokenizer_mode=args.tokenizer_mode,
            trust_remote_code=args.trust_remote_code, tokenizer_revision=args.tokenizer_revision,
            skip_tokenizer_init=args.skip_tokenizer_init, load_format=args.load_format, seed=args.seed)
        cache_config = CacheConfig(
            block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
            swap_space_bytes=int(args.swap_space * (1 << 30)), num_gpu_blocks_override=args.num_gpu_blocks_override,
            cpu_kv_cache_space_bytes=int(args.cpu_kv_cache_space * (1 << 30)),
            enable_prefix_caching=args.enable_prefix_caching)
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=max_batched, max_num_seqs=args.max_num_seqs, max_model_len=max_model_len,
            preemption_mode=args.resolved_preemption_mode, enable_chunked_prefill=args.enable_chunked_prefill)
        return cls(model_config=model_config, cache_config=cache_config, scheduler_config=scheduler_config,
                   device=device, attention_backend=args.attention_backend, enforce_eager=args.enforce_eager,
                   max_seq_len_to_capture=args.max_seq_len_to_capture, max_logprobs=args.max_logprobs,
                   check_invariants=args.check_invariants, disable_log_stats=args.disable_log_stats,
                   async_scheduling=_async_scheduling(args.async_scheduling, device),
                   guided_decoding_backend=args.guided_decoding_backend,
                   tensor_parallel_size=args.tensor_parallel_size)


# vLLM's device-dependent default token budget per step for the offline LLM (vLLM >= 0.8's
# EngineArgs defaults; 0.5.4 had max(max_model_len, 2048) everywhere): a GPU with >= 70 GiB
# (H100/H200/MI300 class; the A100-80GB is excluded, as in vLLM) gets 16384, a smaller GPU 8192.
LARGE_GPU_BYTES = 70 * (1 << 30)
LARGE_GPU_BATCHED_TOKENS = 16384
SMALL_GPU_BATCHED_TOKENS = 8192


def _cuda_facts(device: torch.device) -> tuple[Optional[str], Optional[int]]:
    """(name, total memory in bytes) of a CUDA device; (None, None) for the CPU."""
    if device.type != "cuda":
        return None, None
    props = torch.cuda.get_device_properties(device.index if device.index is not None else torch.cuda.current_device())
    return props.name, props.total_memory


def default_max_num_batched_tokens(max_model_len: int, gpu_name: Optional[str] = None,
                                   gpu_total_memory: Optional[int] = None) -> int:
    """max_num_batched_tokens when the user gives none.

    CPU (no GPU facts): max(max_model_len, 2048), vLLM 0.5.4's default; the lab's CPU notebooks
    show steps of that size. CUDA: the budget from the device, as vLLM chooses it. A large budget
    lets one step prefill many prompts: the small-engine benchmark's 143k prompt tokens
    (benchmarks/throughput.py) take 9 prefill steps at 16384 instead of about 35 at 4096, and
    its hand-tuned setting (16384) ran at 23.3k tok/s where max_model_len=4096's default (4096)
    ran at 20.6k (issue 20). Never below max_model_len: without chunked prefill a whole prompt
    must fit in one step.
    """
    if gpu_total_memory is None:
        return max(max_model_len, 2048)
    large = gpu_total_memory >= LARGE_GPU_BYTES and "a100" not in (gpu_name or "").lower()
    return max(max_model_len, LARGE_GPU_BATCHED_TOKENS if large else SMALL_GPU_BATCHED_TOKENS)


def _async_scheduling(value, device) -> bool:
    """async_scheduling=None: LABENGINE_ASYNC_SCHEDULING=0/1 if set, else on with CUDA (where
    the GPU would otherwise wait for the host between steps), off on the CPU (where nothing
    runs while the host works, and the lab's step-by-step views stay one step per call)."""
    if value is not None:
        return value
    import os

    env = os.environ.get("LABENGINE_ASYNC_SCHEDULING")
    if env is not None and env.strip() != "":
        if env.strip() not in ("0", "1"):
            raise ValueError(f"LABENGINE_ASYNC_SCHEDULING={env!r} is not allowed: use 0, 1 or leave it unset")
        return env.strip() == "1"
    return device.type == "cuda"


def _verify_heads(hf_config, tp: int) -> None:
    """What tensor parallelism splits must split evenly: query heads, KV heads (or, when there are
    fewer KV heads than ranks, the ranks among them: each KV head is then replicated) and the MLP's
    channels. Checked before any worker starts; the vocabulary is padded instead (as vLLM)."""
    if tp == 1:
        return
    heads = getattr(hf_config, "num_attention_heads", None) or getattr(hf_config, "n_head", None)
    if heads is not None and heads % tp != 0:
        raise ValueError(f"Total number of attention heads ({heads}) must be divisible by tensor parallel "
                         f"size ({tp}).")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if kv_heads is not None and kv_heads % tp != 0 and tp % kv_heads != 0:
        raise ValueError(f"Total number of key/value heads ({kv_heads}) must be divisible by tensor parallel "
                         f"size ({tp}), or tensor parallel size by it (each key/value head is then replicated "
                         f"on {tp} // {kv_heads} ranks).")
    hidden = getattr(hf_config, "hidden_size", None)
    for name in ("intermediate_size", "ffn_dim", "n_inner"):
        size = getattr(hf_config, name, None)
        if name == "n_inner" and size is None and getattr(hf_config, "model_type", None) == "gpt2" and hidden:
            size = 4 * hidden
        if size is not None and size % tp != 0:
            raise ValueError(f"{name} ({size}) must be divisible by tensor parallel size ({tp}): the MLP's "
                             "channels are split over the ranks.")


def _verify_swap_space(swap_space_gib: float) -> None:
    try:
        import psutil  # optional: only for the warning/limit

        total = psutil.virtual_memory().total
    except ImportError:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    swap = swap_space_gib * (1 << 30)
    msg = f"{swap / (1 << 30):.2f} GiB out of the {total / (1 << 30):.2f} GiB total CPU memory is allocated for the swap space."
    if swap > 0.7 * total:
        raise ValueError("Too large swap space. " + msg)
    if swap > 0.4 * total:
        logger.warning("Possibly too large swap space. %s", msg)
