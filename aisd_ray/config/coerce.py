"""Typing a value against the schema: TOML's and the INI's values become the dataclasses' types,
or a ConfigError naming the key (and the file or override it came from)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from aisd_ray.config.schema import Config, ConfigError


def set_value(cfg: Config, section: str, key: str, value: Any, source: str, shown: str | None = None) -> None:
    shown = shown or f"[{section}] {key}"
    sub = getattr(cfg, section, None) if section in {f.name for f in dataclasses.fields(Config)} else None
    if sub is None:
        raise ConfigError(f"{source}: unknown section [{section}]")
    hints = typing.get_type_hints(type(sub))
    if key not in hints:
        raise ConfigError(f"{source}: {shown}: unknown key")
    try:
        setattr(sub, key, _coerce(value, hints[key]))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {shown}: {exc}") from None


def _coerce(value: Any, hint: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError(f"expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected a table, got {value!r}")
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    raise TypeError(f"unsupported type {hint}")  # pragma: no cover - the tree uses the types above

