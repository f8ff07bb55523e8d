"""The `gpu` section: display-class PCI devices (class 0x03), with their DRM nodes."""

from __future__ import annotations

import os
from pathlib import Path

from .hwdata import pci_names
from .model import GPU, GPUDRM, GPUCard
from .sysfs import dev_number, driver_of, listdir, numa_node_of, read_hex_id, read_int


def _drm(device: Path) -> GPUDRM | None:
    drm = device / "drm"
    cards = [n for n in listdir(drm) if n.startswith("card") and n[4:].isdigit()]
    if not cards:
        return None
    card = cards[0]
    out = GPUDRM(id=int(card[4:]), card_name=card, card_device=dev_number(drm / card / "dev") or "")
    for name in listdir(drm):
        if name.startswith("renderD"):
            out.render_name, out.render_device = name, dev_number(drm / name / "dev") or ""
        elif name.startswith("controlD"):
            out.control_name, out.control_device = name, dev_number(drm / name / "dev") or ""
    return out


def scan_gpu(root: str | os.PathLike[str] = "/") -> GPU:
    base = Path(root)
    bus = base / "sys/bus/pci/devices"
    cards = []
    for address in listdir(bus):
        device = bus / address
        pci_class = read_int(device / "class", base=16)
        if pci_class is None or pci_class >> 16 != 0x03:
            continue
        vendor_id = read_hex_id(device / "vendor") or ""
        product_id = read_hex_id(device / "device") or ""
        vendor, product = pci_names(base, vendor_id, product_id)
        driver, version = driver_of(base, device)
        cards.append(
            GPUCard(
                driver=driver or "",
                driver_version=version or "",
                drm=_drm(device),
                numa_node=numa_node_of(device),
                pci_address=address,
                vendor=vendor,
                vendor_id=vendor_id,
                product=product,
                product_id=product_id,
            )
        )
    return GPU(cards=cards, total=len(cards))
