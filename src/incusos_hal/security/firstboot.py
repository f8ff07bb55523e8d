"""The recovery key of a first boot, as IncusOS makes it (cmd/incus-osd/main.go,
internal/systemd/cryptenroll.go): when the machine has encrypted volumes and the config
names no recovery key, one is generated in systemd's recovery-key format, enrolled on
every crypttab volume (the TPM opens them to authorise it), and then stored in the
config; the operator reads it from `/1.0/system/security` and says so with `:retrieved`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .recovery import sync_recovery_keys
from .volumes import system_volumes

if TYPE_CHECKING:
    from ..hal.tpm import Tpm

# systemd-cryptenroll --recovery-key: 256 random bits as "modhex" (the YubiKey alphabet,
# the same on every keyboard layout), in eight dash-separated groups of eight.
MODHEX = "cbdefghijklnrtuv"


def new_recovery_key() -> str:
    raw = secrets.token_bytes(32)
    chars = "".join(MODHEX[b >> 4] + MODHEX[b & 0x0F] for b in raw)
    return "-".join(chars[i : i + 8] for i in range(0, len(chars), 8))


def needs_recovery_key(root: Path | str, keys: Sequence[str]) -> bool:
    return not keys and bool(system_volumes(root))


def enroll_first_recovery_key(root: Path | str, tpm: Tpm | None, *, pbkdf: Any = None) -> str:
    """A new key, on every crypttab volume (all or none: RecoveryKeyError says which volume
    could not be opened or changed); the caller stores it."""
    key = new_recovery_key()
    sync_recovery_keys(root, tpm, (), (key,), pbkdf=pbkdf)
    return key
