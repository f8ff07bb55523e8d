"""Storage at boot and on the scrub timer: what IncusOS's daemon does at start-up
(internal/storage/luks.go DecryptDrives, internal/zfs/zfs.go LoadPools) and on its
scrub schedule (ScrubAllPools), as two commands systemd runs:

    incusos-hal storage import   incusos-hal-zfs-import.service, once per boot: every
                                 drive we hold a LUKS key for is opened, then every pool we
                                 hold a key for is imported and its key loaded, then the
                                 `local` pool made on first boot (render/zpool.py decides)
    incusos-hal storage scrub    incusos-hal-scrub.service, from the generated timer: every
                                 imported pool scrubbed in turn, one at a time

A drive or pool that cannot be opened or imported is reported and skipped: a missing
disk must cost its data, never the boot. Which pools are managed is the state dir's
keys (zpool.<pool>.key), as on IncusOS; the key files are never read into a message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..sections.storage import BY_ID, drive_key_path, local_data_partition, pool_key_path
from ..state.paths import KEY_SUFFIX, LUKS_KEY_PREFIX, ZPOOL_KEY_PREFIX

Log = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Report:
    """What one run did: the names it handled, and a line per problem (never a key)."""

    done: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


@dataclass(slots=True)
class _Collect:
    done: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def report(self) -> Report:
        return Report(tuple(self.done), tuple(self.problems))


def _named(state_dir: Path, prefix: str) -> list[str]:
    try:
        names = sorted(os.listdir(state_dir))
    except OSError:
        return []
    return [
        n[len(prefix) : -len(KEY_SUFFIX)]
        for n in names
        if n.startswith(prefix) and n.endswith(KEY_SUFFIX) and len(n) > len(prefix + KEY_SUFFIX)
    ]


def managed_pools(state_dir: Path) -> list[str]:
    """The pools we hold a key for (IncusOS's getPoolsWithKnownKeys), sorted."""
    return _named(state_dir, ZPOOL_KEY_PREFIX)


def encrypted_drives(state_dir: Path) -> list[str]:
    """The by-id paths of the drives we hold a LUKS key for, sorted."""
    return [BY_ID + name for name in _named(state_dir, LUKS_KEY_PREFIX)]


def open_drives(state_dir: Path, root: str = "/") -> Report:
    """Map every drive we hold a key for as /dev/mapper/luks-<by-id name> (IncusOS's
    names), before any pool is imported: a pool may sit on one."""
    from ..hal import devmapper, luks

    out = _Collect()
    for drive in encrypted_drives(state_dir):
        name = "luks-" + os.path.basename(drive)
        device = Path(root) / drive.lstrip("/")
        if devmapper.mapped(name, root):
            out.done.append(drive)
            continue
        if not device.exists():
            out.problems.append(f"encrypted drive {drive} is not present; left closed")
            continue
        try:
            key = luks.read_key_file(drive_key_path(state_dir, drive))
            luks.open_volume(device, name, key)
        except (luks.LuksError, OSError, ValueError) as e:
            out.problems.append(f"cannot open encrypted drive {drive}: {e}")
            continue
        out.done.append(drive)
    return out.report()


# `zpool import` / `zfs load-key` words that mean "already done" (IncusOS matches the same).
_ALREADY_IMPORTED = "a pool with that name already exists"
_NO_SUCH_POOL = "no such pool available"
_KEY_LOADED = "Key already loaded"


def import_pools(state_dir: Path) -> Report:
    """Import every managed pool and load its key from its key file. A pool that is not
    there, or whose key does not load, is a problem reported; the others go on."""
    from ..hal import zfs

    out = _Collect()
    ok = zfs.availability()
    if not ok.ok:
        pools = managed_pools(state_dir)
        if pools:
            out.problems.append(f"{ok.reason}: pools {', '.join(pools)} not imported")
        return out.report()
    for pool in managed_pools(state_dir):
        try:
            zfs.run(zfs.zpool_argv("import", pool))
        except zfs.ZfsError as e:
            if _NO_SUCH_POOL in str(e):
                out.problems.append(
                    f"storage pool '{pool}' cannot be imported, its contents will be unavailable"
                )
                continue
            if _ALREADY_IMPORTED not in str(e):
                out.problems.append(f"storage pool '{pool}': {e}")
                continue
        try:
            # The key's place is set here too: a pool imported from another machine's
            # backup may name a different state dir.
            zfs.run(zfs.set_argv(pool, "keylocation", f"file://{pool_key_path(state_dir, pool)}"))
            zfs.load_key(pool)
        except zfs.ZfsError as e:
            if _KEY_LOADED not in str(e):
                out.problems.append(f"storage pool '{pool}': its key does not load: {e}")
                continue
        out.done.append(pool)
    return out.report()


def scrub_pools(wait: bool = True) -> Report:
    """IncusOS's ScrubAllPools: each imported pool in turn, skipping one already being
    scrubbed; `zpool scrub -w` waits for it to finish, so pools are scrubbed one at a time."""
    from ..hal import zfs

    out = _Collect()
    ok = zfs.availability()
    if not ok.ok:
        out.problems.append(ok.reason)
        return out.report()
    try:
        pools = zfs.status()
    except zfs.ZfsError as e:
        out.problems.append(str(e))
        return out.report()
    for name, pool in sorted(pools.items()):
        scan = pool.scan
        if scan is not None and scan.function == "SCRUB" and scan.state == "SCANNING":
            out.done.append(name)
            continue
        try:
            zfs.run(["zpool", "scrub", *(["-w"] if wait else []), name], timeout=None)
        except zfs.ZfsError as e:
            out.problems.append(f"scrub of '{name}': {e}")
            continue
        out.done.append(name)
    return out.report()


def _grow_local(out: _Collect) -> Report:
    """The `local` pool grown into its partition when that grew (a VM's disk enlarged)."""
    from ..hal import zfs
    from ..render.zpool import local_expand_argv

    try:
        status = zfs.status(zfs.LOCAL_POOL).get(zfs.LOCAL_POOL)
        if status is None:
            return out.report()
        text = zfs.run(["zpool", "get", "-Hp", "-o", "value", "expandsize", zfs.LOCAL_POOL])
        expandsize = int(text.strip()) if text.strip().isdigit() else 0
        for argv in local_expand_argv(zfs.layout(status), expandsize):
            zfs.run(argv)
    except zfs.ZfsError as e:
        out.problems.append(f"storage pool 'local' not grown: {e}")
    return out.report()


def ensure_local_pool(state_dir: Path, root: str = "/") -> Report:
    """The `local` pool, as IncusOS's first boot makes it: on the partition labelled
    local-data, raid0, encrypted with a new key in the state dir. Never over a pool we
    hold a key for, never with -f (zpool refuses a device that holds a filesystem)."""
    from ..hal import zfs
    from ..render.zpool import local_create_argv, local_pool_decision

    out = _Collect()
    if not zfs.availability().ok:
        return out.report()  # import_pools said why
    key = pool_key_path(state_dir, zfs.LOCAL_POOL)
    partition = local_data_partition(root)
    decision = local_pool_decision(zfs.pool_exists(zfs.LOCAL_POOL), key.exists(), partition)
    if decision == "present":
        return _grow_local(out)
    if decision == "no-partition":
        out.problems.append("no partition labelled local-data: no 'local' pool")
        return out.report()
    if decision == "key-without-pool":
        out.problems.append(
            f"storage pool 'local' did not import; its partition {partition} is left as it is"
        )
        return out.report()
    try:
        zfs.run(zfs.zpool_argv("import", zfs.LOCAL_POOL))
    except zfs.ZfsError:
        pass  # none there: a first boot
    else:
        # A reinstall: the pool is there, its key is not. Exported again, so the
        # operator's :import-pool with the recovery key brings it back (as on IncusOS).
        out.problems.append("storage pool 'local' is missing its encryption key")
        try:
            zfs.run(zfs.zpool_argv("export", zfs.LOCAL_POOL))
        except zfs.ZfsError as e:
            out.problems.append(f"storage pool 'local': {e}")
        return out.report()
    from ..core.files import atomic_write

    try:
        import secrets

        atomic_write(key, secrets.token_bytes(32), 0o600)
        zfs.run(local_create_argv(partition, str(key)))
    except (zfs.ZfsError, OSError) as e:
        key.unlink(missing_ok=True)
        out.problems.append(f"cannot create storage pool 'local' on {partition}: {e}")
        return out.report()
    out.done.append(zfs.LOCAL_POOL)
    return out.report()
