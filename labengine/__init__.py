"""labengine: a small, instrumented vLLM-style inference engine for learning.

    from labengine import LLM, SamplingParams
    llm = LLM(model=labengine.DEFAULT_MODEL)        # the lab's embedded model, offline
    outputs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))

Names follow vLLM (v0.5.4): LLM, SamplingParams, RequestOutput, CompletionOutput,
LLMEngine, EngineArgs, AsyncLLMEngine, AsyncEngineArgs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "labengine.llm",
    "SamplingParams": "labengine.sampling_params",
    "RequestOutput": "labengine.outputs",
    "CompletionOutput": "labengine.outputs",
    "Logprob": "labengine.sequence",
    "RequestMetrics": "labengine.sequence",
    "LLMEngine": "labengine.llm_engine",
    "EngineArgs": "labengine.arg_utils",
    "AsyncEngineArgs": "labengine.arg_utils",
    "AsyncLLMEngine": "labengine.async_llm_engine",
    "AsyncEngineDeadError": "labengine.async_llm_engine",
    "DEFAULT_MODEL": "labengine.embedded",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    # Imported on first use, so `import labengine` stays quick and light.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'labengine' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
