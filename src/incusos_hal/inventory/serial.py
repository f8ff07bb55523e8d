"""The `serial` section: serial ports with hardware behind them (USB adapters, real
UARTs), from /sys/class/tty, with their /dev/serial links and USB identity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .hwdata import usb_names
from .sysfs import by_links, dev_number, link_name, listdir, read, read_hex_id, resolve


@dataclass
class SerialDevice:
    """Incus's ResourcesSerialDevice."""

    id: str
    device: str
    device_id: str
    device_path: str
    driver: str
    vendor: str
    vendor_id: str
    product: str
    product_id: str


@dataclass
class Serial:
    """Incus's ResourcesSerial."""

    devices: list[SerialDevice]
    total: int


def _usb_parent(device: Path) -> Path | None:
    current = device
    for _ in range(6):
        if (current / "idVendor").exists():
            return current
        if current.parent == current:
            break
        current = current.parent
    return None


def scan_serial(root: str | os.PathLike[str] = "/") -> Serial:
    base = Path(root)
    devices = []
    for name in listdir(base / "sys/class/tty"):
        tty = base / "sys/class/tty" / name
        device = resolve(tty / "device")
        if device is None:
            continue  # virtual terminals and ptys
        driver = link_name(tty / "device/driver") or ""
        # serial_core ports exist whether or not a UART answers: PORT_UNKNOWN (0) is none.
        if read(tty / "type") == "0":
            continue
        dev = dev_number(tty / "dev")
        if dev is None:
            continue
        usb = _usb_parent(device)
        vendor_id = read_hex_id(usb / "idVendor") if usb else None
        product_id = read_hex_id(usb / "idProduct") if usb else None
        vendor, product = usb_names(base, vendor_id or "", product_id or "")
        ids = by_links(base, "serial/by-id", name)
        paths = by_links(base, "serial/by-path", name)
        devices.append(
            SerialDevice(
                id=name,
                device=dev,
                device_id=f"/dev/serial/by-id/{ids[0]}" if ids else "",
                device_path=f"/dev/serial/by-path/{paths[0]}" if paths else "",
                driver=driver,
                vendor=vendor or (read(usb / "manufacturer") or "" if usb else ""),
                vendor_id=vendor_id or "",
                product=product or (read(usb / "product") or "" if usb else ""),
                product_id=product_id or "",
            )
        )
    return Serial(devices=devices, total=len(devices))
