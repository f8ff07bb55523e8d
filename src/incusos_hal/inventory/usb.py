"""The `usb` section from /sys/bus/usb/devices, names from usb.ids."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .hwdata import usb_names
from .sysfs import driver_of, listdir, read, read_hex_id, read_int


@dataclass
class USBInterface:
    """Incus's ResourcesUSBDeviceInterface."""

    class_: str = field(metadata={"key": "class", "json": "class_"})
    class_id: int = 0
    driver: str = ""
    driver_version: str = ""
    number: int = 0
    subclass: str = ""
    subclass_id: int = 0


@dataclass
class USBDevice:
    """Incus's ResourcesUSBDevice."""

    bus_address: int
    device_address: int
    serial: str
    interfaces: list[USBInterface]
    vendor: str
    vendor_id: str
    product: str
    product_id: str
    speed: float


@dataclass
class USB:
    """Incus's ResourcesUSB."""

    devices: list[USBDevice]
    total: int


# The USB-IF's base classes (usb.ids "C" section has them too; these are the stable ones).
CLASSES = {
    0x01: "Audio",
    0x02: "Communications",
    0x03: "Human Interface Device",
    0x05: "Physical Interface Device",
    0x06: "Imaging",
    0x07: "Printer",
    0x08: "Mass Storage",
    0x09: "Hub",
    0x0A: "CDC Data",
    0x0B: "Chip/SmartCard",
    0x0D: "Content Security",
    0x0E: "Video",
    0x0F: "Personal Healthcare",
    0x10: "Audio/Video",
    0xDC: "Diagnostic",
    0xE0: "Wireless",
    0xEF: "Miscellaneous Device",
    0xFE: "Application Specific Interface",
    0xFF: "Vendor Specific Class",
}


def scan_usb(root: str | os.PathLike[str] = "/") -> USB:
    base = Path(root)
    bus = base / "sys/bus/usb/devices"
    devices = []
    for name in listdir(bus):
        if ":" in name:
            continue  # interfaces are read with their device
        device = bus / name
        busnum, devnum = read_int(device / "busnum"), read_int(device / "devnum")
        vendor_id, product_id = read_hex_id(device / "idVendor"), read_hex_id(device / "idProduct")
        if busnum is None or devnum is None or vendor_id is None or product_id is None:
            continue
        vendor, product = usb_names(base, vendor_id, product_id)
        interfaces = []
        for child in listdir(device):
            if not child.startswith(name + ":"):
                continue
            iface = device / child
            class_id = read_int(iface / "bInterfaceClass", 0, 16) or 0
            driver, version = driver_of(base, iface)
            interfaces.append(
                USBInterface(
                    class_=CLASSES.get(class_id, ""),
                    class_id=class_id,
                    driver=driver or "",
                    driver_version=version or "",
                    number=read_int(iface / "bInterfaceNumber", 0, 16) or 0,
                    subclass="",
                    subclass_id=read_int(iface / "bInterfaceSubClass", 0, 16) or 0,
                )
            )
        try:
            speed = float(read(device / "speed") or 0)
        except ValueError:
            speed = 0.0
        devices.append(
            USBDevice(
                bus_address=busnum,
                device_address=devnum,
                serial=read(device / "serial") or "",
                interfaces=interfaces,
                vendor=vendor or read(device / "manufacturer") or "",
                vendor_id=vendor_id,
                product=product or read(device / "product") or "",
                product_id=product_id,
                speed=speed,
            )
        )
    return USB(devices=devices, total=len(devices))
