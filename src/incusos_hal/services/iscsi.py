"""`/1.0/services/iscsi`: an iSCSI initiator (IncusOS's ServiceISCSI), with open-iscsi.

What IncusOS does (lxc/incus-os, incus-osd/internal/services/service_iscsi.go), the same
way:
  stop     `iscsiadm -m node -T <target> -p <portal> --logout` per target (errors ignored:
           not logged in), then iscsid.service stopped.
  start    /etc/iscsi/initiatorname.iscsi made if absent (`iscsi-iname` with IncusOS's
           prefix, as open-iscsi's package makes it with Debian's), an empty iscsid.conf
           if there is none, iscsid.service started; per target a sendtargets discovery
           (retried ten times) and a login, each fatal.
State: the initiator's name.
"""

from __future__ import annotations

import re
import time
from typing import Any

from ..config.model import ServiceISCSIConfig, ServiceISCSITarget
from .base import (
    Machine,
    ServiceError,
    SystemService,
    compute,
    load_modules,
    read_text,
    write_private,
)

INITIATOR_NAME = "etc/iscsi/initiatorname.iscsi"
ISCSID_CONF = "etc/iscsi/iscsid.conf"
# The prefix IncusOS gives `iscsi-iname` (its initiator names start with it).
INAME_PREFIX = "iqn.2004-10.org.linuxcontainers:01"
_INAME = re.compile(r"iqn\.[a-z0-9.:-]+")
ATTEMPTS, PAUSE_S = 10, 0.5


def read_state(machine: Machine, config: ServiceISCSIConfig) -> dict[str, Any]:
    return {"initiator_name": initiator_name(read_text(machine.path(INITIATOR_NAME)))}


def initiator_name(text: str) -> str:
    """The name in an initiatorname.iscsi file, as iscsid reads it: the value of its
    InitiatorName= line; comment lines (Debian's package writes five) and others aside."""
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key == "InitiatorName":
            return value.strip()
    return ""


def portal(target: ServiceISCSITarget) -> str:
    """iscsiadm's -p: `address[:port]`, an IPv6 address in brackets."""
    host = f"[{target.address}]" if ":" in target.address else target.address
    return f"{host}:{target.port}" if target.port > 0 else host


def ensure_initiator(machine: Machine) -> None:
    if not machine.path(INITIATOR_NAME).exists():
        name = compute(["iscsi-iname", "-p", INAME_PREFIX]).strip()
        if _INAME.fullmatch(name) is None:
            raise ServiceError(f"iscsi-iname gave no iSCSI name: {name[:64]!r}")
        write_private(machine, INITIATOR_NAME, f"InitiatorName={name}\n".encode())
    if not machine.path(ISCSID_CONF).exists():
        write_private(machine, ISCSID_CONF, b"")


def stop(machine: Machine, config: ServiceISCSIConfig) -> None:
    if not config.enabled:
        return
    for target in config.targets:
        machine.run(
            ["iscsiadm", "-m", "node", "-T", target.target, "-p", portal(target), "--logout"],
            check=False,
        )
    machine.run(["systemctl", "stop", "iscsid.service", "iscsid.socket"])


def start(machine: Machine, config: ServiceISCSIConfig) -> None:
    if not config.enabled:
        return
    ensure_initiator(machine)
    # iscsiadm's discovery needs the kernel's iSCSI transport ("iSCSI driver not found"
    # otherwise: the VM rung's first run).
    load_modules(machine, ["iscsi_tcp"])
    machine.run(["systemctl", "start", "iscsid.service"])
    for target in config.targets:
        p = portal(target)
        discovery = ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", p]
        for attempt in range(ATTEMPTS):
            try:
                machine.run(discovery)
                break
            except ServiceError:
                if attempt + 1 == ATTEMPTS:
                    raise
                time.sleep(PAUSE_S)
        machine.run(["iscsiadm", "-m", "node", "-T", target.target, "-p", p, "--login"])


def apply(machine: Machine, old: ServiceISCSIConfig, new: ServiceISCSIConfig) -> None:
    stop(machine, old)
    start(machine, new)


SERVICE = SystemService(
    name="iscsi",
    summary="an iSCSI initiator logged in to its targets (open-iscsi)",
    tools=("iscsiadm", "iscsi-iname", "systemctl"),
    read_state=read_state,
    apply=apply,
    files=(INITIATOR_NAME, ISCSID_CONF),
)
