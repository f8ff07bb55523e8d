"""The `pci` section from /sys/bus/pci/devices, names from pci.ids, and the devices'
Vital Product Data (PCI Local Bus spec, VPD large/small resources) parsed with every
length checked against the buffer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .hwdata import pci_names
from .omit import OMIT
from .sysfs import driver_of, link_name, listdir, numa_node_of, read_hex_id


@dataclass
class PCIVPD:
    """Incus's ResourcesPCIVPD."""

    product_name: str = field(default="", metadata=OMIT)
    entries: dict[str, str] = field(default_factory=dict, metadata=OMIT)


@dataclass
class PCIDevice:
    """Incus's ResourcesPCIDevice."""

    driver: str
    driver_version: str
    numa_node: int
    pci_address: str
    vendor: str
    vendor_id: str
    product: str
    product_id: str
    iommu_group: int
    vpd: PCIVPD


@dataclass
class PCI:
    """Incus's ResourcesPCI."""

    devices: list[PCIDevice]
    total: int


VPD_ID_STRING, VPD_RO, VPD_RW, VPD_END = 0x82, 0x90, 0x91, 0x78
MAX_VPD = 32768


def parse_vpd(data: bytes) -> PCIVPD:
    """Product name (identifier string) and the read-only/read-write keywords of a VPD
    image. Truncated or malformed resources end the parse; what came before stands."""
    vpd = PCIVPD()
    pos = 0
    while pos < len(data):
        tag = data[pos]
        if tag & 0x80 == 0:  # small resource: the end tag, or something we skip
            if tag & 0x78 == VPD_END:
                break
            pos += 1 + (tag & 0x07)
            continue
        if pos + 3 > len(data):
            break
        length = data[pos + 1] | data[pos + 2] << 8
        body = data[pos + 3 : pos + 3 + length]
        if len(body) != length:
            break
        if tag == VPD_ID_STRING:
            vpd.product_name = body.decode("ascii", errors="replace").strip("\x00 ")
        elif tag in (VPD_RO, VPD_RW):
            i = 0
            while i + 3 <= len(body):
                key = body[i : i + 2].decode("ascii", errors="replace")
                size = body[i + 2]
                value = body[i + 3 : i + 3 + size]
                if len(value) != size:
                    break
                # RV (checksum) and RW (free space) are not data.
                if key not in ("RV", "RW") and key.isalnum():
                    vpd.entries[key] = value.decode("ascii", errors="replace").strip("\x00 ")
                i += 3 + size
        pos += 3 + length
    return vpd


def _vpd(path: Path) -> PCIVPD:
    try:
        with open(path, "rb") as f:
            return parse_vpd(f.read(MAX_VPD))
    except OSError:
        return PCIVPD()


def scan_pci(root: str | os.PathLike[str] = "/") -> PCI:
    base = Path(root)
    devices = []
    bus = base / "sys/bus/pci/devices"
    for address in listdir(bus):
        device = bus / address
        vendor_id = read_hex_id(device / "vendor") or ""
        product_id = read_hex_id(device / "device") or ""
        vendor, product = pci_names(base, vendor_id, product_id)
        driver, version = driver_of(base, device)
        group = link_name(device / "iommu_group")
        devices.append(
            PCIDevice(
                driver=driver or "",
                driver_version=version or "",
                numa_node=numa_node_of(device),
                pci_address=address,
                vendor=vendor,
                vendor_id=vendor_id,
                product=product,
                product_id=product_id,
                iommu_group=int(group) if group and group.isdigit() else 0,
                vpd=_vpd(device / "vpd"),
            )
        )
    return PCI(devices=devices, total=len(devices))
