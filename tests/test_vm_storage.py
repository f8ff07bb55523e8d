"""VM rung, storage: IncusOS's storage API on real ZFS and real disks, in one boot of the
ZFS guest (OpenZFS built by DKMS; SeaBIOS, so no Secure Boot to refuse the unsigned
module). tests/guest_storage.py drives incusos-hal.service through its unix socket and
records each answer beside zpool/zfs/smartctl/cryptsetup's own word.

The assertions are those of lxc/incus-os incus-osd/tests/incusos_tests/
tests_incusos_api_system_storage.py and ..._storage_local_pool.py that need no install
media, with IncusOS's bodies, error texts and status codes (incus-osd/internal/rest/
api_system_storage.go, internal/zfs/zfs.go, internal/storage/storage.go), plus what the
issue adds: data survives offline/replace/resilver, the replaced device is wiped, a
resilver and a scrub are seen running (held by OpenZFS's zfs_scan_suspend_progress), and
the drives' SMART equals smartctl's. The guest has no `local` pool (no install), so pools
are found by name, not counted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage_reference import BY_ID, expected_drive, top_vdevs, vdev_states

import vm
from conftest import require_root, require_tool

pytestmark = pytest.mark.vm

D = [f"{BY_ID}/scsi-0QEMU_QEMU_HARDDISK_incus_disk{i}" for i in range(1, 8)]
DISKS = [
    *(vm.Disk(f"incus_disk{i}", 256) for i in range(1, 7)),
    vm.Disk("incus_disk7", 512),  # the odd size out
    vm.Disk("sdisk1", 256, "sata"),  # ATA: qemu answers SMART
    vm.Disk("vdisk1", 256, "virtio"),  # virtio-blk: no SMART at all
]
SATA = f"{BY_ID}/ata-QEMU_HARDDISK_sdisk1"
VIRTIO = f"{BY_ID}/virtio-vdisk1"
ROOT_SERIAL = "ihalroot"
BOOT = f"{BY_ID}/virtio-{ROOT_SERIAL}"
# vm.DEFAULT_NVME: controller IHALNVME0001 (256 + 64 MiB), IHALNVME0002 (256 MiB). udev
# links namespace 1 as nvme-<model>_<serial> and ..._1; IncusOS's DeviceToID takes the first
# sorted by-id link, the one without the namespace (tests/fixtures/zfs/ls-l-dev-disk-by-id.txt).
NVME = [f"{BY_ID}/nvme-QEMU_NVMe_Ctrl_IHALNVME0001", f"{BY_ID}/nvme-QEMU_NVMe_Ctrl_IHALNVME0002"]
SMART = {"nvme": NVME[0], "scsi": D[6], "sata": SATA, "virtio": VIRTIO}
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_root()
    require_tool("qemu-system-x86_64", "debootstrap", "systemd-nspawn", "mkfs.ext4")
    work = tmp_path_factory.mktemp("zfs-guest")
    guest = vm.build(work, vm.no_network, size="4G", zfs=True)
    guest.nvme, guest.disks, guest.root_serial = list(vm.DEFAULT_NVME), DISKS, ROOT_SERIAL
    shutil.copy(TESTS / "guest_api.py", guest.probe_dir / "guest_api.py")
    spec = {"disks": D, "nvme": NVME, "smart": SMART, "boot": BOOT}
    boot = guest.boot(["storage"], {"storage": spec}, timeout=3600)
    part: dict[str, Any] = boot.result["storage"]
    # What the guest recorded outlives its disks (a few GiB, removed): for a failure's
    # post-mortem (each request's time is in it).
    # (Raw: a failure record in one step fails the tests that read that step, not this.)
    raw = boot.result.raw("storage")
    (work.parent / "zfs-guest-result.json").write_text(json.dumps(raw, indent=1))
    yield part
    shutil.rmtree(work, ignore_errors=True)


def step(result: dict[str, Any], name: str) -> dict[str, Any]:
    """A step of the guest part; one that crashed there fails here with its traceback."""
    value = result[name]
    assert "guest_failed" not in value, value["guest_failed"]
    return dict(value)


def ok(answer: dict[str, Any]) -> None:
    # The error's words first: pytest shortens a long dict, and CI keeps only its tail.
    body = answer.get("body") or {}
    why = f"HTTP {answer['status']}: {body.get('error')!r}"
    assert answer["status"] == 200, why
    assert body["status_code"] == 200, why


def refused(answer: dict[str, Any], code: int, text: str, *, exact: bool = True) -> None:
    """IncusOS's error envelope. Its :wipe-drive sends its headers (200) before it works,
    so the envelope's error_code, not the HTTP status, is what says how it ended."""
    body = answer["body"]
    why = f"HTTP {answer['status']}: {body.get('error_code')} {body.get('error')!r}"
    assert body["type"] == "error" and body["error_code"] == code, why
    assert (body["error"] == text) if exact else (text in body["error"]), why


