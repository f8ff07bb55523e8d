"""Device-mapper as sysfs shows it, under `root` (a recorded tree stands in for the
machine): which mappings are active, and which are LUKS volumes on which device. Plain
file reads, nothing else imported: the API service asks this at start, on machines with
or without libcryptsetup and cffi."""

from __future__ import annotations

from pathlib import Path


def open_luks(root: Path | str = "/") -> dict[str, str]:
    """The LUKS volumes open now (device-mapper's sysfs view, under `root`): {mapping name:
    the kernel name of the one device under it}. dm-crypt marks a LUKS mapping's uuid
    `CRYPT-LUKS<version>-...`; a plain dm-crypt one (`CRYPT-PLAIN-`) is not LUKS."""
    out = {}
    for dm in sorted((Path(root) / "sys/block").glob("dm-*")):
        try:
            if not (dm / "dm/uuid").read_text().startswith("CRYPT-LUKS"):
                continue
            name = (dm / "dm/name").read_text().strip()
            slaves = sorted(p.name for p in (dm / "slaves").iterdir())
        except OSError:
            continue
        if len(slaves) == 1:
            out[name] = slaves[0]
    return out


def mapped(name: str, root: Path | str = "/") -> bool:
    """Is /dev/mapper/`name` active (device-mapper's sysfs view, under `root`)?"""
    for dm in (Path(root) / "sys/block").glob("dm-*"):
        try:
            if (dm / "dm/name").read_text().strip() == name:
                return True
        except OSError:
            continue
    return False
