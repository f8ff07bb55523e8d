"""`tpm`, beside Incus's resources in its style: /sys/class/tpm (version, driver, PCR banks
the kernel exports), the resource manager device, and whether the firmware's event log is
exposed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .sysfs import dev_number, driver_of, listdir, read, resolve


@dataclass
class TPMDevice:
    id: str
    device: str
    version: str
    driver: str
    resource_manager: str
    pcr_banks: list[str]
    event_log: bool


@dataclass
class TPM:
    devices: list[TPMDevice]
    total: int


def scan_tpm(root: str | os.PathLike[str] = "/") -> TPM:
    base = Path(root)
    devices = []
    for name in listdir(base / "sys/class/tpm"):
        tpm = base / "sys/class/tpm" / name
        major = read(tpm / "tpm_version_major")
        device = resolve(tpm / "device")
        driver = driver_of(base, device)[0] if device is not None else None
        rm = name.replace("tpm", "tpmrm", 1)
        devices.append(
            TPMDevice(
                id=name,
                device=dev_number(tpm / "dev") or "",
                version="2.0" if major == "2" else ("1.2" if major == "1" else ""),
                driver=driver or "",
                resource_manager=rm if (base / "sys/class/tpmrm" / rm).exists() else "",
                pcr_banks=[
                    entry.removeprefix("pcr-") for entry in listdir(tpm) if entry.startswith("pcr-")
                ],
                event_log=(
                    base / "sys/kernel/security" / name / "binary_bios_measurements"
                ).exists(),
            )
        )
    return TPM(devices=devices, total=len(devices))
