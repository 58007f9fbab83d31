"""`python -m labengine.serve`'s flags are built from the EngineArgs and ServerLimits fields'
real types (issue 16, item 7): every flag parses to its field's type, and the parsed
defaults are EngineArgs' own."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from labengine.arg_utils import AsyncEngineArgs
from labengine.entrypoints.openai.cli import (_CHOICES, _CLI_SKIP, _scalar_type, engine_args_from_cli,
                                              limits_from_cli, make_arg_parser)
from labengine.entrypoints.openai.serving_engine import ServerLimits


def _fields(cls, skip=()):
    hints = typing.get_type_hints(cls)
    return [(f, _scalar_type(hints[f.name])) for f in dataclasses.fields(cls) if f.name not in skip]


ENGINE_FIELDS = _fields(AsyncEngineArgs, _CLI_SKIP)
LIMIT_FIELDS = _fields(ServerLimits)


def _sample(name, kind):
    if name in _CHOICES:
        return _CHOICES[name][-1], _CHOICES[name][-1]
    return {bool: ("true", True), int: ("7", 7), float: ("0.5", 0.5), str: ("something", "something")}[kind]


@pytest.mark.parametrize("field, kind", ENGINE_FIELDS + LIMIT_FIELDS, ids=lambda x: getattr(x, "name", ""))
def test_every_flag_parses_to_its_fields_type(field, kind):
    flag = "--" + field.name.replace("_", "-")
    text, value = _sample(field.name, kind)
    ns = make_arg_parser().parse_args([flag, text])
    assert getattr(ns, field.name) == value and type(getattr(ns, field.name)) is kind
    if kind is bool:
        assert getattr(make_arg_parser().parse_args([flag]), field.name) is True
        assert getattr(make_arg_parser().parse_args([flag, "false"]), field.name) is False
        assert getattr(make_arg_parser().parse_args(["--no-" + flag[2:]]), field.name) is False


def test_async_scheduling_flag_reaches_engine_args():
    """It crashed on any value: its annotation is Optional[bool], which the old builder read as a str."""
    for argv, expected in ([], None), (["--async-scheduling"], True), (["--async-scheduling", "false"], False), \
            (["--no-async-scheduling"], False):
        ns = make_arg_parser().parse_args(["--model", "m", *argv])
        assert engine_args_from_cli(ns).async_scheduling is expected


def test_defaults_are_engine_args_and_limits_defaults():
    ns = make_arg_parser().parse_args(["--model", "m"])
    args = engine_args_from_cli(ns)
    for f in dataclasses.fields(AsyncEngineArgs):
        if f.name not in _CLI_SKIP:
            assert getattr(args, f.name) == f.default, f.name
    assert limits_from_cli(ns) == ServerLimits()


def test_typed_values_build_engine_args():
    ns = make_arg_parser().parse_args(["--model", "m", "--max-model-len", "64", "--gpu-memory-utilization", "0.5",
                                       "--swap-space", "2", "--dtype", "float32", "--enforce-eager",
                                       "--max-queued-requests", "3", "--trust-request-chat-template"])
    args = engine_args_from_cli(ns)
    assert args.max_model_len == 64 and args.gpu_memory_utilization == 0.5 and args.swap_space == 2.0
    assert args.dtype == "float32" and args.enforce_eager is True
    limits = limits_from_cli(ns)
    assert limits.max_queued_requests == 3 and limits.trust_request_chat_template is True


@pytest.mark.parametrize("argv", [["--max-model-len", "big"], ["--enforce-eager", "maybe"], ["--dtype", "int3"],
                                  ["--max-queued-requests", "1.5"]])
def test_bad_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        make_arg_parser().parse_args(["--model", "m", *argv])
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err
