"""Schema versions: every stored document carries `version`; older ones are upgraded here.

A migration takes the raw document of version N and returns version N+1. Documents from a
newer incusos-hal are refused rather than half-understood.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import model
from .errors import FieldError
from .formats import show_int

Document = dict[str, Any]

# version N -> function turning a version-N document into version N+1.
MIGRATIONS: dict[int, Callable[[Document], Document]] = {}


def migrate(raw: Document) -> tuple[Document, list[FieldError]]:
    version = raw.get("version")
    if version is None:
        version = model.CURRENT_VERSION
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 10:
        version = int(version)  # IncusOS writes its seed versions as strings
    if not isinstance(version, int) or isinstance(version, bool):
        return raw, [FieldError("version", "expected an integer")]
    if version > model.CURRENT_VERSION:
        return raw, [
            FieldError(
                "version",
                f"{show_int(version)} was written by a newer incusos-hal; this one reads up to "
                f"{model.CURRENT_VERSION}",
            )
        ]
    if version < 1:
        return raw, [
            FieldError("version", f"{show_int(version)} is not a valid version (1 or later)")
        ]
    doc = dict(raw)
    while version < model.CURRENT_VERSION:
        doc = MIGRATIONS[version](doc)
        version += 1
    doc["version"] = version
    return doc, []
