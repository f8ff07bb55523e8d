"""The machine's inventory in the shape of Incus's resources API (GET /1.0/resources).

`scan(root, sections)` gives JSON-ready data, section by section, field for field as
Incus writes it; the per-section scanners (`scan_cpu`, `scan_storage`, ...) give the
typed dataclasses behind it (inventory.model) for programs importing the HAL. Additions
in the same style: `nvme` (subsystems, controllers, transports, namespaces),
`tpm`, `secure_boot`, `fibre_channel`, `multipath` (inventory.extra). Everything
reads under `root`, so a recorded tree replays a machine. Asking for a section that does
not exist is an error naming it, never an empty answer that looks like "no hardware".
"""

from __future__ import annotations

import importlib
import os

from . import probe
from .model import to_json

# Not `typing.TYPE_CHECKING`: importing typing is a cost the inventory command does not pay.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from .cpu import scan_cpu
    from .fibrechannel import scan_fibre_channel
    from .gpu import scan_gpu
    from .load import scan_load
    from .memory import scan_memory
    from .multipath import scan_multipath
    from .network import scan_network
    from .nvme import scan_nvme
    from .pci import scan_pci
    from .secureboot import scan_secure_boot
    from .serial import scan_serial
    from .storage import scan_storage
    from .system import scan_system
    from .tpm import scan_tpm
    from .usb import scan_usb

Root = str | os.PathLike[str]
# Section -> (module, scanner). Modules load when their section is asked for: a command
# that wants one section does not pay for the others' imports.
SCANNERS: dict[str, tuple[str, str]] = {
    "cpu": ("cpu", "scan_cpu"),
    "memory": ("memory", "scan_memory"),
    "gpu": ("gpu", "scan_gpu"),
    "network": ("network", "scan_network"),
    "storage": ("storage", "scan_storage"),
    "usb": ("usb", "scan_usb"),
    "pci": ("pci", "scan_pci"),
    "system": ("system", "scan_system"),
    "load": ("load", "scan_load"),
    "serial": ("serial", "scan_serial"),
    # additions, not in Incus's resources
    "nvme": ("nvme", "scan_nvme"),
    "tpm": ("tpm", "scan_tpm"),
    "secure_boot": ("secureboot", "scan_secure_boot"),
    "fibre_channel": ("fibrechannel", "scan_fibre_channel"),
    "multipath": ("multipath", "scan_multipath"),
}


def scanner(section: str) -> Callable[[Root], Any]:
    module, function = SCANNERS[section]
    found: Callable[[Root], Any] = getattr(
        importlib.import_module(f".{module}", __name__), function
    )
    return found


def __getattr__(name: str) -> Any:
    for module, function in SCANNERS.values():
        if function == name:
            return getattr(importlib.import_module(f".{module}", __name__), function)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Incus's sections, in its order: what `scan()` returns when not told otherwise.
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

__all__ = [
    "INCUS_SECTIONS",
    "SCANNERS",
    "UnknownSection",
    "scan",
    "scan_cpu",
    "scan_fibre_channel",
    "scan_gpu",
    "scan_load",
    "scan_memory",
    "scan_multipath",
    "scan_network",
    "scan_nvme",
    "scan_pci",
    "scan_secure_boot",
    "scan_serial",
    "scan_storage",
    "scan_system",
    "scan_tpm",
    "scan_usb",
    "scan_with_warnings",
    "scanner",
]


class UnknownSection(ValueError):
    pass


def scan(
    root: Root = "/", sections: Iterable[str] = (), *, load_snake_case: bool = False
) -> dict[str, Any]:
    """Sections (default: Incus's) as JSON data. `load_snake_case` is the compatibility
    switch for the `load` section's keys (see inventory.load)."""
    wanted = list(sections) or list(INCUS_SECTIONS)
    for name in wanted:
        if name not in SCANNERS:
            raise UnknownSection(f"no inventory section {name!r} (known: {', '.join(SCANNERS)})")
    out = {name: to_json(scanner(name)(root)) for name in wanted}
    if load_snake_case and "load" in out:
        from .load import snake_case

        out["load"] = snake_case(out["load"])
    return out


def scan_with_warnings(
    root: Root = "/", sections: Iterable[str] = (), *, load_snake_case: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """scan(), and what it had to leave out and why (a device reply that failed its
    checks, say): the document stays Incus-shaped, the warnings go to the operator."""
    collected, token = probe.collecting()
    try:
        return scan(root, sections, load_snake_case=load_snake_case), collected
    finally:
        probe.stop_collecting(token)
