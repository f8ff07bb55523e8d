"""PCI and USB vendor/product names from the system's pci.ids and usb.ids (hwdata), the
same files lspci, lsusb and Incus read. Parsed once per root, lazily, tolerant of junk."""

from __future__ import annotations

import functools
import re
from pathlib import Path

PCI_IDS = ("usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids")
USB_IDS = ("usr/share/misc/usb.ids", "usr/share/hwdata/usb.ids")
Names = tuple[dict[str, str], dict[tuple[str, str], str]]
_BLOCK_END = re.compile(r"\n[^\t#\n]")


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
def _text(root: str, candidates: tuple[str, ...]) -> str:
    for candidate in candidates:
        try:
            return Path(root, candidate).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
    return ""


def load(root: str, candidates: tuple[str, ...]) -> Names:
    """The whole file parsed (for `record`, which cuts it down)."""
    return parse_ids(_text(root, candidates))


@functools.lru_cache(maxsize=4096)
def _lookup(root: str, candidates: tuple[str, ...], vendor: str, device: str) -> tuple[str, str]:
    """One vendor's and device's names, found with str.find in the file's text rather than
    by parsing all of it: a cold `incusos-hal inventory` looks up a dozen ids, and
    parsing pci.ids whole costs more than the rest of the scan."""
    text = _text(root, candidates)
    if len(vendor) != 4 or len(device) != 4:
        return "", ""
    start = 0 if text.startswith(vendor + "  ") else text.find("\n" + vendor + "  ")
    if start < 0:
        return "", ""
    line_end = text.find("\n", start + 1)
    vendor_name = text[start : line_end if line_end >= 0 else None].split("  ", 1)[1].strip()
    # The vendor's block ends at the next line that is not indented, a comment or empty
    # (a regular expression: Intel's block is thousands of lines).
    after = _BLOCK_END.search(text, line_end) if line_end >= 0 else None
    block = text[line_end : after.start() if after else None]
    at = block.find("\n\t" + device + "  ")
    if at < 0:
        return vendor_name, ""
    end = block.find("\n", at + 1)
    return vendor_name, block[at + 2 + 4 : end if end >= 0 else None].strip()


def pci_names(root: Path, vendor_id: str, product_id: str) -> tuple[str, str]:
    return _lookup(str(root), PCI_IDS, vendor_id.lower(), product_id.lower())


def usb_names(root: Path, vendor_id: str, product_id: str) -> tuple[str, str]:
    return _lookup(str(root), USB_IDS, vendor_id.lower(), product_id.lower())
