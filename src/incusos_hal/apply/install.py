"""Installing the running image to a disk, as an `install` seed asks (lxc/incus-os
incus-osd/internal/install/install.go, its rules and messages; our own code).

    check_security(seed, tpm=, secure_boot=)   IncusOS's degraded-security rules
    select_target(disks, selector, source)      the one disk the `target` selectors pick
    install(seed, files, source, target)        the image's partitions copied and verified

Everything that can refuse is decided before the first write: the security state, the
target (never the boot media, never a disk without a by-id name, read-only, in use or
too small), an existing partition table without `force_install`, every partition
fitting. The copy is the image's partitions (not the swap, root and local-data
partitions systemd-repart makes on a first boot), in the same places with the same
GUIDs, verified by reading them back; the target's `seed-data` partition gets the seed
without its install file, so the installed system configures itself and never installs
again.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config.bytesize import parse_byte_size
from ..config.model import InstallSeed, InstallSeedTarget
from ..config.seed import seed_name
from ..hal import disk as disks
from ..hal import seed as media

# IncusOS refuses targets under 50 GiB (install.go).
MIN_TARGET_BYTES = 50 << 30
# What systemd-repart makes on a first boot (lxc/incus-os mkosi.images/base/mkosi.extra/
# usr/lib/repart.d/30-swap.conf, 40-root.conf, 50-local-data.conf): not the image's.
FIRST_BOOT_TYPES = {
    uuid.UUID("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"),  # swap
    uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"),  # root, x86-64
    uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae"),  # root, arm64
}
FIRST_BOOT_LABELS = ("local-data",)


class InstallError(Exception):
    pass


def check_security(seed: InstallSeed, *, tpm: bool, secure_boot: bool) -> list[str]:
    """IncusOS's rules (install.go CheckSystemRequirements), in its words; the
    warnings to show when the machine runs degraded as allowed."""
    missing_tpm = bool(seed.security and seed.security.missing_tpm)
    missing_sb = bool(seed.security and seed.security.missing_secure_boot)
    if missing_tpm and missing_sb:
        raise InstallError(
            "install seed cannot enable both Secure Boot and TPM degraded security options"
        )
    if not secure_boot and not tpm:
        raise InstallError("cannot run if Secure Boot is disabled and no physical TPM is present")
    if tpm and missing_tpm:
        raise InstallError(
            "a physical TPM was found, but install seed wants to configure a swtpm-backed TPM"
        )
    if secure_boot and missing_sb:
        raise InstallError("Secure Boot is enabled, but install seed expects it to be disabled")
    if not tpm and not missing_tpm:
        raise InstallError("no working TPM found, but install seed doesn't allow for use of swtpm")
    if not secure_boot and not missing_sb:
        raise InstallError("Secure Boot is disabled, but install seed doesn't allow this")
    warnings = []
    if missing_tpm:
        warnings.append("no TPM: this installation will use a software TPM (degraded security)")
    if missing_sb:
        warnings.append("Secure Boot is disabled: this installation runs without it (degraded)")
    return warnings


def select_target(
    found: Sequence[disks.Disk], selector: InstallSeedTarget | None, source: str | None
) -> disks.Disk:
    """The disk the selectors pick, as IncusOS picks it: the boot media, read-only disks
    and disks with no by-id name are never candidates; no selector means exactly one
    candidate; several matches need `sort_order`."""
    candidates = [d for d in found if d.name != source and d.ids and not d.readonly]
    if not candidates:
        raise InstallError("no potential install devices found")
    detected = f" (detected devices: {', '.join(d.id for d in candidates)})"
    if selector is None:
        if len(candidates) == 1:
            return candidates[0]
        raise InstallError(
            "no target install seed provided, and didn't find exactly one install device" + detected
        )
    low = parse_byte_size(selector.min_size)
    high = parse_byte_size(selector.max_size)
    matching = [
        d
        for d in candidates
        if selector.bus.lower() in d.subsystems
        and any(selector.id in name for name in d.ids)
        and not (high and d.size > high)
        and not (low and d.size < low)
    ]
    if not matching:
        raise InstallError("no target device matched provided install seed selectors" + detected)
    if len(matching) == 1:
        return matching[0]
    order = selector.sort_order.lower()
    if order == "smallest":
        return min(matching, key=lambda d: d.size)
    if order == "largest":
        return max(matching, key=lambda d: d.size)
    raise InstallError(
        "more than one target device matched provided install seed selectors" + detected
    )


def first_boot_made(entry: disks.Entry) -> bool:
    return entry.type in FIRST_BOOT_TYPES or entry.name in FIRST_BOOT_LABELS


@dataclass(frozen=True, slots=True)
class Installed:
    target: disks.Disk
    copied: tuple[disks.Copied, ...]
    seed_files: tuple[str, ...]  # what the target's seed-data partition holds


def installed_seed(image_seed: Mapping[str, bytes], used: Mapping[str, bytes]) -> dict[str, bytes]:
    """The installed system's seed: the image's own files, those of the seed this
    install used over them (a user's SEED_DATA volume), never an install file."""
    files: dict[str, bytes] = {}
    for source in (image_seed, used):
        for filename, data in source.items():
            name = seed_name(filename)
            if name is None or name == "install":
                continue
            for other in list(files):
                if seed_name(other) == name:
                    del files[other]
            files[filename] = data
    return files


def install(
    seed: InstallSeed,
    used: Mapping[str, bytes],
    source: Path,
    target: disks.Disk,
    *,
    min_bytes: int = MIN_TARGET_BYTES,
    log: Callable[[str], None] = lambda message: None,
) -> Installed:
    """Copy the image on `source` to `target`; InstallError (nothing written) when a
    rule refuses, DiskError when the disk fails."""
    if target.size < min_bytes:
        raise InstallError(
            f"target device '{target.id}' is too small ({target.size / (1 << 30):.2f}GiB), "
            f"must be at least {min_bytes / (1 << 30):.0f}GiB"
        )
    try:
        existing = disks.has_partition_table(target.path, target.sector)
        table = disks.read_gpt(source, target.sector)
    except (OSError, disks.DiskError) as e:
        raise InstallError(f"cannot read the disks: {e}") from None
    if existing and not seed.force_install:
        raise InstallError(
            f"a partition table already exists on device '{target.id}', and `ForceInstall` "
            "from install configuration isn't true"
        )
    seed_parts = [e for e in table.entries if e.name == media.SEED_PARTLABEL]
    new_seed: dict[int, bytes] = {}
    files: dict[str, bytes] = {}
    for entry in seed_parts:
        length = entry.sectors * table.sector
        with open(source, "rb") as f:
            f.seek(entry.first * table.sector)
            try:
                image_seed = media.read_tar(f)
            except media.SeedReadError:
                image_seed = {}
        files = installed_seed(image_seed, used)
        data = media.tar_bytes(files)
        if len(data) > length:
            raise InstallError(f"the seed does not fit in the target's {media.SEED_PARTLABEL}")
        new_seed[entry.index] = data.ljust(length, b"\0")

    def rewrite(entry: disks.Entry, data: bytes) -> bytes:
        return new_seed.get(entry.index, data)

    try:
        copied = disks.copy_image(
            source,
            target.path,
            target.size,
            lambda e: not first_boot_made(e),
            rewrite=rewrite if new_seed else None,
            progress=log,
        )
    except disks.DiskError as e:
        if "does not fit" in str(e):
            raise InstallError(str(e)) from None
        raise
    return Installed(target, tuple(copied), tuple(sorted(files)))


def seed_of(device: Path, sector: int = 512) -> dict[str, bytes]:
    """The seed in a disk's `seed-data` partition (for checking an installed disk)."""
    table = disks.read_gpt(device, sector)
    for entry in table.entries:
        if entry.name == media.SEED_PARTLABEL:
            with open(device, "rb") as f:
                f.seek(entry.first * sector)
                data = f.read(entry.sectors * sector)
            return media.read_tar(io.BytesIO(data))
    return {}
