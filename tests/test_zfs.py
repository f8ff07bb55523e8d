"""hal/zfs.py and hal/smart.py (the pure parsers and argv builders) and the storage
section's pool, on what OpenZFS 2.3.9 and smartmontools 7.4 really printed in the ZFS
guest (tests/fixtures/zfs/, NOTE.md there says how each was recorded). A case no
recording has (damaged or hostile output, an older format, a failed log device) is a
recording changed in one place, and says so. "ZFS unavailable" as a state on this host.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.hal import smart, zfs
from storage_reference import (
    FIXTURES,
    RECORDED_DISKS,
    RECORDED_NVME,
    RECORDED_TYPES,
    load,
    recorded,
)

from conftest import require_root, require_tool

D, NVME = RECORDED_DISKS, RECORDED_NVME
POOL = "mypool"


def _pool(case: str) -> zfs.PoolStatus:
    """A case's `zpool status mypool -jp --json-int`, parsed."""
    pools = zfs.parse_status(recorded(f"{case}/zpool-status-pool.json"))
    assert list(pools) == [POOL]
    return pools[POOL]


def _changed(case: str, path: Sequence[str], value: object) -> str:
    """A case's recorded `zpool status` with the one value at `path` replaced."""
    doc = load(f"{case}/zpool-status-pool.json")
    node = doc
    for key in path[:-1]:
        node = node[key]
    assert path[-1] in node, path  # damage what the recording has, not a new key
    node[path[-1]] = value
    return json.dumps(doc)


CASES = sorted(p.parent.name for p in FIXTURES.glob("*/zpool-status-pool.json"))


def test_every_recorded_case_has_its_type() -> None:
    assert sorted(RECORDED_TYPES) == CASES


@pytest.mark.parametrize("case", CASES)
def test_status_types_and_the_all_pools_form(case: str) -> None:
    pool = _pool(case)
    assert zfs.layout(pool).type == RECORDED_TYPES[case]
    # `zpool status -jp --json-int` without a name (what IncusOS runs) reads the same,
    # but for the space the live pool allocated between the two commands
    (all_pools,) = zfs.parse_status(recorded(f"{case}/zpool-status.json")).values()
    assert (all_pools.name, all_pools.state, all_pools.scan) == (POOL, pool.state, pool.scan)
    assert dataclasses.replace(zfs.layout(all_pools), allocated=0) == dataclasses.replace(
        zfs.layout(pool), allocated=0
    )


SIZES = {  # case: (raw, usable, allocated) as recorded: the data vdevs' sums
    "raid10": (251658240 * 2, 251658240 * 2, 4608000 + 4648960),
    # raidz: def_space (usable) is the raw space less parity
    "raidz2": (1006632960, 487587840, 19648512),
    # the root's total_space (503316480) counts the special mirror-2; IncusOS sums only
    # the data vdevs, and never the log or the cache
    "log-cache-special": (251658240, 251658240, 8695808),
}


@pytest.mark.parametrize("case", SIZES)
def test_status_sizes_are_the_data_vdevs(case: str) -> None:
    lay = zfs.layout(_pool(case))
    assert (lay.raw_size, lay.usable_size, lay.allocated) == SIZES[case]


def test_status_devices_by_id_sorted_by_class() -> None:
    lay = zfs.layout(_pool("raid10"))
    assert lay.devices == tuple(D[:4]) and not lay.members()[4:]
    lay = zfs.layout(_pool("log-cache-special"))
    assert (lay.devices, lay.log, lay.cache, lay.special) == (
        tuple(D[:2]),
        tuple(D[3:5]),
        (D[2],),
        tuple(NVME),
    )
    assert lay.special_type == "zfs-raid1"  # zpool named it mirror-2 (numbered per pool)


@pytest.mark.parametrize(
    ("case", "state", "healthy", "degraded"),
    [
        ("degraded-offline", "DEGRADED", D[1:3], D[:1]),  # `zpool offline` d1
        ("degraded-removed", "DEGRADED", D[2:4], D[1:2]),  # d2 pulled: CANT_OPEN
        # replacing-0 (d1 OFFLINE, d4 ONLINE) inside mirror-0: the leaves, never the group
        ("resilver-in-progress", "DEGRADED", D[1:4], D[:1]),
        ("resilver-done", "ONLINE", D[1:4], []),
        ("removed-returned", "ONLINE", D[1:4], []),
    ],
)
def test_status_degraded_disks_as_recorded(
    case: str, state: str, healthy: list[str], degraded: list[str]
) -> None:
    pool = _pool(case)
    lay = zfs.layout(pool)
    assert pool.state == state
    assert (lay.devices, lay.devices_degraded) == (tuple(healthy), tuple(degraded))


