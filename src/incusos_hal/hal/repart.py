"""The partitions a first boot makes (systemd-repart, from the image's
usr/lib/repart.d/30-swap.conf, 40-root.conf, 50-local-data.conf): found on the boot disk's
GUID partition table by type and label, and deleted for a factory reset, so that the next
boot is a first boot again and systemd-repart makes them afresh.

    first_boot_partitions(table)   the swap, root and local-data entries; LayoutError when
                                   the disk is not laid out as an appliance's
    delete(disk, entries)          those entries out of the GPT (sfdisk --delete), checked
                                   by reading the table back; the kernel told (partx -d)
    add_to_end(disk, number, start)  partition `number` from sector `start` to the end

Selection is by what the partitions are, never by number: root by its Discoverable
Partitions type (Type=root), swap by the swap type (Type=swap, no label), local-data by
its label and the generic Linux type it is made with. The image's own partitions (the
ESP, /usr A and B, their verity and signature partitions, seed-data) have none of these
and are refused outright should one ever match.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core import tools
from .disk import DiskError, Entry, Table, logical_sector_size, read_gpt

# The Discoverable Partitions Specification's types (systemd's, as sfdisk --label gpt -T
# lists them).
ESP = uuid.UUID("c12a7328-f81f-11d2-ba4b-00a0c93ec93b")
SWAP = uuid.UUID("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f")
LINUX_GENERIC = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")
ROOT = {
    uuid.UUID("4f68bce3-e8cd-4db1-96e7-fbcaf984b709"): "root-x86-64",
    uuid.UUID("b921b045-1df0-41c3-af44-4c6f280d3fae"): "root-arm64",
}
USR = {
    uuid.UUID("8484680c-9521-48c6-9c11-b0720656f69e"): "usr-x86-64",
    uuid.UUID("b0e01050-ee5f-4390-949a-9101b17104e9"): "usr-arm64",
}
# Never deleted, whatever their label says: the image itself.
IMAGE_TYPES = {
    ESP: "esp",
    **USR,
    uuid.UUID("77ff5f63-e7b6-4633-acf4-1565b864c0e6"): "usr-x86-64-verity",
    uuid.UUID("6e11a4e7-fbca-4ded-b9e9-e1a512bb664e"): "usr-arm64-verity",
    uuid.UUID("e7bb33fb-06cf-4e81-8273-e543b413e2e2"): "usr-x86-64-verity-sig",
    uuid.UUID("c23ce4ff-44bd-4b00-b2d4-b41b3419e02a"): "usr-arm64-verity-sig",
}
LOCAL_DATA_LABEL = "local-data"  # 50-local-data.conf (hal.zfsparse.LOCAL_PARTLABEL)
SEED_LABEL = "seed-data"  # hal.seed.SEED_PARTLABEL
TOOL_TIMEOUT_S = 60.0


class LayoutError(Exception):
    """The disk is not laid out as an appliance's: nothing is deleted."""


@dataclass(frozen=True, slots=True)
class FirstBoot:
    """A first-boot partition found: what it is and its GPT entry."""

    kind: str  # "root", "swap", "local-data"
    entry: Entry


def kind_of(entry: Entry) -> str | None:
    if entry.type in IMAGE_TYPES or entry.name == SEED_LABEL:
        return None
    if entry.type in ROOT:
        return "root"
    if entry.type == SWAP:
        return "swap"
    if entry.type == LINUX_GENERIC and entry.name == LOCAL_DATA_LABEL:
        return "local-data"
    return None


def first_boot_partitions(table: Table, disk: str = "the disk") -> tuple[FirstBoot, ...]:
    """The first-boot partitions of an appliance's disk (an ESP and a /usr partition next
    to them), at most one of each kind; LayoutError (saying why) otherwise."""
    types = {e.type for e in table.entries}
    if ESP not in types or not types & set(USR):
        raise LayoutError(f"{disk} has no EFI system partition and /usr partition")
    found = [FirstBoot(kind, e) for e in table.entries if (kind := kind_of(e)) is not None]
    if not found:
        raise LayoutError(f"{disk} has no root, swap or local-data partition")
    for kind in ("root", "swap", "local-data"):
        numbers = [str(f.entry.index) for f in found if f.kind == kind]
        if len(numbers) > 1:
            raise LayoutError(
                f"{disk} has {len(numbers)} {kind} partitions ({', '.join(numbers)}): "
                "not one first boot's"
            )
    return tuple(found)


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return tools.run(argv, timeout=TOOL_TIMEOUT_S, error=DiskError)


