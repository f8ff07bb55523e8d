"""The configuration document: typed model, parsing, validation and serialisation.

`from_dict` is the one way in: TOML as stored and JSON in IncusOS's API shape both
become plain data first, then migrate -> decode -> validate. Anything else raises
ConfigError carrying every problem, each with its field path.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

from . import model
from .decode import decode
from .errors import ConfigError, FieldError
from .model import CURRENT_VERSION, Config
from .validate import validate
from .versions import migrate

__all__ = [
    "CURRENT_VERSION",
    "Config",
    "ConfigError",
    "FieldError",
    "dumps_json",
    "dumps_toml",
    "from_dict",
    "parse",
    "parse_json",
    "parse_toml",
    "to_api",
    "to_dict",
]

# A document larger than this is not a configuration, whatever it holds.
MAX_DOCUMENT_BYTES = 1 << 20


def from_dict(raw: Any) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError([FieldError("", "the document must be a table (JSON object)")])
    doc, errors = migrate(raw)
    if errors:
        raise ConfigError(errors)
    config = decode(Config, doc, "", errors)
    if errors:
        raise ConfigError(errors)
    errors = validate(config)
    if errors:
        raise ConfigError(errors)
    return config


def parse_toml(data: bytes | str) -> Config:
    text = _text(data)
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as e:
        # TOMLDecodeError, and the ValueError int() raises beyond 4300 digits.
        raise ConfigError([FieldError("", f"not valid TOML: {e}")]) from None
    return from_dict(raw)


def parse_json(data: bytes | str) -> Config:
    text = _text(data)
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ConfigError([FieldError("", f"not valid JSON: {e}")]) from None
    return from_dict(raw)


def parse(data: bytes, fmt: str) -> Config:
    """Parse `data` as "toml" or "json"."""
    if fmt == "json":
        return parse_json(data)
    if fmt == "toml":
        return parse_toml(data)
    raise ValueError(f"unknown config format {fmt!r}")


def _text(data: bytes | str) -> str:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError([FieldError("", f"larger than {MAX_DOCUMENT_BYTES} bytes")])
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [FieldError("", f"not UTF-8 text: {e.reason} at byte {e.start}")]
        ) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def to_dict(obj: Any, *, omit_defaults: bool = True) -> Any:
    """Plain data for `obj`, dropping fields left at their default (as omitempty does)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            if omit_defaults and f.name != "version" and _is_default(f, value):
                continue
            out[f.name] = to_dict(value, omit_defaults=omit_defaults)
        return out
    if isinstance(obj, tuple):
        return [to_dict(v, omit_defaults=omit_defaults) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v, omit_defaults=omit_defaults) for k, v in obj.items()}
    return obj


def to_api(obj: Any) -> Any:
    """Plain data for `obj` as IncusOS's JSON has it: a field marked `ALWAYS` (no
    `omitempty` there) is always present, even empty; any other is left out when empty
    (false, 0, "", an empty list or table, or not set), whatever its default. A
    sub-document that is set is present, as Go's non-nil pointers are."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {}
        always = _always(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if value is None:
                continue
            if f.name not in always and not dataclasses.is_dataclass(value) and not value:
                continue
            out[f.name] = to_api(value)
        return out
    if isinstance(obj, tuple):
        return [to_api(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_api(v) for k, v in obj.items()}
    return obj


_ALWAYS: dict[type, frozenset[str]] = {}


def _always(cls: type) -> frozenset[str]:
    """The fields of `cls` marked ALWAYS, read from its annotations once."""
    names = _ALWAYS.get(cls)
    if names is None:
        hints = typing.get_type_hints(cls, vars(model), include_extras=True)
        names = frozenset(
            name
            for name, hint in hints.items()
            if any(isinstance(m, model.Always) for m in getattr(hint, "__metadata__", ()))
        )
        _ALWAYS[cls] = names
    return names


def _is_default(f: dataclasses.Field[Any], value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return bool(value == f.default)
    if f.default_factory is not dataclasses.MISSING:
        return bool(value == f.default_factory())
    return False


def dumps_toml(config: Config) -> bytes:
    # Imported here: reading a config (the generator's slow path) does not need it.
    import tomli_w

    return tomli_w.dumps(to_dict(config)).encode()


def dumps_json(config: Config, *, omit_defaults: bool = True) -> bytes:
    return json.dumps(to_dict(config, omit_defaults=omit_defaults), indent=2).encode() + b"\n"
