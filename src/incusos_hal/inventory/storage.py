"""The `storage` section: disks and partitions, from /sys/class/block and udev's
database. (The `nvme` addition is inventory.nvme.)

A disk is a block device backed by hardware (it has a `device` link) and not a
partition; loop, zram, device-mapper and md devices are not disks, as in Incus.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from . import probe
from .omit import OMIT
from .sysfs import (
    dev_number,
    link_name,
    links_by_target,
    listdir,
    numa_node_of,
    pci_address_of,
    read,
    read_int,
    resolve,
    udev_properties,
    usb_address_of,
)


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


SECTOR = 512  # the unit of a block device's `size`


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
        # A partition is named after its disk (sda1, nvme0n1p1); the disk's other
        # entries (queue, holders, size, ...) are not read at all.
        if not child.startswith(name) or child == name:
            continue
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


def _disk(
    root: Path, name: str, src: probe.Source, links: dict[str, dict[str, list[str]]]
) -> Disk | None:
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
    ids = list(links["disk/by-id"].get(name, []))
    # udev's preferred name first: wwn- and nvme-eui. are stable across controllers.
    ids.sort(key=lambda n: (not n.startswith(("nvme-eui.", "wwn-")), n))
    disk.device_id = ids[0] if ids else ""
    paths = links["disk/by-path"].get(name, [])
    disk.device_path = paths[0] if paths else props.get("ID_PATH", "")
    disk.partitions = _partitions(block, name)
    return disk


def scan_storage(root: str | os.PathLike[str] = "/") -> Storage:
    base = Path(root)
    src = probe.source(root)
    links = {d: links_by_target(base, d) for d in ("disk/by-id", "disk/by-path")}
    disks = []
    for name in listdir(base / "sys/class/block"):
        if name.startswith(("loop", "ram", "zram", "dm-", "md", "sr", "nbd")):
            continue
        disk = _disk(base, name, src, links)
        if disk is not None:
            disks.append(disk)
    return Storage(disks=disks, total=len(disks))
