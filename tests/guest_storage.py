"""Probe part, in the ZFS VM guest (stdlib only): IncusOS's storage API on real disks.

Drives the socket-activated incusos-hal.service through its unix socket, as IncusOS's
own tests drive incus-osd (lxc/incus-os incus-osd/tests/incusos_tests/
tests_incusos_api_system_storage*.py), and records every answer beside what the system
says itself (zpool/zfs JSON, smartctl -aj, cryptsetup, blkid), for
tests/test_vm_storage.py to compare. Nothing is judged here: a step that cannot run is
recorded with why, and the rest still run.

expect["storage"]: {"disks": [by-id of d1..d6 (same size), d7 (larger)], "nvme": [by-id of
two NVMe namespaces], "smart": {name: by-id} (the drives whose SMART the API must match),
"boot": the boot disk's by-id}.
"""

import base64
import json
import os
import time
from pathlib import Path

import guest_api

from guest_lib import crashed, data, journal, sh

# A PUT that creates a pool runs zpool, wipefs and udev under TCG: minutes, not seconds.
guest_api.TIMEOUT_S = 900.0
# How long each request took, in order (for the host's report: where a slow run went).
TIMINGS: list = []


def call(method: str, path: str, body: object = None) -> dict:
    started = time.monotonic()
    try:
        return guest_api.call(method, path, body)
    finally:
        TIMINGS.append([method, path, round(time.monotonic() - started, 1)])


SUSPEND = Path("/sys/module/zfs/parameters/zfs_scan_suspend_progress")
# How long ZFS retries opening a disk it has just partitioned while udev still holds it
# (default 1000 ms): under TCG, udev's probe of the new partitions outlasts that, and
# `zpool create` of four disks failed with "one or more devices is currently
# unavailable" (CI, and this guest beside the image test). Hardware keeps the default.
OPEN_TIMEOUT = Path("/sys/module/zfs/parameters/zfs_vdev_open_timeout_ms")
OPEN_TIMEOUT_MS = "30000"
SCHEDULE = "0 4 * * 0"
POOL = "mypool"


def put(pools: list) -> dict:
    return call(
        "PUT", "/1.0/system/storage", {"config": {"scrub_schedule": SCHEDULE, "pools": pools}}
    )


def pool(kind: str, devices: list, **more) -> dict:
    return {"name": POOL, "type": kind, "devices": devices, **more}


def storage() -> dict:
    """GET /1.0/system/storage's whole answer."""
    return call("GET", "/1.0/system/storage")


def action(name: str, body: dict) -> dict:
    return call("POST", f"/1.0/system/storage/:{name}", body)


def zpool_status(name: str = POOL) -> object:
    return data("zpool", "status", name, "-jp", "--json-int")


def delete_pool(name: str = POOL) -> dict:
    return action("delete-pool", {"name": name})


def wait(activity: str, name: str = POOL) -> dict:
    return sh("zpool", "wait", "-t", activity, name, timeout=600)


def key_of(name: str) -> str | None:
    got = call("GET", "/1.0/system/security")
    state = ((got.get("body") or {}).get("metadata") or {}).get("state") or {}
    return (state.get("pool_recovery_keys") or {}).get(name)


def smart_bracket(smart: dict) -> dict:
    """smartctl -aj on each drive, then GET, then smartctl again: the counters the API
    read lie between the two (NVMe counts every read, udev's too)."""

    def smartctl() -> dict:
        # smartctl's exit status is a bit mask (set for a drive without SMART): keep the
        # JSON whatever it is, with the status beside it
        table = {}
        for n, dev in smart.items():
            r = sh("smartctl", "-aj", os.path.realpath(dev))
            table[n] = {"rc": r["rc"], "json": json.loads(r["out"]) if r["out"] else None}
        return table

    before = smartctl()
    got = storage()
    after = smartctl()
    return {"before": before, "get": got, "after": after}