def delete(disk: Path, found: Sequence[FirstBoot]) -> list[str]:
    """Delete `found` from `disk`'s GPT, after checking the table still lists them as
    they were read (same number, unique GUID, type, label); the table read back must be
    the one before less exactly those. Then the kernel is asked to forget them (partx -d);
    a partition in use (the running root, the active swap) stays known to the kernel
    until the reboot that follows: those are returned as notes, not errors."""
    if not found:
        return []
    sector = logical_sector_size(disk)  # a 4Kn disk's GPT is at byte 4096
    before = read_gpt(disk, sector)
    wanted = {f.entry.index: f.entry for f in found}
    for index, entry in wanted.items():
        now = next((e for e in before.entries if e.index == index), None)
        if now != entry:
            raise DiskError(f"partition {index} of {disk} changed since it was read")
        if kind_of(entry) is None:  # never the image's, whoever called
            raise DiskError(f"partition {index} of {disk} is not a first-boot partition")
    numbers = [str(i) for i in sorted(wanted)]
    done = _run(["sfdisk", "--no-reread", "--no-tell-kernel", "--delete", str(disk), *numbers])
    if done.returncode != 0:
        raise DiskError(f"sfdisk --delete {disk} {' '.join(numbers)}: {done.stderr.strip()}")
    after = read_gpt(disk, sector)
    if after.entries != tuple(e for e in before.entries if e.index not in wanted):
        raise DiskError(f"the partition table of {disk} reads back differently than meant")
    notes = []
    for number in numbers:
        told = _run(["partx", "--delete", "--nr", number, str(disk)])
        if told.returncode != 0:
            notes.append(f"partition {number}: the kernel keeps it until the reboot")
    return notes


def add_to_end(disk: str, number: int, start: int) -> None:
    """Partition `number` of `disk` from sector `start` to the disk's last usable sector,
    of the generic Linux type: added to the disk's GPT, or in a new GPT on a disk without
    one, as `sgdisk -n NUMBER:START:` makes it (IncusOS's call for the local pool's second
    disk; the image has sfdisk, not gdisk). The size is given, not left to sfdisk, which
    would end it on its 1 MiB grid, short of what sgdisk makes and of a mirror's other
    half. The partition's name in sfdisk's script sets its number (its trailing digits);
    the kernel is told, so udev makes its links."""
    if number < 1 or start < 34:
        raise DiskError(f"partition {number} at sector {start}: not a partition")
    dump = _run(["sfdisk", "--dump", disk])
    if dump.returncode != 0:  # no partition table: a new, empty GPT first
        made = tools.run(
            ["sfdisk", "--quiet", disk],
            timeout=TOOL_TIMEOUT_S,
            error=DiskError,
            input="label: gpt\n",
        )
        if made.returncode != 0:
            raise DiskError(f"sfdisk {disk}: a new GPT: {made.stderr.strip()}")
        dump = _run(["sfdisk", "--dump", disk])
    last = next(
        (int(v) for k, _, v in (line.partition(": ") for line in dump.stdout.splitlines())
         if k == "last-lba" and v.isdigit()),
        None,
    )  # fmt: skip
    if dump.returncode != 0 or last is None or last < start:
        raise DiskError(f"{disk}: no room for partition {number} from sector {start}")
    line = f"{disk}-part{number} : start={start}, size={last - start + 1}, type=L\n"
    done = tools.run(
        ["sfdisk", "--quiet", "--append", disk], timeout=TOOL_TIMEOUT_S, error=DiskError, input=line
    )
    if done.returncode != 0:
        raise DiskError(f"sfdisk {disk}: partition {number}: {done.stderr.strip()}")
