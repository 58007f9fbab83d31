"""The OpenAI-compatible HTTP server, split as vLLM's `entrypoints/openai/` is.

    protocol.py            request/response bodies (pydantic, unknown fields refused)
    serving_engine.py      what both endpoints share: errors, params, logprobs, the streaming helper
    serving_completion.py  POST /v1/completions
    serving_chat.py        POST /v1/chat/completions (chat_utils.py renders the chat template)
    api_server.py          the FastAPI app: auth, limits, /health, /metrics, /v1/models
    cli.py                 `python -m labengine.serve`: flags built from AsyncEngineArgs
"""
