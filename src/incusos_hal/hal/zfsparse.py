"""ZFS's pure half: OpenZFS 2.3's JSON parsed into typed values, IncusOS's reading of
a pool, and the commands that change pools as argv. No process, no file: the storage
planner (render/zpool.py) builds on it, `hal/zfs.py` runs it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

PoolType = Literal["zfs-raid0", "zfs-raid1", "zfs-raid10", "zfs-raidz1", "zfs-raidz2", "zfs-raidz3"]
POOL_TYPES: tuple[PoolType, ...] = (
    "zfs-raid0",
    "zfs-raid1",
    "zfs-raid10",
    "zfs-raidz1",
    "zfs-raidz2",
    "zfs-raidz3",
)
BY_ID = "/dev/disk/by-id/"
BY_PARTLABEL = "/dev/disk/by-partlabel/"
# IncusOS's local pool lives on the partition of this label (and -part11 on a second disk).
LOCAL_POOL = "local"
LOCAL_PARTLABEL = "local-data"
# The local pool's partition on a second disk: its number and first sector (IncusOS's,
# where the boot disk's local-data partition starts).
LOCAL_PARTITION = 11
LOCAL_PARTITION_START = 69826560


class ZfsError(RuntimeError):
    """A zpool/zfs command failed, or printed what cannot be parsed. The message is the
    command's own words (IncusOS's API shows them); never a key."""


# -- parsed values --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vdev:
    name: str
    vdev_type: str  # root, mirror, raidz, disk, file, ...
    state: str
    path: str = ""
    read_errors: int = 0
    write_errors: int = 0
    checksum_errors: int = 0
    alloc_space: int = 0
    total_space: int = 0
    def_space: int = 0
    children: tuple[Vdev, ...] = ()


@dataclass(frozen=True, slots=True)
class Scan:
    function: str  # SCRUB, RESILVER, ...
    state: str  # SCANNING, FINISHED, CANCELED, NONE
    start_time: int
    end_time: int
    to_examine: int
    examined: int
    errors: int


@dataclass(frozen=True, slots=True)
class PoolStatus:
    name: str
    state: str
    vdevs: tuple[Vdev, ...]  # the data vdevs (the root vdev's children)
    logs: tuple[Vdev, ...] = ()
    l2cache: tuple[Vdev, ...] = ()
    special: tuple[Vdev, ...] = ()
    spares: tuple[Vdev, ...] = ()
    scan: Scan | None = None


def _num(value: Any) -> int:
    """A number as `--json-int` prints it (an int), or as plain `-j` does (a string)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _vdev(name: str, raw: Any) -> Vdev:
    if not isinstance(raw, Mapping):
        raise ZfsError(f"zpool status: vdev {name!r} is not an object")
    children = raw.get("vdevs") or {}
    if not isinstance(children, Mapping):
        raise ZfsError(f"zpool status: vdev {name!r} has no object of children")
    return Vdev(
        name=_str(raw.get("name")) or name,
        vdev_type=_str(raw.get("vdev_type")),
        state=_str(raw.get("state")),
        path=_str(raw.get("path")),
        read_errors=_num(raw.get("read_errors")),
        write_errors=_num(raw.get("write_errors")),
        checksum_errors=_num(raw.get("checksum_errors")),
        alloc_space=_num(raw.get("alloc_space")),
        total_space=_num(raw.get("total_space")),
        def_space=_num(raw.get("def_space")),
        children=tuple(_vdev(k, v) for k, v in sorted(children.items())),
    )


