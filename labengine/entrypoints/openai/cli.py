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
import typing
from typing import Optional, Sequence

from labengine.entrypoints.openai.serving_engine import ServerLimits, logger

_CLI_SKIP = {"model", "served_model_name", "disable_log_requests", "engine_use_ray"}

# Fields whose values are one of a few words: argparse lists them in --help and refuses others.
_CHOICES = {
    "dtype": ["auto", "half", "float16", "float", "float32", "bfloat16"],
    "tokenizer_mode": ["auto", "slow"],
    "load_format": ["auto", "pt", "safetensors"],
    "preemption_mode": ["recompute", "swap"],
    "device": ["auto", "cpu", "cuda"],
    "attention_backend": ["auto", "torch", "triton"],
}


def parse_bool(text: str) -> bool:
    """`--flag true` / `--flag 0` ...: the value of a boolean flag given with a value."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _scalar_type(field_type):
    """bool, int, float or str: the type a flag's value is parsed to, from the field's real type.

    Optional[X] is X; a Union of str with anything else (dtype: str or torch.dtype) is str.
    """
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    if typing.get_origin(field_type) is typing.Union:
        if len(args) == 1:
            return _scalar_type(args[0])
        return str
    if field_type in (bool, int, float, str):
        return field_type
    raise TypeError(f"no command-line type for {field_type!r}")


def add_dataclass_flags(group, cls, skip=(), choices=None) -> None:
    """One flag per field of dataclass `cls`, typed by the field's (resolved) annotation.

    A boolean field gets `--x` (true), `--x false` and `--no-x`.
    """
    hints = typing.get_type_hints(cls)
    choices = choices or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help") if f.metadata else None
        if kind is bool:
            group.add_argument(flag, dest=f.name, nargs="?", const=True, type=parse_bool, default=default,
                               metavar="true|false", help=help_text)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", help=argparse.SUPPRESS)
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=default, choices=choices.get(f.name),
                               help=help_text)


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
    add_dataclass_flags(p.add_argument_group("limits (what one client may ask)"), ServerLimits)
    add_dataclass_flags(p.add_argument_group("engine arguments (EngineArgs)"), AsyncEngineArgs, skip=_CLI_SKIP,
                        choices=_CHOICES)
    return p


def engine_args_from_cli(ns: argparse.Namespace):
    from labengine.arg_utils import AsyncEngineArgs

    kwargs = {f.name: getattr(ns, f.name) for f in dataclasses.fields(AsyncEngineArgs)
              if f.name not in _CLI_SKIP and hasattr(ns, f.name)}
    return AsyncEngineArgs(model=ns.model, served_model_name=ns.served_model_name,
                           disable_log_requests=ns.disable_log_requests, **kwargs)


def limits_from_cli(ns: argparse.Namespace) -> ServerLimits:
    return ServerLimits(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(ServerLimits)})


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
    app = build_app(engine, name, api_key=ns.api_key, chat_template=chat_template, limits=limits_from_cli(ns),
                    return_tokens_as_token_ids=ns.return_tokens_as_token_ids)
    if ns.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("Listening on %s: other machines can reach this server%s.", ns.host,
                       "" if ns.api_key else " and it has no API key")
    logger.info("Serving %s on http://%s:%d/v1", name, ns.host, ns.port)
    run_server(engine, app, ns.host, ns.port, log_level=ns.log_level)
