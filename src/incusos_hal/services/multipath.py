"""`/1.0/services/multipath`: device-mapper multipath for the listed disks (IncusOS's
ServiceMultipath), with multipath-tools.

IncusOS (lxc/incus-os, incus-osd/internal/services/service_multipath.go) refuses a WWN
with no /dev/disk/by-id/wwn-<WWN>, adds each disk to /etc/multipath/wwids
(`multipath -a`), starts multipathd.service and reloads (`multipath -r`); disabling
removes /etc/multipath, reloads and stops multipathd. Here the same choice of disks is
written as /etc/multipath.conf, which needs no disk present to be right and says it in
one place: every device blacklisted but the listed WWNs (their SCSI WWIDs, "3" and the
NAA digits), find_multipaths "no" so that those are taken at once. multipathd reads it
when started and on `multipath -r`.

State: the local Fibre Channel ports (/sys/class/fc_host) and, while enabled, each listed
WWN's map from sysfs (the dm map whose uuid is mpath-<WWID>, its paths and their SCSI
state), through the inventory's multipath reader.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..config.errors import FieldError, child
from ..config.model import ServiceMultipathConfig
from .base import Machine, SystemService, read_text, write_private

CONF = "etc/multipath.conf"
FC_HOSTS = "sys/class/fc_host"
BY_ID = "dev/disk/by-id"
# A quoted value of multipath.conf: its parser ends a string at `"` and knows no escapes.
_VALUE = re.compile(r"[\x20\x21\x23-\x7e]*")
_FC_FIELDS = (
    "fabric_name", "node_name", "port_name", "port_state", "port_type", "speed",
    "supported_speeds",
)  # fmt: skip


def wwid(wwn: str) -> str:
    """The SCSI WWID multipath names a disk by: NAA designators are type "3"."""
    return "3" + wwn.removeprefix("0x")


def _quoted(value: str) -> str:
    if _VALUE.fullmatch(value) is None:
        raise ValueError(f"not a multipath.conf string: {value!r}")
    return f'"{value}"'


def render(config: ServiceMultipathConfig) -> bytes:
    """/etc/multipath.conf for `config` (enabled): only the listed disks multipathed."""
    lines = [
        "# Written by incusos-hal from /1.0/services/multipath: only the listed WWNs.",
        "defaults {",
        "\tuser_friendly_names no",
        f"\tfind_multipaths {_quoted('no')}",
        "}",
        "blacklist {",
        f"\twwid {_quoted('.*')}",
        "}",
        "blacklist_exceptions {",
        *(f"\twwid {_quoted('^' + re.escape(wwid(w)) + '$')}" for w in config.wwns),
        "}",
    ]
    return ("\n".join(lines) + "\n").encode()


def check(config: ServiceMultipathConfig, root: str) -> list[FieldError]:
    """IncusOS's rule: an enabled service's WWNs are disks this machine has."""
    if not config.enabled:
        return []
    errors = []
    for i, wwn in enumerate(config.wwns):
        if not Path(root, BY_ID, f"wwn-{wwn}").exists():
            where = child(child(child("services", "multipath"), "wwns"), i)
            errors.append(FieldError(where, f'failed to locate WWN "{wwn}"'))
    return errors


def controllers(machine: Machine) -> list[dict[str, str]]:
    try:
        hosts = sorted(machine.sys(FC_HOSTS).iterdir())
    except OSError:
        return []
    return [{name: read_text(host / name) for name in _FC_FIELDS} for host in hosts]


def _size(size: int) -> str:
    """A size as multipath -ll writes it (size=10G): one decimal below 10 of a unit."""
    value, unit = float(size), ""
    for unit in ("", "K", "M", "G", "T", "P"):
        if value < 1024 or unit == "P":
            break
        value /= 1024
    return f"{value:.1f}{unit}" if value < 10 and unit else f"{value:.0f}{unit}"


def devices(machine: Machine, config: ServiceMultipathConfig) -> dict[str, Any]:
    from ..inventory.multipath import scan_multipath

    maps = {m.wwid: m for m in scan_multipath(machine.root).maps}
    out: dict[str, Any] = {}
    for wwn in config.wwns:
        found = maps.get(wwid(wwn))
        if found is None:
            continue
        first = found.paths[0].id if found.paths else ""
        block = machine.sys(f"sys/class/block/{first}/device")
        vendor = ",".join(v for v in (read_text(block / "vendor"), read_text(block / "model")) if v)
        out[wwn] = {
            "vendor": vendor,
            "size": _size(found.size),
            # sysfs tells the paths, not dm's grouping of them: one group, no policy.
            "path_groups": [
                {
                    "policy": "",
                    "priority": 0,
                    "status": "",
                    "paths": [{"id": p.hctl, "status": p.state} for p in found.paths],
                }
            ],
        }
    return out


def read_state(machine: Machine, config: ServiceMultipathConfig) -> dict[str, Any]:
    return {
        "controllers": controllers(machine),
        "devices": devices(machine, config) if config.enabled else {},
    }


def apply(machine: Machine, old: ServiceMultipathConfig, new: ServiceMultipathConfig) -> None:
    if new.enabled:
        write_private(machine, CONF, render(new))
        machine.run(["systemctl", "start", "multipathd.service"])
        machine.run(["multipath", "-r"])
    elif old.enabled:
        machine.path(CONF).unlink(missing_ok=True)
        machine.run(["multipath", "-r"])
        machine.run(["systemctl", "stop", "multipathd.service", "multipathd.socket"])


SERVICE = SystemService(
    name="multipath",
    summary="device-mapper multipath for the listed disks (multipath-tools)",
    tools=("multipath", "multipathd", "systemctl"),
    read_state=read_state,
    apply=apply,
    files=(CONF,),
    check=check,
)
