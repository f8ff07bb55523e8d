"""Validation errors that name the field they are about."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    """A document that is not a valid configuration; carries every problem found."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def child(path: str, key: str | int) -> str:
    """The path of a member: `network` + `dns` -> `network.dns`, + 0 -> `...[0]`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key):
        return f"{path}.{key}" if path else key
    if key.isprintable() and '"' not in key and "\\" not in key:
        return f'{path}["{key}"]'
    # A key from the document itself: quoted as JSON, so no line break or quote in it can
    # forge another line or path in the message.
    return f"{path}[{json.dumps(key)}]"
