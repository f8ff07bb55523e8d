"""What `/1.0/debug` shows of the machine (IncusOS's debug area): the kernel and its
modules, and the boot's TPM event log with the PCRs it adds up to.

Reads only, under a relocatable root (a recorded or built tree in tests), in IncusOS's
shapes (incus-osd/api/debug_kernel.go, internal/kernel/debug.go, api_debug.go).
"""

from __future__ import annotations

import base64
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import eventlog

if TYPE_CHECKING:
    from .tpm import Tpm

MODULES = "proc/modules"
CMDLINE = "proc/cmdline"
OSRELEASE = "proc/sys/kernel/osrelease"
# The PCRs IncusOS's event-log view keeps: boot loader code (4), Secure Boot policy (7)
# and the UKI's own measurements (11).
EVENT_LOG_PCRS = (4, 7, 11)
PCR_SYSFS = "sys/class/tpm/tpm0/pcr-sha256"
LOADER = "/lib64/ld-linux-x86-64.so.2"


@dataclass(frozen=True, slots=True)
class Module:
    name: str
    dependencies: tuple[str, ...]  # the modules this one uses, sorted
    in_use: bool  # its reference count is not zero

    def api(self) -> dict[str, Any]:
        return {"name": self.name, "dependencies": list(self.dependencies), "in_use": self.in_use}


def parse_modules(text: str) -> list[Module]:
    """/proc/modules: `name size refcount users, state address`. The fourth field lists
    the modules that use this one; IncusOS turns it round into each module's
    dependencies."""
    dependencies: dict[str, list[str]] = {}
    in_use: dict[str, bool] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        name = fields[0]
        dependencies.setdefault(name, [])
        in_use[name] = fields[2] != "0"
        if fields[3] == "-":
            continue
        for user in fields[3].rstrip(",").split(","):
            if user:
                dependencies.setdefault(user, []).append(name)
    return [
        Module(name, tuple(sorted(dependencies[name])), in_use.get(name, False))
        for name in sorted(dependencies)
    ]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return ""


def cpu_baseline() -> str:
    """The x86-64 micro-architecture level the dynamic loader says it supports (its
    `--help` lists them, best first), as IncusOS reports it: "x86_64_v3"; "" when there
    is no x86-64 loader."""
    if not os.access(LOADER, os.X_OK):
        return ""
    try:
        out = subprocess.run(
            [LOADER, "--help"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in out.splitlines():
        fields = line.split()
        if (
            len(fields) >= 2
            and fields[0].startswith("x86-64-v")
            and fields[1].startswith("(supported")
        ):
            return fields[0].replace("-", "_")
    return "x86_64_v1"


def kernel(root: Path | str = "/") -> dict[str, Any]:
    """IncusOS's DebugKernel (version, architecture, cpu_baseline, modules), plus the
    kernel command line this boot was given (`command_line`: ours)."""
    base = Path(root)
    if os.fspath(root) == "/":
        version, machine = platform.release(), platform.machine()
    else:  # a recorded tree: what its procfs says
        version, machine = _read(base / OSRELEASE), ""
    return {
        "version": version,
        "architecture": machine,
        "cpu_baseline": cpu_baseline() if machine == "x86_64" else "",
        "modules": [m.api() for m in parse_modules(_read(base / MODULES))],
        "command_line": _read(base / CMDLINE),
    }


def _sysfs_pcr(root: Path | str, pcr: int) -> bytes | None:
    text = _read(Path(root) / PCR_SYSFS / str(pcr))
    if re.fullmatch(r"[0-9A-Fa-f]{64}", text) is None:
        return None
    return bytes.fromhex(text)


def pcr_values(root: Path | str, tpm: Tpm | None, pcrs: tuple[int, ...]) -> dict[int, bytes]:
    """SHA-256 PCR values as the kernel shows them in sysfs (IncusOS's ReadPCR), else
    read from the TPM."""
    out = {pcr: v for pcr in pcrs if (v := _sysfs_pcr(root, pcr)) is not None}
    missing = [pcr for pcr in pcrs if pcr not in out]
    if missing and tpm is not None:
        out.update(tpm.pcr_read("sha256", missing))
    return out


def event_log(root: Path | str, tpm: Tpm | None) -> dict[str, Any]:
    """`GET /1.0/debug/secureboot/event-log`: the measured events of PCRs 4, 7 and 11 as
    go-eventlog's tcg.Event has them in JSON (`Index` is the PCR; `Data` and the SHA-256
    `Digest` in base64), and PCRs 4 and 7 in hex.

    Raises OSError or eventlog.EventLogError when there is no log or it does not parse,
    and LookupError when neither sysfs nor a TPM gives the PCRs."""
    log = eventlog.read(root)
    events = [
        {
            "Index": e.pcr,
            "Type": e.type,
            "Data": base64.b64encode(e.data).decode(),
            "Digest": base64.b64encode(e.digests.get("sha256", b"")).decode(),
        }
        for e in log.events
        if e.pcr in EVENT_LOG_PCRS and e.type != eventlog.EV_NO_ACTION
    ]
    pcrs = pcr_values(root, tpm, (4, 7))
    if set(pcrs) != {4, 7}:
        raise LookupError("neither sysfs nor a TPM gives PCRs 4 and 7")
    return {"event_log": events, "pcr4": pcrs[4].hex(), "pcr7": pcrs[7].hex()}
