"""A host survey for migration tools: the per-machine facts a migration needs (in the
manner of FuturFusion migration-manager's instance properties), from a live machine, a
recorded tree, or a mounted disk image of another machine.

A disk image has files but no sysfs or procfs: firmware, Secure Boot, TPM, CPUs, memory
and the hardware behind disks and NICs cannot be known from it, and the survey says so
in `unknown` (field -> why) instead of guessing. What the image's own files tell (OS
release, host name, machine id, an EFI system partition in its fstab) is reported, the
last as a hint rather than a fact; the architecture is its shell's (ELF header).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .cpu import scan_cpu
from .memory import scan_memory
from .network import scan_network
from .secureboot import scan_secure_boot
from .storage import scan_storage
from .sysfs import read
from .system import scan_system
from .tpm import scan_tpm


def os_release(root: Path) -> dict[str, str]:
    """os-release(5): KEY=value lines, values optionally quoted."""
    text = read(root / "etc/os-release") or read(root / "usr/lib/os-release") or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


ELF_MACHINES = {
    0x03: "i686",
    0x28: "armv7l",
    0x3E: "x86_64",
    0xB7: "aarch64",
    0xF3: "riscv64",
    0x15: "ppc64le",
    0x16: "s390x",
}


def elf_architecture(root: Path) -> str:
    """The architecture an image's own shell was built for (ELF e_machine)."""
    for rel in ("usr/bin/sh", "bin/sh", "usr/bin/env"):
        path = root / rel
        try:
            # An absolute symlink inside the image points into the image, not this host.
            while path.is_symlink():
                target = os.readlink(path)
                path = root / target.lstrip("/") if target.startswith("/") else path.parent / target
            with open(path, "rb") as f:
                head = f.read(20)
        except OSError:
            continue
        if len(head) == 20 and head[:4] == b"\x7fELF":
            machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
            return ELF_MACHINES.get(machine, "")
    return ""


def kind_of(root: Path) -> str:
    if root.resolve() == Path("/"):
        return "live"
    if (root / "sys/class").is_dir() or (root / "proc/cpuinfo").is_file():
        return "recorded"
    return "image"


def survey(root: str | os.PathLike[str] = "/") -> dict[str, Any]:
    base = Path(root)
    kind = kind_of(base)
    release = os_release(base)
    out: dict[str, Any] = {
        "source": kind,
        "hostname": read(base / "etc/hostname") or "",
        "machine_id": (read(base / "etc/machine-id") or "").replace("uninitialized", ""),
        "os": {
            "name": release.get("NAME", ""),
            "id": release.get("ID", ""),
            "version": release.get("VERSION", ""),
            "version_id": release.get("VERSION_ID", ""),
            "pretty_name": release.get("PRETTY_NAME", ""),
        },
        "unknown": {},
        "hints": {},
    }
    if kind == "image":
        why = "a disk image has no sysfs or procfs: only the running machine can tell"
        for key in (
            "firmware",
            "secure_boot",
            "tpm",
            "cpus",
            "memory",
            "disks",
            "nics",
            "uuid",
        ):
            out[key] = None
            out["unknown"][key] = why
        out["architecture"] = elf_architecture(base) or None
        if out["architecture"] is None:
            out["unknown"]["architecture"] = "no ELF shell in the image to read it from"
        fstab = read(base / "etc/fstab") or ""
        if any(
            len(f) > 1 and f[1] in ("/boot/efi", "/efi")
            for f in (line.split() for line in fstab.splitlines() if not line.startswith("#"))
        ):
            out["hints"]["firmware"] = "uefi: its fstab mounts an EFI system partition"
        return out
    cpu = scan_cpu(base)
    system = scan_system(base)
    secure = scan_secure_boot(base)
    out["uuid"] = system.uuid
    out["architecture"] = cpu.architecture
    out["cpus"] = cpu.total
    out["memory"] = scan_memory(base).total
    out["firmware"] = secure.firmware
    out["secure_boot"] = secure.enabled
    out["tpm"] = scan_tpm(base).total > 0
    out["disks"] = [
        {"id": d.id, "size": d.size, "serial": d.serial, "model": d.model, "wwn": d.wwn}
        for d in scan_storage(base).disks
    ]
    out["nics"] = [
        {"id": p["id"], "mac": p.get("address", ""), "driver": card.get("driver", "")}
        for card in scan_network(base)["cards"]
        for p in card.get("ports", [])
    ]
    if not system.uuid:
        out["unknown"]["uuid"] = "no DMI product_uuid (no DMI, or not readable)"
    return out
