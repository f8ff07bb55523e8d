"""The machine's security, in the shape of IncusOS's `/1.0/system/security` (incus-osd/api/
system_security.go): what the API serves and what a library user reads.

It gathers from the HAL: Secure Boot state and certificates (hal.secureboot, efivarfs), the
TPM's status (hal.eventlog replayed against hal.tpm's PCR 7), the encrypted volumes named
in crypttab and whether each is open and how (device-mapper in sysfs, and whether the TPM
could unseal its token now), and the stored configuration's recovery keys.

Everything reads under `root`, so a recorded tree or a fixture directory stands in for
the running machine; the TPM is passed in already open (or None when there is none).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..hal import eventlog, pcrsig, secureboot

if TYPE_CHECKING:
    from ..config.model import Security
    from ..hal.luks import Header
    from ..hal.tpm import PCRPolicy, Tpm

TPM_OK = "ok"
TPM_PCR_MISMATCH = "pcr mismatch"
TPM_SWTPM = "swtpm"
# Not one of IncusOS's values (it refuses to run without a TPM): what this HAL reports
# when there is none, or it cannot be opened, rather than failing the whole request.
TPM_UNAVAILABLE = "unavailable"

# IncusOS runs a software TPM from this directory when installed with missing_tpm.
SWTPM_STATE_DIR = "boot/swtpm"
CRYPTTAB = "etc/crypttab"


@dataclass(frozen=True, slots=True)
class CrypttabEntry:
    name: str
    device: str
    key_file: str
    options: tuple[str, ...]


def parse_crypttab(text: str) -> list[CrypttabEntry]:
    """crypttab(5): name, device, key file (optional), options (optional). Lines that are
    not entries (comments, blanks) are skipped; a line with one field is malformed and
    skipped too, as systemd-cryptsetup-generator does."""
    out = []
    for raw in text.splitlines():
        fields = raw.split()
        if not fields or fields[0].startswith("#") or len(fields) < 2:
            continue
        key = fields[2] if len(fields) > 2 and fields[2] not in ("-", "none") else ""
        options = tuple(fields[3].split(",")) if len(fields) > 3 else ()
        out.append(CrypttabEntry(fields[0], fields[1], key, options))
    return out


def signature_path(entry: CrypttabEntry) -> str:
    """The PCR signature document systemd-cryptsetup reads for this volume."""
    for option in entry.options:
        if option.startswith("tpm2-signature="):
            return option.partition("=")[2]
    return pcrsig.SIGNATURE_PATH


def resolve_device(root: Path | str, device: str) -> Path:
    """A crypttab device (path or UUID=/PARTUUID=/LABEL=/PARTLABEL=) as a path under root."""
    for prefix, directory in (
        ("UUID=", "by-uuid"),
        ("PARTUUID=", "by-partuuid"),
        ("LABEL=", "by-label"),
        ("PARTLABEL=", "by-partlabel"),
    ):
        if device.startswith(prefix):
            return Path(root) / "dev/disk" / directory / device[len(prefix) :]
    return Path(root) / device.lstrip("/")


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


def volume_state(mapped: bool, tpm_unseals: bool, status: str) -> str:
    """IncusOS's wording for an encrypted volume."""
    if not mapped:
        return "locked"
    if tpm_unseals:
        return "unlocked (TPM)"
    if status == TPM_PCR_MISMATCH:
        return "unlocked (TPM; PCR update pending)"
    return "unlocked (recovery passphrase)"


def encrypted_volumes(root: Path | str, tpm: Tpm | None, status: str) -> list[dict[str, str]]:
    from ..hal import luks

    try:
        entries = parse_crypttab((Path(root) / CRYPTTAB).read_text())
    except FileNotFoundError:
        return []
    out = []
    for entry in entries:
        tpm_unseals = False
        if tpm is not None:
            try:
                header = luks.header(resolve_device(root, entry.device))
            except (luks.LuksError, OSError):
                pass  # not there, or not LUKS2: nothing the TPM could unseal
            else:
                tpm_unseals = _tpm_unseals(root, entry, header, tpm)
        mapped = luks.mapped(entry.name, root)
        out.append({"volume": entry.name, "state": volume_state(mapped, tpm_unseals, status)})
    return out


def _signatures(root: Path | str, entry: CrypttabEntry) -> list[pcrsig.PCRSignature]:
    """The PCR signatures systemd-cryptsetup would read for this volume; none when the
    document is missing or broken (a signed token then cannot unseal: as at boot)."""
    try:
        return pcrsig.load_signatures(root, signature_path(entry))
    except pcrsig.SignatureError:
        return []


