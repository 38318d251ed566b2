"""Typed configs on the command line: dataclass fields become flags, YAML fills the rest.

Every stage has one config dataclass whose fields carry their help text in
``field(help=...)``. That text is the only documentation of the field and becomes its
``--help``. Precedence, lowest first: dataclass default, ``--config`` YAML file, explicit
flags. Validation lives in each dataclass's ``__post_init__`` and raises ``ValueError``
naming the field; it never rewrites a value.

Field groups that several stages share (client options, optimiser, judge) are their own
dataclasses, nested with ``group(...)``. On the command line a group is flattened: its
fields become flags named ``prefix + field`` (``--timeout-s``, or ``--triton-timeout-s``
with the prefix ``triton_``). In YAML a group is either a nested mapping under the group's
field name or the same flat keys as the flags.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from tribune.services.common.errors import UserError

C = TypeVar("C")
REDACTED = "<redacted>"


def field(default: Any = dataclasses.MISSING, *, help: str, secret: bool = False, **kw: Any) -> Any:
    """A dataclass field whose ``help`` becomes the flag's ``--help`` text.

    ``secret`` fields (tokens) are never written out by ``to_dict``.
    """
    meta = {"help": help, "secret": secret}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: copy.deepcopy(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def group(default: Any, *, help: str = "", prefix: str = "") -> Any:
    """A nested config group (a dataclass instance as default); flags are ``prefix + field``."""
    return dataclasses.field(default_factory=lambda: copy.deepcopy(default),
                             metadata={"help": help, "group": True, "prefix": prefix})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class FlatField:
    """One leaf field of a (possibly nested) config: its flag name and where it lives."""
    name: str                    # flag dest: prefix + field name
    path: tuple[str, ...]        # attribute path from the top config
    type: Any
    optional: bool
    default: Any                 # dataclasses.MISSING when required
    help: str


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def flat_fields(cls: type, prefix: str = "", path: tuple[str, ...] = (), defaults: Any = None) -> list[FlatField]:
    """Every leaf field of ``cls`` with groups flattened (the flag layer's view)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if f.metadata.get("group"):
            out += flat_fields(hints[f.name], prefix + f.metadata.get("prefix", ""), path + (f.name,), default)
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        out.append(FlatField(prefix + f.name, path + (f.name,), tp, optional, default, f.metadata.get("help", "")))
    return out


def _parse_mapping(items: list, name: str = "options") -> dict[str, Any]:
    """``KEY=VALUE`` words (values parsed as YAML scalars) → a dict; anything else is a user error."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=") if isinstance(item, str) else ("", "", "")
        if not sep or not key:
            raise UserError(f"{name}: expected KEY=VALUE words, got {item!r}")
        try:
            out[key.replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"{name}: {item!r} has a value that is not a YAML scalar ({e})") from None
    return out


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Adds one flag per leaf field of dataclass ``cls``; unset flags stay absent (SUPPRESS)."""
    parser.add_argument("--config", type=Path, default=argparse.SUPPRESS,
                        help="YAML file with any of the fields below; flags override it")
    for f in flat_fields(cls):
        tp = f.type
        required = f.default is dataclasses.MISSING
        text = f"{f.help} (required)" if required else f"{f.help} (default: {f.default})"
        kw: dict[str, Any] = {"help": text.replace("%", "%%"), "default": argparse.SUPPRESS, "dest": f.name}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
            kw["type"] = type(get_args(tp)[0])
        elif get_origin(tp) in (list, tuple):
            (inner, *_) = get_args(tp) or (str,)
            kw["nargs"] = "+"
            kw["type"] = inner
        elif get_origin(tp) is dict or tp is dict:
            kw["nargs"] = "+"
            kw["metavar"] = "KEY=VALUE"
        elif tp in (int, float, str, Path):
            kw["type"] = tp
        else:
            raise TypeError(f"unsupported config type for {cls.__name__}.{f.name}: {tp}")
        if f.optional and tp in (int, float, str, Path):
            base = kw["type"]
            kw["type"] = lambda s, base=base: None if s.lower() in ("none", "null") else base(s)
        parser.add_argument(_flag(f.name), **kw)


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of field names to values")
    return data


_YAML_BOOLS = {False: ("no", "false", "off"), True: ("yes", "true", "on")}


def _coerce(f: FlatField, v: Any) -> Any:
    """A YAML or ``KEY=VALUE`` value checked against the field's type; a mismatch is a user error.

    ``none``/``null`` clear an optional field, as on the command line; numbers written as
    text are read as the flag reads them; a number for a text field becomes text; a YAML 1.1
    boolean (``no``, ``off``) for a field of named choices is read back as the word it was.
    """
    tp = f.type
    if isinstance(v, str) and f.optional and v.lower() in ("none", "null"):
        return None
    if v is None:
        if f.optional or tp is Any:
            return v
        raise UserError(f"{f.name}: needs a value ({_describe(tp)}), got none")
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if isinstance(v, bool) and not any(isinstance(c, bool) for c in choices):
            v = next((w for w in _YAML_BOOLS[v] if w in choices), v)
        if v not in choices:
            raise UserError(f"{f.name}: expected {_describe(tp)}, got {v!r}")
        return v
    if get_origin(tp) is dict or tp is dict:
        if isinstance(v, list):
            return _parse_mapping(v, f.name)
        if isinstance(v, str):
            return _parse_mapping([v], f.name)
        if not isinstance(v, dict):
            raise UserError(f"{f.name}: expected a mapping (KEY=VALUE words, or a YAML mapping), got {v!r}")
        return v
    if get_origin(tp) in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        items = list(v) if isinstance(v, (list, tuple)) else [v]
        if inner in (int, float, str, Path):
            return [_coerce(dataclasses.replace(f, type=inner, optional=False), x) for x in items]
        return items
    if tp is bool:
        if not isinstance(v, bool):
            raise UserError(f"{f.name}: expected true or false, got {v!r}")
        return v
    if tp in (int, float):
        return _number(f.name, tp, v)
    if tp in (str, Path):
        if isinstance(v, (dict, list, bool)):
            raise UserError(f"{f.name}: expected {_describe(tp)}, got {v!r}")
        return tp(v)
    return v


def _number(name: str, tp: type, v: Any) -> int | float:
    """An int or float field's value; text is parsed as the flag would (PyYAML reads ``1e-3`` as text)."""
    if isinstance(v, str):
        try:
            v = float(v) if tp is float else int(v)
        except ValueError:
            pass
    if isinstance(v, float) and tp is int and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (tp is int and not isinstance(v, int)):
        raise UserError(f"{name}: expected {_describe(tp)}, got {v!r}")
    return tp(v)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(c) for c in get_args(tp))
    return {int: "a whole number", float: "a number", bool: "true or false", str: "text",
            Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))


