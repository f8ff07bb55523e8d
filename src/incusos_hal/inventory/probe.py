"""What only an ioctl tells (ethtool link settings, NVMe identify and SMART, SCSI VPD),
from the live machine or from a recorded tree, through one interface.

Live (root is /): the HAL's ioctls (hal.ethtool, hal.nvme, hal.scsi). A recorded tree
(`incusos-hal record`) keeps the raw replies the kernel gave under ioctl/ in the tree,
and replays them through the same parsers, so a reproducer carries them too. Any other
root (a mounted disk image of another machine) has no devices to ask: nothing.

Failures are expected (a virtual NIC without link settings, a disk that refuses VPD):
they give None, and the field is left out rather than guessed.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..hal import ethtool, nvme, scsi

IOCTL_DIR = "ioctl"
MAX_REPLY = 1 << 16


class Source:
    """Raw kernel replies; None when there is nothing to ask or the device refused."""

    def ethtool_drvinfo(self, ifname: str) -> bytes | None:
        return None

    def ethtool_link(self, ifname: str) -> bytes | None:
        return None

    def nvme_id_ctrl(self, ctrl: str) -> bytes | None:
        return None

    def nvme_smart(self, ctrl: str) -> bytes | None:
        return None

    def scsi_vpd(self, disk: str, page: int) -> bytes | None:
        return None


class Live(Source):
    def ethtool_drvinfo(self, ifname: str) -> bytes | None:
        return _try(lambda: ethtool.raw_drvinfo(ifname))

    def ethtool_link(self, ifname: str) -> bytes | None:
        return _try(lambda: ethtool.raw_link_settings(ifname))

    def nvme_id_ctrl(self, ctrl: str) -> bytes | None:
        return _try(lambda: nvme.raw_identify_controller(f"/dev/{ctrl}"))

    def nvme_smart(self, ctrl: str) -> bytes | None:
        return _try(lambda: nvme.raw_smart_log(f"/dev/{ctrl}"))

    def scsi_vpd(self, disk: str, page: int) -> bytes | None:
        return _try(lambda: scsi.raw_vpd(f"/dev/{disk}", page))


class Recorded(Source):
    def __init__(self, root: Path) -> None:
        self.base = root / IOCTL_DIR

    def _read(self, *parts: str) -> bytes | None:
        try:
            with open(self.base.joinpath(*parts), "rb") as f:
                return f.read(MAX_REPLY)
        except OSError:
            return None

    def ethtool_drvinfo(self, ifname: str) -> bytes | None:
        return self._read("ethtool", ifname, "drvinfo")

    def ethtool_link(self, ifname: str) -> bytes | None:
        return self._read("ethtool", ifname, "link-settings")

    def nvme_id_ctrl(self, ctrl: str) -> bytes | None:
        return self._read("nvme", ctrl, "id-ctrl")

    def nvme_smart(self, ctrl: str) -> bytes | None:
        return self._read("nvme", ctrl, "smart-log")

    def scsi_vpd(self, disk: str, page: int) -> bytes | None:
        return self._read("scsi", disk, f"vpd-{page:02x}")


def _try(call: object) -> bytes | None:
    try:
        return call()  # type: ignore[operator,no-any-return]
    except (OSError, ValueError, struct.error):
        return None


def source(root: str | os.PathLike[str]) -> Source:
    path = Path(root)
    if path.resolve() == Path("/"):
        return Live()
    if (path / IOCTL_DIR).is_dir():
        return Recorded(path)
    return Source()


def link_settings(src: Source, ifname: str) -> ethtool.LinkSettings | None:
    raw = src.ethtool_link(ifname)
    header = struct.calcsize(ethtool.LINK_HEADER)
    if raw is None or len(raw) < header or (len(raw) - header) % 12:
        return None
    try:
        return ethtool.parse_link_settings(raw, (len(raw) - header) // 12)
    except (ValueError, struct.error):
        return None


def driver_info(src: Source, ifname: str) -> ethtool.DriverInfo | None:
    raw = src.ethtool_drvinfo(ifname)
    try:
        return ethtool.parse_drvinfo(raw) if raw is not None else None
    except (ValueError, struct.error):
        return None


def id_ctrl(src: Source, ctrl: str) -> nvme.IdController | None:
    raw = src.nvme_id_ctrl(ctrl)
    try:
        return nvme.parse_id_ctrl(raw) if raw is not None else None
    except ValueError:
        return None


def smart(src: Source, ctrl: str) -> nvme.SmartLog | None:
    raw = src.nvme_smart(ctrl)
    try:
        return nvme.parse_smart_log(raw) if raw is not None else None
    except ValueError:
        return None


def vpd_serial(src: Source, disk: str) -> str | None:
    raw = src.scsi_vpd(disk, scsi.VPD_SERIAL)
    try:
        return scsi.parse_serial(raw) or None if raw is not None else None
    except ValueError:
        return None


def vpd_wwid(src: Source, disk: str) -> str | None:
    raw = src.scsi_vpd(disk, scsi.VPD_DEVICE_ID)
    try:
        return scsi.parse_device_identification(raw).wwid or None if raw is not None else None
    except ValueError:
        return None
