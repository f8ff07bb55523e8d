"""`secure_boot`, beside Incus's resources in its style: firmware kind and the Secure Boot
state variables from efivarfs (the certificates and their checks are the security HAL's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"


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
