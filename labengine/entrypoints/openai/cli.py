"""`python -m labengine.serve`: the server's command line (vLLM's `cli_args.py` + `api_server.main`).

    python -m labengine.serve --model MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY]

The server binds to 127.0.0.1 unless `--host` says otherwise. The API key may also come from
the environment variable LABENGINE_API_KEY. Every field of AsyncEngineArgs is a flag
(`--max-model-len 512`, `--enforce-eager`, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from typing import Optional, Sequence

from labengine.entrypoints.openai.serving_engine import logger

_CLI_SKIP = {"model", "served_model_name", "disable_log_requests", "engine_use_ray"}


def make_arg_parser() -> argparse.ArgumentParser:
    from labengine.arg_utils import AsyncEngineArgs

    p = argparse.ArgumentParser(prog="python -m labengine.serve",
                                description="labengine's OpenAI-compatible server.")
    p.add_argument("--model", default=None,
                   help="model folder or HF name (default: the lab's embedded model, labengine/tinylab)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LABENGINE_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $LABENGINE_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model name clients use (default: --model)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template, or a file holding one")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help='write logprob tokens as "token_id:<id>" (tokens that are not valid UTF-8 alone stay '
                        'distinct)')
    p.add_argument("--disable-log-requests", action="store_true")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    engine = p.add_argument_group("engine arguments (EngineArgs)")
    for f in dataclasses.fields(AsyncEngineArgs):
        if f.name in _CLI_SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        ann = str(f.type)
        default = f.default if f.default is not dataclasses.MISSING else None
        if ann == "bool":
            engine.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif "int" in ann and "str" not in ann and "float" not in ann:
            engine.add_argument(flag, type=int, default=default)
        elif "float" in ann and "str" not in ann:
            engine.add_argument(flag, type=float, default=default)
        else:
            engine.add_argument(flag, type=str, default=default)
    return p


def engine_args_from_cli(ns: argparse.Namespace):
    from labengine.arg_utils import AsyncEngineArgs

    kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(AsyncEngineArgs)
              if f.name not in _CLI_SKIP and hasattr(ns, f.name)}
    return AsyncEngineArgs(model=ns.model, served_model_name=ns.served_model_name,
                           disable_log_requests=ns.disable_log_requests, **kwargs)


def default_model() -> Optional[str]:
    """The embedded model, by its short name ("labengine/tinylab") so clients can say that."""
    try:
        from labengine import embedded

        for alias, path in getattr(embedded, "MODEL_ALIASES", {}).items():
            if "/" in alias and path == embedded.DEFAULT_MODEL:
                return alias
        return embedded.DEFAULT_MODEL
    except Exception:
        return None


def main(argv: Optional[Sequence[str]] = None) -> None:
    from labengine.async_llm_engine import AsyncLLMEngine
    from labengine.entrypoints.openai.api_server import build_app, run_server

    ns = make_arg_parser().parse_args(argv)
    logging.basicConfig(level=ns.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if ns.model is None:
        ns.model = default_model()
        if ns.model is None:
            sys.exit("error: --model is required (no embedded model in this install)")
    chat_template = ns.chat_template
    if chat_template and os.path.isfile(chat_template):
        with open(chat_template) as fh:
            chat_template = fh.read()
    engine = AsyncLLMEngine.from_engine_args(engine_args_from_cli(ns))
    name = ns.served_model_name or str(ns.model)
    app = build_app(engine, name, api_key=ns.api_key, chat_template=chat_template,
                    return_tokens_as_token_ids=ns.return_tokens_as_token_ids)
    if ns.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Listening on %s: other machines can reach this server%s.", ns.host,
                       "" if ns.api_key else " and it has no API key")
    logger.info("Serving %s on http://%s:%d/v1", name, ns.host, ns.port)
    run_server(engine, app, ns.host, ns.port, log_level=ns.log_level)