def pool_types(d: list, nvme: list) -> dict:
    """Every pool type through PUT, each checked with zpool's own word, then deleted."""
    out = {}
    cases = {  # the host's TYPES (tests/test_vm_storage.py) says why these four
        "zfs-raid0-2": pool("zfs-raid0", d[:2]),
        "zfs-raid10": pool("zfs-raid10", d[:4]),
        "zfs-raidz2": pool("zfs-raidz2", d[:4]),
        "cache-log-special": pool(
            "zfs-raid1",
            d[:2],
            cache=d[2:3],
            log=d[3:5],
            special={"type": "zfs-raid1", "special_small_blocks_size_in_kb": 16, "devices": nvme},
        ),
    }
    for name, spec in cases.items():
        step: dict = {"put": put([spec])}
        step["get"] = storage()
        step["zpool"] = zpool_status()
        step["props"] = data(
            "zfs",
            "get",
            "-j",
            "encryption,keyformat,keylocation,mountpoint,special_small_blocks",
            POOL,
        )
        step["ashift"] = sh("zpool", "get", "-H", "-o", "value", "ashift", POOL)["out"].strip()
        step["delete"] = delete_pool()
        step["gone"] = sh("zpool", "list", POOL)["rc"] != 0
        step["get_after"] = storage()
        out[name] = step
        cleanup(d, nvme)
    return out


def cleanup(d: list, nvme: list) -> None:
    """What a failed step left (a pool the API did not delete, labels) goes, so the next
    step starts from blank disks: one failure is reported once, not by every later step."""
    for name in sh("zpool", "list", "-H", "-o", "name")["out"].split():
        sh("zpool", "destroy", "-f", name)
    for dev in [*d, *nvme]:
        sh("zpool", "labelclear", "-f", dev)


def mixed_and_mirror(d: list) -> dict:
    out: dict = {}
    out["mixed"] = put([pool("zfs-raidz1", [d[0], d[1], d[6]])])
    out["mixed_nothing"] = sh("zpool", "list", POOL)["rc"] != 0
    out["mixed_allowed"] = put([pool("zfs-raidz1", [d[0], d[1], d[6]], allow_mixed_dev_sizes=True)])
    out["mixed_get"] = storage()
    out["mixed_delete"] = delete_pool()
    out["raid0"] = put([pool("zfs-raid0", d[:1])])
    out["raid0_get"] = storage()
    out["raid1"] = put([pool("zfs-raid1", d[:2])])
    out["raid1_get"] = storage()
    wait("resilver")
    out["raid1_zpool"] = zpool_status()
    out["delete"] = delete_pool()
    return out


def write_data(mib: int) -> str:
    """A dataset mounted from the pool, `mib` MiB of random data in it: its SHA-256."""
    sh("zfs", "create", "-o", "mountpoint=/mnt/data", f"{POOL}/data")
    sh(
        "dd",
        "if=/dev/urandom",
        "of=/mnt/data/blob",
        "bs=1M",
        f"count={mib}",
        "conv=fsync",
        timeout=600,
    )
    return sh("sha256sum", "/mnt/data/blob")["out"].split(" ")[0]


def replace_and_scrub(d: list) -> dict:
    """IncusOS's PoolDeleteReplaceDevices, with data on the pool, then the scrub action."""
    out: dict = {}
    out["create"] = put([pool("zfs-raid1", d[:3])])
    out["create_get"] = storage()
    out["sha"] = write_data(48)
    out["offline"] = put([pool("zfs-raid1", ["", d[1], d[2]])])
    out["offline_get"] = storage()
    out["offline_zpool"] = zpool_status()
    out["online"] = put([pool("zfs-raid1", [d[1], d[2], d[0]])])
    wait("resilver")
    out["online_get"] = storage()
    # d3 -> d4: held mid-resilver by OpenZFS's test tunable, so its state is seen for sure
    SUSPEND.write_text("1")
    out["replace"] = put([pool("zfs-raid1", [d[0], d[1], d[3]])])
    out["resilvering_get"] = storage()
    out["resilvering_zpool"] = zpool_status()
    SUSPEND.write_text("0")
    # The resilver's end, then the old disk's detach from its `replacing` group, which
    # ZFS does a moment later (a GET between the two listed four disks).
    out["resilver_wait"] = wait("resilver,replace")
    out["replaced_get"] = storage()
    out["replaced_zpool"] = zpool_status()
    out["old_blkid"] = sh("blkid", "-p", "-o", "export", d[2])
    out["sha_after"] = sh("sha256sum", "/mnt/data/blob")["out"].split(" ")[0]
    # a shorter list, a duplicate, a device that does not exist: refused, nothing changes
    before = zpool_status()
    out["shorter"] = put([pool("zfs-raid1", d[:2])])
    out["duplicate"] = put([pool("zfs-raid1", [d[0], d[0], d[3]])])
    out["missing"] = put([pool("zfs-raid1", [d[0], d[1], "/dev/disk/by-id/scsi-0QEMU_nothing"])])
    out["unchanged"] = vdev_paths(zpool_status()) == vdev_paths(before)

    SUSPEND.write_text("1")
    out["scrub"] = action("scrub-pool", {"name": POOL})
    time.sleep(1)
    out["scrub_again"] = action("scrub-pool", {"name": POOL})
    out["scrubbing_get"] = storage()
    SUSPEND.write_text("0")
    out["scrub_wait"] = wait("scrub")
    out["scrubbed_get"] = storage()
    out["scrubbed_zpool"] = zpool_status()
    out["scrub_missing"] = action("scrub-pool", {"name": "nosuchpool"})
    return out


