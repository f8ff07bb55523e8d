"""`/1.0/services/nvme`: NVMe over TCP and Fibre Channel (IncusOS's ServiceNVME).

What IncusOS does (lxc/incus-os, incus-osd/internal/services/service_nvme.go), done the
same way with nvme-cli:
  stop     `nvme disconnect-all`, /etc/nvme/discovery.conf removed.
  start    the modules (nvme, nvme-fabrics, nvme-tcp or nvme-fc) loaded; /etc/nvme/hostnqn
           (`nvme gen-hostnqn`) and hostid (a random UUID) made if absent, as nvme-cli's
           package does; a target with an NQN connected directly (`nvme connect`, fatal
           if it never answers), every other one discovered (`nvme discover`, not fatal:
           a controller may be offline) and written to discovery.conf, then
           `nvme connect-all` connects what discovery.conf lists. nvme-cli's own
           nvmf-autoconnect.service reads the same file at boot.
  reset    the NQN targets connected again (errors ignored: already connected), then
           `nvme connect-all`.
State: the host's NQN and ID, and the subsystems with their controllers and namespaces
from /sys/class/nvme-subsystem.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from ..config.model import ServiceNVMEConfig, ServiceNVMETarget
from .base import (
    Machine,
    ServiceError,
    SystemService,
    compute,
    load_modules,
    read_text,
    write_private,
)

HOSTNQN = "etc/nvme/hostnqn"
HOSTID = "etc/nvme/hostid"
DISCOVERY = "etc/nvme/discovery.conf"
SUBSYSTEMS = "sys/class/nvme-subsystem"
FC_HOSTS = "sys/class/fc_host"
_CONTROLLER = re.compile(r"nvme[0-9]+")
_NAMESPACE = re.compile(r"(nvme[0-9]+)c[0-9]+(n[0-9]+)")
# One word of discovery.conf: nvme-cli splits its lines at blanks and reads `#` as a comment.
_WORD = re.compile(r"--[a-z-]+=[\x21-\x22\x24-\x7e]+")
# IncusOS tries a target ten times, half a second apart.
ATTEMPTS, PAUSE_S = 10, 0.5


def read_state(machine: Machine, config: ServiceNVMEConfig) -> dict[str, Any]:
    return {
        "host_id": read_text(machine.path(HOSTID)),
        "host_nqn": read_text(machine.path(HOSTNQN)),
        "subsystems": subsystems(machine),
    }


def subsystems(machine: Machine) -> list[dict[str, Any]]:
    base = machine.sys(SUBSYSTEMS)
    out: list[dict[str, Any]] = []
    try:
        names = sorted(p.name for p in base.iterdir())
    except OSError:
        return out
    for name in names:
        path = base / name
        controllers = []
        try:
            entries = sorted(p.name for p in path.iterdir())
        except OSError:
            continue
        for entry in entries:
            if _CONTROLLER.fullmatch(entry) is None:
                continue
            ctrl = path / entry
            try:
                inside = sorted(p.name for p in ctrl.iterdir())
            except OSError:
                inside = []
            namespaces = [m[1] + m[2] for n in inside if (m := _NAMESPACE.fullmatch(n))]
            controllers.append(
                {
                    "name": entry,
                    "transport": read_text(ctrl / "transport"),
                    "address": read_text(ctrl / "address"),
                    "state": read_text(ctrl / "state"),
                    "namespaces": namespaces,
                }
            )
        out.append({"name": name, "nqn": read_text(path / "subsysnqn"), "controllers": controllers})
    return out


def connections(machine: Machine, target: ServiceNVMETarget) -> list[list[str]]:
    """nvme-cli's arguments for each path to `target` (one per local FC port)."""
    if target.transport != "fc":
        return [
            [f"--transport={target.transport}", f"--traddr={target.address}",
             f"--trsvcid={target.port}"]
        ]  # fmt: skip
    hosts = [target.host_address] if target.host_address else fc_host_addresses(machine)
    if not hosts:
        raise ServiceError(f"no local Fibre Channel port found for NVME target {target.address!r}")
    return [
        [f"--transport={target.transport}", f"--traddr={target.address}", f"--host-traddr={h}"]
        for h in hosts
    ]


