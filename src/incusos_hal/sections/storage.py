"""`/1.0/system/storage`: drives, ZFS pools and the root partition (IncusOS's
SystemStorage), pools created and changed through the planner (render/zpool.py), and
IncusOS's nine actions.

ZFS unavailable (no tools, no module: a Secure Boot machine with DKMS modules) is a
state: GET shows the drives and no pools, with `zfs` saying why; a PUT that asks for
pools and every pool action answer 503 with that reason. Keys live in the state dir
(state/paths.py), 0600, written atomically; no message carries one.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.errors import FieldError
from ..state.paths import KEY_SUFFIX, LOCAL_KEY_SKIP, LUKS_KEY_PREFIX, ZPOOL_KEY_PREFIX
from .base import Action, Context, Refused, Section, UnitInputs

if TYPE_CHECKING:
    from ..config.model import Config
    from ..core.tree import Tree
    from ..hal.zfsparse import PoolStatus
    from ..render.zpool import Machine, Step

BY_ID = "/dev/disk/by-id/"
VOLUME_USES = ("incus", "linstor")

# What IncusOS answers 500 for (its InternalError): the command on the machine failed.
_UNAVAILABLE = (503, "ZFS unavailable (no zpool/zfs tools or no kernel module)")
_FAILED = (500, "the command on the machine failed (IncusOS's status); nothing is left half done")


# -- keys ---------------------------------------------------------------------------------


def pool_key_path(state_dir: Path, pool: str) -> Path:
    return state_dir / f"{ZPOOL_KEY_PREFIX}{pool}{KEY_SUFFIX}"


def drive_key_path(state_dir: Path, drive_id: str) -> Path:
    return state_dir / f"{LUKS_KEY_PREFIX}{os.path.basename(drive_id)}{KEY_SUFFIX}"


def _keys(state_dir: Path, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        names = sorted(os.listdir(state_dir))
    except OSError:
        return out
    for name in names:
        if name.startswith(prefix) and name.endswith(KEY_SUFFIX):
            try:
                data = (state_dir / name).read_bytes()
            except OSError:
                continue
            out[name[len(prefix) : -len(KEY_SUFFIX)]] = base64.b64encode(data).decode()
    return out


def pool_recovery_keys(state_dir: Path) -> dict[str, str]:
    """The security state's pool_recovery_keys: every managed pool's key, base64."""
    return _keys(state_dir, ZPOOL_KEY_PREFIX)


def drive_recovery_keys(state_dir: Path) -> dict[str, str]:
    """The security state's drive_recovery_keys, by the drive's by-id name."""
    return _keys(state_dir, LUKS_KEY_PREFIX)


def _new_key(path: Path) -> None:
    from ..core.files import atomic_write

    atomic_write(path, os.urandom(32), 0o600)  # as secrets.token_bytes does


# -- state --------------------------------------------------------------------------------


def _by_id_links(root: str) -> dict[str, str]:
    """Every /dev/disk/by-id link -> the kernel name it points at (sdb, nvme0n1p2)."""
    out: dict[str, str] = {}
    base = Path(root) / "dev/disk/by-id"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return out
    for name in entries:
        try:
            out[BY_ID + name] = os.path.basename(os.readlink(base / name))
        except OSError:
            continue
    return out


def local_data_partition(root: str) -> str:
    """The by-id path of the partition whose GPT label is `local-data` (IncusOS's
    repart.d/50-local-data.conf), read from sysfs (the kernel's PARTNAME=), so no udev
    by-partlabel link is needed; "" when there is none. The first one, by kernel name,
    when several disks carry one (a disk from another machine plugged in)."""
    from ..hal.zfsparse import LOCAL_PARTLABEL

    block = Path(root) / "sys/class/block"
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return ""
    links = _by_id_links(root)
    for name in names:
        try:
            uevent = (block / name / "uevent").read_text()
        except OSError:
            continue
        if f"PARTNAME={LOCAL_PARTLABEL}" in uevent.splitlines():
            found = _drive_id(name, links)
            if found:
                return found
    return ""


def _drive_id(kname: str, links: dict[str, str]) -> str:
    """IncusOS's DeviceToID: the first by-id link (sorted) of the device, not lvm-pv-uuid."""
    for link, target in links.items():
        if target == kname and not os.path.basename(link).startswith("lvm-pv-uuid-"):
            return link
    return ""


def _boot_disk(root: str) -> str:
    """The kernel name of the disk the running root is on ("" when unknown)."""
    try:
        st = os.stat(Path(root) / "etc")
    except OSError:
        return ""
    dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    block = Path(root) / "sys/class/block"
    try:
        names = os.listdir(block)
    except OSError:
        return ""
    for name in names:
        try:
            if (block / name / "dev").read_text().strip() != dev:
                continue
        except OSError:
            continue
        # A partition: its disk is the parent directory; a dm device: its first slave.
        real = os.path.realpath(block / name)
        if (block / name / "partition").exists():
            return os.path.basename(os.path.dirname(real))
        slaves = (
            sorted(os.listdir(block / name / "slaves"))
            if (block / name / "slaves").is_dir()
            else []
        )
        if slaves:
            inner = Path(os.path.realpath(block / slaves[0]))
            return inner.parent.name if (inner / "partition").exists() else inner.name
        return name
    return ""


def read_pools(state_dir: Path) -> tuple[dict[str, PoolStatus], str]:
    """The pools as `zpool status` shows them, or why there are none."""
    from ..hal import zfs

    ok = zfs.availability()
    if not ok.ok:
        return {}, ok.reason
    try:
        return zfs.status(), ""
    except zfs.ZfsError as e:
        return {}, str(e)


def pool_api(status: PoolStatus, state_dir: Path) -> dict[str, Any]:
    """IncusOS's SystemStoragePool for one pool (volumes and key status from zfs)."""
    from ..hal import zfs

    lay = zfs.layout(status)
    out: dict[str, Any] = {"name": status.name, "type": lay.type, "devices": list(lay.devices)}
    for key, values in (("cache", lay.cache), ("log", lay.log)):
        if values:
            out[key] = list(values)
    # The pool's three reads of zfs, side by side: each is a process that waits on the
    # kernel module more than on this one (under load, a process costs most of a GET).
    from concurrent.futures import ThreadPoolExecutor

    special = bool(lay.special or lay.special_degraded)
    with ThreadPoolExecutor(3) as ask:
        small = ask.submit(_special_small_blocks_kb, status.name) if special else None
        keystatus_of = ask.submit(_keystatus, status.name)
        volumes_of = ask.submit(_volumes, status.name)
    if small is not None:
        out["special"] = {
            "type": lay.special_type,
            "special_small_blocks_size_in_kb": small.result(),
            "devices": list(lay.special),
        }
    keystatus, volumes = keystatus_of.result(), volumes_of.result()
    out |= {
        "managed": pool_key_path(state_dir, status.name).exists(),
        "state": status.state,
        "encryption_key_status": keystatus,
    }
    scan = status.scan
    if scan is not None and scan.start_time:
        out["last_scrub"] = {
            "state": zfs.scrub_state(scan),
            "start_time": _rfc3339(scan.start_time),
            "end_time": _rfc3339(scan.end_time),
            "progress": zfs.scrub_progress(scan),
            "errors": scan.errors,
        }
    for key, values in (
        ("devices_degraded", lay.devices_degraded),
        ("cache_degraded", lay.cache_degraded),
        ("log_degraded", lay.log_degraded),
        ("special_degraded", lay.special_degraded),
    ):
        if values:
            out[key] = list(values)
    out |= {
        "raw_pool_size_in_bytes": lay.raw_size,
        "usable_pool_size_in_bytes": lay.usable_size,
        "pool_allocated_space_in_bytes": lay.allocated,
        "volumes": volumes,
    }
    return out


def _special_small_blocks_kb(pool: str) -> int:
    from ..hal import zfs

    try:
        raw = zfs.pool_properties(pool, ["special_small_blocks"]).get("special_small_blocks", 0)
    except zfs.ZfsError:
        return 0
    return int(raw) // 1024 if isinstance(raw, int) else 0


def _keystatus(pool: str) -> str:
    """IncusOS's encryption_key_status: zfs's keystatus, NONE when there is none (or zfs
    cannot say)."""
    from ..hal import zfs

    try:
        value = zfs.pool_properties(pool, ["keystatus"]).get("keystatus", "-")
    except zfs.ZfsError:
        return "NONE"
    return "NONE" if value in ("-", "") else str(value)


def _volumes(pool: str) -> list[dict[str, Any]]:
    """IncusOS's SystemStoragePoolVolume list: the pool's first-level datasets."""
    from ..hal import zfs

    try:
        found = zfs.volumes(pool)
    except zfs.ZfsError:
        return []
    volumes = []
    for name, props in found.items():
        quota, used, use = props.get("quota", 0), props.get("used", 0), props.get("incusos:use", "")
        volumes.append(
            {
                "name": name.removeprefix(pool + "/"),
                "usage_in_bytes": used if isinstance(used, int) else 0,
                "quota_in_bytes": quota if isinstance(quota, int) else 0,
                "use": use if isinstance(use, str) and use != "-" else "",
            }
        )
    return volumes


def _rfc3339(seconds: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_drives(
    root: str, state_dir: Path, pools: dict[str, PoolStatus], *, with_smart: bool = True
) -> list[dict[str, Any]]:
    """IncusOS's SystemStorageDrive list, sorted by id: the inventory's disks, SMART from
    smartctl, the pool each belongs to, and whether we hold its LUKS key. `with_smart`
    False: no smartctl (a plan needs sizes and membership only; smartctl takes seconds a
    drive, and a PUT would pay it for every drive of the machine)."""
    from ..hal import smart, zfs
    from ..inventory.storage import scan_storage

    links = _by_id_links(root)
    boot = _boot_disk(root)
    members: dict[str, str] = {}
    for name, status in pools.items():
        for dev in zfs.layout(status).members():
            target = links.get(dev)
            members[target or dev] = name
            if target is not None:  # a partition's pool is its disk's pool
                members.setdefault(_disk_of(root, target), name)
    # IncusOS skips devices without an id link (mmcblk0boot0)
    disks = [(d, i) for d in scan_storage(root).disks if (i := _drive_id(d.id, links))]
    live = root == "/" and with_smart
    infos = _smart_of([f"/dev/{d.id}" for d, _ in disks]) if live else {}
    drives = []
    for disk, drive_id in disks:
        info = infos.get(f"/dev/{disk.id}", smart.DriveInfo())
        out: dict[str, Any] = {
            "id": drive_id,
            "model_family": info.model_family,
            "model_name": info.model_name or disk.model,
            "serial_number": info.serial_number or disk.serial,
            # smartctl's device type, as IncusOS reports it ("" where smartctl has none,
            # a virtio disk); a machine read under another root (a recording, the
            # library) has no smartctl to ask: the kernel's transport then.
            "bus": info.bus if live else disk.type,
            "capacity_in_bytes": disk.size,
            "boot": disk.id == boot,
            "multipath": False,
            "removable": disk.removable,
            "remote": False,
        }
        if disk.wwn:
            out["wwn"] = disk.wwn
            if (BY_ID + "wwn-" + disk.wwn) in links:
                out["wwn_id"] = BY_ID + "wwn-" + disk.wwn
        if info.smart is not None:
            out["smart"] = info.smart.to_api()
        if disk.id in members:
            out["member_pool"] = members[disk.id]
        if drive_key_path(state_dir, drive_id).exists():
            out["encrypted"] = True
            out["encrypted_id"] = "/dev/mapper/luks-" + os.path.basename(drive_id)
        drives.append(out)
    return sorted(drives, key=lambda d: str(d["id"]))


def _smart_of(devices: list[str]) -> dict[str, Any]:
    """Every drive's SMART at once: each smartctl waits on its drive, not on the CPU, so
    a machine with many drives answers in about the slowest one's time, not their sum."""
    from concurrent.futures import ThreadPoolExecutor

    from ..hal import smart

    if len(devices) < 2:
        return {dev: smart.nvme_or_smartctl(dev) for dev in devices}
    with ThreadPoolExecutor(max_workers=min(16, len(devices))) as pool:
        return dict(zip(devices, pool.map(smart.nvme_or_smartctl, devices), strict=True))


def _disk_of(root: str, kname: str) -> str:
    real = os.path.realpath(Path(root) / "sys/class/block" / kname)
    if (Path(real) / "partition").exists():
        return os.path.basename(os.path.dirname(real))
    return kname


def read_state(ctx: Context) -> Any:
    root, state_dir = ctx.settings.root, ctx.settings.state_dir
    pools, why = read_pools(state_dir)
    st = os.statvfs(root)
    out: dict[str, Any] = {
        "drives": read_drives(root, state_dir, pools),
        "pools": [pool_api(p, state_dir) for p in pools.values()],
        "root_partition": {
            "size_in_bytes": st.f_blocks * st.f_frsize,
            "available_in_bytes": st.f_bavail * st.f_frsize,
        },
    }
    if why:
        out["zfs"] = why  # not IncusOS's: why there are no pools
    return out


# -- PUT ----------------------------------------------------------------------------------


def stored(config: Config) -> Config:
    """IncusOS stores the scrub schedule only: pools are requests, the pools the truth."""
    from dataclasses import replace

    return replace(config, storage=replace(config.storage, pools=()))


def machine(root: str, state_dir: Path, pools: dict[str, PoolStatus]) -> Machine:
    from ..hal import zfs
    from ..render.zpool import Drive, Machine

    drives_raw = read_drives(root, state_dir, pools, with_smart=False)
    links = _by_id_links(root)
    drives = {
        d["id"]: Drive(d["id"], d["capacity_in_bytes"], d["boot"], d.get("member_pool", ""))
        for d in drives_raw
    }
    resolve: dict[str, str] = {}
    sizes: dict[str, int] = {d.id: d.size for d in drives.values()}
    by_kname: dict[str, str] = {}
    for link, target in links.items():
        by_kname.setdefault(target, link)
    for link, target in links.items():
        resolve[link] = link
        resolve[f"/dev/{target}"] = by_kname[target]
        size = _size(root, target)
        if size:
            sizes.setdefault(link, size)
    layouts = {name: zfs.layout(p) for name, p in pools.items()}
    keys = frozenset(n for n in pool_recovery_keys(state_dir))
    local_root = local_data_partition(root)
    for d in drives.values():
        if not local_root and d.boot and (d.id + "-part11") in links:
            local_root = d.id + "-part11"
    present = frozenset(link for link in links)
    return Machine(layouts, drives, resolve, present, keys, local_root, sizes)


def _size(root: str, kname: str) -> int:
    try:
        return int((Path(root) / "sys/class/block" / kname / "size").read_text()) * 512
    except (OSError, ValueError):
        return 0


def check(new: Config, current: Config, root: str) -> list[FieldError]:
    """Static rules are in config/validate.py; the plan needs the machine, so it is
    made in before_store (where a refusal is also a 400 with nothing done)."""
    return []


async def before_store(ctx: Context, new: Config, current: Config) -> None:
    if not new.storage.pools:
        return
    state_dir = ctx.settings.state_dir
    pools, why = await ctx.run_in_thread(lambda: read_pools(state_dir))
    if why:
        raise Refused(503, f"config.pools: {why}")
    from ..render.zpool import plan

    m = await ctx.run_in_thread(lambda: machine(ctx.settings.root, state_dir, pools))
    result = plan(
        new.storage.pools, m, lambda name: str(pool_key_path(state_dir, name)), "config.pools"
    )
    if result.errors:
        raise Refused(400, "; ".join(str(e) for e in result.errors))
    await ctx.run_in_thread(lambda: execute(result.steps, state_dir, ctx))


# The zpool verbs that partition a whole disk and then open the new partition by its
# /dev/disk/by-id link, which udev makes: with udev's queue still full of the previous
# change's events (a pool destroyed, disks wiped), the link came after ZFS stopped
# waiting and the create failed "no such pool or dataset" (the ZFS guest, in CI).
PARTITIONING = (("zpool", "create"), ("zpool", "add"), ("zpool", "attach"), ("zpool", "replace"))


def _settle() -> None:
    """Wait for udev's queue to empty. Bounded; a settle that fails or times out only
    means the command is tried as it is."""
    from ..hal import zfs

    with contextlib.suppress(zfs.ZfsError):
        zfs.run(["udevadm", "settle", "--timeout=60"], timeout=90)


def execute(steps: tuple[Step, ...], state_dir: Path, ctx: Context) -> None:
    """Run the steps in order; when one fails, undo what the others did, newest first,
    and refuse with the failing command's words. The devices the pools left are wiped
    last, once the change is done (`wipe_left`)."""
    from ..hal import repart, zfs
    from ..hal.disk import DiskError
    from ..hal.zfsparse import LOCAL_PARTITION, LOCAL_PARTITION_START

    undo: list[tuple[str, ...] | Path] = []
    for step in steps:
        if step.kind == "wipe":
            continue
        try:
            if step.kind == "new-key":
                path = pool_key_path(state_dir, step.target)
                if path.exists():
                    raise zfs.ZfsError(f"encryption key for '{step.target}' already exists")
                _new_key(path)
                undo.append(path)
            elif step.kind == "run":
                if step.argv[:2] in PARTITIONING:
                    _settle()
                zfs.run(step.argv)
                if step.undo:
                    undo.append(step.undo)
            elif step.kind == "partition-local":
                repart.add_to_end(step.target, LOCAL_PARTITION, LOCAL_PARTITION_START)
                zfs.run(["udevadm", "settle"])
        except (zfs.ZfsError, DiskError, OSError) as e:
            for back in reversed(undo):
                try:
                    if isinstance(back, Path):
                        back.unlink(missing_ok=True)
                    else:
                        if back[:2] in PARTITIONING:  # `zpool replace` back, say
                            _settle()
                        zfs.run(back)
                except (zfs.ZfsError, OSError) as again:
                    ctx.log("error", f"storage: undoing a failed change: {again}")
            raise Refused(500, str(e)) from None
    for step in steps:
        if step.kind == "wipe":
            wipe_left(step, ctx)


# How long a change (an API request) waits for ZFS to let go of a device it replaced or
# removed (the resilver or the evacuation reads from it) before leaving it unwiped: a
# small pool's resilver on hardware ends in seconds; a large one's is not waited for.
WIPE_WAIT_S = 60.0


def wipe_left(step: Step, ctx: Context) -> None:
    """Wipe a device its pool left, once ZFS is done with it: a replaced device stays in
    the pool (a `replacing` vdev) until the resilver ends, a removed one until its data
    is evacuated, and is open exclusively meanwhile (wipefs: "Device or resource busy",
    seen in the ZFS guest). IncusOS wipes it after half a second, while ZFS may still
    read it. The change is done either way: a device still held after WIPE_WAIT_S is
    left as it is, and the log says so."""
    from ..hal import zfs

    try:
        if step.pool:
            zfs.run(["zpool", "wait", "-t", "replace,remove", step.pool], timeout=WIPE_WAIT_S)
        wipe_device(step.target)
    except (zfs.ZfsError, OSError) as e:
        ctx.log(
            "warning",
            f"storage: {step.target} left pool '{step.pool}' but was not wiped ({e}); "
            "wipe it with :wipe-drive once ZFS no longer uses it",
        )


def wipe_device(device: str) -> None:
    """IncusOS's opportunistic wipe: signatures gone (wipefs), then discard if it can."""
    import subprocess

    from ..hal import zfs

    zfs.run(["wipefs", "-a", device])
    subprocess.run(["blkdiscard", "-f", device], capture_output=True, check=False, timeout=600)


# -- actions ------------------------------------------------------------------------------


def _body(body: Any) -> dict[str, Any]:
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise Refused(400, "the request body must be a JSON object")
    return body


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise Refused(400, f"{key}: must be a string")
    if any(ord(c) < 32 or c == "\x7f" for c in value):
        raise Refused(400, f"{key}: control characters are not allowed")
    return value


def _zfs_or_refuse() -> None:
    from ..hal import zfs

    ok = zfs.availability()
    if not ok.ok:
        raise Refused(503, ok.reason)


def _drive(ctx: Context, drive_id: str) -> dict[str, Any]:
    state_dir = ctx.settings.state_dir
    pools, _why = read_pools(state_dir)
    for d in read_drives(ctx.settings.root, state_dir, pools, with_smart=False):
        if d["id"] == drive_id:
            return d
    raise Refused(400, f"drive '{drive_id}' doesn't exist")


def _device(ctx: Context, drive_id: str) -> str:
    """The drive's path as the machine under `root` names it (on a machine: the by-id
    path itself; under a scratch root, its link there, which may lead to a real device)."""
    root = ctx.settings.root
    path = drive_id if root == "/" else str(Path(root) / drive_id.lstrip("/"))
    # What is wiped or formatted must be a disk: never a file a link in a recorded tree
    # (or a stale by-id name) happens to lead to.
    try:
        is_disk = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        is_disk = False
    if not is_disk:
        raise Refused(400, f"drive '{drive_id}' is not a block device here")
    return path


def _wipe_checked(ctx: Context, drive_id: str) -> None:
    from ..hal import devmapper, luks, zfs

    d = _drive(ctx, drive_id)
    if d["boot"]:
        raise Refused(400, "cannot wipe boot drive")
    if d.get("member_pool"):
        raise Refused(400, f"cannot wipe drive belonging to pool '{d['member_pool']}'")
    key = drive_key_path(ctx.settings.state_dir, drive_id)
    if key.exists():
        name = "luks-" + os.path.basename(drive_id)
        if devmapper.mapped(name, ctx.settings.root):
            luks.close_volume(name)
        key.unlink()
    try:
        wipe_device(_device(ctx, drive_id))
    except zfs.ZfsError as e:
        raise Refused(500, str(e)) from None


async def wipe_drive(ctx: Context, body: Any) -> Any:
    b = _body(body)
    drive_id = _text(b, "id")
    if not drive_id:
        raise Refused(400, "no drive specified")
    await ctx.run_in_thread(lambda: _wipe_checked(ctx, drive_id))
    return {}


def _encrypt(ctx: Context, drive_id: str) -> None:
    from ..hal import luks

    _wipe_checked(ctx, drive_id)
    key = drive_key_path(ctx.settings.state_dir, drive_id)
    _new_key(key)
    try:
        luks.format_volume(_device(ctx, drive_id), key.read_bytes())
    except luks.LuksError as e:
        key.unlink(missing_ok=True)
        raise Refused(500, f"cannot encrypt {drive_id}: {e}") from None
    except BaseException:
        key.unlink(missing_ok=True)
        raise
    _open_drive(ctx, drive_id, key)


def _open_drive(ctx: Context, drive_id: str, key: Path) -> None:
    from ..hal import devmapper, luks

    name = "luks-" + os.path.basename(drive_id)
    if not devmapper.mapped(name, ctx.settings.root):
        try:
            luks.open_volume(_device(ctx, drive_id), name, key.read_bytes())
        except luks.LuksError as e:
            # device-mapper may be unavailable (a container): the key is kept and the
            # drive opens at the next boot through crypttab.
            ctx.log("warning", f"storage: {drive_id} is encrypted but not opened now: {e}")


async def encrypt_drive(ctx: Context, body: Any) -> Any:
    b = _body(body)
    drive_id = _text(b, "id")
    if not drive_id:
        raise Refused(400, "no drive specified")
    if not drive_id.startswith(BY_ID):
        raise Refused(400, "invalid disk id")
    await ctx.run_in_thread(lambda: _encrypt(ctx, drive_id))
    return {}


def _import_drive(ctx: Context, drive_id: str, raw: bytes) -> None:
    from ..hal import luks

    _drive(ctx, drive_id)
    device = _device(ctx, drive_id)
    try:
        luks.header(device)
    except luks.LuksError:
        raise Refused(500, f"Device {drive_id} is not a valid LUKS device") from None
    if not luks.opens(device, raw):
        raise Refused(500, f"the key does not open {drive_id}")
    key = drive_key_path(ctx.settings.state_dir, drive_id)
    luks.write_key_file(key, raw)
    _open_drive(ctx, drive_id, key)


def _raw_key(text: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        raise Refused(400, f"{what}: not base64") from None
    if len(raw) != 32:
        raise Refused(400, f"expected a 32 byte raw encryption key, got {len(raw)} bytes")
    return raw


async def import_encrypted_drive(ctx: Context, body: Any) -> Any:
    b = _body(body)
    drive_id = _text(b, "id")
    if not drive_id:
        raise Refused(400, "no drive specified")
    if not drive_id.startswith(BY_ID):
        raise Refused(400, "invalid disk id")
    raw = _raw_key(_text(b, "key"), "key")
    await ctx.run_in_thread(lambda: _import_drive(ctx, drive_id, raw))
    return {}


def _pool_name(b: dict[str, Any], key: str = "name") -> str:
    from ..config.validate import check_pool_name

    name = _text(b, key)
    if not name:
        raise Refused(400, "no pool name provided")
    if check_pool_name(name) is not None:
        raise Refused(400, "invalid pool name provided")
    return name


async def import_pool(ctx: Context, body: Any) -> Any:
    b = _body(body)
    name, kind = _text(b, "name"), _text(b, "type")
    if not name or not kind:
        raise Refused(400, "missing pool name and type")
    if kind != "zfs":
        raise Refused(400, f"unsupported pool type '{kind}'")
    name = _pool_name(b)
    key_text = _text(b, "encryption_key")
    raw = _raw_key(key_text, "encryption_key") if key_text else None
    _zfs_or_refuse()
    await ctx.run_in_thread(lambda: _import(ctx, name, raw))
    return {}


def _import(ctx: Context, name: str, raw: bytes | None) -> None:
    from ..hal import zfs

    # zpool import finds the pool's disks by what blkid last read of them: disks just
    # attached (or a pool just exported) may still be in udev's queue, and then the pool
    # is "no such pool available" (seen in the ZFS guest under load).
    _settle()
    try:
        zfs.run(zfs.zpool_argv("import", name))
    except zfs.ZfsError as e:
        raise Refused(500, str(e)) from None
    key = pool_key_path(ctx.settings.state_dir, name)
    try:
        props = zfs.pool_properties(name, ["encryption", "keyformat"])
        if props.get("encryption") == "off":
            if raw is None:
                ctx.log("warning", f"Unencrypted storage pool '{name}' has been imported")
                return
            raise Refused(
                500,
                f"attempted to import unencrypted pool '{name}',"
                " but an encryption key was provided",
            )
        if props.get("keyformat") != "raw":
            raise Refused(
                500,
                f"refusing to import encrypted pool '{name}' that doesn't use a raw encryption key",
            )
        if raw is None:
            raise Refused(400, f"pool '{name}' is encrypted: an encryption_key is required")
        from ..hal import luks

        luks.write_key_file(key, raw)
        zfs.run(zfs.set_argv(name, "keylocation", f"file://{key}"))
        # The key loaded, the filesystems are left unmounted, as IncusOS leaves them (to
        # Incus, or zfs-mount.service at the next boot).
        zfs.load_key(name)
    except (Refused, zfs.ZfsError) as e:
        key.unlink(missing_ok=True)
        with contextlib.suppress(zfs.ZfsError):
            zfs.run(["zpool", "export", "-f", name])
        if isinstance(e, Refused):
            raise
        raise Refused(500, str(e)) from None


async def delete_pool(ctx: Context, body: Any) -> Any:
    name = _pool_name(_body(body))
    if name == "local":
        raise Refused(500, "cannot destroy special zpool 'local'")
    _zfs_or_refuse()
    await ctx.run_in_thread(lambda: _delete(ctx, name))
    return {}


def _delete(ctx: Context, name: str) -> None:
    from ..hal import zfs

    key = pool_key_path(ctx.settings.state_dir, name)
    pools = zfs.status()
    if name not in pools:
        if not key.exists():
            raise Refused(500, f"cannot destroy zpool '{name}': no such pool")
        key.unlink()
        return
    members = zfs.layout(pools[name]).members()
    try:
        zfs.run(zfs.zpool_argv("destroy", name))
    except zfs.ZfsError as e:
        raise Refused(500, str(e)) from None
    key.unlink(missing_ok=True)
    for dev in members:
        if os.path.exists(dev):
            wipe_device(dev)


async def scrub_pool(ctx: Context, body: Any) -> Any:
    name = _pool_name(_body(body))
    _zfs_or_refuse()
    await ctx.run_in_thread(lambda: _scrub(name))
    return {}


def _scrub(name: str) -> None:
    from ..hal import zfs

    pools = zfs.status()
    if name not in pools:
        raise Refused(500, f"zpool '{name}' doesn't exist")
    scan = pools[name].scan
    if scan is not None and scan.function == "SCRUB" and scan.state == "SCANNING":
        raise Refused(409, "scrub already in progress")
    try:
        zfs.run(zfs.zpool_argv("scrub", name))
    except zfs.ZfsError as e:
        raise Refused(500, str(e)) from None


def _volume(b: dict[str, Any]) -> tuple[str, str]:
    # The pool's full rule (not only "no /"): `-R` or `-o...` would reach zfs's argv as
    # an option.
    pool = _pool_name(b, "pool")
    name = _text(b, "name")
    if not name:
        raise Refused(400, "no volume name provided")
    if "/" in name or not all(c.isascii() and (c.isalnum() or c in "_-.:") for c in name):
        raise Refused(400, "invalid volume name provided")
    return pool, name


async def create_volume(ctx: Context, body: Any) -> Any:
    from ..hal import zfs

    b = _body(body)
    pool, name = _volume(b)
    use = _text(b, "use")
    if not use:
        raise Refused(400, "no volume use provided")
    if use not in VOLUME_USES:
        raise Refused(400, "invalid volume use provided")
    quota = b.get("quota", 0)
    if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
        raise Refused(400, "quota: a number of bytes")
    props = {"incusos:use": use}
    if use == "linstor":
        props["encryption"] = "off"  # linstor does its own
    if quota > 0:
        props["quota"] = str(quota)
    _zfs_or_refuse()
    argv = zfs.dataset_create_argv(f"{pool}/{name}", props)
    await ctx.run_in_thread(lambda: _run500(argv))
    return {}


async def delete_volume(ctx: Context, body: Any) -> Any:
    from ..hal import zfs

    b = _body(body)
    pool, name = _volume(b)
    force = b.get("force", False)
    if not isinstance(force, bool):
        raise Refused(400, "force: true or false")
    _zfs_or_refuse()
    argv = zfs.dataset_destroy_argv(f"{pool}/{name}", force)
    await ctx.run_in_thread(lambda: _run500(argv))
    return {}


def _run500(argv: list[str]) -> None:
    from ..hal import zfs

    try:
        zfs.run(argv)
    except zfs.ZfsError as e:
        raise Refused(500, str(e)) from None


async def cleanup_root(ctx: Context, body: Any) -> Any:
    """IncusOS's: the journal vacuumed to one file, /var/cache emptied. Both are
    deletions, so they act where the service writes (`target`), never where it only
    reads: a service on a scratch target leaves the host's caches and journal alone."""
    import shutil

    def work() -> None:
        target = Path(ctx.settings.target)
        if ctx.settings.target == "/" and shutil.which("journalctl"):
            _run500(["journalctl", "--vacuum-files=1"])
        cache = target / "var/cache"
        for entry in sorted(cache.iterdir()) if cache.is_dir() else []:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    await ctx.run_in_thread(work)
    return {}


def units(config: Config, inputs: UnitInputs) -> Tree:
    from ..render.units import storage_units

    return storage_units(config, source=inputs.source, unit_dir=inputs.unit_dir)


SECTION = Section(
    name="storage",
    attribute="storage",
    summary="drives, ZFS pools and the root partition; pools created and changed",
    read_state=read_state,
    check=check,
    before_store=before_store,
    put_failures=(
        (503, "pools were asked for and ZFS is unavailable"),
        (500, "a step of the change failed; every step before it was undone"),
    ),
    stored=stored,
    units=units,
    # The key is a file (api/backup.py keeps it); the document has nothing to keep.
    backup_skip={LOCAL_KEY_SKIP: lambda archived, running: archived},
    actions=(
        Action(
            "import-pool",
            "import an existing ZFS pool (with its raw key)",
            import_pool,
            (_FAILED, _UNAVAILABLE),
        ),
        Action(
            "delete-pool",
            "destroy a pool and wipe its devices",
            delete_pool,
            (
                (500, "the pool is `local`, which is never deleted, or zpool destroy failed"),
                _UNAVAILABLE,
            ),
        ),
        Action(
            "scrub-pool",
            "start a scrub (409 while one runs)",
            scrub_pool,
            ((500, "no such pool, or zpool scrub failed (IncusOS's status)"), _UNAVAILABLE),
        ),
        Action(
            "create-volume",
            "create a dataset in a pool",
            create_volume,
            (_FAILED, _UNAVAILABLE),
        ),
        Action(
            "delete-volume",
            "destroy a dataset in a pool",
            delete_volume,
            (_FAILED, _UNAVAILABLE),
        ),
        Action(
            "wipe-drive",
            "wipe a drive (never the boot drive or a pool member)",
            wipe_drive,
            (_FAILED,),
        ),
        Action(
            "encrypt-drive",
            "wipe and LUKS2-encrypt a drive with a new key",
            encrypt_drive,
            (_FAILED,),
        ),
        Action(
            "import-encrypted-drive",
            "keep the key of a LUKS drive and open it",
            import_encrypted_drive,
            ((500, "not a LUKS device, or the key does not open it (IncusOS's status)"),),
        ),
        Action("cleanup-root", "free space on the root partition", cleanup_root, (_FAILED,)),
    ),
)
