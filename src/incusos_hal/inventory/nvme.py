"""The `nvme` addition to Incus's resources, in its style: subsystems, controllers with
their transport and namespaces, from /sys/class/nvme-subsystem and /sys/class/nvme, with
what Identify Controller and the SMART log tell (through inventory.probe)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import probe
from .storage import SECTOR
from .sysfs import listdir, numa_node_of, pci_address_of, read, read_int, resolve

# Not `typing.TYPE_CHECKING`. For a type only: the ioctls load when a device is asked
# (inventory.probe), so a scan of a recorded tree does not pay for ctypes and the parser.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..hal import nvme


@dataclass
class NVMeNamespace:
    id: str  # block device name
    nsid: int
    size: int
    block_size: int
    wwid: str = ""
    nguid: str = ""
    uuid: str = ""
    paths: list[str] = field(default_factory=list)  # nvmeXcYnZ path devices, when multipathed


@dataclass
class SmartSummary:
    """A drive's health as IncusOS's storage state gives it (enabled, passed), with the
    NVMe health log's main counters. Temperature in degrees Celsius."""

    enabled: bool
    passed: bool
    temperature: int
    power_on_hours: int
    power_cycles: int
    unsafe_shutdowns: int
    media_errors: int
    percent_used: int
    available_spare: int


def smart_summary(log: nvme.SmartLog) -> SmartSummary:
    return SmartSummary(
        enabled=True,
        passed=log.critical_warning == 0,
        temperature=log.temperature - 273 if log.temperature else 0,
        power_on_hours=log.power_on_hours,
        power_cycles=log.power_cycles,
        unsafe_shutdowns=log.unsafe_shutdowns,
        media_errors=log.media_errors,
        percent_used=log.percent_used,
        available_spare=log.avail_spare,
    )


@dataclass
class NVMeController:
    id: str  # nvme0
    serial: str
    model: str
    firmware_version: str
    transport: str  # pcie, tcp, fc, rdma, loop
    address: str  # PCI address, or "traddr=...,trsvcid=..." for fabrics
    state: str
    cntlid: int
    numa_node: int
    namespaces: list[NVMeNamespace] = field(default_factory=list)
    subsystem_nqn: str = ""  # from Identify Controller, when the device could be asked
    smart: SmartSummary | None = None


@dataclass
class NVMeSubsystem:
    id: str  # nvme-subsys0
    nqn: str
    model: str
    serial: str
    iopolicy: str
    controllers: list[NVMeController] = field(default_factory=list)


@dataclass
class NVMe:
    subsystems: list[NVMeSubsystem]
    total: int  # controllers


def _namespace(block: Path, name: str) -> NVMeNamespace:
    return NVMeNamespace(
        id=name,
        nsid=read_int(block / "nsid", 0) or 0,
        size=(read_int(block / "size", 0) or 0) * SECTOR,
        block_size=read_int(block / "queue/logical_block_size", 0) or 0,
        wwid=read(block / "wwid") or "",
        nguid=read(block / "nguid") or "",
        uuid=read(block / "uuid") or "",
    )


PATH_DEVICE = re.compile(r"^nvme\d+c(\d+)n(\d+)$")


def _controller(root: Path, name: str, src: probe.Source) -> NVMeController:
    ctrl = root / "sys/class/nvme" / name
    device = resolve(ctrl / "device")
    transport = read(ctrl / "transport") or ""
    address = read(ctrl / "address") or ""
    if transport == "pcie" and device is not None:
        address = pci_address_of(device) or address
    controller = NVMeController(
        id=name,
        serial=read(ctrl / "serial") or "",
        model=read(ctrl / "model") or "",
        firmware_version=read(ctrl / "firmware_rev") or "",
        transport=transport,
        address=address,
        state=read(ctrl / "state") or "",
        cntlid=read_int(ctrl / "cntlid", 0) or 0,
        numa_node=numa_node_of(device) if device is not None else 0,
    )
    identified = probe.id_ctrl(src, name)
    if identified is not None:
        controller.subsystem_nqn = identified.subnqn
    log = probe.smart(src, name)
    if log is not None:
        controller.smart = smart_summary(log)
    for child in listdir(ctrl):
        # Private namespaces (nvme0n1) live under their controller.
        if re.fullmatch(rf"{name}n\d+", child) and (ctrl / child / "nsid").exists():
            controller.namespaces.append(_namespace(ctrl / child, child))
    return controller


def scan_nvme(root: str | os.PathLike[str] = "/") -> NVMe:
    """Subsystems with their controllers. A namespace shared by several controllers
    (native NVMe multipath: fabrics, dual-port drives) is the head device under the
    subsystem; each controller holds a path device nvme<S>c<C>n<N> to it."""
    base = Path(root)
    src = probe.source(root)
    subsystems: list[NVMeSubsystem] = []
    controllers = 0
    subsys_dir = base / "sys/class/nvme-subsystem"
    for sname in listdir(subsys_dir):
        sub = subsys_dir / sname
        subsystem = NVMeSubsystem(
            id=sname,
            nqn=read(sub / "subsysnqn") or "",
            model=read(sub / "model") or "",
            serial=read(sub / "serial") or "",
            iopolicy=read(sub / "iopolicy") or "",
        )
        heads = {
            head.nsid: head
            for head in (
                _namespace(sub / child, child)
                for child in listdir(sub)
                if re.fullmatch(r"nvme\d+n\d+", child) and (sub / child / "nsid").exists()
            )
        }
        members = [
            c
            for c in listdir(sub)
            if re.fullmatch(r"nvme\d+", c) and (base / "sys/class/nvme" / c).exists()
        ]
        if not members and subsystem.nqn:
            # A tree without the subsystem's links to its controllers: the NQN names the
            # subsystem uniquely, and each controller states its own.
            members = [
                c
                for c in listdir(base / "sys/class/nvme")
                if read(base / "sys/class/nvme" / c / "subsysnqn") == subsystem.nqn
            ]
        for cname in members:
            controller = _controller(base, cname, src)
            for child in listdir(base / "sys/class/nvme" / cname):
                match = PATH_DEVICE.match(child)
                head = heads.get(int(match.group(2))) if match else None
                if head is not None:
                    head.paths.append(child)
                    if head not in controller.namespaces:
                        controller.namespaces.append(head)
            subsystem.controllers.append(controller)
            controllers += 1
        subsystems.append(subsystem)
    return NVMe(subsystems=subsystems, total=controllers)