def state(get: dict[str, Any]) -> dict[str, Any]:
    ok(get)
    found: dict[str, Any] = get["body"]["metadata"]["state"]
    return found


def pool_in(get: dict[str, Any], name: str = "mypool") -> dict[str, Any] | None:
    return next((p for p in state(get)["pools"] if p["name"] == name), None)


def the_pool(get: dict[str, Any], name: str = "mypool") -> dict[str, Any]:
    found = pool_in(get, name)
    assert found is not None, state(get)["pools"]
    return found


def drive(get: dict[str, Any], ident: str) -> dict[str, Any]:
    found = [d for d in state(get)["drives"] if d["id"] == ident]
    assert len(found) == 1, [d["id"] for d in state(get)["drives"]]
    return found[0]


def test_zfs_loads_with_secure_boot_off(storage: dict[str, Any]) -> None:
    assert storage["modprobe"]["rc"] == 0, storage["modprobe"]["err"]
    assert storage["open_timeout"]["rc"] == 0, storage["open_timeout"]
    assert storage["zfs_version"].startswith("zfs-2."), storage["zfs_version"]
    assert storage["socket_start"]["rc"] == 0, storage["socket_start"]


# Each case costs minutes under TCG. These four take every vdev shape through the API
# (a stripe, mirrors striped, parity, and log, cache and special beside a mirror); raid1
# and raidz1 come through the mixed-sizes and replace steps. Every type's exact zpool
# command line and its status are held to real OpenZFS output recorded in this guest
# (tests/fixtures/zfs, tests/test_zfs.py).
TYPES = {  # case: (type, devices, data vdevs as zpool names them, log, cache)
    "zfs-raid0-2": ("zfs-raid0", D[:2], D[:2], [], []),
    "zfs-raid10": ("zfs-raid10", D[:4], ["mirror-0", "mirror-1"], [], []),
    "zfs-raidz2": ("zfs-raidz2", D[:4], ["raidz2-0"], [], []),
    "cache-log-special": ("zfs-raid1", D[:2], ["mirror-0"], D[3:5], D[2:3]),
}


@pytest.mark.parametrize("case", TYPES)
def test_every_pool_type_through_put(storage: dict[str, Any], case: str) -> None:
    """PUT creates it as IncusOS does (encrypted with a raw key, ashift 12, no
    mountpoint), GET shows it as IncusOS does, zpool agrees, :delete-pool removes it."""
    kind, devices, data, log, cache = TYPES[case]
    got = step(step(storage, "types"), case)
    ok(got["put"])
    pool = the_pool(got["get"])
    assert pool["type"] == kind
    assert pool["devices"] == sorted(devices)
    assert pool["state"] == "ONLINE" and pool["managed"] is True
    assert pool["encryption_key_status"] == "available"
    assert sorted(pool.get("log", [])) == log and pool.get("cache", []) == cache
    layout = top_vdevs(got["zpool"])
    assert layout["data"] == data and layout["logs"] == log and layout["l2cache"] == cache
    props = {k: v["value"] for k, v in got["props"]["datasets"]["mypool"]["properties"].items()}
    assert props["encryption"] == "aes-256-gcm" and props["keyformat"] == "raw"
    assert props["mountpoint"] == "none" and props["keylocation"].startswith("file://")
    assert got["ashift"] == "12"
    if case == "cache-log-special":
        # two log devices are a mirror
        assert "mirror" in str(got["zpool"]["pools"]["mypool"]["logs"])
        assert pool["special"] == {
            "type": "zfs-raid1",
            "special_small_blocks_size_in_kb": 16,
            "devices": sorted(NVME),
        }
        assert layout["special"] == sorted(NVME)
        assert props["special_small_blocks"] == "16K"
    ok(got["delete"])
    assert got["gone"] and pool_in(got["get_after"]) is None


