"""The `load` section from /proc/loadavg.

Incus's ResourcesLoad has no JSON tags, so its keys are the Go field names
(Average1Min, ...), and Average10Min carries the kernel's 15 minute average. Both quirks
are kept by default, for clients written against Incus; `snake_case=True` gives
{"average_1min", "average_5min", "average_15min", "processes"} instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .sysfs import read

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


# Incus's struct has no json tags, so Go writes the field names as they are.
@dataclass
class Load:
    """Incus's ResourcesLoad."""

    Average1Min: float  # Incus's keys, see above
    Average5Min: float
    Average10Min: float  # Incus fills it from the 15 minute average
    Processes: int


def scan_load(root: str | os.PathLike[str] = "/") -> Load:
    fields = (read(Path(root, "proc/loadavg")) or "").split()
    try:
        averages = [float(x) for x in fields[:3]]
        processes = int(fields[3].split("/")[1])
    except (ValueError, IndexError):
        return Load(0.0, 0.0, 0.0, 0)
    return Load(averages[0], averages[1], averages[2], processes)


def snake_case(load: dict[str, Any]) -> dict[str, Any]:
    """The compatibility switch: Incus's keys -> what they mean."""
    return {
        "average_1min": load["Average1Min"],
        "average_5min": load["Average5Min"],
        "average_15min": load["Average10Min"],
        "processes": load["Processes"],
    }
