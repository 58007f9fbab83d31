"""`python -m labengine.serve`: the OpenAI-compatible HTTP server on top of AsyncLLMEngine.

    python -m labengine.serve --model MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]

The server lives in labengine/entrypoints/openai/ (split as vLLM's is: protocol,
serving_completion, serving_chat, api_server, cli); this module is the command, and keeps
the names notebooks and scripts import from it.
"""
from labengine.entrypoints.openai.api_server import ServerMetrics, build_app
from labengine.entrypoints.openai.chat_utils import DEFAULT_CHAT_TEMPLATE, default_chat_prompt
from labengine.entrypoints.openai.cli import default_model, engine_args_from_cli, main, make_arg_parser

__all__ = ["build_app", "main", "make_arg_parser", "engine_args_from_cli", "default_model", "ServerMetrics",
           "DEFAULT_CHAT_TEMPLATE", "default_chat_prompt"]

if __name__ == "__main__":
    main()
