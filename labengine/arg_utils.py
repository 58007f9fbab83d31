"""EngineArgs: every argument of the engine, validated in one place.

`LLM(...)` and `AsyncLLMEngine.from_engine_args(...)` both go through EngineArgs. Rules that
need only the argument itself are checked in `__post_init__`; rules that need the model's
config (max_model_len, heads vs tensor_parallel_size) in `create_engine_config`.
Messages follow vLLM's (v0.5.4) where vLLM has one.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from labengine.utils import logger

_DTYPES = ("auto", "half", "float16", "float", "float32", "bfloat16")
_QUANTIZATION_METHODS = ("awq", "gptq", "squeezellm", "fp8", "marlin", "bitsandbytes", "gguf",
                         "aqlm", "deepspeedfp", "compressed-tensors", "experts_int8")
_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


def _check_type(name, value, types, allowed: str):
    # bool is an int in Python; an int field should not silently take True.
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TypeError(f"{name} must be {allowed}, got {value!r} (bool)")
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")


@dataclass
class EngineArgs:
    """Arguments of LLM / LLMEngine (vLLM v0.5.4 names and defaults, plus the lab's own)."""

    model: str
    tokenizer: Optional[str] = None
    tokenizer_mode: str = "auto"
    skip_tokenizer_init: bool = False
    trust_remote_code: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: Union[str, torch.dtype] = "auto"
    quantization: Optional[str] = None
    revision: Optional[str] = None
    tokenizer_revision: Optional[str] = None
    seed: int = 0
    gpu_memory_utilization: float = 0.9
    swap_space: float = 4  # GiB
    enforce_eager: bool = False
    max_context_len_to_capture: Optional[int] = None
    max_seq_len_to_capture: int = 8192
    disable_custom_all_reduce: bool = False
    download_dir: Optional[str] = None
    load_format: str = "auto"
    max_model_len: Optional[int] = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: Optional[int] = None
    max_paddings: Optional[int] = None  # accepted and ignored (removed from vLLM in v0.3)
    max_logprobs: int = 20
    disable_log_stats: bool = False
    num_gpu_blocks_override: Optional[int] = None
    preemption_mode: Optional[str] = None  # None means "recompute"
    served_model_name: Optional[str] = None
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = False
    guided_decoding_backend: str = "llguidance"  # vLLM v0.5.4 defaults to "outlines"; labengine has llguidance
    # labengine's own
    device: str = "auto"
    attention_backend: Optional[str] = None  # "torch", "triton" or None (auto)
    check_invariants: bool = False
    cpu_kv_cache_space: float = 1.0  # GiB of KV cache when the model runs on the CPU
    # Schedule and launch decode step k+1 while step k runs on the GPU (None: on with CUDA).
    async_scheduling: Optional[bool] = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise TypeError(f"model must be a model name or a folder path (str), got {self.model!r}")
        self.model = str(self.model)
        if self.tokenizer is not None:
            self.tokenizer = str(self.tokenizer)
        if self.tokenizer_mode not in ("auto", "slow"):
            raise ValueError(f"Unknown tokenizer mode: {self.tokenizer_mode}. Must be either 'auto' or 'slow'.")
        for name in ("skip_tokenizer_init", "trust_remote_code", "enforce_eager", "disable_custom_all_reduce",
                     "disable_log_stats", "enable_prefix_caching", "enable_chunked_prefill", "check_invariants"):
            _check_type(name, getattr(self, name), bool, "True or False")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "seed", "max_seq_len_to_capture",
                     "block_size", "max_num_seqs", "max_logprobs"):
            _check_type(name, getattr(self, name), int, "an int")
        if self.async_scheduling is not None:
            _check_type("async_scheduling", self.async_scheduling, bool, "True, False or None (auto)")
        for name in ("max_context_len_to_capture", "max_model_len", "max_num_batched_tokens",
                     "num_gpu_blocks_override", "max_paddings"):
            if getattr(self, name) is not None:
                _check_type(name, getattr(self, name), int, "an int or None")
        for name in ("gpu_memory_utilization", "swap_space", "cpu_kv_cache_space"):
            _check_type(name, getattr(self, name), (int, float), "a number")

        from labengine.guided_decoding import check_guided_decoding_backend

        check_guided_decoding_backend(self.guided_decoding_backend)
        if isinstance(self.dtype, torch.dtype):
            if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"Unknown dtype: {self.dtype}")
        elif not isinstance(self.dtype, str) or self.dtype.lower() not in _DTYPES:
            raise ValueError(f"Unknown dtype: {self.dtype}")
        if self.quantization is not None:
            known = self.quantization in _QUANTIZATION_METHODS
            raise ValueError(
                f"quantization={self.quantization!r} is not supported: labengine runs unquantized "
                "weights only (dtype float16, bfloat16 or float32)"
                + ("" if known else f"; vLLM's methods are {', '.join(_QUANTIZATION_METHODS)}")
                + ". Use quantization=None.")
        if self.gpu_memory_utilization > 1.0:
            raise ValueError(f"GPU memory utilization must be less than 1.0. Got {self.gpu_memory_utilization}.")
        if self.gpu_memory_utilization <= 0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.swap_space < 0:
            raise ValueError(f"swap_space must be >= 0 GiB, got {self.swap_space}.")
        if self.cpu_kv_cache_space <= 0:
            raise ValueError(f"cpu_kv_cache_space must be > 0 GiB, got {self.cpu_kv_cache_space}.")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}.")
        if self.pipeline_parallel_size != 1:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} is not supported: "
                             "labengine runs the whole model on one device. Use pipeline_parallel_size=1.")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}.")
        if self.block_size not in _BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {_BLOCK_SIZES}, got {self.block_size}.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}.")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}.")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError(f"num_gpu_blocks_override must be at least 1, got {self.num_gpu_blocks_override}.")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}.")
        if self.max_seq_len_to_capture < 1:
            raise ValueError(f"max_seq_len_to_capture must be at least 1, got {self.max_seq_len_to_capture}.")
        if self.preemption_mode not in (None, "recompute", "swap"):
            raise ValueError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}.")
        if self.load_format not in ("auto", "pt", "safetensors"):
            raise ValueError(f"load_format must be one of 'auto', 'pt', 'safetensors', got {self.load_format!r}.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}.")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but PyTorch sees no CUDA GPU on this machine; "
                             "use device='auto' or device='cpu'.")
        if self.attention_backend not in (None, "auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}.")
        if self.max_context_len_to_capture is not None:
            # The old name (vLLM < 0.4.2) of max_seq_len_to_capture.
            self.max_seq_len_to_capture = self.max_context_len_to_capture
        if self.max_paddings is not None:
            logger.info("max_paddings=%s is accepted and ignored: labengine batches tokens without padding "
                        "(vLLM dropped the argument too).", self.max_paddings)
        if self.tensor_parallel_size > 1:
            self._verify_parallelism_devices()

    def _verify_parallelism_devices(self) -> None:
        """tensor_parallel_size ranks need as many GPUs on a GPU run; on the CPU (device='cpu', or
        'auto' without a GPU) the ranks are CPU processes talking over gloo."""
        if self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available()):
            return
        n_gpus = torch.cuda.device_count()
        if self.tensor_parallel_size > n_gpus:
            raise ValueError(
                f"The number of required GPUs exceeds the total number of available GPUs: "
                f"tensor_parallel_size={self.tensor_parallel_size} but {n_gpus} GPU(s) are available.")

    @property
    def resolved_preemption_mode(self) -> str:
        return self.preemption_mode or "recompute"

    def create_engine_config(self):
        from labengine.config import EngineConfig

        return EngineConfig.from_engine_args(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class AsyncEngineArgs(EngineArgs):
    """EngineArgs for AsyncLLMEngine (vLLM's extra fields; Ray is not supported)."""

    engine_use_ray: bool = False
    disable_log_requests: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine_use_ray:
            raise ValueError("engine_use_ray=True is not supported: labengine runs its engine in-process.")
