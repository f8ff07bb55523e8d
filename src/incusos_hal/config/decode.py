"""Structural decoding: plain data (parsed TOML or JSON) into the typed model.

Driven by the dataclasses' own type hints, so the model is the single description of the
document's shape. This layer checks types and keys only; values are checked in
`validate.py`. JSON `null` means "not set", as it does for IncusOS's omitempty fields.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from . import model
from .errors import FieldError, child

T = TypeVar("T")

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls, vars(model))
        _HINTS[cls] = hints
    return hints


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is str or typing.get_origin(tp) is typing.Literal:
        return "a string"
    if isinstance(tp, type) and issubclass(tp, str):
        return "a string"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if origin is tuple:
        return "a list"
    if origin is Mapping or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return "a table (object)"
    return str(tp)


def _decode_value(tp: Any, raw: Any, path: str, errors: list[FieldError]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw is None:
            return None
        return _decode_value(inner[0], raw, path, errors)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif tp is str or origin is typing.Literal:
        # An enumeration is decoded as its text; validation says which values it takes,
        # in the same words for every document format.
        if isinstance(raw, str):
            return raw
    elif isinstance(tp, type) and issubclass(tp, str):  # a typed string (Duration)
        if isinstance(raw, str):
            return tp(raw)
    elif origin is tuple:
        if isinstance(raw, list):
            (item_type, _ellipsis) = typing.get_args(tp)
            return tuple(
                _decode_value(item_type, item, child(path, i), errors) for i, item in enumerate(raw)
            )
    elif origin is Mapping:
        if isinstance(raw, dict):
            (_key_type, value_type) = typing.get_args(tp)
            return {
                key: _decode_value(value_type, value, child(path, key), errors)
                for key, value in sorted(raw.items())
            }
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(raw, dict):
            return decode(tp, raw, path, errors)
    else:  # pragma: no cover - the model only uses the types above
        raise TypeError(f"unsupported type in the model: {tp!r}")
    errors.append(FieldError(path, f"expected {_type_name(tp)}, got {_describe(raw)}"))
    return None


def _describe(raw: Any) -> str:
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "a boolean"
    if isinstance(raw, int | float):
        return "a number"
    if isinstance(raw, str):
        return "a string"
    if isinstance(raw, list):
        return "a list"
    if isinstance(raw, dict):
        return "a table (object)"
    return type(raw).__name__


def decode(cls: type[T], raw: Mapping[str, Any], path: str, errors: list[FieldError]) -> T:
    """Build `cls` from `raw`, appending a FieldError for every problem.

    On errors the returned object may hold placeholders (None); callers must check
    `errors` before using it.
    """
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            reason = model.UNSUPPORTED_KEYS.get(key, "unknown key")
            errors.append(FieldError(child(path, key), reason))
            continue
        if value is None:
            continue
        values[key] = _decode_value(hints[key], value, child(path, key), errors)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in values and no_default:
            errors.append(FieldError(child(path, name), "required"))
            values[name] = None
    return cls(**values)
