"""Typed configs on the command line: dataclass fields become flags, YAML fills the rest.

Every stage has one config dataclass whose fields carry their help text in
``field(metadata={"help": ...})``. That text is the only documentation of the field
and becomes its ``--help``. Precedence, lowest first: dataclass default, ``--config``
YAML file, explicit flags. Validation lives in each dataclass's ``__post_init__`` and
raises ``ValueError`` naming the field; it never rewrites a value.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from trainer.errors import UserError

C = TypeVar("C")


def field(default: Any = dataclasses.MISSING, *, help: str, **kw: Any) -> Any:
    """A dataclass field whose ``help`` becomes the flag's ``--help`` text."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one flag per field of dataclass ``cls``; unset flags stay absent (SUPPRESS)."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="YAML file with any of the fields below; flags override it")
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        text = f.metadata.get("help", "")
        text = f"{text} (required)" if required else f"{text} (default: {default})"
        kw: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS, "dest": f.name}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
            kw["type"] = type(get_args(tp)[0])
        elif get_origin(tp) in (list, tuple):
            (inner, *_) = get_args(tp) or (str,)
            kw["nargs"] = "+"
            kw["type"] = inner
        elif tp in (int, float, str):
            kw["type"] = tp
        elif tp is Path:
            kw["type"] = Path
        else:
            raise TypeError(f"unsupported config type for {cls.__name__}.{f.name}: {tp}")
        if optional and tp in (int, float, str, Path):
            base = kw["type"]
            kw["type"] = lambda s, base=base: None if s.lower() in ("none", "null") else base(s)
        parser.add_argument(_flag(f.name), **kw)


def load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of field names to values")
    return data


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    """Makes ``cls`` from a dict; unknown keys and invalid values are user errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    coerced = {}
    for k, v in values.items():
        tp, _ = _unwrap_optional(hints[k])
        if tp is Path and v is not None:
            v = Path(v)
        elif tp is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        coerced[k] = v
    missing = [f.name for f in dataclasses.fields(cls)
               if f.init and f.name not in coerced
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing required option(s): {', '.join(_flag(m) for m in missing)}")
    try:
        return cls(**coerced)
    except ValueError as e:
        raise UserError(f"invalid {cls.__name__}: {e}") from None


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """YAML from ``--config`` (if given), then explicit flags on top."""
    values: dict[str, Any] = {}
    ns = vars(args)
    if ns.get("config") is not None:
        values.update(load_yaml(ns["config"]))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in ns.items() if k in names})
    return build_config(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly dict of a config (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()}
