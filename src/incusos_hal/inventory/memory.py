"""The `memory` section from /proc/meminfo and the NUMA nodes' meminfo in sysfs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .omit import OMIT
from .sysfs import listdir, read


@dataclass
class MemoryNode:
    """Incus's ResourcesMemoryNode."""

    numa_node: int
    hugepages_used: int
    hugepages_total: int
    used: int
    total: int


@dataclass
class Memory:
    """Incus's ResourcesMemory."""

    nodes: list[MemoryNode] = field(default_factory=list, metadata=OMIT)
    hugepages_total: int = 0
    hugepages_used: int = 0
    hugepages_size: int = 0
    used: int = 0
    total: int = 0


def parse_meminfo(text: str | None) -> dict[str, int]:
    """ "Key:   123 kB" lines (or "Node 0 Key: 123 kB") -> bytes (counts stay counts)."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        words = key.split()
        if not words:
            continue
        parts = value.split()
        try:
            number = int(parts[0])
        except (IndexError, ValueError):
            continue
        out[words[-1]] = number * 1024 if parts[1:2] == ["kB"] else number
    return out


def _used(info: dict[str, int]) -> int:
    total = info.get("MemTotal", 0)
    if "MemAvailable" in info:
        return max(total - info["MemAvailable"], 0)
    free = info.get("MemFree", 0) + info.get("FilePages", info.get("Cached", 0))
    return max(total - free, 0)


def scan_memory(root: str | os.PathLike[str] = "/") -> Memory:
    info = parse_meminfo(read(Path(root, "proc/meminfo")))
    page = info.get("Hugepagesize", 0)
    memory = Memory(
        hugepages_total=info.get("HugePages_Total", 0) * page,
        hugepages_used=(info.get("HugePages_Total", 0) - info.get("HugePages_Free", 0)) * page,
        hugepages_size=page,
        used=_used(info),
        total=info.get("MemTotal", 0),
    )
    nodes = Path(root, "sys/devices/system/node")
    for name in listdir(nodes):
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        node = parse_meminfo(read(nodes / name / "meminfo"))
        if "MemTotal" not in node:
            continue
        memory.nodes.append(
            MemoryNode(
                numa_node=int(name[4:]),
                hugepages_used=(node.get("HugePages_Total", 0) - node.get("HugePages_Free", 0))
                * page,
                hugepages_total=node.get("HugePages_Total", 0) * page,
                used=max(
                    node.get("MemTotal", 0) - node.get("MemFree", 0) - node.get("FilePages", 0), 0
                ),
                total=node["MemTotal"],
            )
        )
    memory.nodes.sort(key=lambda n: n.numa_node)
    return memory
