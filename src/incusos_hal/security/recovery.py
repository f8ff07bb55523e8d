"""Encryption recovery keys: every crypttab volume opens with exactly the configured keys,
as IncusOS does on a PUT of its security config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .volumes import (
    CrypttabEntry,
    add_everywhere,
    resolve_device,
    signatures,
    system_volumes,
)

if TYPE_CHECKING:
    from ..hal.tpm import Tpm


def check_recovery_keys(keys: Sequence[str]) -> str | None:
    """The PUT rule on top of each key's own: IncusOS keeps at least one."""
    if not keys:
        return "at least one encryption recovery key is required"
    return None


class RecoveryKeyError(Exception):
    """Changing the volumes' recovery keys failed; the message names the volume, never a key."""


@dataclass(frozen=True, slots=True)
class KeyChange:
    volume: str
    added: tuple[int, ...]
    removed: tuple[int, ...]


def plan_recovery_keys(old: Sequence[str], new: Sequence[str]) -> tuple[list[str], list[str]]:
    """(keys to add, keys to remove), each in the order given."""
    return [k for k in new if k not in old], [k for k in old if k not in new]


def _unlock_passphrase(
    root: Path | str, device: Path, tpm: Tpm | None, keys: Sequence[str], entry: CrypttabEntry
) -> bytes:
    """Something that opens the volume: one of its current recovery keys, else its TPM
    token (as at boot)."""
    from ..hal import luks

    for key in keys:
        if luks.opens(device, key):
            return key.encode()
    if tpm is not None:
        try:
            return luks.unlock_tpm2(device, tpm, signatures(root, entry))[1]
        except (luks.LuksError, OSError):
            pass
    raise RecoveryKeyError(
        f"volume {entry.name}: neither a current recovery key nor the TPM opens it"
    )


def sync_recovery_keys(
    root: Path | str,
    tpm: Tpm | None,
    old: Sequence[str],
    new: Sequence[str],
    *,
    pbkdf: Any = None,
) -> list[KeyChange]:
    """Make every crypttab volume open with exactly the keys in `new` (of the recovery
    keys; TPM and other keyslots stay), as IncusOS does on a PUT of its security config.

    All volumes get the new keys first; if any addition fails, the slots added so far are
    removed and nothing has changed. Only then are the dropped keys' slots removed, so no
    volume is ever left without a way in."""
    from ..hal import luks

    to_add, to_remove = plan_recovery_keys(old, new)
    if not to_add and not to_remove:
        return []
    volumes = [(entry, resolve_device(root, entry.device)) for entry in system_volumes(root)]
    # Any key, old or new, that already opens a volume can authorise the change (the
    # first PUT after an install names the key the volumes were made with).
    known = [*old, *(k for k in new if k not in old)]
    unlock = {e.name: _unlock_passphrase(root, dev, tpm, known, e) for e, dev in volumes}

    def add(volume: tuple[CrypttabEntry, Path], slots: list[int]) -> None:
        entry, dev = volume
        try:
            for key in to_add:
                if not luks.opens(dev, key):
                    slots.append(luks.add_key(dev, unlock[entry.name], key, pbkdf=pbkdf))
        except (luks.LuksError, OSError) as e:
            raise RecoveryKeyError(
                f"volume {entry.name}: adding a recovery key failed ({e}); no volume changed"
            ) from None

    added = add_everywhere(volumes, add, lambda volume: volume[1])
    return [
        KeyChange(entry.name, tuple(slots), tuple(_remove_keys(entry, dev, to_remove)))
        for (entry, dev), slots in zip(volumes, added, strict=True)
    ]


def _remove_keys(entry: CrypttabEntry, dev: Path, keys: Sequence[str]) -> list[int]:
    """Remove the keyslots `keys` open on this volume (the new keys are already on it)."""
    from ..hal import luks

    removed = []
    for key in keys:
        try:
            slot = luks.test_key(dev, key)
        except luks.WrongKeyError:
            continue  # not on this volume
        try:
            luks.remove_keyslot(dev, slot)
        except (luks.LuksError, OSError) as e:
            raise RecoveryKeyError(
                f"volume {entry.name}: the new keys were added, removing an old one failed ({e})"
            ) from None
        removed.append(slot)
    return removed
