"""Dataclass fields that carry their own checks: one rule set for config keys and scorer options.

``setting`` declares a field's choices or range and its help text; ``checked`` coerces a value (from TOML, the command
line or Python) to the field's declared type and checks it, with an error that names the key. A leaf module.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import ConfigError

INT64 = 2**63  # TOML integers are 64-bit; tomllib reads bigger ones, which torch then cannot hold


def setting(default: Any, *, choices: tuple | None = None, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, hi_open: bool = False, must: str | None = None, noun: str | None = None,
            doc: str = "", metavar: str | None = None) -> Any:
    """A dataclass field with its checks: ``choices`` (named ``noun`` in errors), a range (of each item for a list),
    ``must`` (the range in words), and help text."""
    meta = {"choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "must": must,
            "noun": noun, "doc": doc, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared_type(f: dataclasses.Field) -> str:
    """The field's type without ``| None``: "int", "float", "str", "bool" or "list[...]"."""
    return str(f.type).replace(" | None", "")


def checked(f: dataclasses.Field, value: Any, key: str, suffix: str = "") -> Any:
    """``value`` coerced to ``f``'s type and checked; errors name ``key`` and end in ``suffix``."""
    if value is None:
        if "None" in str(f.type):
            return None
        raise ConfigError(f"{key} must not be empty{suffix}")
    base = declared_type(f)
    if base.startswith("list["):
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__} {value!r}{suffix}")
        items = [_coerce(base[5:-1], v, f"{key}[{i}]", suffix) for i, v in enumerate(value)]
        for i, v in enumerate(items):
            _check_range(f.metadata, v, f"{key}[{i}]", suffix)
        return items
    value = _coerce(base, value, key, suffix, f.metadata.get("must"))
    choices, noun = f.metadata.get("choices"), f.metadata.get("noun")
    if choices and value not in choices:
        if noun:
            raise ConfigError(f"unknown {noun} {value!r} (available: {', '.join(map(str, choices))}){suffix}")
        raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(repr, choices))}{suffix}")
    _check_range(f.metadata, value, key, suffix)
    return value


def _check_range(meta: Any, value: Any, key: str, suffix: str) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    below = lo is not None and (value < lo or (meta.get("lo_open") and value == lo))
    above = hi is not None and (value > hi or (meta.get("hi_open") and value == hi))
    if not (below or above):
        return
    if meta.get("must"):
        raise ConfigError(f"{key} must be {meta['must']}, got {value!r}{suffix}")
    bound = f"{'>' if meta.get('lo_open') else '>='} {lo}" if below else f"{'<' if meta.get('hi_open') else '<='} {hi}"
    raise ConfigError(f"{key} = {value!r} is out of range (must be {bound}){suffix}")


def _coerce(type_name: str, value: Any, key: str, suffix: str, must: str | None = None) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        shown = str(value) if len(str(value)) <= 40 else f"an integer of {len(str(abs(value)))} digits"
        raise ConfigError(f"{key} = {shown} does not fit a 64-bit integer "
                          f"(TOML integers lie in -2**63 .. 2**63 - 1){suffix}")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_name == "float" and number:
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be {must or 'finite'}, got {value!r}{suffix}")
        return float(value)
    accepted = {"bool": isinstance(value, bool), "int": number and isinstance(value, int),
                "str": isinstance(value, str), "float": False}
    if type_name not in accepted:  # pragma: no cover - a new field type without a coercion rule
        raise TypeError(f"no coercion for {type_name}")
    if accepted[type_name]:
        return value
    raise ConfigError(f"{key} must be {type_name}, got {type(value).__name__} {value!r}{suffix}")
