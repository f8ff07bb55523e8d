"""SMART through `smartctl -aj` (smartmontools' JSON), parsed purely into IncusOS's
drive fields (its SystemStorageDriveSMART plus the identity smartctl reports); for NVMe,
the same fields from the SMART / Health log read by hal/nvme.py's admin ioctl.

smartctl answers non-zero for a device without SMART (a virtual disk) and still prints
JSON: the exit status is not an error here, the JSON decides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .nvme import IdController, SmartLog


@dataclass(frozen=True, slots=True)
class Smart:
    enabled: bool
    passed: bool
    error: str = ""
    power_on_hours: int = 0
    data_units_read: int = 0
    data_units_written: int = 0
    available_spare: int = 0
    percentage_used: int = 0
    raw_read_error_rate: int = 0
    seek_error_rate: int = 0
    reallocated_sectors: int = 0

    def to_api(self) -> dict[str, Any]:
        """IncusOS's JSON: enabled and passed always, the rest when not zero."""
        out: dict[str, Any] = {"enabled": self.enabled, "passed": self.passed}
        for key in (
            "error",
            "power_on_hours",
            "data_units_read",
            "data_units_written",
            "available_spare",
            "percentage_used",
            "raw_read_error_rate",
            "seek_error_rate",
            "reallocated_sectors",
        ):
            value = getattr(self, key)
            if value:
                out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class DriveInfo:
    model_family: str = ""
    model_name: str = ""
    serial_number: str = ""
    bus: str = ""
    smart: Smart | None = None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _obj(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _s(value: Any) -> str:
    return value if isinstance(value, str) else ""


def parse_smartctl(text: str) -> DriveInfo:
    """`smartctl -aj <dev>` as IncusOS reads it (internal/storage/storage.go): the model
    from model_* or the SCSI vendor/product, "sat" spelled "sata", SMART only when
    smart_support.available says so."""
    if not text.strip():
        return DriveInfo()
    try:
        doc = json.loads(text)
    except ValueError as e:
        return DriveInfo(smart=Smart(False, False, error=f"Bad SMART data from drive: {e}"))
    if not isinstance(doc, Mapping):
        return DriveInfo()
    bus = _s(_obj(doc.get("device")).get("type"))
    if bus == "sat":
        bus = "sata"
    support = _obj(doc.get("smart_support"))
    smart = None
    if support.get("available") is True:
        nvme = _obj(doc.get("nvme_smart_health_information_log"))
        ata = {
            _s(_obj(a).get("name")): _int(_obj(_obj(a).get("raw")).get("value"))
            for a in (_obj(doc.get("ata_smart_attributes")).get("table") or [])
        }
        smart = Smart(
            enabled=support.get("enabled") is True,
            passed=_obj(doc.get("smart_status")).get("passed") is True,
            power_on_hours=_int(_obj(doc.get("power_on_time")).get("hours")),
            data_units_read=_int(nvme.get("data_units_read")),
            data_units_written=_int(nvme.get("data_units_written")),
            available_spare=_int(nvme.get("available_spare")),
            percentage_used=_int(nvme.get("percentage_used")),
            raw_read_error_rate=ata.get("Raw_Read_Error_Rate", 0),
            seek_error_rate=ata.get("Seek_Error_Rate", 0),
            reallocated_sectors=ata.get("Reallocated_Sector_Ct", 0),
        )
    return DriveInfo(
        model_family=_s(doc.get("model_family")) or _s(doc.get("scsi_vendor")),
        model_name=_s(doc.get("model_name")) or _s(doc.get("scsi_product")),
        serial_number=_s(doc.get("serial_number")),
        bus=bus,
        smart=smart,
    )


# How long a drive's smartctl answer is reused. SMART data moves slowly (a drive updates
# its attributes on its own schedule, power-on hours once an hour; smartd polls every
# 30 minutes), while smartctl costs a process and a round of commands to the drive per
# GET: a client polling the storage state would otherwise keep every drive busy
# answering. A drive replaced in the same place is a new device (`identity`), never the
# old one's answer.
SMARTCTL_MAX_AGE_S = 60.0

_answers: dict[str, tuple[float, tuple[int, ...], DriveInfo]] = {}
_answers_lock = threading.Lock()
_asking: dict[str, threading.Lock] = {}  # one per device path: one smartctl at a time


def identity(device: str, sys_block: str = "/sys/class/block") -> tuple[int, ...]:
    """What tells one attached drive from the next at the same path: its device number
    and the kernel's diskseq (a number no attach ever reuses, Linux 5.15 and later;
    without it, the size stands in). Empty when the device is not there."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return ()
    name = os.path.basename(device)
    for attr in ("diskseq", "size"):
        try:
            with open(f"{sys_block}/{name}/{attr}") as f:
                return (rdev, int(f.read().strip() or 0))
        except (OSError, ValueError):
            continue
    return (rdev,)


def smartctl_recent(device: str, now: float | None = None) -> DriveInfo:
    """`smartctl(device)`, or its answer for the same drive from the last
    SMARTCTL_MAX_AGE_S seconds. Requests at once for one drive ask it once: the others
    wait for that answer (a drive answers one SMART command at a time anyway)."""
    key = identity(device)
    with _answers_lock:
        asking = _asking.setdefault(device, threading.Lock())
    with asking:
        now = time.monotonic() if now is None else now
        with _answers_lock:
            seen = _answers.get(device)
        if key and seen is not None and seen[1] == key and now - seen[0] < SMARTCTL_MAX_AGE_S:
            return seen[2]
        info = smartctl(device)
        if key:
            with _answers_lock:
                _answers[device] = (now, key, info)
        return info


def smartctl(device: str, timeout: float = 30) -> DriveInfo:
    """One drive; an absent smartctl or a hung drive is "no SMART", never an error."""
    if shutil.which("smartctl") is None:
        return DriveInfo()
    try:
        done = subprocess.run(
            ["smartctl", "-aj", device],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return DriveInfo()
    return parse_smartctl(done.stdout)


def from_nvme(ident: IdController, log: SmartLog) -> DriveInfo:
    """An NVMe drive from its Identify Controller data and SMART / Health log (hal/nvme.py:
    one ioctl each, no smartctl process): the values `smartctl -aj` reports for the same
    log. smartctl's "passed" for NVMe is no critical warning bit set."""
    return DriveInfo(
        model_name=ident.mn,
        serial_number=ident.sn,
        bus="nvme",
        smart=Smart(
            enabled=True,
            passed=log.critical_warning == 0,
            power_on_hours=log.power_on_hours,
            data_units_read=log.data_units_read,
            data_units_written=log.data_units_written,
            available_spare=log.avail_spare,
            percentage_used=log.percent_used,
        ),
    )


def nvme_or_smartctl(device: str) -> DriveInfo:
    """SMART for one drive: an NVMe namespace through the admin ioctl (fresh each time:
    it costs microseconds), falling back to smartctl (`smartctl_recent`) when the ioctl
    is not answered (no native module, a fabric that refuses it) or the drive is not
    NVMe."""
    if os.path.basename(device).startswith("nvme"):
        from . import nvme

        try:
            return from_nvme(nvme.identify_controller(device), nvme.smart_log(device))
        except (OSError, ValueError, ImportError):
            pass
    return smartctl_recent(device)
