"""Re-binding volumes to the TPM (POST /1.0/system/security/:tpm-rebind): for after a
boot that needed a recovery key (new Secure Boot keys, a firmware update, a cleared TPM)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .volumes import CrypttabEntry, add_everywhere, crypttab_entries, resolve_device, tpm_unseals

if TYPE_CHECKING:
    from ..hal.luks import Tpm2Token
    from ..hal.tpm import PCRPolicy, Tpm

# systemd-cryptsetup's tpm2-measure-pcr= extends PCR 15 with each volume key it opens, so a
# token bound to PCR 15 must expect the value it has before any volume is opened: zero.
VOLUME_KEY_PCR = 15


class RebindRefused(Exception):
    """Rebinding was refused before anything changed; the message names the volume."""


class RebindError(Exception):
    """Rebinding failed midway; the message says what was left (never a key)."""


@dataclass(frozen=True, slots=True)
class Rebound:
    volume: str
    keyslot: int  # the new TPM token's keyslot
    pcrs: tuple[int, ...]
    removed: tuple[int, ...]  # the keyslots of the tokens it replaced


@dataclass(frozen=True, slots=True)
class Rebind:
    rebound: tuple[Rebound, ...]
    skipped: Mapping[str, str]  # volume -> why (its device is not there)


def rebind_policy(tpm: Tpm, bank: str, pcrs: Sequence[int]) -> PCRPolicy:
    """The PCR policy a token over `pcrs` gets when rebound: the values as they are now,
    PCR 15 at zero (see VOLUME_KEY_PCR)."""
    zero = {f"pcr{VOLUME_KEY_PCR}": bytes(hashlib.new(bank).digest_size)}
    return tpm.current_policy(bank, pcrs, **(zero if VOLUME_KEY_PCR in pcrs else {}))


@dataclass(frozen=True, slots=True)
class _Work:
    """One volume to re-bind: its token to copy, the keyslots it replaces, what opens it."""

    entry: CrypttabEntry
    device: Path
    template: Tpm2Token
    old_slots: tuple[int, ...]
    unlock: bytes


def tpm_rebind(root: Path | str, tpm: Tpm | None, keys: Sequence[str]) -> Rebind:
    """Re-seal the TPM tokens of the crypttab volumes the TPM no longer unseals to the
    machine as it is now (IncusOS's tpm-rebind, for after a boot that needed a recovery
    key: new Secure Boot keys, a firmware update, a cleared TPM).

    Each such volume keeps its token's shape (bank, PCRs, signing key for signed PCRs)
    with the PCR values read now. Refused, with nothing changed, when no TPM-bound volume
    needs it, when there is no TPM (None), when a token is one this HAL cannot re-create
    (PIN, pcrlock, malformed) or when none of `keys` (the configured recovery keys) opens
    a volume. New tokens are added to every volume first (any failure removes those
    added); only then are the old tokens' keyslots removed. Volumes whose device is
    absent are skipped and reported."""
    work, skipped = _plan(root, tpm, keys)
    assert tpm is not None  # _plan refuses without one
    added = _seal_everywhere(tpm, work)
    rebound = [
        Rebound(w.entry.name, slot, w.template.pcrs, _remove_old(w))
        for w, slot in zip(work, added, strict=True)
    ]
    return Rebind(tuple(rebound), skipped)


def _plan(
    root: Path | str, tpm: Tpm | None, keys: Sequence[str]
) -> tuple[list[_Work], dict[str, str]]:
    """The volumes to re-bind, and those skipped (device absent); RebindRefused with
    nothing changed when there is nothing this may or can do."""
    from ..hal import luks

    skipped: dict[str, str] = {}
    bound = False
    work: list[_Work] = []
    for entry in crypttab_entries(root):
        device = resolve_device(root, entry.device)
        if not device.exists():
            skipped[entry.name] = f"{entry.device} is not present"
            continue
        try:
            header = luks.header(device)
            tokens = [
                luks.parse_tpm2_token(i, raw)
                for i, raw in sorted(header.tokens.items())
                if raw.get("type") == luks.TOKEN_TPM2
            ]
        except luks.LuksError as e:
            raise RebindRefused(f"volume {entry.name}: {e}") from None
        if not tokens:
            continue
        bound = True
        if tpm is None:
            raise RebindRefused(f"volume {entry.name} is bound to a TPM, and there is none")
        if tpm_unseals(root, entry, header, tpm):
            continue
        template = tokens[0]
        if template.pin or template.pcrlock:
            kind = "PIN" if template.pin else "pcrlock policy"
            raise RebindRefused(
                f"volume {entry.name}: its TPM token uses a {kind}, which tpm-rebind does not "
                "re-create"
            )
        unlock = next((k.encode() for k in keys if luks.opens(device, k)), None)
        if unlock is None:
            raise RebindRefused(
                f"volume {entry.name}: none of the configured recovery keys opens it"
            )
        old = tuple(t.keyslot for t in tokens)
        work.append(_Work(entry, device, template, old, unlock))
    if not bound:
        raise RebindRefused("no volume in crypttab is bound to the TPM")
    if not work:
        raise RebindRefused("the TPM unseals every TPM-bound volume as the machine is now")
    return work, skipped


def _seal_everywhere(tpm: Tpm, work: Sequence[_Work]) -> list[int]:
    """A new token on every volume, sealed to the PCRs as they are now; all or none."""
    from ..hal import luks
    from ..hal.tpm import TPMError

    def seal(w: _Work, slots: list[int]) -> None:
        try:
            policy = rebind_policy(tpm, w.template.bank, w.template.pcrs)
            slot, _ = luks.enroll_tpm2(
                w.device, w.unlock, tpm, policy, signer=w.template.signer,
                signer_pcrs=w.template.signer_pcrs,
            )  # fmt: skip
        except (luks.LuksError, TPMError, OSError, ValueError) as e:
            raise RebindError(
                f"volume {w.entry.name}: sealing a new TPM token failed ({e}); no volume changed"
            ) from None
        slots.append(slot)

    return [slots[0] for slots in add_everywhere(work, seal, lambda w: w.device)]


def _remove_old(w: _Work) -> tuple[int, ...]:
    """The replaced tokens' keyslots, removed (never the one the recovery key opens)."""
    from ..hal import luks

    keep = luks.test_key(w.device, w.unlock)
    removed = tuple(s for s in w.old_slots if s != keep)
    try:
        for s in removed:
            luks.remove_keyslot(w.device, s)
    except (luks.LuksError, OSError) as e:
        raise RebindError(
            f"volume {w.entry.name}: the new TPM tokens were added, removing an old one "
            f"failed ({e})"
        ) from None
    return removed
