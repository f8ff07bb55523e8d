"""The `storage` section (disks and partitions, from /sys/class/block and udev's
database), and the `nvme` addition: subsystems, controllers with their transport and
namespaces, from /sys/class/nvme-subsystem and /sys/class/nvme.

A disk is a block device backed by hardware (it has a `device` link) and not a
partition; loop, zram, device-mapper and md devices are not disks, as in Incus.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import probe
from .model import OMIT
from .sysfs import (
    by_links,
    dev_number,
    link_name,
    listdir,
    numa_node_of,
    pci_address_of,
    read,
    read_int,
    resolve,
    udev_properties,
    usb_address_of,
)

TYPE_CHECKING = False  # not typing's: the storage section does not import typing
if TYPE_CHECKING:
    # For a type only: the ioctls load when a device is asked (inventory.probe), so
    # the storage section, which reads sysfs, does not pay for ctypes and the NVMe parser.
    from ..hal import nvme


@dataclass
class Partition:
    """Incus's ResourcesStorageDiskPartition."""

    id: str
    device: str
    read_only: bool
    size: int
    partition: int


@dataclass
class Disk:
    """Incus's ResourcesStorageDisk."""

    id: str
    device: str
    model: str = field(default="", metadata=OMIT)
    type: str = field(default="", metadata=OMIT)
    read_only: bool = False
    size: int = 0
    removable: bool = False
    wwn: str = field(default="", metadata=OMIT)
    numa_node: int = 0
    device_path: str = field(default="", metadata=OMIT)
    block_size: int = 0
    firmware_version: str = field(default="", metadata=OMIT)
    rpm: int = 0
    serial: str = field(default="", metadata=OMIT)
    device_id: str = ""
    partitions: list[Partition] = field(default_factory=list)
    pci_address: str = field(default="", metadata=OMIT)
    usb_address: str = field(default="", metadata=OMIT)


@dataclass
class Storage:
    """Incus's ResourcesStorage."""

    disks: list[Disk]
    total: int


SECTOR = 512


def _type(device: Path, props: dict[str, str]) -> str:
    """nvme, virtio, scsi, usb, sata, ... as Incus names the bus a disk is on."""
    if props.get("ID_BUS") == "ata" or props.get("ID_ATA") == "1":
        return "sata"
    if props.get("ID_BUS") == "usb":
        return "usb"
    subsystem = link_name(device / "subsystem")
    if subsystem in ("nvme", "nvme-subsystem"):  # a multipath head's parent is its subsystem
        return "nvme"
    if subsystem == "virtio":
        return "virtio"
    if subsystem == "scsi":
        return "scsi"
    return subsystem or ""


def _partitions(block: Path, name: str) -> list[Partition]:
    out = []
    for child in listdir(block):
        part = block / child
        number = read_int(part / "partition")
        dev = dev_number(part / "dev")
        if number is None or dev is None or not child.startswith(name):
            continue
        out.append(
            Partition(
                id=child,
                device=dev,
                read_only=read(part / "ro") == "1",
                size=(read_int(part / "size", 0) or 0) * SECTOR,
                partition=number,
            )
        )
    out.sort(key=lambda p: p.partition)
    return out


def _disk(root: Path, name: str, src: probe.Source) -> Disk | None:
    block = root / "sys/class/block" / name
    if (block / "partition").exists() or not (block / "device").exists():
        return None
    dev = dev_number(block / "dev")
    if dev is None:
        return None
    device = resolve(block / "device")
    props = udev_properties(root, "b", dev)
    disk = Disk(id=name, device=dev)
    if device is not None:
        disk.type = _type(device, props)
        disk.model = read(device / "model") or props.get("ID_MODEL", "").replace("_", " ")
        disk.serial = (
            read(device / "serial")
            or props.get("ID_SCSI_SERIAL")
            or props.get("ID_SERIAL_SHORT", "")
        )
        disk.firmware_version = (
            read(device / "firmware_rev") or read(device / "rev") or props.get("ID_REVISION", "")
        )
        disk.numa_node = numa_node_of(device)
        disk.pci_address = pci_address_of(device) or ""
        disk.usb_address = usb_address_of(root, device) or ""
    if not disk.serial and disk.type in ("scsi", "sata", "usb"):
        # No udev database (a container, an early boot): ask the device itself.
        disk.serial = probe.vpd_serial(src, name) or ""
    wwid = read(block / "wwid") or read(block / "device/wwid")
    disk.wwn = props.get("ID_WWN_WITH_EXTENSION") or props.get("ID_WWN") or wwid or ""
    disk.read_only = read(block / "ro") == "1"
    disk.removable = read(block / "removable") == "1"
    disk.size = (read_int(block / "size", 0) or 0) * SECTOR
    disk.block_size = read_int(block / "queue/logical_block_size", 0) or 0
    rotational = read(block / "queue/rotational") == "1"
    rpm = props.get("ID_ATA_ROTATION_RATE_RPM", "")
    disk.rpm = int(rpm) if rotational and rpm.isdigit() else 0
    ids = by_links(root, "disk/by-id", name)
    # udev's preferred name first: wwn- and nvme-eui. are stable across controllers.
    ids.sort(key=lambda n: (not n.startswith(("nvme-eui.", "wwn-")), n))
    disk.device_id = ids[0] if ids else ""
    paths = by_links(root, "disk/by-path", name)
    disk.device_path = paths[0] if paths else props.get("ID_PATH", "")
    disk.partitions = _partitions(block, name)
    return disk


def scan_storage(root: str | os.PathLike[str] = "/") -> Storage:
    base = Path(root)
    src = probe.source(root)
    disks = []
    for name in listdir(base / "sys/class/block"):
        if name.startswith(("loop", "ram", "zram", "dm-", "md", "sr", "nbd")):
            continue
        disk = _disk(base, name, src)
        if disk is not None:
            disks.append(disk)
    return Storage(disks=disks, total=len(disks))


# NVMe detail (an addition to Incus's resources, in its style)


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
