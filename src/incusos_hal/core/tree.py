"""What a renderer produces: a tree of files and symlinks, keyed by path.

Pure data. Writing it anywhere is the job of `incusos_hal.core.files`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class File:
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Symlink:
    target: str


Entry = File | Symlink
# Paths are absolute ("/run/systemd/network/...") for the configure step's files and
# relative ("multi-user.target.wants/...") for a generator's output directory.
Tree = dict[str, Entry]
