"""The machine's security, in the shape of IncusOS's `/1.0/system/security` (incus-osd/api/
system_security.go): what the API serves and what a library user reads.

It gathers from the HAL: Secure Boot state and certificates (hal.secureboot, efivarfs), the
TPM's status (hal.eventlog replayed against hal.tpm's PCR 7), the encrypted volumes named
in crypttab and whether each is open and how (security.volumes), and the stored
configuration's recovery keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hal import eventlog, secureboot
from .volumes import TPM_PCR_MISMATCH, encrypted_volumes

if TYPE_CHECKING:
    from ..config.model import Security
    from ..hal.tpm import Tpm

TPM_OK = "ok"
TPM_SWTPM = "swtpm"
# Not one of IncusOS's values (it refuses to run without a TPM): what this HAL reports
# when there is none, or it cannot be opened, rather than failing the whole request.
TPM_UNAVAILABLE = "unavailable"

# IncusOS runs a software TPM from this directory when installed with missing_tpm.
SWTPM_STATE_DIR = "boot/swtpm"


def swtpm_in_use(root: Path | str = "/") -> bool:
    """IncusOS's rule: a software TPM runs when the firmware left no event log (no hardware
    TPM measured the boot) and the swtpm state directory exists."""
    base = Path(root)
    return not (base / eventlog.LOG_PATH).exists() and (base / SWTPM_STATE_DIR).is_dir()


def tpm_status(root: Path | str, tpm: Tpm | None) -> str:
    """ "pcr mismatch" when the event log does not replay to the TPM's PCR 7 (the firmware
    measured something it did not log, or the log was altered), "swtpm" for a software
    TPM, "ok" otherwise; "unavailable" without a TPM."""
    if tpm is None:
        return TPM_UNAVAILABLE
    if swtpm_in_use(root):
        return TPM_SWTPM
    try:
        log = eventlog.read(root)
        bank = "sha256" if "sha256" in log.banks else log.banks[0]
        replayed = eventlog.replay(log, bank).get(7)
        actual = tpm.pcr_read(bank, [7])[7]
    except (OSError, eventlog.EventLogError):
        return TPM_PCR_MISMATCH
    return TPM_OK if replayed == actual else TPM_PCR_MISMATCH


@dataclass(frozen=True, slots=True)
class Flags:
    """What the service keeps about security beside the config (IncusOS's state.txt)."""

    recovery_keys_retrieved: bool = False
    swtpm: bool = False
    secure_boot_disabled: bool = False
    drive_recovery_keys: Mapping[str, str] = field(default_factory=dict)
    pool_recovery_keys: Mapping[str, str] = field(default_factory=dict)
    tpm_public_key: str = ""


def trust(status: str, secure_boot_enabled: bool) -> tuple[bool, str]:
    """system_state_is_trusted and system_state_status."""
    issues = []
    if status == TPM_SWTPM:
        issues.append("using swtpm")
    elif status == TPM_UNAVAILABLE:
        issues.append("no TPM")
    if not secure_boot_enabled:
        issues.append("Secure Boot is disabled")
    if status == TPM_PCR_MISMATCH:
        issues.append("the TPM event log does not match PCR 7")
    if issues:
        return False, ", ".join(issues)
    return True, "system state is fully trusted"


def security_state(root: Path | str, tpm: Tpm | None, flags: Flags = Flags()) -> dict[str, Any]:
    sb = secureboot.state(root)
    status = tpm_status(root, tpm)
    trusted, why = trust(status, sb.secure_boot)
    public_key = flags.tpm_public_key
    if not public_key and tpm is not None:
        public_key = tpm.identity_public_key_pem()
    out: dict[str, Any] = {
        "encrypted_volumes": encrypted_volumes(root, tpm, status),
        "encryption_recovery_keys_retrieved": flags.recovery_keys_retrieved,
        "drive_recovery_keys": dict(flags.drive_recovery_keys),
        "pool_recovery_keys": dict(flags.pool_recovery_keys),
        "secure_boot_certificates": [c.api() for c in secureboot.certificates(root)],
        "secure_boot_enabled": sb.secure_boot,
        "system_state_is_trusted": trusted,
        "system_state_status": why,
        "tpm_status": status,
    }
    if public_key:
        out["tpm_public_key"] = public_key
    return out


def security_config(config: Security) -> dict[str, Any]:
    out: dict[str, Any] = {"encryption_recovery_keys": list(config.encryption_recovery_keys)}
    if config.custom_ca_certs:
        out["custom_ca_certs"] = list(config.custom_ca_certs)
    return out


def security(
    config: Security, root: Path | str = "/", tpm: Tpm | None = None, flags: Flags = Flags()
) -> dict[str, Any]:
    """GET /1.0/system/security's metadata: {"config": ..., "state": ...}."""
    return {"config": security_config(config), "state": security_state(root, tpm, flags)}