def vdev_paths(status: object) -> list:
    found: list = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "path" in node:
                found.append((node["path"], node.get("state")))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(status)
    return sorted(found)


def wipe(d: list, boot: str) -> dict:
    """:wipe-drive refused for the boot disk and for a member of mypool (still there)."""
    return {
        "boot": action("wipe-drive", {"id": boot, "secure_wipe": False}),
        "member": action("wipe-drive", {"id": d[0], "secure_wipe": False}),
        "member_still": sh("zpool", "list", POOL)["rc"] == 0,
        "unknown": action("wipe-drive", {"id": "/dev/disk/by-id/scsi-0QEMU_nothing"}),
        "empty": action("wipe-drive", {}),
    }


def export_import(d: list) -> dict:
    """mypool exported (its disks taken to another machine) and imported with the key the
    security state gave; a pool made elsewhere with a raw key, a wrong key first; an
    unencrypted pool; a passphrase one."""
    out: dict = {}
    key = key_of(POOL)
    out["key_known"] = key is not None and len(base64.b64decode(key)) == 32
    out["export"] = sh("zpool", "export", POOL)
    out["import"] = action(
        "import-pool", {"name": POOL, "type": "zfs", "encryption_key": key or ""}
    )
    out["import_get"] = storage()
    # The import leaves the filesystems unmounted (as IncusOS): mounted here, in the
    # machine's namespace, the data reads back with the key the API loaded; and the pool
    # is deleted through the API with it still mounted (the service's zpool destroy runs
    # in the machine's namespace, where it can unmount it).
    out["import_mounted_before"] = sh("findmnt", "-n", "/mnt/data")["out"]
    out["import_mount"] = sh("zfs", "mount", f"{POOL}/data")
    out["import_sha"] = sh("sha256sum", "/mnt/data/blob")["out"].split(" ")[0]
    out["delete"] = delete_pool()
    out["mounted_after_delete"] = sh("findmnt", "-n", "/mnt/data")["out"]

    raw = os.urandom(32)
    Path("/root/other.key").write_bytes(raw)
    # As the service does before it partitions disks (sections/storage.PARTITIONING): the
    # delete just wiped disks, and zpool create behind udev's queue failed "no such pool
    # or dataset" here (the probe's own create, beside the image test).
    out["other_settle"] = sh("udevadm", "settle", "--timeout=60")
    out["other_create"] = sh(
        *(
            "zpool",
            "create",
            "-o",
            "ashift=12",
            "-O",
            "mountpoint=none",
            "-O",
            "encryption=aes-256-gcm",
        ),
        *("-O", "keyformat=raw", "-O", "keylocation=file:///root/other.key", "other", d[4], d[5]),
    )
    out["other_export"] = sh("zpool", "export", "other")
    wrong = base64.b64encode(os.urandom(32)).decode()
    out["wrong_key"] = action(
        "import-pool", {"name": "other", "type": "zfs", "encryption_key": wrong}
    )
    out["wrong_key_exported"] = sh("zpool", "list", "other")["rc"] != 0
    out["right_key"] = action(
        "import-pool",
        {"name": "other", "type": "zfs", "encryption_key": base64.b64encode(raw).decode()},
    )
    out["right_get"] = storage()
    out["right_keystatus"] = data("zfs", "get", "-j", "keystatus", "other")
    out["other_delete"] = delete_pool("other")

    sh("zpool", "create", "-o", "ashift=12", "-O", "mountpoint=none", "plain", d[4])
    sh("zpool", "export", "plain")
    out["plain"] = action("import-pool", {"name": "plain", "type": "zfs"})
    out["plain_get"] = storage()
    sh("zpool", "destroy", "plain")

    Path("/root/pass").write_text("secret-passphrase")
    sh(
        *("zpool", "create", "-O", "encryption=aes-256-gcm", "-O", "keyformat=passphrase"),
        *("-O", "keylocation=file:///root/pass", "-O", "mountpoint=none", "phrase", d[5]),
    )
    sh("zpool", "export", "phrase")
    # A well-formed raw key, so the refusal is the pool's (its keyformat), as IncusOS's;
    # a key that is not 32 bytes of base64 is refused before the import (400, docs).
    well_formed = base64.b64encode(os.urandom(32)).decode()
    out["passphrase"] = action(
        "import-pool", {"name": "phrase", "type": "zfs", "encryption_key": well_formed}
    )
    out["passphrase_exported"] = sh("zpool", "list", "phrase")["rc"] != 0
    sh("zpool", "import", "phrase")
    sh("zpool", "destroy", "phrase")
    out["no_name"] = action("import-pool", {})
    out["bad_type"] = action("import-pool", {"name": "x", "type": "btrfs"})
    return out


