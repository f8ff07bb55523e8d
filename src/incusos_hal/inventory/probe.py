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

import contextvars
import os
import struct
from pathlib import Path

# The HAL's device modules load at first use: a scan of one section, or of a recorded
# tree with nothing to ask, does not pay for them. (Not `typing.TYPE_CHECKING`: importing
# typing is a cost the inventory command does not pay.)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..hal import ethtool, nvme

IOCTL_DIR = "ioctl"
MAX_REPLY = 1 << 16
# Where scan() collects what it had to leave out and why (inventory.scan_with_warnings).
_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "inventory_warnings", default=None
)


def warn(message: str) -> None:
    collected = _warnings.get()
    if collected is not None:
        collected.append(message)


def collecting() -> tuple[list[str], contextvars.Token[list[str] | None]]:
    collected: list[str] = []
    return collected, _warnings.set(collected)


def stop_collecting(token: contextvars.Token[list[str] | None]) -> None:
    _warnings.reset(token)


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
        from ..hal import ethtool

        return _try(lambda: ethtool.raw_drvinfo(ifname))

    def ethtool_link(self, ifname: str) -> bytes | None:
        from ..hal import ethtool

        return _try(lambda: ethtool.raw_link_settings(ifname))

    def nvme_id_ctrl(self, ctrl: str) -> bytes | None:
        from ..hal import nvme

        return _try(lambda: nvme.raw_identify_controller(f"/dev/{ctrl}"))

    def nvme_smart(self, ctrl: str) -> bytes | None:
        from ..hal import nvme

        return _try(lambda: nvme.raw_smart_log(f"/dev/{ctrl}"))

    def scsi_vpd(self, disk: str, page: int) -> bytes | None:
        from ..hal import scsi

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


def _try(call: Callable[[], bytes]) -> bytes | None:
    try:
        return call()
    except (OSError, ValueError, struct.error):
        return None


def source(root: str | os.PathLike[str]) -> Source:
    path = Path(root)
    if path.resolve() == Path("/"):
        return Live()
    if (path / IOCTL_DIR).is_dir():
        return Recorded(path)
    return Source()


def _parse(what: str, raw: bytes | None, parse: Callable[[bytes], object]) -> object | None:
    """A reply through its parser; a reply that fails its checks is left out, with a
    warning naming the device and what was wrong."""
    if raw is None:
        return None
    try:
        return parse(raw)
    except (ValueError, struct.error) as e:
        warn(f"{what}: {e}; left out")
        return None


def link_settings(src: Source, ifname: str) -> ethtool.LinkSettings | None:
    from ..hal import ethtool

    header = struct.calcsize(ethtool.LINK_HEADER)

    def parse(raw: bytes) -> ethtool.LinkSettings:
        if len(raw) < header or (len(raw) - header) % 12:
            raise ValueError(f"a link settings reply of {len(raw)} bytes")
        return ethtool.parse_link_settings(raw, (len(raw) - header) // 12)

    result = _parse(f"{ifname}: ethtool", src.ethtool_link(ifname), parse)
    return result if isinstance(result, ethtool.LinkSettings) else None


def driver_info(src: Source, ifname: str) -> ethtool.DriverInfo | None:
    from ..hal import ethtool

    result = _parse(f"{ifname}: ethtool", src.ethtool_drvinfo(ifname), ethtool.parse_drvinfo)
    return result if isinstance(result, ethtool.DriverInfo) else None


def id_ctrl(src: Source, ctrl: str) -> nvme.IdController | None:
    from ..hal import nvme

    result = _parse(f"{ctrl}: identify controller", src.nvme_id_ctrl(ctrl), nvme.parse_id_ctrl)
    return result if isinstance(result, nvme.IdController) else None


def smart(src: Source, ctrl: str) -> nvme.SmartLog | None:
    from ..hal import nvme

    result = _parse(f"{ctrl}: SMART log", src.nvme_smart(ctrl), nvme.parse_smart_log)
    return result if isinstance(result, nvme.SmartLog) else None


def vpd_serial(src: Source, disk: str) -> str | None:
    from ..hal import scsi

    result = _parse(f"{disk}: VPD 0x80", src.scsi_vpd(disk, scsi.VPD_SERIAL), scsi.parse_serial)
    return result if isinstance(result, str) and result else None


def vpd_wwid(src: Source, disk: str) -> str | None:
    from ..hal import scsi

    result = _parse(
        f"{disk}: VPD 0x83",
        src.scsi_vpd(disk, scsi.VPD_DEVICE_ID),
        lambda raw: scsi.parse_device_identification(raw).wwid,
    )
    return result if isinstance(result, str) and result else None
