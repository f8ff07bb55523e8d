"""The `gpu` section: display-class PCI devices (class 0x03), with their DRM nodes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .omit import OMIT
from .pci import scan_pci
from .sysfs import dev_number, listdir, read_int


@dataclass
class GPUDRM:
    """Incus's ResourcesGPUCardDRM."""

    id: int
    card_name: str
    card_device: str
    control_name: str = field(default="", metadata=OMIT)
    control_device: str = field(default="", metadata=OMIT)
    render_name: str = field(default="", metadata=OMIT)
    render_device: str = field(default="", metadata=OMIT)


@dataclass
class GPUCard:
    """Incus's ResourcesGPUCard."""

    driver: str = field(default="", metadata=OMIT)
    driver_version: str = field(default="", metadata=OMIT)
    drm: GPUDRM | None = field(default=None, metadata=OMIT)
    numa_node: int = 0
    pci_address: str = field(default="", metadata=OMIT)
    vendor: str = field(default="", metadata=OMIT)
    vendor_id: str = field(default="", metadata=OMIT)
    product: str = field(default="", metadata=OMIT)
    product_id: str = field(default="", metadata=OMIT)
    usb_address: str = field(default="", metadata=OMIT)


@dataclass
class GPU:
    """Incus's ResourcesGPU."""

    cards: list[GPUCard]
    total: int


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
    bus = Path(root, "sys/bus/pci/devices")
    cards = []
    for pci in scan_pci(root).devices:
        device = bus / pci.pci_address
        pci_class = read_int(device / "class", base=16)
        if pci_class is None or pci_class >> 16 != 0x03:
            continue
        cards.append(
            GPUCard(
                driver=pci.driver,
                driver_version=pci.driver_version,
                drm=_drm(device),
                numa_node=pci.numa_node,
                pci_address=pci.pci_address,
                vendor=pci.vendor,
                vendor_id=pci.vendor_id,
                product=pci.product,
                product_id=pci.product_id,
            )
        )
    return GPU(cards=cards, total=len(cards))