def _tpm_unseals(root: Path | str, entry: CrypttabEntry, header: Header, tpm: Tpm) -> bool:
    """Does one of the volume's systemd-tpm2 tokens unseal with this TPM now?"""
    from ..hal import luks

    try:
        tokens = luks.unseal_tpm2_tokens(header, tpm, _signatures(root, entry))
        return any(True for _ in tokens)
    except luks.LuksError:  # a malformed token
        return False


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
            return luks.unlock_tpm2(device, tpm, _signatures(root, entry))[1]
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
    try:
        entries = parse_crypttab((Path(root) / CRYPTTAB).read_text())
    except FileNotFoundError:
        return []
    volumes = [(entry, resolve_device(root, entry.device)) for entry in entries]
    # Any key, old or new, that already opens a volume can authorise the change (the
    # first PUT after an install names the key the volumes were made with).
    known = [*old, *(k for k in new if k not in old)]
    unlock = {e.name: _unlock_passphrase(root, dev, tpm, known, e) for e, dev in volumes}
    added: dict[str, list[int]] = {}
    for entry, dev in volumes:
        try:
            for key in to_add:
                if luks.opens(dev, key):
                    continue
                added.setdefault(entry.name, []).append(
                    luks.add_key(dev, unlock[entry.name], key, pbkdf=pbkdf)
                )
        except (luks.LuksError, OSError) as e:
            for done, done_dev in volumes:
                for slot in added.get(done.name, []):
                    luks.remove_keyslot(done_dev, slot)
            raise RecoveryKeyError(
                f"volume {entry.name}: adding a recovery key failed ({e}); no volume changed"
            ) from None
    changes = []
    for entry, dev in volumes:
        removed = []
        for key in to_remove:
            try:
                slot = luks.test_key(dev, key)
            except luks.WrongKeyError:
                continue  # not on this volume
            try:
                luks.remove_keyslot(dev, slot)
            except (luks.LuksError, OSError) as e:
                raise RecoveryKeyError(
                    f"volume {entry.name}: the new keys were added, removing an old one "
                    f"failed ({e})"
                ) from None
            removed.append(slot)
        changes.append(KeyChange(entry.name, tuple(added.get(entry.name, [])), tuple(removed)))
    return changes


# -- rebinding to the TPM (POST /1.0/system/security/:tpm-rebind) ----------------------------

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
    from ..hal import luks
    from ..hal.tpm import TPMError

    try:
        entries = parse_crypttab((Path(root) / CRYPTTAB).read_text())
    except FileNotFoundError:
        entries = []
    skipped: dict[str, str] = {}
    bound = False
    work: list[tuple[CrypttabEntry, Path, luks.Tpm2Token, list[int], bytes]] = []
    for entry in entries:
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
        if _tpm_unseals(root, entry, header, tpm):
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
        work.append((entry, device, template, [t.keyslot for t in tokens], unlock))
    if not bound:
        raise RebindRefused("no volume in crypttab is bound to the TPM")
    if not work:
        raise RebindRefused("the TPM unseals every TPM-bound volume as the machine is now")
    assert tpm is not None  # work is only found with one
    added: list[int] = []  # the new keyslots, in the order of `work`
    try:
        for _, device, template, _, unlock in work:
            policy = rebind_policy(tpm, template.bank, template.pcrs)
            slot, _ = luks.enroll_tpm2(
                device, unlock, tpm, policy, signer=template.signer,
                signer_pcrs=template.signer_pcrs,
            )  # fmt: skip
            added.append(slot)
    except (luks.LuksError, TPMError, OSError, ValueError) as e:
        for (_, done, *_), slot in zip(work, added, strict=False):
            luks.remove_keyslot(done, slot)
        failed = work[len(added)][0].name
        raise RebindError(
            f"volume {failed}: sealing a new TPM token failed ({e}); no volume changed"
        ) from None
    rebound = []
    for (entry, device, template, old, unlock), slot in zip(work, added, strict=True):
        keep = luks.test_key(device, unlock)  # never the slot the recovery key opens
        removed = tuple(s for s in old if s != keep)
        try:
            for s in removed:
                luks.remove_keyslot(device, s)
        except (luks.LuksError, OSError) as e:
            raise RebindError(
                f"volume {entry.name}: the new TPM tokens were added, removing an old one "
                f"failed ({e})"
            ) from None
        rebound.append(Rebound(entry.name, slot, template.pcrs, removed))
    return Rebind(tuple(rebound), skipped)
