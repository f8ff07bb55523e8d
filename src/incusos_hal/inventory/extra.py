"""Additions to Incus's resources, in its style (lists with a `total`, sysfs names and
units): `tpm`, `secure_boot`, `fibre_channel` and `multipath`.

- tpm: /sys/class/tpm (version, driver, PCR banks the kernel exports), the resource
  manager device, and whether the firmware's event log is exposed.
- secure_boot: firmware kind and the Secure Boot state variables from efivarfs (the
  certificates and their checks are the security HAL's).
- fibre_channel: /sys/class/fc_host and fc_remote_ports (scsi_transport_fc): WWNN/WWPN,
  port state and type, speed, fabric, and the remote ports each host sees.
- multipath: device-mapper multipath maps (dm uuid "mpath-<wwid>") and their path
  devices with the SCSI device state, from sysfs alone (no multipathd needed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .sysfs import (
    dev_number,
    driver_of,
    listdir,
    pci_address_of,
    read,
    read_int,
    resolve,
)

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


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


@dataclass
class SecureBoot:
    firmware: str  # uefi, bios
    enabled: bool
    setup_mode: bool
    audit_mode: bool
    deployed_mode: bool


def efi_variable(root: Path, name: str, guid: str = EFI_GLOBAL) -> bytes | None:
    """An efivarfs variable's data: four attribute bytes, then the value."""
    try:
        with open(root / "sys/firmware/efi/efivars" / f"{name}-{guid}", "rb") as f:
            raw = f.read(1 << 16)
    except OSError:
        return None
    return raw[4:] if len(raw) > 4 else None


def _flag(root: Path, name: str) -> bool:
    value = efi_variable(root, name)
    return bool(value) and value[0] == 1  # type: ignore[index]


def scan_secure_boot(root: str | os.PathLike[str] = "/") -> SecureBoot:
    base = Path(root)
    uefi = (base / "sys/firmware/efi").is_dir()
    return SecureBoot(
        firmware="uefi" if uefi else "bios",
        enabled=uefi and _flag(base, "SecureBoot"),
        setup_mode=uefi and _flag(base, "SetupMode"),
        audit_mode=uefi and _flag(base, "AuditMode"),
        deployed_mode=uefi and _flag(base, "DeployedMode"),
    )


@dataclass
class FCRemotePort:
    id: str  # rport-H:B-R
    wwnn: str
    wwpn: str
    port_id: str
    port_state: str
    roles: str


@dataclass
class FCHost:
    id: str  # hostN
    wwnn: str
    wwpn: str
    port_id: str
    port_state: str
    port_type: str
    speed: str
    supported_speeds: str
    fabric_name: str
    symbolic_name: str
    driver: str
    pci_address: str
    remote_ports: list[FCRemotePort] = field(default_factory=list)


@dataclass
class FibreChannel:
    hosts: list[FCHost]
    total: int


def scan_fibre_channel(root: str | os.PathLike[str] = "/") -> FibreChannel:
    base = Path(root)
    hosts = []
    rports = base / "sys/class/fc_remote_ports"
    for name in listdir(base / "sys/class/fc_host"):
        fc = base / "sys/class/fc_host" / name
        device = resolve(fc / "device")
        # The HBA's driver is on its PCI function, the scsi host's parent.
        pci = pci_address_of(device) if device is not None else None
        driver = None
        if device is not None and pci:
            pci_dir = next((p for p in [device, *device.parents] if p.name == pci), None)
            driver = driver_of(base, pci_dir)[0] if pci_dir is not None else None
        host = FCHost(
            id=name,
            wwnn=read(fc / "node_name") or "",
            wwpn=read(fc / "port_name") or "",
            port_id=read(fc / "port_id") or "",
            port_state=read(fc / "port_state") or "",
            port_type=read(fc / "port_type") or "",
            speed=read(fc / "speed") or "",
            supported_speeds=read(fc / "supported_speeds") or "",
            fabric_name=read(fc / "fabric_name") or "",
            symbolic_name=read(fc / "symbolic_name") or "",
            driver=driver or "",
            pci_address=pci or "",
        )
        number = name.removeprefix("host")
        for rname in listdir(rports):
            if not rname.startswith(f"rport-{number}:"):
                continue
            rport = rports / rname
            host.remote_ports.append(
                FCRemotePort(
                    id=rname,
                    wwnn=read(rport / "node_name") or "",
                    wwpn=read(rport / "port_name") or "",
                    port_id=read(rport / "port_id") or "",
                    port_state=read(rport / "port_state") or "",
                    roles=read(rport / "roles") or "",
                )
            )
        hosts.append(host)
    hosts.sort(key=lambda h: int(h.id[4:]) if h.id[4:].isdigit() else 0)
    return FibreChannel(hosts=hosts, total=len(hosts))


@dataclass
class MultipathPath:
    id: str  # sda
    device: str
    state: str  # the SCSI device's: running, offline, blocked, ...
    hctl: str
    wwid: str


@dataclass
class MultipathMap:
    id: str  # dm-0
    name: str
    wwid: str
    device: str
    size: int
    read_only: bool
    paths: list[MultipathPath] = field(default_factory=list)


@dataclass
class Multipath:
    maps: list[MultipathMap]
    total: int


def scan_multipath(root: str | os.PathLike[str] = "/") -> Multipath:
    base = Path(root)
    blocks = base / "sys/class/block"
    maps = []
    for name in listdir(blocks):
        if not name.startswith("dm-"):
            continue
        dm = blocks / name
        uuid = read(dm / "dm/uuid") or ""
        if not uuid.startswith("mpath-"):
            continue
        mp = MultipathMap(
            id=name,
            name=read(dm / "dm/name") or "",
            wwid=uuid.removeprefix("mpath-"),
            device=dev_number(dm / "dev") or "",
            size=(read_int(dm / "size", 0) or 0) * 512,
            read_only=read(dm / "ro") == "1",
        )
        for slave in listdir(dm / "slaves"):
            path = blocks / slave
            scsi = resolve(path / "device")
            mp.paths.append(
                MultipathPath(
                    id=slave,
                    device=dev_number(path / "dev") or "",
                    state=read(path / "device/state") or "",
                    hctl=scsi.name if scsi is not None else "",
                    wwid=read(path / "device/wwid") or "",
                )
            )
        maps.append(mp)
    return Multipath(maps=maps, total=len(maps))
