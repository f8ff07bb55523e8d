"""The `network` section of Incus's resources API (GET /1.0/resources), from sysfs.

Field names and shapes are lxc/incus `shared/api/resource.go` (ResourcesNetwork,
ResourcesNetworkCard, ResourcesNetworkCardPort). Cards are the hardware devices (PCI or
USB) behind wired interfaces; software links (bridges, bonds, veths) are not cards.
What only ethtool can tell (supported modes and ports, auto-negotiation, port and
transceiver type, firmware version) comes from SIOCETHTOOL through inventory.probe, live
or recorded; where it cannot be had those keys are left out or false, never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import probe
from .hwdata import pci_names
from .sysfs import driver_of, read, read_int

TYPE_CHECKING = False  # not typing's: the network section does not import typing
if TYPE_CHECKING:
    from typing import Any

# linux/if_arp.h, as hal.net has it: not imported from there, whose interface model this
# section has no use for.
ARPHRD_ETHER = 1


def _int(path: Path, default: int = 0) -> int:
    value = read_int(path, default, 0)
    return default if value is None else value


def _port(d: Path, name: str, src: probe.Source) -> dict[str, Any]:
    port: dict[str, Any] = {"id": name}
    address = read(d / "address")
    if address:
        port["address"] = address.lower()
    port["port"] = max(_int(d / "dev_port"), 0)
    port["protocol"] = "ethernet" if _int(d / "type") == ARPHRD_ETHER else "infiniband"
    settings = probe.link_settings(src, name)
    if settings is not None:
        if settings.supported_modes:
            port["supported_modes"] = settings.supported_modes
        if settings.supported_ports:
            port["supported_ports"] = settings.supported_ports
        if settings.port_type:
            port["port_type"] = settings.port_type
        if settings.transceiver_type:
            port["transceiver_type"] = settings.transceiver_type
    port["auto_negotiation"] = settings.auto_negotiation if settings is not None else False
    # Reading carrier/speed of a down link fails with EINVAL: that is "no link".
    port["link_detected"] = read(d / "carrier") == "1"
    speed = _int(d / "speed", -1)
    if port["link_detected"] and speed > 0:
        port["link_speed"] = speed
        duplex = read(d / "duplex")
        if duplex in ("full", "half"):
            port["link_duplex"] = duplex
    return port


def scan_network(root: str | os.PathLike[str] = "/") -> dict[str, Any]:
    base = Path(root, "sys/class/net")
    src = probe.source(root)
    cards: dict[str, dict[str, Any]] = {}
    try:
        names = sorted(os.listdir(base))
    except OSError:
        names = []
    for name in names:
        d = base / name
        device = d / "device"
        if not device.exists():
            continue
        try:
            device_path = device.resolve()
        except OSError:
            continue
        key = str(device_path)
        card = cards.get(key)
        if card is None:
            card = {}
            driver, version = driver_of(Path(root), device)
            if driver:
                card["driver"] = driver
            if version:
                card["driver_version"] = version
            card["ports"] = []
            card["numa_node"] = max(_int(device / "numa_node"), 0)
            vendor, product = read(device / "vendor"), read(device / "device")
            if (device / "subsystem").is_symlink():
                subsystem = os.path.basename(os.readlink(device / "subsystem"))
                if subsystem == "pci":
                    card["pci_address"] = device_path.name
                if subsystem == "virtio":
                    # virtio-net: the PCI function is the virtio device's parent.
                    parent = device_path.parent
                    card["pci_address"] = parent.name
                    vendor, product = read(parent / "vendor"), read(parent / "device")
            if vendor and product:
                card["vendor_id"] = vendor.removeprefix("0x")
                card["product_id"] = product.removeprefix("0x")
                vendor_name, product_name = pci_names(
                    Path(root), card["vendor_id"], card["product_id"]
                )
                if vendor_name:
                    card["vendor"] = vendor_name
                if product_name:
                    card["product"] = product_name
            total_vfs = read(device / "sriov_totalvfs")
            if total_vfs is not None:
                card["sriov"] = {
                    "current_vfs": _int(device / "sriov_numvfs"),
                    "maximum_vfs": _int(device / "sriov_totalvfs"),
                    "vfs": [],
                }
            cards[key] = card
        if "firmware_version" not in card:
            info = probe.driver_info(src, name)
            if info is not None and info.firmware_version:
                card["firmware_version"] = info.firmware_version
        card["ports"].append(_port(d, name, src))
    ordered = [cards[k] for k in sorted(cards)]
    return {"cards": ordered, "total": len(ordered)}