def encrypt(drive: str) -> dict:
    """IncusOS's LUKSRawDevice, on a drive in no pool."""
    out: dict = {}
    name = Path(drive).name
    out["before"] = storage()
    out["import_not_luks"] = action(
        "import-encrypted-drive", {"id": drive, "key": base64.b64encode(os.urandom(32)).decode()}
    )
    out["encrypt"] = action("encrypt-drive", {"id": drive, "secure_wipe": False})
    out["encrypted_get"] = storage()
    out["is_luks"] = sh("cryptsetup", "isLuks", "--type", "luks2", drive)["rc"] == 0
    out["mapped"] = Path(f"/dev/mapper/luks-{name}").exists()
    got = call("GET", "/1.0/system/security")
    keys = (((got.get("body") or {}).get("metadata") or {}).get("state") or {}).get(
        "drive_recovery_keys"
    )
    out["recovery_key_names"] = sorted(keys) if isinstance(keys, dict) else keys
    out["wipe"] = action("wipe-drive", {"id": drive, "secure_wipe": False})
    out["wiped_get"] = storage()
    out["wiped_luks"] = sh("cryptsetup", "isLuks", drive)["rc"] == 0
    out["wiped_mapped"] = Path(f"/dev/mapper/luks-{name}").exists()
    return out


def run(expect_all: dict) -> dict:
    spec = expect_all["storage"]
    d, nvme = spec["disks"], spec["nvme"]
    out: dict = {
        "modprobe": sh("modprobe", "zfs"),
        "open_timeout": sh("sh", "-c", f"echo {OPEN_TIMEOUT_MS} > {OPEN_TIMEOUT}"),
        "zfs_version": sh("zfs", "version")["out"],
        "socket_start": sh("systemctl", "start", "incusos-hal.socket"),
    }
    sh("udevadm", "settle")
    out["lsblk"] = data(
        "lsblk",
        "-JMpdb",
        "-e",
        "1,2,7,43,147,230,251",
        "-o",
        "KNAME,ID_LINK,SIZE,SUBSYSTEMS,RM,WWN",
    )
    out["by_id"] = sorted(p.name for p in Path("/dev/disk/by-id").iterdir())
    steps = [
        ("smart", lambda: smart_bracket(spec["smart"])),
        ("types", lambda: pool_types(d, nvme)),
        ("mixed_mirror", lambda: mixed_and_mirror(d)),
        ("cleanup", lambda: cleanup(d, nvme)),
        ("replace", lambda: replace_and_scrub(d)),
        ("wipe", lambda: wipe(d, spec["boot"])),
        ("export_import", lambda: export_import(d)),
        ("cleanup", lambda: cleanup(d, nvme)),
        ("encrypt", lambda: encrypt(d[5])),
    ]
    for name, step in steps:
        try:
            out[name] = step()
        except Exception:
            out[name] = crashed(f"storage step {name}")
    out["journal"] = journal("-u", "incusos-hal.service")[-6000:]
    out["timings"] = TIMINGS
    return out
