"""The machine's own encrypted volumes (crypttab's, and the root and swap that
systemd-gpt-auto-generator opens): where each device is, whether it is open and how, and
the all-or-nothing change of their keyslots that recovery keys and TPM re-binding share.

Everything reads under `root`, so a recorded tree or a fixture directory stands in for
the running machine; the TPM is passed in already open (or None when there is none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..hal import pcrsig
from ..render.crypttab import CRYPTTAB, CrypttabEntry, parse_crypttab

__all__ = [
    "CrypttabEntry",
    "add_everywhere",
    "crypttab_entries",
    "encrypted_volumes",
    "resolve_device",
    "signature_path",
    "signatures",
    "system_volumes",
    "tpm_unseals",
    "volume_state",
]

if TYPE_CHECKING:
    from ..hal.luks import Header
    from ..hal.tpm import Tpm

TPM_PCR_MISMATCH = "pcr mismatch"
Work = TypeVar("Work")


# What systemd-gpt-auto-generator names the volumes it opens (the discoverable root and
# swap partitions): on the appliance, systemd-repart made both, encrypted and TPM-bound,
# on first boot, as IncusOS's root and swap. Other open LUKS volumes (drives encrypted
# through the storage API, with keys of their own) are not the system's.
GPT_AUTO_VOLUMES = ("root", "swap")


def crypttab_entries(root: Path | str) -> list[CrypttabEntry]:
    """The volumes in the machine's crypttab (none when it has no crypttab)."""
    try:
        return parse_crypttab((Path(root) / CRYPTTAB.lstrip("/")).read_text())
    except FileNotFoundError:
        return []


def system_volumes(root: Path | str) -> list[CrypttabEntry]:
    """crypttab's volumes, then those gpt-auto opened that crypttab does not name (as
    entries of its own: device the partition under the mapping, default options, which
    is how gpt-auto opens them: tpm2-device=auto, the default signature path)."""
    from ..hal import devmapper

    entries = crypttab_entries(root)
    named = {e.name for e in entries}
    for name, kname in devmapper.open_luks(root).items():
        if name in GPT_AUTO_VOLUMES and name not in named:
            entries.append(CrypttabEntry(name, f"/dev/{kname}", "none", ()))
    return entries


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
    from ..hal import devmapper

    out = []
    for entry in system_volumes(root):
        unsealed = False
        if tpm is not None:
            from ..hal import luks  # libcryptsetup through cffi: only with a TPM to ask

            try:
                header = luks.header(resolve_device(root, entry.device))
            except (luks.LuksError, OSError):
                pass  # not there, or not LUKS2: nothing the TPM could unseal
            else:
                unsealed = tpm_unseals(root, entry, header, tpm)
        mapped = devmapper.mapped(entry.name, root)
        out.append({"volume": entry.name, "state": volume_state(mapped, unsealed, status)})
    return out


def signatures(root: Path | str, entry: CrypttabEntry) -> list[pcrsig.PCRSignature]:
    """The PCR signatures systemd-cryptsetup would read for this volume; none when the
    document is missing or broken (a signed token then cannot unseal: as at boot)."""
    try:
        return pcrsig.load_signatures(root, signature_path(entry))
    except pcrsig.SignatureError:
        return []


def tpm_unseals(root: Path | str, entry: CrypttabEntry, header: Header, tpm: Tpm) -> bool:
    """Does one of the volume's systemd-tpm2 tokens unseal with this TPM now?"""
    from ..hal import luks

    try:
        tokens = luks.unseal_tpm2_tokens(header, tpm, signatures(root, entry))
        return any(True for _ in tokens)
    except luks.LuksError:  # a malformed token
        return False


def add_everywhere(
    work: Sequence[Work],
    add: Callable[[Work, list[int]], None],
    device: Callable[[Work], Path],
) -> list[list[int]]:
    """Run `add` on every item: it adds keyslots to one volume, appending each new slot to
    the list it is given as soon as it exists. If one fails, every keyslot added so far,
    on every volume, is removed again and the error is raised: all volumes get their new
    keyslots, or none does. The caller removes old keyslots only after this returned, so
    no volume is ever left without a way in."""
    from ..hal import luks

    added: list[list[int]] = []
    try:
        for item in work:
            added.append([])
            add(item, added[-1])
    except BaseException:
        for item, slots in zip(work, added, strict=False):
            for slot in slots:
                luks.remove_keyslot(device(item), slot)
        raise
    return added
