"""Factory reset (`POST /1.0/system/:factory-reset`), IncusOS's `SystemReset` body
(lxc/incus-os incus-osd/api/system_reset.go): `allow_tpm_reset_failure`, `seeds`
(seed name -> its JSON), `wipe_existing_seeds`.

    parse_reset(body)                          the body, strictly (400 otherwise)
    factory_reset(state_dir, root, request, log, machine)
                                               seeds checked and written, the TPM
                                               cleared, the first-boot partitions
                                               deleted, the state dir emptied

Order, as IncusOS's (internal/reset/reset.go): the seeds are validated (here as first
boot will check them, over the default document: after the reset the machine starts
afresh), then written where first boot reads them, and only then is anything erased: the
TPM cleared, the root, swap and local-data partitions deleted (hal.repart), so the next
boot is a first boot and systemd-repart makes them again, encrypted to the new TPM seed.
A seed that does not validate refuses the reset with 400 and nothing is written or
erased; a TPM that cannot be cleared refuses it with 500, the seed put back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..config.seed import NAMES, seed_name
from ..hal import disk as disks
from ..hal import repart
from ..hal import seed as media
from ..state.paths import SEED_PATH_ENV
from .seed import check, problem_lines, read_problem

FIELDS = ("allow_tpm_reset_failure", "seeds", "wipe_existing_seeds")


class ResetRefused(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ResetRequest:
    allow_tpm_reset_failure: bool = False
    seeds: Mapping[str, Any] = field(default_factory=dict)
    wipe_existing_seeds: bool = False


def parse_reset(body: Any) -> ResetRequest:
    if body is None:
        return ResetRequest()
    if not isinstance(body, dict):
        raise ResetRefused("the request body must be a JSON object")
    for key in body:
        if key not in FIELDS:
            raise ResetRefused(f"{key}: unknown field (expected {', '.join(FIELDS)})")
    for key in ("allow_tpm_reset_failure", "wipe_existing_seeds"):
        if not isinstance(body.get(key, False), bool):
            raise ResetRefused(f"{key}: expected true or false")
    seeds = body.get("seeds") or {}
    if not isinstance(seeds, dict):
        raise ResetRefused("seeds: expected an object (seed name -> its JSON)")
    for name, value in seeds.items():
        if name not in NAMES:
            raise ResetRefused(f"seeds.{name}: not a seed (IncusOS reads {', '.join(NAMES)})")
        if name == "install":
            raise ResetRefused(
                "seeds.install: a factory reset returns this machine to first boot; "
                "it does not install"
            )
        if value is None:
            # IncusOS's words (reset.go).
            raise ResetRefused(f"seed data for '{name}' is not defined")
    return ResetRequest(
        bool(body.get("allow_tpm_reset_failure", False)),
        dict(seeds),
        bool(body.get("wipe_existing_seeds", False)),
    )


def seed_location(root: str, disk: Path | None = None) -> Path | None:
    """Where first boot reads the seed: $INCUSOS_HAL_SEED, else this machine's
    `seed-data` partition (never a user's SEED_DATA stick: IncusOS writes its own
    disk's seed partition). With the boot disk known, only that disk's own: a
    `seed-data` partition elsewhere (another appliance's disk, a stick labelled so) is
    neither read nor overwritten by a reset that then erases the boot disk."""
    explicit = os.environ.get(SEED_PATH_ENV)
    if explicit:
        return Path(explicit)
    if disk is not None:
        return _own_seed_partition(root, disk)
    found = media.find(root)
    if found is not None and found.how == f"partition {media.SEED_PARTLABEL}":
        return found.path
    return None


def _own_seed_partition(root: str, disk: Path) -> Path | None:
    """The node of `disk`'s partition labelled `seed-data` in its GPT (exactly one),
    through the kernel's partitions of that disk in sysfs; None when there is none."""
    try:
        table = disks.read_gpt(disk, disks.logical_sector_size(disk))
    except (OSError, disks.DiskError):
        return None
    numbers = [e.index for e in table.entries if e.name == media.SEED_PARTLABEL]
    if len(numbers) != 1:
        return None
    return disks.partition_node(root, disk, numbers[0])


def merged_seed(existing: Mapping[str, bytes], request: ResetRequest) -> dict[str, bytes]:
    files = {} if request.wipe_existing_seeds else dict(existing)
    for name, value in request.seeds.items():
        for filename in list(files):
            if seed_name(filename) == name:
                del files[filename]
        files[f"{name}.json"] = json.dumps(value, indent=2).encode() + b"\n"
    return files


@dataclass(frozen=True, slots=True)
class Machine:
    """What a reset may touch besides the state dir and the seed. Off the running system
    (`live` false: a scratch or re-rooted service, the API's tests) the TPM and the disks
    are left alone whatever else is set."""

    live: bool = False
    tcti: str | None = None  # the TPM to clear (None: the default, the kernel's)
    disk: Path | None = None  # the boot disk (None: the disk under the running /usr)


@dataclass(frozen=True, slots=True)
class Reset:
    """What a factory reset did."""

    seed: dict[str, bytes]  # what the next boot finds
    tpm_cleared: bool
    deleted: tuple[str, ...]  # "root (partition 10)", the first-boot partitions deleted
    left_alone: str  # why the TPM and the partitions were not touched ("" if they were)


def plan_partitions(
    root: str, machine: Machine
) -> tuple[Path | None, tuple[repart.FirstBoot, ...], str]:
    """(the boot disk, its first-boot partitions, "") or (.., (), why they are left
    alone): read only, before anything is written."""
    if not machine.live:
        return None, (), "not the running system: the TPM and the disks are left alone"
    disk = machine.disk
    if disk is None:
        name = disks.holder_disk(root, "/usr")
        if name is None:
            return None, (), "no disk under the running /usr: the TPM and the disks are left alone"
        disk = Path(root, "dev", name)
    try:
        table = disks.read_gpt(disk, disks.logical_sector_size(disk))
        return disk, repart.first_boot_partitions(table, str(disk)), ""
    except (OSError, disks.DiskError, repart.LayoutError) as e:
        return disk, (), f"{e}: not an appliance's layout, the TPM and the disks are left alone"


def factory_reset(
    state_dir: Path,
    root: str,
    request: ResetRequest,
    log: Callable[[str, str], None] = lambda level, message: None,
    machine: Machine = Machine(),
) -> Reset:
    """IncusOS's order: the seeds validated, the seed written, the TPM cleared (a failure
    refuses the reset, 500, the seed put back as it was, unless
    `allow_tpm_reset_failure`), the first-boot partitions deleted, the state dir emptied,
    the disks synced. The caller reboots. On a disk that is not laid out as an
    appliance's neither the TPM nor the disk is touched (clearing the TPM would leave
    volumes sealed to it that no first boot re-creates): the state dir alone is emptied,
    and `left_alone` says why."""
    # Read only: the boot disk first, so that the seed is read from and written to that
    # disk's own seed partition.
    disk, found, left_alone = plan_partitions(root, machine)
    where = seed_location(root, disk)
    existing: dict[str, bytes] = {}
    if where is not None and os.path.lexists(where) and not request.wipe_existing_seeds:
        try:
            existing = media.read(where)
        except media.SeedReadError as e:
            raise ResetRefused(
                f"the existing seed cannot be read: {read_problem(e)}", 500
            ) from None
    files = merged_seed(existing, request)
    checked = check(files, Config(), root)
    if checked.problems:
        raise ResetRefused("; ".join(problem_lines(checked)))
    undo_seed: Callable[[], None] = lambda: None  # noqa: E731
    if where is None:
        if files:
            raise ResetRefused(f"no {media.SEED_PARTLABEL} partition to write the seed to", 500)
    elif files or os.path.lexists(where):
        # What write_tar overwrites: the tar, and on a device the zeros after it up to the
        # head the reader looks at.
        undo_seed = _seed_undo(where, max(len(media.tar_bytes(files)), media.HEAD_BYTES))
        _write_seed(where, files)
    tpm_cleared = False
    if found:
        from ..hal import tpm

        try:
            with tpm.open_tpm(machine.tcti) as handle:
                handle.clear()
            tpm_cleared = True
        except tpm.TPMError as e:
            if not request.allow_tpm_reset_failure:
                undo_seed()
                raise ResetRefused(
                    f"{e}; nothing was erased (allow_tpm_reset_failure lets the reset go on)",
                    500,
                ) from None
            log("warning", f"factory reset: {e}; going on (allow_tpm_reset_failure)")
    deleted: tuple[str, ...] = ()
    if disk is not None and found:
        try:
            notes = repart.delete(disk, found)
        except (OSError, disks.DiskError) as e:
            cleared = "the TPM was cleared; " if tpm_cleared else ""
            raise ResetRefused(
                f"{cleared}the first-boot partitions cannot be deleted: {e}", 500
            ) from None
        for note in notes:
            log("info", f"factory reset: {note}")
        deleted = tuple(f"{f.kind} (partition {f.entry.index})" for f in found)
    for entry in sorted(os.listdir(state_dir)):
        path = state_dir / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if machine.live:
        os.sync()
    if left_alone:
        log("warning", f"factory reset: {left_alone}")
    log(
        "warning",
        "factory reset: "
        + ("TPM cleared; " if tpm_cleared else "")
        + (f"deleted {', '.join(deleted)}; " if deleted else "")
        + f"state cleared; the next boot applies the seed "
        f"({', '.join(sorted(files)) or 'empty'})",
    )
    return Reset(files, tpm_cleared, deleted, left_alone)


def _seed_undo(where: Path, length: int) -> Callable[[], None]:
    """What puts the seed back as it is now, should the reset be refused after writing
    it: the bytes the new tar overwrites on a device, the file, or a directory's seed
    files."""
    from ..core.files import atomic_write

    if where.is_dir() and not where.is_symlink():
        kept = {e: (where / e).read_bytes() for e in os.listdir(where) if seed_name(e)}

        def undo_dir() -> None:
            for entry in os.listdir(where):
                if seed_name(entry) is not None and entry not in kept:
                    (where / entry).unlink()
            for entry, data in kept.items():
                atomic_write(where / entry, data, 0o600)

        return undo_dir
    if where.is_block_device():
        with open(where, "rb") as f:
            head = f.read(length)

        def undo_device() -> None:
            fd = os.open(where, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, head, 0)
                os.fsync(fd)
            finally:
                os.close(fd)

        return undo_device
    before = where.read_bytes() if where.is_file() else None

    def undo_file() -> None:
        if before is None:
            where.unlink(missing_ok=True)
        else:
            atomic_write(where, before, 0o600)

    return undo_file


def _write_seed(where: Path, files: Mapping[str, bytes]) -> None:
    if where.is_dir() and not where.is_symlink():
        from ..core.files import atomic_write

        for entry in os.listdir(where):
            if seed_name(entry) is not None:
                (where / entry).unlink()
        for filename, data in files.items():
            atomic_write(where / filename, data, 0o600)
        return
    try:
        media.write_tar(where, files)
    except (OSError, media.SeedReadError) as e:
        raise ResetRefused(f"the seed cannot be written: {e}", 500) from None
