"""TOML out: the standard library reads TOML (tomllib) but does not write it, and configs are saved into every run and
study directory, so this small writer covers what they hold."""

from __future__ import annotations

from typing import Any


def dump_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Write the section dicts that configs use as TOML: a dict inside a section becomes the table ``[section.key]``
    (written only if it sets something); None values are omitted."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if value is not None and key not in tables:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for key, table in tables.items():
            if any(v is not None for v in table.values()):
                lines.append(dump_toml({f"{name}.{key}": table}))
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
