"""Entry points that put the engine behind a network API (vLLM's `vllm.entrypoints`)."""
