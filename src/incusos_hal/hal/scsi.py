"""SCSI INQUIRY over SG_IO: the standard data, and Vital Product Data pages 0x80 (unit
serial number) and 0x83 (device identification, where a disk's WWN lives), per SPC-5.
What `sg_inq` prints and udev's scsi_id derives ID_SERIAL / ID_WWN from.

Every page's own length field is checked against the bytes the device returned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import _native

VPD_SERIAL, VPD_DEVICE_ID = 0x80, 0x83
DESIGNATOR_TYPES = {0: "vendor", 1: "t10", 2: "eui64", 3: "naa", 8: "scsi-name"}


@dataclass
class Inquiry:
    peripheral_type: int
    vendor: str
    product: str
    revision: str


@dataclass
class Designator:
    association: int  # 0: the logical unit, 1: the target port, 2: the target device
    type: str
    code_set: int  # 1 binary, 2 ASCII, 3 UTF-8
    value: str  # hex for binary identifiers, text otherwise


@dataclass
class DeviceIdentification:
    designators: list[Designator] = field(default_factory=list)

    @property
    def wwid(self) -> str:
        """The logical unit's best name, as the kernel's `wwid` attribute gives it:
        NAA first, then EUI-64, then the T10 vendor id ("naa.5000c500...")."""
        for kind in ("naa", "eui64", "t10"):
            for d in self.designators:
                if d.association == 0 and d.type == kind:
                    prefix = {"naa": "naa.", "eui64": "eui.", "t10": "t10."}[kind]
                    return prefix + d.value
        return ""


def _text(data: bytes) -> str:
    return data.decode("ascii", errors="replace").strip(" \x00")


def parse_inquiry(data: bytes) -> Inquiry:
    if len(data) < 36:
        raise ValueError(f"standard INQUIRY: {len(data)} bytes, need 36")
    return Inquiry(data[0] & 0x1F, _text(data[8:16]), _text(data[16:32]), _text(data[32:36]))


def _page(data: bytes, page: int) -> bytes:
    if len(data) < 4 or data[1] != page:
        raise ValueError(f"VPD page {page:#x}: no page header")
    length = int.from_bytes(data[2:4], "big")
    if 4 + length > len(data):
        raise ValueError(f"VPD page {page:#x}: says {length} bytes, has {len(data) - 4}")
    return data[4 : 4 + length]


def parse_serial(data: bytes) -> str:
    return _text(_page(data, VPD_SERIAL))


def parse_device_identification(data: bytes) -> DeviceIdentification:
    body = _page(data, VPD_DEVICE_ID)
    out = DeviceIdentification()
    pos = 0
    while pos + 4 <= len(body):
        code_set, flags, length = body[pos] & 0x0F, body[pos + 1], body[pos + 3]
        value = body[pos + 4 : pos + 4 + length]
        if len(value) != length:
            raise ValueError("VPD page 0x83: a designator runs past the page")
        kind = DESIGNATOR_TYPES.get(flags & 0x0F, f"type{flags & 0x0F}")
        out.designators.append(
            Designator(
                association=(flags >> 4) & 0x03,
                type=kind,
                code_set=code_set,
                value=value.hex() if code_set == 1 else _text(value),
            )
        )
        pos += 4 + length
    return out


def _inquiry(device: str, evpd: bool, page: int, length: int = 255) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        status, data = _native.sg_inquiry(fd, evpd, page, length)
    finally:
        os.close(fd)
    if status:
        raise OSError(f"{device}: INQUIRY page {page:#x} failed, SCSI status {status:#x}")
    return data


def raw_vpd(device: str, page: int) -> bytes:
    return _inquiry(device, True, page)


def inquiry(device: str) -> Inquiry:
    return parse_inquiry(_inquiry(device, False, 0, 96))


def serial_number(device: str) -> str:
    return parse_serial(_inquiry(device, True, VPD_SERIAL))


def device_identification(device: str) -> DeviceIdentification:
    return parse_device_identification(_inquiry(device, True, VPD_DEVICE_ID))