def test_status_degraded_log_cache_and_special() -> None:
    # No recording has a failed log, cache or special device: log-cache-special with
    # one leaf of each in a state zpool prints for a failed disk.
    doc = load("log-cache-special/zpool-status-pool.json")
    pool = doc["pools"][POOL]
    pool["logs"]["mirror-1"]["vdevs"][D[4].rsplit("/", 1)[1]]["state"] = "UNAVAIL"
    pool["l2cache"][D[2].rsplit("/", 1)[1]]["state"] = "FAULTED"
    pool["special"]["mirror-2"]["vdevs"][NVME[1].rsplit("/", 1)[1]]["state"] = "REMOVED"
    lay = zfs.layout(zfs.parse_status(json.dumps(doc))[POOL])
    assert (lay.log, lay.log_degraded) == ((D[3],), (D[4],))
    assert (lay.cache, lay.cache_degraded) == ((), (D[2],))
    assert (lay.special, lay.special_degraded) == ((NVME[0],), (NVME[1],))
    assert lay.devices == tuple(D[:2]) and not lay.devices_degraded


def test_status_local_data_partlabel_and_strings_for_numbers() -> None:
    # raid0-1 changed to what no recording has: a pool made before IncusOS's storage API
    # (its vdev named by the partition label), printed by plain `-jp` (numbers as strings).
    doc = load("raid0-1/zpool-status-pool.json")
    root = doc["pools"][POOL]["vdevs"][POOL]
    ((name, vdev),) = root["vdevs"].items()
    vdev |= {"name": "local-data", "total_space": str(vdev["total_space"])}
    root["vdevs"] = {"local-data": vdev}
    lay = zfs.layout(zfs.parse_status(json.dumps(doc))[POOL])
    assert lay.devices == ("/dev/disk/by-partlabel/local-data",)
    assert lay.raw_size == 251658240 and name == D[0].rsplit("/", 1)[1]


@pytest.mark.parametrize(
    ("case", "state", "progress"),
    [
        # zfs_scan_suspend_progress held it: nothing examined yet
        ("scrub-in-progress", "IN_PROGRESS", "0.00%"),
        ("scrub-paused", "IN_PROGRESS", "0.00%"),  # `zpool scrub -p`: still SCANNING
        ("scrub-done", "FINISHED", "100.00%"),
        ("resilver-in-progress", "IN_PROGRESS", "0.00%"),
        ("resilver-done", "FINISHED", "100.00%"),
    ],
)
def test_scrub_state_and_progress_as_recorded(case: str, state: str, progress: str) -> None:
    scan = _pool(case).scan
    assert scan is not None
    assert (zfs.scrub_state(scan), zfs.scrub_progress(scan)) == (state, progress)