def _flatten_values(cls: type, values: dict[str, Any], leaves: list[FlatField]) -> dict[tuple[str, ...], Any]:
    """Flat keys and nested group mappings → {attribute path: value}; unknown keys raise."""
    by_name = {f.name: f for f in leaves}
    group_paths = {f.path[:i] for f in leaves for i in range(1, len(f.path))}
    out: dict[tuple[str, ...], Any] = {}
    unknown = []

    def visit(path: tuple[str, ...], key: str, value: Any) -> None:
        full = path + (key,)
        if full in group_paths and isinstance(value, dict):
            for k, v in value.items():
                visit(full, k, v)
            return
        leaf = next((f for f in leaves if f.path == full), None)
        if leaf is None and not path:
            leaf = by_name.get(key)
        if leaf is None:
            unknown.append(".".join(full))
            return
        out[leaf.path] = _coerce(leaf, value)

    for k, v in values.items():
        visit((), k, v)
    if unknown:
        raise UserError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    return out


def _construct(cls: type, values: dict[tuple[str, ...], Any], defaults: Any = None) -> Any:
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.metadata.get("group"):
            sub = {p[1:]: v for p, v in values.items() if p[0] == f.name}
            base = getattr(defaults, f.name) if defaults is not None else _field_default(f)
            kwargs[f.name] = _construct(hints[f.name], sub, base) if sub else copy.deepcopy(base)
        elif (f.name,) in values:
            kwargs[f.name] = values[(f.name,)]
        elif defaults is not None:
            kwargs[f.name] = getattr(defaults, f.name)
    return cls(**kwargs)


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    """Makes ``cls`` from flat and/or nested values; unknown keys and invalid values are user errors."""
    leaves = flat_fields(cls)
    flat = _flatten_values(cls, values, leaves)
    missing = [f.name for f in leaves if f.default is dataclasses.MISSING and f.path not in flat]
    if missing:
        raise UserError(f"missing required option(s): {', '.join(_flag(m) for m in missing)}")
    try:
        return _construct(cls, flat)
    except ValueError as e:
        raise UserError(f"invalid {cls.__name__}: {e}") from None


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """YAML from ``--config`` (if given), then explicit flags on top."""
    values: dict[str, Any] = {}
    ns = vars(args)
    if ns.get("config") is not None:
        values.update(load_yaml(ns["config"]))
    leaves = flat_fields(cls)
    names = {f.name for f in leaves}
    flags = {k: v for k, v in ns.items() if k in names}
    if flags:
        # a flag beats the same option given as a flat or nested YAML key
        by_name = {f.name: f.path for f in leaves}
        for k in flags:
            path = by_name[k]
            node = values
            for part in path[:-1]:
                node = node.get(part) if isinstance(node.get(part), dict) else {}
            node.pop(path[-1], None)
        values.update(flags)
    return build_config(cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly nested dict of a config: paths as strings, secret fields redacted."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif f.metadata.get("secret") and v is not None:
            v = REDACTED
        elif isinstance(v, Path):
            v = str(v)
        out[f.name] = v
    return out
