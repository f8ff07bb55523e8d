"""NVMe admin commands through the kernel's passthrough ioctl: Identify Controller,
Identify Namespace and the SMART / Health Information log, parsed per the NVMe Base
Specification 2.0 (figure numbers in the comments). What `nvme id-ctrl`, `nvme id-ns`
and `nvme smart-log` print, at one ioctl each with no process to start.

Every reply is exactly the size the command asked for; a short one is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import _native

ADMIN_GET_LOG_PAGE, ADMIN_IDENTIFY = 0x02, 0x06
CNS_NAMESPACE, CNS_CONTROLLER = 0x00, 0x01
LOG_SMART = 0x02
IDENTIFY_SIZE, SMART_SIZE = 4096, 512
NSID_ALL = 0xFFFFFFFF


def _le(data: bytes, start: int, end: int) -> int:
    return int.from_bytes(data[start:end], "little")


def _ascii(data: bytes) -> str:
    return data.decode("ascii", errors="replace").strip(" \x00")


@dataclass
class IdController:
    """Identify Controller data structure (figure 275), the fields people ask for."""

    vid: int
    ssvid: int
    sn: str
    mn: str
    fr: str
    ieee: int
    cmic: int
    mdts: int
    cntlid: int
    ver: int
    oacs: int
    nn: int
    tnvmcap: int
    unvmcap: int
    subnqn: str


@dataclass
class LBAFormat:
    ms: int
    ds: int  # log2 of the data size
    rp: int


@dataclass
class IdNamespace:
    """Identify Namespace data structure (figure 280)."""

    nsze: int
    ncap: int
    nuse: int
    nlbaf: int
    flbas: int
    nguid: str
    eui64: str
    lbafs: list[LBAFormat]

    @property
    def block_size(self) -> int:
        # FLBAS bits 3:0 and 6:5 index the format in use (2.0 allows 64 formats).
        index = (self.flbas & 0x0F) | ((self.flbas >> 5) & 0x03) << 4
        return 1 << self.lbafs[index].ds if index < len(self.lbafs) else 0


@dataclass
class SmartLog:
    """SMART / Health Information log page (figure 207). Temperature in kelvin."""

    critical_warning: int
    temperature: int
    avail_spare: int
    spare_thresh: int
    percent_used: int
    data_units_read: int
    data_units_written: int
    host_read_commands: int
    host_write_commands: int
    controller_busy_time: int
    power_cycles: int
    power_on_hours: int
    unsafe_shutdowns: int
    media_errors: int
    num_err_log_entries: int


def parse_id_ctrl(data: bytes) -> IdController:
    if len(data) != IDENTIFY_SIZE:
        raise ValueError(f"identify controller: {len(data)} bytes, expected {IDENTIFY_SIZE}")
    return IdController(
        vid=_le(data, 0, 2),
        ssvid=_le(data, 2, 4),
        sn=_ascii(data[4:24]),
        mn=_ascii(data[24:64]),
        fr=_ascii(data[64:72]),
        ieee=_le(data, 73, 76),
        cmic=data[76],
        mdts=data[77],
        cntlid=_le(data, 78, 80),
        ver=_le(data, 80, 84),
        oacs=_le(data, 256, 258),
        nn=_le(data, 516, 520),
        tnvmcap=_le(data, 280, 296),
        unvmcap=_le(data, 296, 312),
        subnqn=_ascii(data[768:1024]),
    )


def parse_id_ns(data: bytes) -> IdNamespace:
    if len(data) != IDENTIFY_SIZE:
        raise ValueError(f"identify namespace: {len(data)} bytes, expected {IDENTIFY_SIZE}")
    nlbaf = data[25]
    count = min(nlbaf + 1, 64)
    lbafs = [
        LBAFormat(ms=_le(data, off, off + 2), ds=data[off + 2], rp=data[off + 3] & 0x03)
        for off in range(128, 128 + 4 * count, 4)
    ]
    return IdNamespace(
        nsze=_le(data, 0, 8),
        ncap=_le(data, 8, 16),
        nuse=_le(data, 16, 24),
        nlbaf=nlbaf,
        flbas=data[26],
        nguid=data[104:120].hex(),
        eui64=data[120:128].hex(),
        lbafs=lbafs,
    )


def parse_smart_log(data: bytes) -> SmartLog:
    if len(data) != SMART_SIZE:
        raise ValueError(f"SMART log: {len(data)} bytes, expected {SMART_SIZE}")
    return SmartLog(
        critical_warning=data[0],
        temperature=_le(data, 1, 3),
        avail_spare=data[3],
        spare_thresh=data[4],
        percent_used=data[5],
        data_units_read=_le(data, 32, 48),
        data_units_written=_le(data, 48, 64),
        host_read_commands=_le(data, 64, 80),
        host_write_commands=_le(data, 80, 96),
        controller_busy_time=_le(data, 96, 112),
        power_cycles=_le(data, 112, 128),
        power_on_hours=_le(data, 128, 144),
        unsafe_shutdowns=_le(data, 144, 160),
        media_errors=_le(data, 160, 176),
        num_err_log_entries=_le(data, 176, 192),
    )


def _admin(device: str, opcode: int, nsid: int, cdw10: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        status, data = _native.nvme_admin(fd, opcode, nsid, cdw10, 0, length)
    finally:
        os.close(fd)
    if status:
        raise OSError(f"{device}: NVMe admin opcode {opcode:#x} failed, status {status:#x}")
    return data


def raw_identify_controller(device: str) -> bytes:
    """`device`: the controller's character device (/dev/nvme0) or a namespace's."""
    return _admin(device, ADMIN_IDENTIFY, 0, CNS_CONTROLLER, IDENTIFY_SIZE)


def raw_smart_log(device: str) -> bytes:
    numd = SMART_SIZE // 4 - 1  # dwords, zero-based; the lower 16 bits go in CDW10
    return _admin(
        device, ADMIN_GET_LOG_PAGE, NSID_ALL, (numd & 0xFFFF) << 16 | LOG_SMART, SMART_SIZE
    )


def identify_controller(device: str) -> IdController:
    return parse_id_ctrl(raw_identify_controller(device))


def identify_namespace(device: str, nsid: int) -> IdNamespace:
    return parse_id_ns(_admin(device, ADMIN_IDENTIFY, nsid, CNS_NAMESPACE, IDENTIFY_SIZE))


def smart_log(device: str) -> SmartLog:
    return parse_smart_log(raw_smart_log(device))