def _group(raw: Any, what: str) -> tuple[Vdev, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ZfsError(f"zpool status: {what} is not an object")
    return tuple(_vdev(k, v) for k, v in sorted(raw.items()))


def _scan(raw: Any) -> Scan | None:
    if not isinstance(raw, Mapping):
        return None
    return Scan(
        function=_str(raw.get("function")),
        state=_str(raw.get("state")),
        start_time=_num(raw.get("start_time")),
        end_time=_num(raw.get("end_time")),
        to_examine=_num(raw.get("to_examine")),
        examined=_num(raw.get("examined")),
        errors=_num(raw.get("errors")),
    )


def parse_status(text: str) -> dict[str, PoolStatus]:
    """`zpool status -jp --json-int` (all pools or one) as PoolStatus values by name."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ZfsError(f"zpool status: not JSON ({e})") from None
    pools = doc.get("pools") if isinstance(doc, Mapping) else None
    if pools is None:
        return {}
    if not isinstance(pools, Mapping):
        raise ZfsError("zpool status: pools is not an object")
    out: dict[str, PoolStatus] = {}
    for name, raw in sorted(pools.items()):
        if not isinstance(raw, Mapping):
            raise ZfsError(f"zpool status: pool {name!r} is not an object")
        vdevs = raw.get("vdevs") or {}
        if not isinstance(vdevs, Mapping):
            raise ZfsError(f"zpool status: pool {name!r} vdevs is not an object")
        root = vdevs.get(name)
        data = _vdev(name, root).children if root is not None else ()
        out[name] = PoolStatus(
            name=name,
            state=_str(raw.get("state")),
            vdevs=data,
            logs=_group(raw.get("logs"), "logs"),
            l2cache=_group(raw.get("l2cache"), "l2cache"),
            special=_group(raw.get("special"), "special"),
            spares=_group(raw.get("spares"), "spares"),
            scan=_scan(raw.get("scan_stats")),
        )
    return out


PropValue = str | int


def parse_datasets(text: str) -> dict[str, dict[str, PropValue]]:
    """`zfs list -j --json-int -o ...` or `zfs get -j --json-int ...`: each dataset's
    properties by name (a number stays a number; `-` and absent user properties are "-")."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ZfsError(f"zfs: not JSON ({e})") from None
    datasets = doc.get("datasets") if isinstance(doc, Mapping) else None
    if datasets is None:
        return {}
    if not isinstance(datasets, Mapping):
        raise ZfsError("zfs: datasets is not an object")
    out: dict[str, dict[str, PropValue]] = {}
    for name, raw in sorted(datasets.items()):
        props = raw.get("properties") if isinstance(raw, Mapping) else None
        values: dict[str, PropValue] = {}
        if isinstance(props, Mapping):
            for prop, entry in props.items():
                value = entry.get("value") if isinstance(entry, Mapping) else None
                if isinstance(value, bool):
                    value = str(value).lower()
                if isinstance(value, int | str):
                    values[prop] = value
                elif isinstance(value, float):
                    values[prop] = int(value)
        out[name] = values
    return out


# -- IncusOS's view of a pool ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """A pool as IncusOS's SystemStoragePool shows it: devices by-id, sorted, healthy
    apart from degraded; the type read back from the vdev names."""

    type: str
    devices: tuple[str, ...]
    devices_degraded: tuple[str, ...]
    log: tuple[str, ...]
    log_degraded: tuple[str, ...]
    cache: tuple[str, ...]
    cache_degraded: tuple[str, ...]
    special_type: str
    special: tuple[str, ...]
    special_degraded: tuple[str, ...]
    raw_size: int
    usable_size: int
    allocated: int

    def members(self) -> tuple[str, ...]:
        return (
            self.devices
            + self.devices_degraded
            + self.log
            + self.log_degraded
            + self.cache
            + self.cache_degraded
            + self.special
            + self.special_degraded
        )


def _leaf_path(vdev: Vdev) -> str:
    if vdev.vdev_type == "file":
        return vdev.path
    # Pools made before IncusOS's storage API used the partition label.
    if vdev.name == LOCAL_PARTLABEL:
        return BY_PARTLABEL + vdev.name
    return BY_ID + vdev.name


def _split(leaves: Sequence[Vdev]) -> tuple[list[str], list[str]]:
    good: list[str] = []
    bad: list[str] = []
    for leaf in leaves:
        (good if leaf.state == "ONLINE" else bad).append(_leaf_path(leaf))
    return good, bad


def _group_type(vdevs: Sequence[Vdev]) -> str:
    mirrors = [v for v in vdevs if v.vdev_type == "mirror"]
    raidz = [v for v in vdevs if v.vdev_type in ("raidz", "draid") or v.name.startswith("raidz")]
    if raidz:
        return "zfs-" + raidz[0].name.rsplit("-", 1)[0]
    if len(mirrors) > 1:
        return "zfs-raid10"
    if mirrors:
        return "zfs-raid1"
    return "zfs-raid0" if vdevs else ""


def _leaves(vdevs: Sequence[Vdev]) -> list[Vdev]:
    out: list[Vdev] = []
    for v in vdevs:
        if v.children:
            out += _leaves(v.children)
        else:
            out.append(v)
    return out


def layout(pool: PoolStatus) -> Layout:
    """IncusOS's reading of `zpool status` (internal/storage/storage.go): disks are named
    by-id, the top-level vdev names give the type, sizes summed over the data vdevs."""
    devices, devices_degraded = _split(_leaves(pool.vdevs))
    log, log_degraded = _split(_leaves(pool.logs))
    cache, cache_degraded = _split(_leaves(pool.l2cache))
    special, special_degraded = _split(_leaves(pool.special))
    return Layout(
        type=_group_type(pool.vdevs),
        devices=tuple(sorted(devices)),
        devices_degraded=tuple(sorted(devices_degraded)),
        log=tuple(sorted(log)),
        log_degraded=tuple(sorted(log_degraded)),
        cache=tuple(sorted(cache)),
        cache_degraded=tuple(sorted(cache_degraded)),
        special_type=_group_type(pool.special),
        special=tuple(sorted(special)),
        special_degraded=tuple(sorted(special_degraded)),
        raw_size=sum(v.total_space for v in pool.vdevs),
        usable_size=sum(v.def_space for v in pool.vdevs),
        allocated=sum(v.alloc_space for v in pool.vdevs),
    )


ScrubState = Literal["UNKNOWN", "IN_PROGRESS", "FINISHED"]


def scrub_state(scan: Scan) -> ScrubState:
    return {"SCANNING": "IN_PROGRESS", "FINISHED": "FINISHED"}.get(scan.state, "UNKNOWN")  # type: ignore[return-value]


def scrub_progress(scan: Scan) -> str:
    """IncusOS's percentage: 100% once finished, capped at 99.99% while running."""
    if scan.state == "FINISHED":
        return "100.00%"
    if scan.to_examine == 0:
        return "0.00%"
    progress = scan.examined / scan.to_examine * 100
    return "99.99%" if progress > 100 else f"{progress:.2f}%"


# -- commands as argv (pure) ------------------------------------------------------------------


def _vdev_spec(pool_type: str, devices: Sequence[str]) -> list[str]:
    """The vdev part of `zpool create` for one of IncusOS's types: raid10 is two mirrors
    of the halves, as IncusOS makes it."""
    devices = list(devices)
    if pool_type == "zfs-raid0":
        return devices
    if pool_type == "zfs-raid1":
        return ["mirror", *devices]
    if pool_type == "zfs-raid10":
        half = len(devices) // 2
        return ["mirror", *devices[:half], "mirror", *devices[half:]]
    if pool_type in ("zfs-raidz1", "zfs-raidz2", "zfs-raidz3"):
        return [pool_type.removeprefix("zfs-"), *devices]
    raise ValueError(f"unsupported pool type {pool_type}")


def create_argv(
    name: str,
    pool_type: str,
    devices: Sequence[str],
    *,
    keyfile: str,
    cache: Sequence[str] = (),
    log: Sequence[str] = (),
    special_type: str = "",
    special: Sequence[str] = (),
    force: bool = False,
) -> list[str]:
    """IncusOS's `zpool create`: ashift=12, no mountpoint, aes-256-gcm with a raw key from
    `keyfile`; a log of several devices is mirrored. `force` (-f) only for mixed sizes
    the operator allowed."""
    argv = ["zpool", "create"]
    if force:
        argv.append("-f")
    argv += [
        "-o",
        "ashift=12",
        "-O",
        "mountpoint=none",
        "-O",
        "encryption=aes-256-gcm",
        "-O",
        "keyformat=raw",
        "-O",
        f"keylocation=file://{keyfile}",
        name,
        *_vdev_spec(pool_type, devices),
    ]
    if cache:
        argv += ["cache", *cache]
    if log:
        argv += ["log", *(["mirror"] if len(log) > 1 else []), *log]
    if special:
        argv += ["special", *_vdev_spec(special_type, special)]
    return argv


def zpool_argv(verb: str, pool: str, *args: str) -> list[str]:
    """attach/replace/offline/online/remove/add/export/import/scrub/destroy."""
    if verb not in {
        "attach",
        "replace",
        "offline",
        "online",
        "remove",
        "add",
        "export",
        "import",
        "scrub",
        "destroy",
        "detach",
        "set",
    }:
        raise ValueError(f"zpool {verb}: not a verb this module runs")
    return ["zpool", verb, pool, *args] if verb != "set" else ["zpool", "set", *args, pool]


def set_argv(dataset: str, prop: str, value: str) -> list[str]:
    return ["zfs", "set", f"{prop}={value}", dataset]


def dataset_create_argv(dataset: str, props: Mapping[str, str]) -> list[str]:
    argv = ["zfs", "create"]
    for k, v in sorted(props.items()):
        argv += ["-o", f"{k}={v}"]
    return [*argv, dataset]


def dataset_destroy_argv(dataset: str, recursive: bool = False) -> list[str]:
    return ["zfs", "destroy", *(["-R"] if recursive else []), dataset]


def load_key_argv(dataset: str) -> list[str]:
    return ["zfs", "load-key", dataset]


# The commands that may mount or unmount a filesystem: run in the machine's mount
# namespace (core/tools.py), else a mount made by the API service is seen by no one and a
# mounted filesystem cannot be destroyed from it.
_MOUNTING = {
    "zpool": {"create", "import", "export", "destroy"},
    "zfs": {"create", "destroy", "mount", "unmount", "umount", "set", "inherit", "rename"},
}


def touches_mounts(argv: Sequence[str]) -> bool:
    return len(argv) > 1 and argv[1] in _MOUNTING.get(argv[0], set())