def test_mixed_sizes_only_when_allowed_and_raid0_to_raid1(storage: dict[str, Any]) -> None:
    got = step(storage, "mixed_mirror")
    # A refusal the plan sees is a 400 naming the field, before any command runs
    # (IncusOS: 500 after some ran; docs/incusos-differences.md, storage).
    refused(
        got["mixed"],
        400,
        ": refusing to create new zpool with devices of different sizes unless "
        "AllowMixedDevSizes is true",
        exact=False,
    )
    assert got["mixed_nothing"]
    ok(got["mixed_allowed"])
    assert len(the_pool(got["mixed_get"])["devices"]) == 3
    ok(got["mixed_delete"])
    ok(got["raid0"])
    pool = the_pool(got["raid0_get"])
    assert (pool["type"], pool["devices"]) == ("zfs-raid0", D[:1])
    ok(got["raid1"])
    pool = the_pool(got["raid1_get"])
    assert (pool["type"], pool["devices"]) == ("zfs-raid1", D[:2])
    assert top_vdevs(got["raid1_zpool"])["data"] == ["mirror-0"]
    ok(got["delete"])


def test_offline_replace_resilver_keep_the_data(storage: dict[str, Any]) -> None:
    """IncusOS's PoolDeleteReplaceDevices, with 48 MiB on the pool throughout."""
    got = step(storage, "replace")
    ok(got["create"])
    pool = the_pool(got["create_get"])
    assert (pool["type"], pool["state"], len(pool["devices"])) == ("zfs-raid1", "ONLINE", 3)
    ok(got["offline"])  # an empty entry takes d1 offline
    pool = the_pool(got["offline_get"])
    assert pool["state"] == "DEGRADED" and len(pool["devices"]) == 2
    assert D[0] not in pool["devices"]
    assert (D[0], "OFFLINE") in vdev_states(got["offline_zpool"])
    ok(got["online"])  # back in its list: online again
    pool = the_pool(got["online_get"])
    assert pool["state"] == "ONLINE" and len(pool["devices"]) == 3
    ok(got["replace"])  # d3 -> d4
    scan = got["resilvering_zpool"]["pools"]["mypool"]["scan_stats"]
    assert (scan["function"], scan["state"]) == ("RESILVER", "SCANNING"), scan
    assert got["resilver_wait"]["rc"] == 0, got["resilver_wait"]
    pool = the_pool(got["replaced_get"])
    assert pool["state"] == "ONLINE" and len(pool["devices"]) == 3
    assert D[3] in pool["devices"] and D[2] not in pool["devices"]
    assert not pool.get("devices_degraded")
    scan = got["replaced_zpool"]["pools"]["mypool"]["scan_stats"]
    assert (scan["function"], scan["state"]) == ("RESILVER", "FINISHED"), scan
    assert "zfs_member" not in got["old_blkid"]["out"], got["old_blkid"]  # the old one wiped
    assert got["sha_after"] == got["sha"]


def test_changes_that_would_lose_data_are_refused(storage: dict[str, Any]) -> None:
    """A shorter list, a duplicate, a device that does not exist: 400 naming the field,
    and the pool as it was (the issue's bad-input rule; IncusOS answers these from deep
    in its apply, with 500s, after checking less)."""
    got = step(storage, "replace")
    for name in ("shorter", "duplicate", "missing"):
        answer = got[name]
        assert answer["status"] == 400 and "devices" in answer["body"]["error"], (name, answer)
    assert got["unchanged"]


def test_scrub_action_and_409_while_one_runs(storage: dict[str, Any]) -> None:
    got = step(storage, "replace")
    ok(got["scrub"])
    refused(got["scrub_again"], 409, "scrub already in progress")
    assert the_pool(got["scrubbing_get"])["last_scrub"]["state"] == "IN_PROGRESS"
    assert got["scrub_wait"]["rc"] == 0, got["scrub_wait"]
    last = the_pool(got["scrubbed_get"])["last_scrub"]
    assert last["state"] == "FINISHED" and last["progress"] == "100.00%"
    assert last["errors"] == 0 and last["start_time"] and last["end_time"]
    scan = got["scrubbed_zpool"]["pools"]["mypool"]["scan_stats"]
    assert (scan["function"], scan["state"]) == ("SCRUB", "FINISHED"), scan
    refused(got["scrub_missing"], 500, "zpool 'nosuchpool' doesn't exist")


def test_wipe_drive_refused_for_boot_disk_and_pool_member(storage: dict[str, Any]) -> None:
    got = step(storage, "wipe")
    # Refused before anything is touched: 400 (IncusOS: 500), in IncusOS's words.
    refused(got["boot"], 400, "cannot wipe boot drive")
    refused(got["member"], 400, "cannot wipe drive belonging to pool 'mypool'")
    assert got["member_still"]
    refused(got["unknown"], 400, "drive '/dev/disk/by-id/scsi-0QEMU_nothing' doesn't exist")
    refused(got["empty"], 400, "no drive specified")


