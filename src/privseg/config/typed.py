"""Typed dataclass configs from TOML: construction, validation, overrides, TOML output.

Generic machinery with no privseg fields: :mod:`privseg.config` declares the sections and
their rules (``rule(...)`` metadata); every error names the field, the value and the rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from typing import Any, Literal, get_args, get_origin

from privseg.core.errors import ConfigError
from privseg.core.registry import choice_error


def rule(**kwargs: Any) -> dict[str, Any]:
    """Field metadata: numeric bounds (gt, ge, lt, le), ``multiple_of``, a short help text, and
    ``one_of`` (a :class:`~privseg.core.registry.Registry` or any collection of names, read when
    the config is validated, so a plug-in registered later is allowed) with ``also`` (values
    allowed besides those, e.g. ``"auto"``)."""
    return kwargs


def choices(meta: Any) -> tuple[Any, ...] | None:
    """The values a field with ``one_of`` allows now (None: the field has no such rule)."""
    if "one_of" not in meta:
        return None
    return (*meta.get("also", ()), *meta["one_of"])


# ---- overrides ---------------------------------------------------------------------------
def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.field=value`` override; the value is parsed as TOML when it can be."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is invalid: expected section.field=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    set_path(raw, key, value)


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r} is invalid: {part!r} is not a section")
    node[parts[-1]] = value


# ---- typed construction with messages that name the field --------------------------------
def build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        name = sorted(unknown)[0]
        close = difflib.get_close_matches(name, list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{prefix}{name} is not a config field{hint}; allowed: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, prefix=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(args[0], value, name)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise choice_error(name, value, allowed)
        return value
    if origin is list:
        (item_tp,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a list")
        return [_coerce(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, item_tp = get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a table {{key = value}}")
        return {
            _coerce(key_tp, k, f"{name} key {k!r}"): _coerce(item_tp, v, f"{name}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{name} = {value!r} is invalid: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} = {value!r} is invalid: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a number")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} = {value!r} is invalid: expected a string")
        return value
    return value


def validate(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{name}.")
            continue
        values = value if isinstance(value, list) else [value]
        allowed = choices(f.metadata)
        for v in values if allowed is not None else ():
            if v not in allowed:
                raise choice_error(name, v, allowed)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | float):
                continue
            _check_bounds(name, value, v, f.metadata)
    check = getattr(obj, "check", None)
    if check is not None:
        check()


def _check_bounds(name: str, shown: Any, v: float, meta: Any) -> None:
    rules = [
        ("gt", lambda b: v > b, "> {}"),
        ("ge", lambda b: v >= b, ">= {}"),
        ("lt", lambda b: v < b, "< {}"),
        ("le", lambda b: v <= b, "<= {}"),
    ]
    allowed = " and ".join(fmt.format(meta[k]) for k, _, fmt in rules if k in meta)
    for key, ok, _ in rules:
        if key in meta and not ok(meta[key]):
            raise ConfigError(f"{name} = {shown!r} is invalid: allowed values are {allowed}")
    step = meta.get("multiple_of")
    if step and int(v) % step:
        raise ConfigError(
            f"{name} = {shown!r} is invalid: must be a multiple of {step}"
            + (f" ({meta['help']})" if "help" in meta else "")
        )


# ---- TOML output (stdlib has a reader only) ----------------------------------------------
def none_to_string(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (none_to_string(v) if isinstance(v, dict) else "none" if v is None else v)
        for k, v in d.items()
    }


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # an inline table (keys are plain names, checked by the config)
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps_toml(d: dict[str, Any]) -> str:
    """Write a two-level dict (scalars, then tables) as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for k, v in d.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"
