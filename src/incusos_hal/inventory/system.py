"""The `system` section from DMI (/sys/class/dmi/id) and what kind of machine this is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .sysfs import read


@dataclass
class Firmware:
    """Incus's ResourcesSystemFirmware."""

    vendor: str
    date: str
    version: str


@dataclass
class Chassis:
    """Incus's ResourcesSystemChassis."""

    vendor: str
    type: str
    serial: str
    version: str


@dataclass
class Motherboard:
    """Incus's ResourcesSystemMotherboard."""

    vendor: str
    product: str
    serial: str
    version: str


@dataclass
class System:
    """Incus's ResourcesSystem."""

    uuid: str
    vendor: str
    product: str
    family: str
    version: str
    sku: str
    serial: str
    type: str
    firmware: Firmware | None
    chassis: Chassis | None
    motherboard: Motherboard | None


# SMBIOS 3.x, 7.4.1: chassis types.
CHASSIS_TYPES = {
    1: "Other",
    2: "Unknown",
    3: "Desktop",
    4: "Low Profile Desktop",
    5: "Pizza Box",
    6: "Mini Tower",
    7: "Tower",
    8: "Portable",
    9: "Laptop",
    10: "Notebook",
    11: "Hand Held",
    12: "Docking Station",
    13: "All in One",
    14: "Sub Notebook",
    15: "Space-saving",
    16: "Lunch Box",
    17: "Main Server Chassis",
    18: "Expansion Chassis",
    19: "SubChassis",
    20: "Bus Expansion Chassis",
    21: "Peripheral Chassis",
    22: "RAID Chassis",
    23: "Rack Mount Chassis",
    24: "Sealed-case PC",
    25: "Multi-system chassis",
    26: "Compact PCI",
    27: "Advanced TCA",
    28: "Blade",
    29: "Blade Enclosure",
    30: "Tablet",
    31: "Convertible",
    32: "Detachable",
    33: "IoT Gateway",
    34: "Embedded PC",
    35: "Mini PC",
    36: "Stick PC",
}
# Firmware strings vendors leave in unset fields: not information.
PLACEHOLDERS = {
    "",
    "None",
    "Not Specified",
    "Not Applicable",
    "To be filled by O.E.M.",
    "To Be Filled By O.E.M.",
    "Default string",
    "System Serial Number",
    "System Product Name",
    "0123456789",
}


def machine_type(root: Path) -> str:
    """container, virtual-machine or physical (what `systemd-detect-virt` would say,
    from the files it reads), unknown when a recorded tree does not tell."""
    if (root / "run/systemd/container").exists() or (root / ".dockerenv").exists():
        return "container"
    cpuinfo = read(root / "proc/cpuinfo")
    if cpuinfo is None:
        return "unknown"
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    if " hypervisor" in flags or (root / "sys/hypervisor/type").exists():
        return "virtual-machine"
    return "physical"


def scan_system(root: str | os.PathLike[str] = "/") -> System:
    base = Path(root)
    dmi = base / "sys/class/dmi/id"

    def field(name: str) -> str:
        value = read(dmi / name) or ""
        return "" if value in PLACEHOLDERS else value

    chassis_type = read(dmi / "chassis_type") or ""
    has_dmi = dmi.is_dir()
    return System(
        uuid=field("product_uuid"),
        vendor=field("sys_vendor"),
        product=field("product_name"),
        family=field("product_family"),
        version=field("product_version"),
        sku=field("product_sku"),
        serial=field("product_serial"),
        type=machine_type(base),
        firmware=Firmware(field("bios_vendor"), field("bios_date"), field("bios_version"))
        if has_dmi
        else None,
        chassis=Chassis(
            field("chassis_vendor"),
            CHASSIS_TYPES.get(int(chassis_type), "") if chassis_type.isdigit() else "",
            field("chassis_serial"),
            field("chassis_version"),
        )
        if has_dmi
        else None,
        motherboard=Motherboard(
            field("board_vendor"),
            field("board_name"),
            field("board_serial"),
            field("board_version"),
        )
        if has_dmi
        else None,
    )
