"""Re-sealing the TPM-bound volumes to the PCR 7 of the next boot, around a Secure Boot
variable update (KEK, db or dbx), so that boot opens them without a recovery key.

IncusOS does this in lxc/incus-os incus-osd/internal/secureboot/efi_vars.go
(appendEFIVarUpdate) and pcrs.go (computeNewPCR7Value): validate the TPM event log,
write the variable, compute the next boot's PCR 7 from the log with every
EV_EFI_VARIABLE_DRIVER_CONFIG event measured again from the variable as it is now, then
enroll each LUKS volume again to that PCR 7 and PCR 15 at zero. The steps here:

    prepare(root, tpm, keys)         before the write: the volumes bound to PCR 7, checked
                                     (a recovery key opens each), and the event log,
                                     validated against the TPM's PCR 7 in each bank they
                                     use; refused (RebindRefused) with nothing changed, so
                                     the caller does not write a variable it could not
                                     follow; None when no volume is bound to PCR 7
    reseal_for_next_boot(...)        after the write: predict PCR 7 from the variables read
                                     back from efivarfs and seal every planned volume to it,
                                     all or nothing (security.rebind.reseal)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import rebind
from .rebind import Rebind, RebindRefused
from .volumes import resolve_device, system_volumes

if TYPE_CHECKING:
    from ..hal.eventlog import EventLog
    from ..hal.tpm import Tpm

PCR = 7


@dataclass(frozen=True, slots=True)
class Prepared:
    plan: rebind.ResealPlan
    log: EventLog  # validated: it replays to the TPM's PCR 7 in every bank of the plan


def tpm_bound(root: Path | str) -> bool:
    """Does a present crypttab volume carry a systemd-tpm2 token? (Whether the TPM needs
    opening at all; an unreadable header counts, so that prepare reports it.)"""
    from ..hal import luks

    for entry in system_volumes(root):
        device = resolve_device(root, entry.device)
        if not device.exists():
            continue
        try:
            if luks.header(device).token_slots(luks.TOKEN_TPM2):
                return True
        except (luks.LuksError, OSError):
            return True
    return False


def prepare(root: Path | str, tpm: Tpm | None, keys: Sequence[str]) -> Prepared | None:
    """The volumes to re-seal and the validated log, or None when no volume is bound to
    PCR 7 (nothing to do). RebindRefused, nothing changed, when they cannot be re-sealed
    (no TPM, no configured recovery key opens one, the log does not match the TPM)."""
    plan = rebind.plan_reseal(root, tpm, keys, PCR)
    if not plan.work:
        return None
    assert tpm is not None  # plan_reseal refuses bound volumes without one
    return Prepared(plan, validated_log(root, tpm, plan.banks))


def validated_log(root: Path | str, tpm: Tpm, banks: Sequence[str]) -> EventLog:
    """The machine's event log, if it replays to the TPM's PCR 7 in each of `banks` (a
    prediction from any other log would be a guess; IncusOS's GetValidatedTPMEventLog)."""
    from ..hal import eventlog
    from ..hal.tpm import TPMError

    try:
        log = eventlog.read(root)
    except (OSError, eventlog.EventLogError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RebindRefused(f"the TPM event log cannot be read ({reason})") from None
    for bank in banks:
        try:
            logged = eventlog.replay(log, bank).get(PCR)
            measured = tpm.pcr_read(bank, [PCR])[PCR]
        except (eventlog.EventLogError, TPMError) as e:
            raise RebindRefused(f"the TPM event log cannot be validated ({e})") from None
        if logged != measured:
            raise RebindRefused(
                f"the TPM event log does not replay to the TPM's PCR {PCR} ({bank}): the "
                "next boot's value cannot be predicted from it"
            )
    return log


def next_boot_pcr7(
    root: Path | str, log: EventLog, banks: Sequence[str]
) -> dict[str, Mapping[int, bytes]]:
    """PCR 7 of the next boot in each bank: the log's PCR 7 events with each Secure Boot
    variable measured as efivarfs holds it now (a variable that is not there is measured
    empty, as the firmware does)."""
    from ..hal import eventlog
    from ..hal import secureboot as sb

    variables = {
        name: sb.read_variable(root, name) or b"" for name in eventlog.SECURE_BOOT_VARIABLES
    }
    return {bank: {PCR: eventlog.predict_pcr7(log, bank, variables)} for bank in banks}


def reseal_for_next_boot(root: Path | str, tpm: Tpm, prepared: Prepared) -> Rebind:
    """Seal the prepared volumes to the next boot's PCR 7 (after the variable was written).
    RebindError names what failed (no volume changed when adding a token failed);
    RebindRefused, nothing changed, when no prediction could be made."""
    try:
        expected = next_boot_pcr7(root, prepared.log, prepared.plan.banks)
    except (OSError, ValueError) as e:  # EventLogError, SignatureListError: both ValueError
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RebindRefused(f"PCR {PCR} of the next boot cannot be predicted ({reason})") from None
    return rebind.reseal(tpm, prepared.plan, expected)
