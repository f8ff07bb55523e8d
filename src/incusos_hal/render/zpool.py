"""The storage PUT's planner: (the pools as they are, the pools asked for, the drives) ->
the ordered steps that get there, or the errors that refuse it. Pure: the edge resolves
device names and reads the pools first; the section runs the steps.

IncusOS's rules (lxc/incus-os incus-osd/internal/zfs/zfs.go, CreateZpool/UpdateZpool):
device lists are positional against the pool's sorted current list. An empty entry takes
that device offline (removes it from a raid0), a different one replaces it, extra ones
are attached (mirror, raidz expansion: one at a time; raid10: a pair) or added (raid0);
a degraded member that is physically gone is replaced by an extra one; raid0 becomes
raid1 with exactly two devices; a list never shrinks. Beyond IncusOS, every change is
checked whole before anything runs (a missing device, the boot drive, another pool's
member, a duplicate: 400 naming the field), each step carries the command that puts it
back, and wiping replaced devices waits until every other step succeeded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..config.errors import FieldError
from ..config.model import StoragePool
from ..hal.zfsparse import LOCAL_POOL, Layout, create_argv, set_argv, zpool_argv

StepKind = Literal["new-key", "run", "wipe", "partition-local"]


@dataclass(frozen=True, slots=True)
class Step:
    """One thing the section does. `run`: argv, undone by `undo` (empty: nothing to put
    back, or nothing that can be); `new-key`: a pool's key file (undone by removing it);
    `wipe`: a device left by `pool`; `partition-local`: the local pool's partition 11
    on a second disk (IncusOS's offset)."""

    kind: StepKind
    argv: tuple[str, ...] = ()
    undo: tuple[str, ...] = ()
    target: str = ""
    pool: str = ""  # `wipe`: the pool the device left (ZFS may still read it: a resilver)


@dataclass(frozen=True, slots=True)
class Drive:
    id: str  # /dev/disk/by-id/...
    size: int = 0
    boot: bool = False
    member_pool: str = ""


@dataclass(frozen=True, slots=True)
class Machine:
    """What the planner knows of the machine, read by the edge beforehand."""

    pools: Mapping[str, Layout]
    drives: Mapping[str, Drive]  # by id
    # Every name the operator may use for a device (/dev/sdb, a by-id or by-path link,
    # a partition) -> its by-id path; a name absent here does not exist.
    resolve: Mapping[str, str]
    # Device paths that exist now (a degraded member not here is physically gone).
    present: frozenset[str] = frozenset()
    keys: frozenset[str] = frozenset()  # pools whose key file is in the state dir
    local_root: str = ""  # the boot disk's local-data partition, by id
    sizes: Mapping[str, int] = field(default_factory=dict)  # by id, partitions too


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...]
    errors: tuple[FieldError, ...]


def _drive_of(dev: str) -> str:
    """The whole disk a by-id partition link belongs to (IncusOS's -partN suffix)."""
    head, sep, tail = dev.rpartition("-part")
    return head if sep and tail.isdigit() else dev