def test_scrub_progress_arithmetic() -> None:
    # No recording caught a scrub part way or a cancelled one: the recorded running scan
    # with examined (and the state) changed.
    running = _pool("scrub-in-progress").scan
    assert running is not None and _pool("degraded-offline").scan is None
    quarter = dataclasses.replace(running, examined=running.to_examine // 4)
    assert zfs.scrub_progress(quarter) == "25.00%"
    over = dataclasses.replace(running, examined=running.to_examine + 1)
    assert zfs.scrub_progress(over) == "99.99%"  # IncusOS's cap while still running
    assert zfs.scrub_progress(dataclasses.replace(running, to_examine=0)) == "0.00%"
    assert zfs.scrub_state(dataclasses.replace(running, state="CANCELED")) == "UNKNOWN"


MIRROR0 = ("pools", POOL, "vdevs", POOL, "vdevs", "mirror-0")
DAMAGED = {  # raid10's recording, damaged in one place each
    "empty": "",
    "truncated": recorded("raid10/zpool-status-pool.json")[:900],
    "pools a list": _changed("raid10", ("pools",), [POOL]),
    "pool a number": _changed("raid10", ("pools", POOL), 3),
    "pool vdevs a string": _changed("raid10", ("pools", POOL, "vdevs"), "mirror-0"),
    "vdev a string": _changed("raid10", MIRROR0, "ONLINE"),
    "children a list": _changed("raid10", (*MIRROR0, "vdevs"), ["a", "b"]),
    "logs a list": _changed("log-cache-special", ("pools", POOL, "logs"), ["mirror-1"]),
    "l2cache a string": _changed("log-cache-special", ("pools", POOL, "l2cache"), "sdc"),
}


@pytest.mark.parametrize("bad", DAMAGED.values(), ids=DAMAGED.keys())
def test_status_refuses_what_is_not_its_shape(bad: str) -> None:
    with pytest.raises(zfs.ZfsError):
        zfs.parse_status(bad)


def test_status_wrong_types_inside_read_as_nothing() -> None:
    # raid10's recording with a count and a state of the wrong type: read as 0 and "",
    # so the disk shows degraded, never a crash or a made-up value.
    doc = load("raid10/zpool-status-pool.json")
    mirror = doc["pools"][POOL]["vdevs"][POOL]["vdevs"]["mirror-0"]
    mirror["total_space"] = [251658240]
    mirror["vdevs"][D[0].rsplit("/", 1)[1]]["state"] = 1
    lay = zfs.layout(zfs.parse_status(json.dumps(doc))[POOL])
    assert lay.raw_size == 251658240 and lay.devices_degraded == (D[0],)


def test_datasets_as_recorded() -> None:
    # IncusOS's volume listing: the pool itself and its first-level datasets
    got = zfs.parse_datasets(recorded("raid10/zfs-list-volumes.json"))
    assert got == {
        POOL: {"quota": 0, "used": 9240576, "incusos:use": "-"},
        f"{POOL}/incus": {"quota": 1073741824, "used": 8601600, "incusos:use": "incus"},
    }
    props = zfs.parse_datasets(recorded("log-cache-special/zfs-get-all.json"))[POOL]
    assert props["special_small_blocks"] == 16384  # bytes, an int under --json-int
    assert props["compressratio"] == "1.00" and props["encryption"] == "aes-256-gcm"


@pytest.mark.parametrize(
    ("case", "keystatus"),
    [
        ("encrypted-key-loaded", "available"),
        ("encrypted-key-unloaded", "unavailable"),
        ("encrypted-imported-no-key", "unavailable"),
        ("encrypted-imported-key-loaded", "available"),
        ("raid0-1-unencrypted", "-"),
    ],
)
def test_keystatus_as_recorded(case: str, keystatus: str) -> None:
    got = zfs.parse_datasets(recorded(f"{case}/zfs-get-keystatus.json"))
    assert got == {POOL: {"keystatus": keystatus}}


def test_datasets_refuse_what_is_not_their_shape() -> None:
    text = recorded("raid10/zfs-list-volumes.json")
    with pytest.raises(zfs.ZfsError):
        zfs.parse_datasets(text[: len(text) // 2])
    doc = json.loads(text)
    doc["datasets"] = [POOL]
    with pytest.raises(zfs.ZfsError):
        zfs.parse_datasets(json.dumps(doc))


def _recorded_runs(log: str) -> set[str]:
    """The command lines a recording ran that ended 0 (`$ argv  -> status`)."""
    runs = re.findall(r"^\$ (.*?)  -> 0$", (FIXTURES / log).read_text(), re.MULTILINE)
    return set(runs)


def test_create_argv_is_what_the_recording_ran() -> None:
    """The guest made every pool with IncusOS's `zpool create`: ours builds the same."""
    runs = _recorded_runs("commands.log") | _recorded_runs("commands-rest.log")
    keyfile = re.search(r"keylocation=file://(\S+)", " ".join(runs))
    assert keyfile is not None
    for pool_type, devices in [
        ("zfs-raid0", D[:1]),
        ("zfs-raid0", D[:2]),
        ("zfs-raid1", D[:2]),
        ("zfs-raid1", D[:3]),
        ("zfs-raid10", D[:4]),
        ("zfs-raidz1", D[:3]),
        ("zfs-raidz2", D[:4]),
        ("zfs-raidz3", D[:5]),
    ]:
        argv = zfs.create_argv(POOL, pool_type, devices, keyfile=keyfile[1])
        assert " ".join(argv) in runs, (pool_type, devices)
    argv = zfs.create_argv(POOL, "zfs-raid1", D[:2], keyfile=keyfile[1], cache=D[2:3], log=D[3:5])
    assert " ".join(argv) in runs
    assert " ".join(zfs.zpool_argv("add", POOL, "special", "mirror", *NVME)) in runs
    # log-cache-special-create (no encryption there): the vdevs in IncusOS's order
    argv = zfs.create_argv(
        POOL,
        "zfs-raid1",
        D[:2],
        keyfile=keyfile[1],
        log=D[3:5],
        cache=D[2:3],
        special_type="zfs-raid1",
        special=NVME,
    )
    tail = " ".join(argv[argv.index(POOL) :])
    assert [run for run in runs if run.endswith(" " + tail)], tail


def test_create_argv_force_and_refusals() -> None:
    # zpool refuses mixed sizes and names -f (recorded); IncusOS passes it when allowed
    assert "use '-f' to override" in recorded("mixed-sizes-refused.txt.err")
    assert zfs.create_argv("p", "zfs-raidz3", ["a"], keyfile="/k", force=True)[2] == "-f"
    assert zfs.create_argv("p", "zfs-raid0", ["a"], keyfile="/k", log=["l"])[-2:] == ["log", "l"]
    with pytest.raises(ValueError):
        zfs.create_argv("p", "zfs-raid5", ["a"], keyfile="/k")


def test_zfs_unavailable_is_a_state_here() -> None:
    # This host has neither the tools nor the module: a reason, not an exception.
    got = zfs.availability("/")
    if got.ok:
        pytest.fail("this test expects a host without ZFS (the VM rung covers ZFS)")
    assert got.reason.startswith("ZFS unavailable")


# -- the storage section on the recordings --------------------------------------------------


def _replay(case: str) -> Any:
    """hal/zfs's edge (`run`) answering from a case's recordings: what the section runs
    for a pool, by what it asks; anything else fails the test."""

    def run(argv: Sequence[str], *, timeout: float | None = None) -> str:
        argv = list(argv)
        if argv[:2] == ["zfs", "get"] and argv[-1] == POOL:
            if "keystatus" in argv:
                return recorded(f"{case}/zfs-get-keystatus.json")
            return recorded(f"{case}/zfs-get-all.json")  # `all` holds what is asked
        if argv[:2] == ["zfs", "list"] and argv[-1] == POOL and "incusos:use" in " ".join(argv):
            return recorded(f"{case}/zfs-list-volumes.json")
        raise AssertionError(f"not recorded: {argv}")

    return run


def _pool_api(case: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from incusos_hal.sections import storage

    monkeypatch.setattr(zfs, "run", _replay(case))
    return storage.pool_api(_pool(case), state_dir)


def test_the_section_shows_a_recorded_pool_as_incusos_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = _pool_api("log-cache-special", tmp_path, monkeypatch)
    assert got == {
        "name": POOL,
        "type": "zfs-raid1",
        "devices": D[:2],
        "cache": D[2:3],
        "log": D[3:5],
        "special": {"type": "zfs-raid1", "special_small_blocks_size_in_kb": 16, "devices": NVME},
        "managed": False,
        "state": "ONLINE",
        "encryption_key_status": "available",
        "raw_pool_size_in_bytes": 251658240,
        "usable_pool_size_in_bytes": 251658240,
        "pool_allocated_space_in_bytes": 8695808,
        "volumes": [
            {"name": "incus", "usage_in_bytes": 8601600, "quota_in_bytes": 1 << 30, "use": "incus"}
        ],
    }


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("raid0-1-unencrypted", {"encryption_key_status": "NONE", "state": "ONLINE"}),
        ("encrypted-key-unloaded", {"encryption_key_status": "unavailable"}),
        ("degraded-removed", {"state": "DEGRADED", "devices_degraded": D[1:2]}),
        (
            "scrub-in-progress",
            {
                "last_scrub": {
                    "state": "IN_PROGRESS",
                    "start_time": "2026-11-27T21:32:26Z",  # the guest's clock
                    "end_time": "1970-01-01T00:00:00Z",  # 0 until it ends, as IncusOS shows it
                    "progress": "0.00%",
                    "errors": 0,
                }
            },
        ),
    ],
)
def test_the_section_on_recorded_states(
    case: str, expected: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got = _pool_api(case, tmp_path, monkeypatch)
    assert {k: got.get(k) for k in expected} == expected


# -- SMART ----------------------------------------------------------------------------------


def test_smartctl_as_recorded() -> None:
    nvme = smart.parse_smartctl(recorded("smartctl-aj-nvme-namespace.json"))
    assert (nvme.bus, nvme.model_name, nvme.serial_number) == (
        "nvme",
        "QEMU NVMe Ctrl",
        "IHALNVME0001",
    )
    # qemu's NVMe reports spare, wear and hours as 0: left out, as IncusOS does
    assert nvme.smart is not None
    assert nvme.smart.to_api() == {"enabled": True, "passed": True, "data_units_read": 6}
    assert smart.parse_smartctl(recorded("smartctl-aj-nvme-controller.json")) == nvme
    scsi = smart.parse_smartctl(recorded("smartctl-aj-scsi.json"))  # smartctl exited 4
    assert scsi == smart.DriveInfo("QEMU", "QEMU HARDDISK", "incus_disk1", "scsi", None)
    sata = smart.parse_smartctl(recorded("smartctl-aj-sata.json"))
    assert (sata.bus, sata.model_name, sata.serial_number) == ("sata", "QEMU HARDDISK", "sdisk1")
    assert sata.smart is not None
    assert sata.smart.to_api() == {"enabled": True, "passed": True, "power_on_hours": 1}
    for virtio in ("smartctl-aj-virtio-blk.json", "smartctl-aj-root-virtio-blk.json"):
        # "Unable to detect device type", exit 1: no device key, nothing known
        assert smart.parse_smartctl(recorded(virtio)) == smart.DriveInfo()


def test_smartctl_damaged() -> None:
    assert smart.parse_smartctl("") == smart.DriveInfo()  # smartctl printed nothing
    text = recorded("smartctl-aj-sata.json")
    cut = smart.parse_smartctl(text[: len(text) // 2])
    assert cut.smart is not None and cut.smart.passed is False
    assert cut.smart.error.startswith("Bad SMART data from drive")
    # the SATA recording with fields of the wrong type: no SMART, and 0 hours, never a crash
    doc = load("smartctl-aj-sata.json")
    doc["smart_support"]["available"] = "true"
    assert smart.parse_smartctl(json.dumps(doc)).smart is None
    doc = load("smartctl-aj-sata.json")
    doc["power_on_time"]["hours"] = "1"
    doc["ata_smart_attributes"]["table"] = "none"
    got = smart.parse_smartctl(json.dumps(doc)).smart
    assert got is not None and got.power_on_hours == 0


def _counting_smartctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `smartctl` on PATH that prints the SATA recording and counts its runs."""
    runs = tmp_path / "runs"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "sata.json").write_text(recorded("smartctl-aj-sata.json"))
    script = bin_dir / "smartctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {runs}\ncat {tmp_path / "sata.json"}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(smart, "_answers", {})
    return runs


def test_requests_at_once_for_one_drive_ask_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    runs = _counting_smartctl(tmp_path, monkeypatch)
    script = tmp_path / "bin/smartctl"
    script.write_text(script.read_text().replace("cat ", "sleep 0.3; cat "))
    device = tmp_path / "sdz"
    device.write_bytes(b"")
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: smart.smartctl_recent(str(device)), range(8)))
    assert len(runs.read_text().splitlines()) == 1
    assert len(set(got)) == 1 and got[0].bus == "sata"


def test_a_drives_smartctl_answer_is_reused_for_a_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _counting_smartctl(tmp_path, monkeypatch)
    device = tmp_path / "sdz"
    device.write_bytes(b"")
    first = smart.smartctl_recent(str(device), now=1000.0)
    assert first.bus == "sata" and first.smart is not None
    assert smart.smartctl_recent(str(device), now=1000.0 + 59) == first
    assert runs.read_text().splitlines() == [f"-aj {device}"]
    assert smart.smartctl_recent(str(device), now=1000.0 + 61) == first
    assert len(runs.read_text().splitlines()) == 2  # older than the minute: asked again
    device.unlink()  # a path with nothing there is asked every time, never remembered
    smart.smartctl_recent(str(device), now=1000.0 + 62)
    smart.smartctl_recent(str(device), now=1000.0 + 63)
    assert len(runs.read_text().splitlines()) == 4


@pytest.mark.root
def test_a_drive_replaced_at_the_same_path_is_asked_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop device detached and attached again is a new drive to the kernel (a new
    diskseq), at the same path and device number: its answer is its own."""
    require_root()
    require_tool("losetup")
    runs = _counting_smartctl(tmp_path, monkeypatch)
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 20)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        before = smart.identity(dev)
        smart.smartctl_recent(dev, now=1000.0)
        smart.smartctl_recent(dev, now=1001.0)
        assert len(runs.read_text().splitlines()) == 1
        subprocess.run(["losetup", "-d", dev], check=True)
        subprocess.run(["losetup", dev, str(backing)], check=True)
        after = smart.identity(dev)
        assert before[0] == after[0] and before != after, (before, after)
        smart.smartctl_recent(dev, now=1002.0)
        assert len(runs.read_text().splitlines()) == 2
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _nvme_both_ways(doc: dict[str, Any]) -> tuple[smart.DriveInfo, smart.DriveInfo]:
    """The drive smartctl describes, read through hal/nvme.py from the log page and
    Identify data that say the same (NVMe Base Specification 2.0, figures 207 and 275)."""
    from incusos_hal.hal import nvme

    log = doc["nvme_smart_health_information_log"]
    page = bytearray(512)
    page[0] = log["critical_warning"]
    page[1:3] = (log["temperature"] + 273).to_bytes(2, "little")  # kelvin
    page[3], page[4], page[5] = (
        log["available_spare"],
        log["available_spare_threshold"],
        log["percentage_used"],
    )
    page[32:48] = log["data_units_read"].to_bytes(16, "little")
    page[48:64] = log["data_units_written"].to_bytes(16, "little")
    page[128:144] = doc["power_on_time"]["hours"].to_bytes(16, "little")
    ident = bytearray(4096)
    ident[4:24] = doc["serial_number"].encode().ljust(20)
    ident[24:64] = doc["model_name"].encode().ljust(40)
    ours = smart.from_nvme(nvme.parse_id_ctrl(bytes(ident)), nvme.parse_smart_log(bytes(page)))
    return ours, smart.parse_smartctl(json.dumps(doc))


def test_nvme_smart_from_the_log_matches_what_smartctl_reports() -> None:
    """The same drive state read two ways: the raw SMART / Health log page through
    hal/nvme.py, and smartctl's recorded JSON of it."""
    doc = load("smartctl-aj-nvme-namespace.json")
    ours, theirs = _nvme_both_ways(doc)
    assert ours == theirs and ours.serial_number == "IHALNVME0001"
    # qemu's drive reports zeros: the recording changed to a worn drive, then a failing one
    worn = copy.deepcopy(doc)
    worn["power_on_time"]["hours"] = 4242
    worn["nvme_smart_health_information_log"] |= {
        "available_spare": 97,
        "percentage_used": 4,
        "data_units_read": 123456,
        "data_units_written": 654321,
    }
    ours, theirs = _nvme_both_ways(worn)
    assert ours == theirs and ours.smart is not None and ours.smart.available_spare == 97
    worn["nvme_smart_health_information_log"]["critical_warning"] = 0x04  # reliability
    worn["smart_status"]["passed"] = False
    ours, theirs = _nvme_both_ways(worn)
    assert ours == theirs and ours.smart is not None and ours.smart.passed is False


@pytest.mark.parametrize(
    ("argv", "mounts"),
    [
        (["zpool", "import", "mypool"], True),
        (["zpool", "export", "-f", "mypool"], True),
        (["zpool", "destroy", "mypool"], True),
        (["zpool", "create", "-O", "mountpoint=none", "mypool", "/dev/sdb"], True),
        (["zfs", "destroy", "-R", "mypool/data"], True),
        (["zfs", "create", "-o", "mountpoint=/mnt/x", "mypool/x"], True),
        (["zfs", "set", "mountpoint=/mnt/y", "mypool/x"], True),
        (["zfs", "unmount", "mypool/x"], True),
        (["zpool", "status", "-jp", "--json-int"], False),
        (["zpool", "scrub", "mypool"], False),
        (["zpool", "replace", "mypool", "/dev/a", "/dev/b"], False),
        (["zfs", "load-key", "mypool"], False),
        (["zfs", "get", "-j", "keystatus", "mypool"], False),
        (["wipefs", "-a", "/dev/sdb"], False),
        (["zpool"], False),
    ],
)
def test_the_commands_that_may_mount_run_in_the_machines_namespace(
    argv: list[str], mounts: bool
) -> None:
    """zfs.run hands these to core/tools.run with mounts=True (the service's own mount
    namespace would hide or refuse their mounts); the rest run in place."""
    assert zfs.touches_mounts(argv) is mounts
