"""Re-binding volumes to the TPM (POST /1.0/system/security/:tpm-rebind): for after a
boot that needed a recovery key (new Secure Boot keys, a firmware update, a cleared TPM)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .volumes import CrypttabEntry, add_everywhere, resolve_device, system_volumes, tpm_unseals

if TYPE_CHECKING:
    from ..hal.luks import Header, Tpm2Token
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


def rebind_policy(
    tpm: Tpm, bank: str, pcrs: Sequence[int], expected: Mapping[int, bytes] | None = None
) -> PCRPolicy:
    """The PCR policy a token over `pcrs` gets when rebound: the values in `expected` (a
    predicted PCR 7, say), PCR 15 at zero (see VOLUME_KEY_PCR), the others as they are now."""
    values = {f"pcr{pcr}": value for pcr, value in (expected or {}).items() if pcr in pcrs}
    if VOLUME_KEY_PCR in pcrs:
        values[f"pcr{VOLUME_KEY_PCR}"] = bytes(hashlib.new(bank).digest_size)
    return tpm.current_policy(bank, pcrs, **values)


@dataclass(frozen=True, slots=True)
class _Work:
    """One volume to re-bind: its token to copy, the keyslots it replaces, what opens it."""

    entry: CrypttabEntry
    device: Path
    template: Tpm2Token
    old_slots: tuple[int, ...]
    unlock: bytes


@dataclass(frozen=True, slots=True)
class ResealPlan:
    """The volumes `plan_reseal` found, checked and ready to be sealed to given PCR values."""

    work: tuple[_Work, ...]
    skipped: Mapping[str, str]

    @property
    def banks(self) -> tuple[str, ...]:
        """The PCR banks of the tokens to re-seal (a prediction is needed in each)."""
        return tuple(sorted({w.template.bank for w in self.work}))


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

    def locked_out(entry: CrypttabEntry, header: Header, _token: Tpm2Token) -> bool:
        assert tpm is not None  # _plan refuses before asking without one
        return not tpm_unseals(root, entry, header, tpm)

    work, skipped, bound = _plan(root, tpm, keys, locked_out)
    if not bound:
        raise RebindRefused("no volume in crypttab is bound to the TPM")
    if not work:
        raise RebindRefused("the TPM unseals every TPM-bound volume as the machine is now")
    assert tpm is not None  # _plan refuses without one
    return _reseal(tpm, work, skipped, {})


def plan_reseal(root: Path | str, tpm: Tpm | None, keys: Sequence[str], pcr: int = 7) -> ResealPlan:
    """Every crypttab volume whose TPM token covers `pcr`, whether or not the TPM unseals
    it today, checked as tpm_rebind checks (RebindRefused, nothing changed: no TPM, a
    token this HAL cannot re-create, no configured recovery key opens it). Empty when no
    volume is bound to `pcr`: nothing to do. Then `reseal` seals them to given values:
    for before a change of what `pcr` measures (new Secure Boot keys), while the old
    token still opens the volume at this boot."""
    work, skipped, _ = _plan(root, tpm, keys, lambda _e, _h, token: pcr in token.pcrs)
    return ResealPlan(tuple(work), skipped)


def reseal(tpm: Tpm, plan: ResealPlan, expected: Mapping[str, Mapping[int, bytes]]) -> Rebind:
    """Seal every planned volume again with the PCR values in `expected` (bank -> PCR ->
    value, e.g. PCR 7 as the next boot will have it), PCR 15 at zero and the token's other
    PCRs as they are now; a signed-policy key stays. All new tokens are added before any
    old keyslot is removed, and a failure adding one takes every added token back."""
    missing = [b for b in plan.banks if b not in expected]
    if missing:
        raise RebindRefused(f"no expected PCR values for the {', '.join(missing)} bank")
    return _reseal(tpm, plan.work, plan.skipped, expected)


def _reseal(
    tpm: Tpm,
    work: Sequence[_Work],
    skipped: Mapping[str, str],
    expected: Mapping[str, Mapping[int, bytes]],
) -> Rebind:
    added = _seal_everywhere(tpm, work, expected)
    rebound = [
        Rebound(w.entry.name, slot, w.template.pcrs, _remove_old(w))
        for w, slot in zip(work, added, strict=True)
    ]
    return Rebind(tuple(rebound), dict(skipped))


def _plan(
    root: Path | str,
    tpm: Tpm | None,
    keys: Sequence[str],
    wanted: Callable[[CrypttabEntry, Header, Tpm2Token], bool],
) -> tuple[list[_Work], dict[str, str], bool]:
    """The TPM-bound volumes `wanted` picks (by its entry, header and first TPM token),
    those skipped (device absent), and whether any volume is TPM-bound; RebindRefused
    with nothing changed when a picked one cannot be re-sealed."""
    from ..hal import luks

    skipped: dict[str, str] = {}
    bound = False
    work: list[_Work] = []
    for entry in system_volumes(root):
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
        template = tokens[0]
        if not wanted(entry, header, template):
            continue
        if template.pin or template.pcrlock:
            kind = "PIN" if template.pin else "pcrlock policy"
            raise RebindRefused(
                f"volume {entry.name}: its TPM token uses a {kind}, which this HAL does not "
                "re-create"
            )
        unlock = next((k.encode() for k in keys if luks.opens(device, k)), None)
        if unlock is None:
            raise RebindRefused(
                f"volume {entry.name}: none of the configured recovery keys opens it"
            )
        old = tuple(t.keyslot for t in tokens)
        work.append(_Work(entry, device, template, old, unlock))
    return work, skipped, bound


def _seal_everywhere(
    tpm: Tpm, work: Sequence[_Work], expected: Mapping[str, Mapping[int, bytes]]
) -> list[int]:
    """A new token on every volume, sealed to `expected` and the PCRs as they are now;
    all or none."""
    from ..hal import luks
    from ..hal.tpm import TPMError

    def seal(w: _Work, slots: list[int]) -> None:
        try:
            bank = w.template.bank
            policy = rebind_policy(tpm, bank, w.template.pcrs, expected.get(bank))
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