class _Planner:
    def __init__(self, m: Machine, keyfile: Callable[[str], str]) -> None:
        self.m = m
        self.keyfile = keyfile
        self.steps: list[Step] = []
        self.wipes: list[Step] = []
        self.errors: list[FieldError] = []
        self.claimed: dict[str, str] = {}  # by-id -> the field that names it

    def fail(self, where: str, message: str) -> None:
        self.errors.append(FieldError(where, message))

    def run(self, argv: Sequence[str], undo: Sequence[str] = ()) -> None:
        self.steps.append(Step("run", tuple(argv), tuple(undo)))

    def device(self, pool: str, name: str, where: str, *, own: Sequence[str] = ()) -> str | None:
        """The by-id path of a device entering `pool`, or None (and an error)."""
        dev = self.m.resolve.get(name)
        if dev is None:
            self.fail(where, f"device {name} does not exist")
            return None
        drive = self.m.drives.get(_drive_of(dev))
        if dev in self.claimed:
            self.fail(where, f"device {name} is already used by {self.claimed[dev]}")
            return None
        self.claimed[dev] = where
        if dev in own:
            return dev
        if (
            drive is not None
            and drive.boot
            and not (pool == LOCAL_POOL and dev == self.m.local_root)
        ):
            self.fail(
                where,
                f"list of devices includes the system root drive {name},"
                " which can't be used in other zpools",
            )
            return None
        if drive is not None and drive.member_pool and drive.member_pool != pool:
            self.fail(where, f"device {name} is already a member of pool '{drive.member_pool}'")
            return None
        return dev

    # -- a new pool ---------------------------------------------------------------------

    def create(self, pool: StoragePool, p: str) -> None:
        name = pool.name
        if name in self.m.keys:
            self.fail(f"{p}.name", f"encryption key for '{name}' already exists")
        if not pool.devices:
            self.fail(f"{p}.devices", "at least one device must be specified")
        if pool.type == "zfs-raid1" and len(pool.devices) < 2:
            self.fail(
                f"{p}.devices", "at least two devices must be specified when creating a raid1 pool"
            )
        if pool.type == "zfs-raid10":
            if len(pool.devices) < 4:
                self.fail(
                    f"{p}.devices",
                    "at least four devices must be specified when creating a raid10 pool",
                )
            elif len(pool.devices) % 2:
                self.fail(
                    f"{p}.devices",
                    "an even number of devices must be specified when creating a raid10 pool",
                )
        special = pool.special
        if special is not None:
            sp = f"{p}.special.devices"
            if special.type == "zfs-raid1" and len(special.devices) < 2:
                self.fail(
                    sp, "at least two devices must be specified when creating a raid1 special vdev"
                )
            if special.type == "zfs-raid10" and (
                len(special.devices) < 4 or len(special.devices) % 2
            ):
                self.fail(
                    sp,
                    "at least four devices, an even number, must be specified"
                    " for a raid10 special vdev",
                )

        def ids(group: str, names: Sequence[str]) -> list[str]:
            out = []
            for j, n in enumerate(names):
                where = f"{p}.{group}[{j}]"
                if n == "":
                    self.fail(where, "a new pool's device cannot be empty")
                    continue
                dev = self.device(name, n, where)
                if dev is not None:
                    out.append(dev)
            return out

        devices = ids("devices", pool.devices)
        cache = ids("cache", pool.cache)
        log = ids("log", pool.log)
        special_devices = ids("special.devices", special.devices) if special else []
        mixed = any(
            len({self.m.sizes.get(d, 0) for d in group}) > 1 for group in (devices, special_devices)
        )
        if mixed and not pool.allow_mixed_dev_sizes:
            self.fail(
                f"{p}.devices",
                "refusing to create new zpool with devices of different sizes"
                " unless AllowMixedDevSizes is true",
            )
        if self.errors:
            return
        keyfile = self.keyfile(name)
        self.steps.append(Step("new-key", target=name))
        argv = create_argv(
            name,
            pool.type,
            devices,
            keyfile=keyfile,
            cache=cache,
            log=log,
            special_type=special.type if special else "",
            special=special_devices,
            force=mixed,
        )
        self.run(argv, zpool_argv("destroy", name))
        if special is not None and special.special_small_blocks_size_in_kb:
            kb = special.special_small_blocks_size_in_kb
            self.run(set_argv(name, "special_small_blocks", f"{kb}K"))

    # -- an existing pool ---------------------------------------------------------------

    def update(self, pool: StoragePool, current: Layout, p: str) -> None:
        name = pool.name
        for group, new, cur in (
            ("devices", pool.devices, current.devices),
            ("log", pool.log, current.log),
            ("cache", pool.cache, current.cache),
        ):
            if len(new) < len(cur):
                what = "" if group == "devices" else f"{group} "
                self.fail(
                    f"{p}.{group}",
                    f"only {len(new)} {what}devices provided in update,"
                    f" expected at least {len(cur)}",
                )
        if pool.special is not None and len(pool.special.devices) < len(current.special):
            self.fail(
                f"{p}.special.devices",
                f"only {len(pool.special.devices)} special device devices provided in update,"
                f" expected at least {len(current.special)}",
            )
        if pool.type != current.type and not (
            current.type == "zfs-raid0" and pool.type == "zfs-raid1"
        ):
            self.fail(
                f"{p}.type",
                f"pool '{name}' is {current.type}: its type cannot change"
                " (only zfs-raid0 to zfs-raid1)",
            )
        if name == LOCAL_POOL:
            self.local_rules(pool, p)
        if self.errors:
            return
        if current.type == "zfs-raid0" and pool.type == "zfs-raid1":
            self.to_mirror(pool, current, p)
        else:
            self.group(
                name,
                pool.type,
                "devices",
                current.devices,
                current.devices_degraded,
                pool.devices,
                p,
                current,
            )
        log_type = "zfs-raid1" if len(pool.log) > 1 else "zfs-raid0"
        self.group(name, log_type, "log", current.log, current.log_degraded, pool.log, p, current)
        self.group(
            name,
            "zfs-raid0",
            "cache",
            current.cache,
            current.cache_degraded,
            pool.cache,
            p,
            current,
        )
        if pool.special is not None:
            self.group(
                name,
                pool.special.type,
                "special.devices",
                current.special,
                current.special_degraded,
                pool.special.devices,
                p,
                current,
            )

    def local_rules(self, pool: StoragePool, p: str) -> None:
        if pool.type not in ("zfs-raid0", "zfs-raid1"):
            self.fail(
                f"{p}.type", "special zpool 'local' type must be either zfs-raid0 or zfs-raid1"
            )
        if len(pool.devices) > 2:
            self.fail(
                f"{p}.devices", "special zpool 'local' cannot consist of more than two devices"
            )
        if pool.log:
            self.fail(f"{p}.log", "special zpool 'local' cannot have any log devices")
        if pool.cache:
            self.fail(f"{p}.cache", "special zpool 'local' cannot have any cache devices")
        root = self.m.local_root
        if root and root not in {self.m.resolve.get(d, d) for d in pool.devices}:
            self.fail(
                f"{p}.devices",
                f"special zpool 'local' must always include main system partition '{root}'",
            )

    def to_mirror(self, pool: StoragePool, current: Layout, p: str) -> None:
        if len(current.devices) != 1:
            self.fail(
                f"{p}.type", "cannot convert a pool with more than one device to a mirrored pool"
            )
            return
        if len(pool.devices) != 2:
            self.fail(f"{p}.devices", "converting to a mirrored pool requires exactly two devices")
            return
        existing = current.devices[0]
        own = current.members()
        ids = [
            self.device(pool.name, n, f"{p}.devices[{j}]", own=own) if n else None
            for j, n in enumerate(pool.devices)
        ]
        if None in ids:
            if not self.errors:
                self.fail(
                    f"{p}.devices", "converting to a mirrored pool requires exactly two devices"
                )
            return
        new = ids[1] if ids[0] == existing else ids[0]
        assert new is not None
        if existing not in ids:
            self.fail(f"{p}.devices", f"the pool's device {existing} must stay in the list")
            return
        new = self.local_partition(pool.name, new)
        self.run(
            zpool_argv("attach", pool.name, existing, new), zpool_argv("detach", pool.name, new)
        )

    def local_partition(self, pool: str, dev: str) -> str:
        if pool != LOCAL_POOL or dev.endswith("-part11"):
            return dev
        self.steps.append(Step("partition-local", target=dev))
        return dev + "-part11"

    def group(
        self,
        name: str,
        vtype: str,
        group: str,
        current: Sequence[str],
        degraded: Sequence[str],
        new: Sequence[str],
        p: str,
        layout: Layout,
    ) -> None:
        cur = list(current)
        for gone in degraded:
            if len(cur) >= len(new):
                break
            if gone not in self.m.present:
                cur.append(gone)
        own = layout.members()
        for idx, old in enumerate(cur):
            where = f"{p}.{group}[{idx}]"
            want = new[idx]
            if want == "":
                if vtype == "zfs-raid0":
                    self.run(zpool_argv("remove", name, old))
                    self.wipes.append(Step("wipe", target=old, pool=name))
                else:
                    self.run(zpool_argv("offline", name, old), zpool_argv("online", name, old))
                continue
            dev = self.device(name, want, where, own=own)
            if dev is None or dev == old:
                continue
            if name == LOCAL_POOL and vtype == "zfs-raid1":
                dev = self.local_partition(name, dev)
            undo = zpool_argv("replace", name, dev, old) if old in self.m.present else ()
            self.run(zpool_argv("replace", name, old, dev), undo)
            old_disk = old.removesuffix("-part11") if name == LOCAL_POOL else old
            if old_disk in self.m.present:
                self.wipes.append(Step("wipe", target=old_disk, pool=name))
        self.extras(name, vtype, group, current, degraded, list(new[len(cur) :]), len(cur), p, own)

    def extras(
        self,
        name: str,
        vtype: str,
        group: str,
        current: Sequence[str],
        degraded: Sequence[str],
        extra: list[str],
        start: int,
        p: str,
        own: Sequence[str],
    ) -> None:
        """Devices past the current list: added (raid0), onlined, or attached."""
        if not extra:
            return
        where = f"{p}.{group}[{start}]"
        ids = []
        for j, n in enumerate(extra):
            w = f"{p}.{group}[{start + j}]"
            if n == "":
                self.fail(w, "a device added to the pool cannot be empty")
                return
            dev = self.device(name, n, w, own=own)
            if dev is None:
                return
            ids.append(dev)
        if vtype == "zfs-raid0":
            self.run(zpool_argv("add", name, *ids), ())
            return
        if len(ids) == 1 and ids[0] in degraded:
            self.run(zpool_argv("online", name, ids[0]), zpool_argv("offline", name, ids[0]))
            return
        if vtype == "zfs-raid10":
            if len(ids) != 2:
                self.fail(where, "expanding a raid10 pool requires a pair of new devices")
                return
        elif len(ids) != 1:
            self.fail(
                where,
                "expanding a pool can only be performed one device at a time,"
                " due to a required resilver between expansions",
            )
            return
        members = sorted(current)
        if not members:
            self.fail(where, f"pool '{name}' has no healthy device to attach to")
            return
        if vtype.startswith("zfs-raidz"):
            # raidz expansion cannot be undone (OpenZFS 2.3).
            self.run(zpool_argv("attach", name, vtype.removeprefix("zfs-") + "-0", ids[0]))
        else:
            self.run(
                zpool_argv("attach", name, members[0], ids[0]), zpool_argv("detach", name, ids[0])
            )
        if vtype == "zfs-raid10":
            self.run(
                zpool_argv("attach", name, members[-1], ids[1]), zpool_argv("detach", name, ids[1])
            )


