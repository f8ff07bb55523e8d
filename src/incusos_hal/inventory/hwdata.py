"""PCI and USB vendor/product names from the system's pci.ids and usb.ids (hwdata), the
same files lspci, lsusb and Incus read. Parsed once per root, lazily, tolerant of junk."""

from __future__ import annotations

import functools
from pathlib import Path

PCI_IDS = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids")
USB_IDS = ("usr/share/misc/usb.ids", "usr/share/hwdata/usb.ids")
Names = tuple[dict[str, str], dict[tuple[str, str], str]]


def parse_ids(text: str) -> Names:
    """Vendors and (vendor, device) names from an .ids file. Lines: "vvvv  Name", then
    tab "dddd  Name"; two tabs are subsystems; class sections (after "C ") end vendors."""
    vendors: dict[str, str] = {}
    devices: dict[tuple[str, str], str] = {}
    vendor = ""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("\t\t"):
            continue
        if line.startswith("\t"):
            ident, _, name = line[1:].partition("  ")
            if vendor and len(ident) == 4:
                devices[(vendor, ident.lower())] = name.strip()
            continue
        ident, _, name = line.partition("  ")
        if len(ident) == 4 and all(c in "0123456789abcdefABCDEF" for c in ident):
            vendor = ident.lower()
            vendors[vendor] = name.strip()
        else:
            vendor = ""  # "C 03 ...", "AT ...": classes and other tables follow
    return vendors, devices


@functools.lru_cache(maxsize=8)
def load(root: str, candidates: tuple[str, ...]) -> Names:
    for candidate in candidates:
        try:
            text = Path(root, candidate).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        return parse_ids(text)
    return {}, {}


def pci_names(root: Path, vendor_id: str, product_id: str) -> tuple[str, str]:
    vendors, devices = load(str(root), PCI_IDS)
    return vendors.get(vendor_id, ""), devices.get((vendor_id, product_id), "")


def usb_names(root: Path, vendor_id: str, product_id: str) -> tuple[str, str]:
    vendors, devices = load(str(root), USB_IDS)
    return vendors.get(vendor_id, ""), devices.get((vendor_id, product_id), "")