def test_export_and_import_pool_with_its_key(storage: dict[str, Any]) -> None:
    got = step(storage, "export_import")
    assert got["key_known"], "GET /1.0/system/security gave no 32-byte pool_recovery_keys.mypool"
    assert got["export"]["rc"] == 0, got["export"]
    ok(got["import"])
    pool = the_pool(got["import_get"])
    assert pool["state"] == "ONLINE" and pool["encryption_key_status"] == "available"
    assert got["import_mounted_before"] == "", "the import mounted what IncusOS leaves"
    assert got["import_mount"]["rc"] == 0, got["import_mount"]
    assert got["import_sha"] == step(storage, "replace")["sha"]
    # Deleted while mounted in the machine's namespace: unmounted and gone.
    ok(got["delete"])
    assert got["mounted_after_delete"] == "", got["mounted_after_delete"]
    # The pool made elsewhere (by the probe, with zpool), then exported, then imported.
    assert got["other_create"]["rc"] == 0, got["other_create"]
    assert got["other_export"]["rc"] == 0, got["other_export"]
    refused(got["wrong_key"], 500, "Incorrect key provided for 'other'", exact=False)
    assert got["wrong_key_exported"], "a failed import leaves the pool imported"
    ok(got["right_key"])
    other = the_pool(got["right_get"], "other")
    assert other["managed"] is True and other["encryption_key_status"] == "available"
    assert got["right_keystatus"]["datasets"]["other"]["properties"]["keystatus"]["value"] == (
        "available"
    )
    ok(got["other_delete"])
    ok(got["plain"])  # unencrypted: imported, not managed
    assert the_pool(got["plain_get"], "plain")["managed"] is False
    refused(
        got["passphrase"],
        500,
        "refusing to import encrypted pool 'phrase' that doesn't use a raw encryption key",
    )
    assert got["passphrase_exported"]
    refused(got["no_name"], 400, "missing pool name and type")
    refused(got["bad_type"], 400, "unsupported pool type 'btrfs'")


def test_encrypt_drive_then_wipe_it(storage: dict[str, Any]) -> None:
    """IncusOS's LUKSRawDevice on d6, a drive in no pool."""
    got = step(storage, "encrypt")
    name = Path(D[5]).name
    before = drive(got["before"], D[5])
    assert "encrypted" not in before and "encrypted_id" not in before
    refused(got["import_not_luks"], 500, f"Device {D[5]} is not a valid LUKS device", exact=False)
    ok(got["encrypt"])
    after = drive(got["encrypted_get"], D[5])
    assert after["encrypted"] is True and after["encrypted_id"] == f"/dev/mapper/luks-{name}"
    assert got["is_luks"] and got["mapped"]
    assert name in got["recovery_key_names"]
    ok(got["wipe"])
    wiped = drive(got["wiped_get"], D[5])
    assert "encrypted" not in wiped and not got["wiped_luks"] and not got["wiped_mapped"]


COUNTERS = ("data_units_read", "data_units_written", "power_on_hours")


@pytest.mark.parametrize("bus", SMART)
def test_drive_smart_equals_smartctl(storage: dict[str, Any], bus: str) -> None:
    """GET's drive, against smartctl -aj run just before and just after it: fields equal,
    counters (which any read moves) between the two readings."""
    got = step(storage, "smart")
    ident = SMART[bus]
    api = drive(got["get"], ident)
    before = expected_drive(got["before"][bus]["json"])
    after = expected_drive(got["after"][bus]["json"])
    for key in ("model_family", "model_name", "serial_number", "bus"):
        assert api[key] == before[key] == after[key], (key, api, got["before"][bus])
    if before["smart"] is None:
        assert api.get("smart") is None, api
        return
    smart = api["smart"]
    for key in set(before["smart"]) | set(smart):
        if key in COUNTERS:
            low, high = before["smart"].get(key, 0), after["smart"].get(key, 0)
            assert low <= smart.get(key, 0) <= high, (key, smart, before, after)
        else:
            assert smart.get(key) == before["smart"].get(key), (key, smart, before)


def test_drives_are_sorted_and_the_boot_disk_is_flagged(storage: dict[str, Any]) -> None:
    got = step(storage, "smart")
    drives = state(got["get"])["drives"]
    ids = [d["id"] for d in drives]
    assert ids == sorted(ids)
    assert {d["id"] for d in drives if d["boot"]} == {BOOT}
    sizes = {row["id-link"]: row["size"] for row in storage["lsblk"]["blockdevices"]}
    for d in drives:
        assert d["capacity_in_bytes"] == sizes[Path(d["id"]).name], d
    assert set(D) | {SATA, VIRTIO, *NVME} <= set(ids)