def plan(
    pools: Sequence[StoragePool],
    machine: Machine,
    keyfile: Callable[[str], str],
    path: str = "storage.pools",
) -> Plan:
    """Every pool's steps, or every error; nothing is planned when any error is found."""
    planner = _Planner(machine, keyfile)
    for i, pool in enumerate(pools):
        p = f"{path}[{i}]"
        current = machine.pools.get(pool.name)
        if current is None:
            planner.create(pool, p)
        else:
            planner.update(pool, current, p)
    if planner.errors:
        return Plan((), tuple(planner.errors))
    return Plan(tuple(planner.steps + planner.wipes), ())


# -- the local pool at boot ---------------------------------------------------------------

LocalDecision = Literal["present", "no-partition", "key-without-pool", "import-or-create"]


def local_pool_decision(imported: bool, have_key: bool, partition: str) -> LocalDecision:
    """What the boot does about the `local` pool (IncusOS's LoadPools, made safe):

    present            imported (with its key, by the import of every managed pool)
    no-partition       no partition labelled local-data: nothing to build it on
    key-without-pool   we hold its key but it did not import (its disk is missing, say):
                       reported, and never a new pool over whatever the partition holds
    import-or-create   first boot: a `local` pool already on the partition is imported
                       (a reinstall; its key is then missing, the operator gives it with
                       :import-pool), otherwise a new one is created on the partition
    """
    if imported:
        return "present"
    if not partition:
        return "no-partition"
    if have_key:
        return "key-without-pool"
    return "import-or-create"


