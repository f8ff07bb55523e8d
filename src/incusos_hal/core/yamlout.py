"""YAML output for JSON-shaped data (what `incus ... --format yaml` users expect).

Block style; every string is written double-quoted with JSON escapes, which YAML 1.2
reads identically, so no value can be mistaken for another type.
"""

from __future__ import annotations

import json
from typing import Any


def dumps(data: Any) -> str:
    return "\n".join(_lines(data, 0)) + "\n"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value))


def _key(key: str) -> str:
    # Plain when it cannot be read as anything but a string; quoted otherwise.
    plain = key and key[0].isalpha() and all(c.isalnum() or c in "_-" for c in key)
    if plain and key.lower() not in ("true", "false", "null", "yes", "no", "on", "off", "y", "n"):
        return key
    return json.dumps(key)


def _lines(data: Any, indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(data, dict):
        if not data:
            return [pad + "{}"]
        for key, value in data.items():
            head = f"{pad}{_key(str(key))}:"
            if isinstance(value, dict | list) and value:
                out.append(head)
                out.extend(_lines(value, indent + 2))
            else:
                out.append(f"{head} {_lines(value, 0)[0]}")
        return out
    if isinstance(data, list):
        if not data:
            return [pad + "[]"]
        for item in data:
            inner = _lines(item, indent + 2)
            out.append(f"{pad}- {inner[0].lstrip()}")
            out.extend(inner[1:])
        return out
    return [pad + _scalar(data)]
