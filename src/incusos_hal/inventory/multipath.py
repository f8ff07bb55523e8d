"""`multipath`, beside Incus's resources in its style: device-mapper multipath maps (dm uuid
"mpath-<wwid>") and their path devices with the SCSI device state, from sysfs alone (no
multipathd needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .sysfs import dev_number, listdir, read, read_int, resolve


@dataclass
class MultipathPath:
    id: str  # sda
    device: str
    state: str  # the SCSI device's: running, offline, blocked, ...
    hctl: str
    wwid: str


@dataclass
class MultipathMap:
    id: str  # dm-0
    name: str
    wwid: str
    device: str
    size: int
    read_only: bool
    paths: list[MultipathPath] = field(default_factory=list)


@dataclass
class Multipath:
    maps: list[MultipathMap]
    total: int


def scan_multipath(root: str | os.PathLike[str] = "/") -> Multipath:
    base = Path(root)
    blocks = base / "sys/class/block"
    maps = []
    for name in listdir(blocks):
        if not name.startswith("dm-"):
            continue
        dm = blocks / name
        uuid = read(dm / "dm/uuid") or ""
        if not uuid.startswith("mpath-"):
            continue
        mp = MultipathMap(
            id=name,
            name=read(dm / "dm/name") or "",
            wwid=uuid.removeprefix("mpath-"),
            device=dev_number(dm / "dev") or "",
            size=(read_int(dm / "size", 0) or 0) * 512,
            read_only=read(dm / "ro") == "1",
        )
        for slave in listdir(dm / "slaves"):
            path = blocks / slave
            scsi = resolve(path / "device")
            mp.paths.append(
                MultipathPath(
                    id=slave,
                    device=dev_number(path / "dev") or "",
                    state=read(path / "device/state") or "",
                    hctl=scsi.name if scsi is not None else "",
                    wwid=read(path / "device/wwid") or "",
                )
            )
        maps.append(mp)
    return Multipath(maps=maps, total=len(maps))