def fc_host_addresses(machine: Machine) -> list[str]:
    base = machine.sys(FC_HOSTS)
    try:
        hosts = sorted(base.iterdir())
    except OSError:
        return []
    out = []
    for host in hosts:
        node, port = read_text(host / "node_name"), read_text(host / "port_name")
        if node and port:
            out.append(f"nn-{node}:pn-{port}")
    return out


def discovery_conf(lines: list[list[str]]) -> bytes:
    """/etc/nvme/discovery.conf: one connection a line, each word checked to be one
    word of nvme-cli's (an option and its value, no blank, no comment sign)."""
    out = []
    for words in lines:
        for word in words:
            if _WORD.fullmatch(word) is None:
                raise ValueError(f"not a discovery.conf word: {word!r}")
        out.append(" ".join(words) + "\n")
    return "".join(out).encode()


def ensure_identity(machine: Machine) -> None:
    """hostnqn and hostid, made once as nvme-cli's package makes them."""
    if not machine.path(HOSTNQN).exists():
        nqn = compute(["nvme", "gen-hostnqn"]).strip()
        if not nqn.startswith("nqn.") or not nqn.isprintable() or " " in nqn:
            raise ServiceError(f"nvme gen-hostnqn gave no NQN: {nqn[:64]!r}")
        write_private(machine, HOSTNQN, nqn.encode() + b"\n")
    if not machine.path(HOSTID).exists():
        write_private(machine, HOSTID, str(uuid.uuid4()).encode() + b"\n")


def _retry(machine: Machine, argv: list[str]) -> bool:
    for attempt in range(ATTEMPTS):
        try:
            machine.run(argv)
            return True
        except ServiceError:
            if attempt + 1 < ATTEMPTS:
                time.sleep(PAUSE_S)
    return False


def stop(machine: Machine, config: ServiceNVMEConfig) -> None:
    if not config.enabled:
        return
    machine.run(["nvme", "disconnect-all"])
    machine.path(DISCOVERY).unlink(missing_ok=True)


def start(machine: Machine, config: ServiceNVMEConfig) -> None:
    if not config.enabled:
        return
    modules = ["nvme", "nvme-fabrics"]
    for target in config.targets:
        module = "nvme-fc" if target.transport == "fc" else "nvme-tcp"
        if module not in modules:
            modules.append(module)
    load_modules(machine, modules)
    ensure_identity(machine)
    discovered: list[list[str]] = []
    for target in config.targets:
        paths = connections(machine, target)
        if target.nqn:
            connected = [
                _retry(machine, ["nvme", "connect", f"--nqn={target.nqn}", *p]) for p in paths
            ]
            if not any(connected):
                raise ServiceError(
                    f"couldn't connect to NVME subsystem {target.nqn!r} on {target.address!r}"
                )
            continue
        for p in paths:
            _retry(machine, ["nvme", "discover", *p])  # not fatal: IncusOS's too
            discovered.append(p)
    write_private(machine, DISCOVERY, discovery_conf(discovered))
    machine.run(["nvme", "connect-all"])


def apply(machine: Machine, old: ServiceNVMEConfig, new: ServiceNVMEConfig) -> None:
    stop(machine, old)
    start(machine, new)


def reset(machine: Machine, config: ServiceNVMEConfig) -> None:
    if not config.enabled:
        raise ServiceError("NVME isn't currently enabled", 400)
    for target in config.targets:
        if target.nqn:
            for p in connections(machine, target):
                machine.run(["nvme", "connect", f"--nqn={target.nqn}", *p], check=False)
    machine.run(["nvme", "connect-all"])


SERVICE = SystemService(
    name="nvme",
    summary="NVMe over TCP and Fibre Channel targets (nvme-cli)",
    tools=("nvme", "systemctl"),
    read_state=read_state,
    apply=apply,
    files=(HOSTNQN, HOSTID, DISCOVERY),
    reset=reset,
)
