"""Typed inventory: the sections of Incus's `GET /1.0/resources`, field for field.

Names, order, units and omission follow lxc/incus `shared/api/resource.go` (the copy the
tests check against is noted in tests/schema/): a field marked `omitempty` there carries
OMIT here and leaves the JSON when it holds its zero value, as Go's encoder does. Sizes
are bytes, frequencies MHz, speeds Mbit/s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

OMIT = {"omitempty": True}


def to_json(value: Any) -> Any:
    """Plain JSON data from inventory dataclasses, omitting empty omitempty fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.metadata.get("json", f.name))
            if f.metadata.get("omitempty") and item in (None, "", 0, False, [], {}):
                continue
            out[f.metadata.get("key", f.name)] = to_json(item)
        return out
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


# cpu


@dataclass
class CPUCache:
    level: int
    type: str
    size: int


@dataclass
class CPUThread:
    id: int
    numa_node: int
    thread: int
    online: bool
    isolated: bool


@dataclass
class CPUCore:
    core: int
    die: int
    threads: list[CPUThread]
    frequency: int = field(default=0, metadata=OMIT)
    flags: list[str] = field(default_factory=list)


@dataclass
class CPUAddressSizes:
    physical_bits: int
    virtual_bits: int


@dataclass
class CPUSocket:
    name: str = field(default="", metadata=OMIT)
    vendor: str = field(default="", metadata=OMIT)
    socket: int = 0
    cache: list[CPUCache] = field(default_factory=list, metadata=OMIT)
    cores: list[CPUCore] = field(default_factory=list)
    frequency: int = field(default=0, metadata=OMIT)
    frequency_minimum: int = field(default=0, metadata=OMIT)
    frequency_turbo: int = field(default=0, metadata=OMIT)
    address_sizes: CPUAddressSizes | None = field(default=None, metadata=OMIT)


@dataclass
class CPU:
    architecture: str
    sockets: list[CPUSocket]
    total: int


# memory


@dataclass
class MemoryNode:
    numa_node: int
    hugepages_used: int
    hugepages_total: int
    used: int
    total: int


@dataclass
class Memory:
    nodes: list[MemoryNode] = field(default_factory=list, metadata=OMIT)
    hugepages_total: int = 0
    hugepages_used: int = 0
    hugepages_size: int = 0
    used: int = 0
    total: int = 0


# storage


@dataclass
class Partition:
    id: str
    device: str
    read_only: bool
    size: int
    partition: int


@dataclass
class Disk:
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
    disks: list[Disk]
    total: int


# pci


@dataclass
class PCIVPD:
    product_name: str = field(default="", metadata=OMIT)
    entries: dict[str, str] = field(default_factory=dict, metadata=OMIT)


@dataclass
class PCIDevice:
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
    devices: list[PCIDevice]
    total: int


# usb


@dataclass
class USBInterface:
    class_: str = field(metadata={"key": "class", "json": "class_"})
    class_id: int = 0
    driver: str = ""
    driver_version: str = ""
    number: int = 0
    subclass: str = ""
    subclass_id: int = 0


@dataclass
class USBDevice:
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
    devices: list[USBDevice]
    total: int


# system


@dataclass
class Firmware:
    vendor: str
    date: str
    version: str


@dataclass
class Chassis:
    vendor: str
    type: str
    serial: str
    version: str


@dataclass
class Motherboard:
    vendor: str
    product: str
    serial: str
    version: str


@dataclass
class System:
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


# load: Incus's struct has no json tags, so Go writes the field names as they are.


@dataclass
class Load:
    Average1Min: float  # Incus's keys, see above
    Average5Min: float
    Average10Min: float  # Incus fills it from the 15 minute average
    Processes: int


# serial


@dataclass
class SerialDevice:
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
    devices: list[SerialDevice]
    total: int


# gpu


@dataclass
class GPUDRM:
    id: int
    card_name: str
    card_device: str
    control_name: str = field(default="", metadata=OMIT)
    control_device: str = field(default="", metadata=OMIT)
    render_name: str = field(default="", metadata=OMIT)
    render_device: str = field(default="", metadata=OMIT)


@dataclass
class GPUCard:
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
    cards: list[GPUCard]
    total: int