def local_create_argv(partition: str, keyfile: str) -> list[str]:
    """IncusOS's first-boot pool: raid0 on the local-data partition, its usual options."""
    return create_argv(LOCAL_POOL, "zfs-raid0", [partition], keyfile=keyfile)


def application_dataset_argv(application: str) -> list[str]:
    """IncusOS's dataset for an application's data (CreateApplicationDataset): local/<app>,
    mounted at /var/lib/<app>/ and tagged incusos:use=<app>."""
    if not application or not all(c.isascii() and (c.isalnum() or c in "-_") for c in application):
        raise ValueError(f"not an application name: {application!r}")
    return [
        "zfs",
        "create",
        "-o",
        f"mountpoint=/var/lib/{application}/",
        "-o",
        f"incusos:use={application}",
        f"{LOCAL_POOL}/{application}",
    ]


def local_expand_argv(layout: Layout, expandsize: int) -> list[list[str]]:
    """IncusOS's ExpandLocalPool, when the partition under a single-device raid0 `local`
    pool has grown (`expandsize`, the space the pool could take, is not zero): autoexpand
    on, then the device brought online expanded. Nothing for a mirror or a two-disk pool."""
    if layout.type != "zfs-raid0" or len(layout.devices) != 1 or expandsize <= 0:
        return []
    return [
        zpool_argv("set", LOCAL_POOL, "autoexpand=on"),
        ["zpool", "online", "-e", LOCAL_POOL, layout.devices[0]],
    ]
