"""Typed inventory: the sections of Incus's `GET /1.0/resources`, field for field.

Names, order, units and omission follow lxc/incus `shared/api/resource.go` (the copy the
tests check against is noted in tests/schema/): a field marked `omitempty` there carries
OMIT here and leaves the JSON when it holds its zero value, as Go's encoder does. Sizes
are bytes, frequencies MHz, speeds Mbit/s.

Each section's dataclasses live in the section's module (`inventory.storage.Disk`), so
a command asking for one section builds only that section's classes; the names are
also reachable here, loaded on first use.
"""

from __future__ import annotations

import dataclasses
import importlib

from .omit import OMIT

# Not `typing.TYPE_CHECKING`: importing typing is a cost the inventory command does not pay.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .cpu import CPU, CPUAddressSizes, CPUCache, CPUCore, CPUSocket, CPUThread
    from .gpu import GPU, GPUDRM, GPUCard
    from .load import Load
    from .memory import Memory, MemoryNode
    from .pci import PCI, PCIVPD, PCIDevice
    from .serial import Serial, SerialDevice
    from .storage import Disk, Partition, Storage
    from .system import Chassis, Firmware, Motherboard, System
    from .usb import USB, USBDevice, USBInterface


# Class name -> the section module that defines it.
_HOMES = {
    **dict.fromkeys(
        ("CPU", "CPUAddressSizes", "CPUCache", "CPUCore", "CPUSocket", "CPUThread"), "cpu"
    ),
    **dict.fromkeys(("GPU", "GPUDRM", "GPUCard"), "gpu"),
    "Load": "load",
    **dict.fromkeys(("Memory", "MemoryNode"), "memory"),
    **dict.fromkeys(("PCI", "PCIVPD", "PCIDevice"), "pci"),
    **dict.fromkeys(("Serial", "SerialDevice"), "serial"),
    **dict.fromkeys(("Disk", "Partition", "Storage"), "storage"),
    **dict.fromkeys(("Chassis", "Firmware", "Motherboard", "System"), "system"),
    **dict.fromkeys(("USB", "USBDevice", "USBInterface"), "usb"),
}

__all__ = [
    "CPU",
    "GPU",
    "GPUDRM",
    "OMIT",
    "PCI",
    "PCIVPD",
    "USB",
    "CPUAddressSizes",
    "CPUCache",
    "CPUCore",
    "CPUSocket",
    "CPUThread",
    "Chassis",
    "Disk",
    "Firmware",
    "GPUCard",
    "Load",
    "Memory",
    "MemoryNode",
    "Motherboard",
    "PCIDevice",
    "Partition",
    "Serial",
    "SerialDevice",
    "Storage",
    "System",
    "USBDevice",
    "USBInterface",
    "to_json",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __package__), name)


# A class -> (attribute, JSON key, omitempty) per field in order, None if not a
# dataclass: worked out once per class rather than once per value.
_PLANS: dict[type, tuple[tuple[str, str, bool], ...] | None] = {}


def _plan(cls: type) -> tuple[tuple[str, str, bool], ...] | None:
    try:
        return _PLANS[cls]
    except KeyError:
        plan = None
        if dataclasses.is_dataclass(cls):
            plan = tuple(
                (
                    f.metadata.get("json", f.name),
                    f.metadata.get("key", f.name),
                    bool(f.metadata.get("omitempty")),
                )
                for f in dataclasses.fields(cls)
            )
        _PLANS[cls] = plan
        return plan


def to_json(value: Any) -> Any:
    """Plain JSON data from inventory dataclasses, omitting empty omitempty fields."""
    plan = _plan(type(value))
    if plan is not None:
        out: dict[str, Any] = {}
        for attribute, key, omitempty in plan:
            item = getattr(value, attribute)
            if omitempty and item in (None, "", 0, False, [], {}):
                continue
            out[key] = to_json(item)
        return out
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value
