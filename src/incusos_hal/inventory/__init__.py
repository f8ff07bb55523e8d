"""The machine's inventory in the shape of Incus's resources API (GET /1.0/resources).

Sections land one by one (the inventory HAL's issue); asking for one that has not landed
yet is an error naming it, never an empty answer that looks like "no hardware".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from .network import scan_network

SCANNERS: dict[str, Callable[[str | os.PathLike[str]], dict[str, Any]]] = {
    "network": scan_network,
}
# Incus's sections, in its order; those without a scanner are not built yet.
INCUS_SECTIONS = (
    "cpu",
    "memory",
    "gpu",
    "network",
    "storage",
    "usb",
    "pci",
    "system",
    "load",
    "serial",
)


class UnknownSection(ValueError):
    pass


def scan(root: str | os.PathLike[str] = "/", sections: Iterable[str] = ()) -> dict[str, Any]:
    wanted = list(sections) or list(SCANNERS)
    for name in wanted:
        if name not in SCANNERS:
            if name in INCUS_SECTIONS:
                raise UnknownSection(f"inventory section {name!r} is not implemented yet")
            raise UnknownSection(f"no inventory section {name!r}")
    return {name: SCANNERS[name](root) for name in wanted}
