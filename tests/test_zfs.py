"""hal/zfs.py and hal/smart.py: the pure parsers and argv builders, against the JSON
OpenZFS 2.3 and smartmontools print (tests/fixtures/zfs/NOTE.md says where each came
from), and "ZFS unavailable" as a state on this host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incusos_hal.hal import smart, zfs

FIXTURES = Path(__file__).parent / "fixtures" / "zfs"


def _leaf(name: str, state: str = "ONLINE", **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "vdev_type": "disk",
        "state": state,
        "path": f"/dev/disk/by-id/{name}-part1",
        **extra,
    }


def _status(vdevs: dict[str, object], **groups: object) -> str:
    """A `zpool status -jp --json-int` document in OpenZFS 2.3's key names (synthetic:
    the structure, not a recording)."""
    pool = {
        "name": "tank",
        "state": "ONLINE",
        "vdevs": {"tank": {"name": "tank", "vdev_type": "root", "state": "ONLINE", "vdevs": vdevs}},
        **groups,
    }
    return json.dumps({"output_version": {"command": "zpool status"}, "pools": {"tank": pool}})


def test_status_raid10_type_devices_and_sizes() -> None:
    text = _status(
        {
            "mirror-0": {
                "name": "mirror-0",
                "vdev_type": "mirror",
                "state": "ONLINE",
                "alloc_space": 5,
                "total_space": 100,
                "def_space": 90,
                "vdevs": {"b": _leaf("b"), "a": _leaf("a")},
            },
            "mirror-1": {
                "name": "mirror-1",
                "vdev_type": "mirror",
                "state": "DEGRADED",
                "alloc_space": 7,
                "total_space": 100,
                "def_space": 90,
                "vdevs": {"c": _leaf("c"), "d": _leaf("d", "UNAVAIL")},
            },
        },
        logs={"l1": _leaf("l1")},
        l2cache={"c1": _leaf("c1", "FAULTED")},
    )
    pool = zfs.parse_status(text)["tank"]
    lay = zfs.layout(pool)
    assert lay.type == "zfs-raid10"
    assert lay.devices == ("/dev/disk/by-id/a", "/dev/disk/by-id/b", "/dev/disk/by-id/c")
    assert lay.devices_degraded == ("/dev/disk/by-id/d",)
    assert lay.log == ("/dev/disk/by-id/l1",) and lay.cache_degraded == ("/dev/disk/by-id/c1",)
    assert (lay.raw_size, lay.usable_size, lay.allocated) == (200, 180, 12)


@pytest.mark.parametrize(
    ("vdevs", "expected"),
    [
        ({"a": _leaf("a")}, "zfs-raid0"),
        (
            {"mirror-0": {"vdev_type": "mirror", "state": "ONLINE", "vdevs": {"a": _leaf("a")}}},
            "zfs-raid1",
        ),
        (
            {"raidz2-0": {"vdev_type": "raidz", "state": "ONLINE", "vdevs": {"a": _leaf("a")}}},
            "zfs-raidz2",
        ),
    ],
)
def test_status_types(vdevs: dict[str, object], expected: str) -> None:
    assert zfs.layout(zfs.parse_status(_status(vdevs))["tank"]).type == expected


def test_status_local_data_partlabel_and_strings_for_numbers() -> None:
    # Plain -j prints numbers as strings; pools made before IncusOS's storage API used
    # the partition label as the vdev name.
    text = _status({"local-data": _leaf("local-data", total_space="1024")})
    lay = zfs.layout(zfs.parse_status(text)["tank"])
    assert lay.devices == ("/dev/disk/by-partlabel/local-data",) and lay.raw_size == 1024


def test_scrub_state_and_progress() -> None:
    running = zfs.Scan("SCRUB", "SCANNING", 10, 0, 200, 50, 0)
    assert zfs.scrub_state(running) == "IN_PROGRESS" and zfs.scrub_progress(running) == "25.00%"
    done = zfs.Scan("SCRUB", "FINISHED", 10, 20, 200, 50, 0)
    assert zfs.scrub_state(done) == "FINISHED" and zfs.scrub_progress(done) == "100.00%"
    over = zfs.Scan("SCRUB", "SCANNING", 10, 0, 10, 50, 0)
    assert zfs.scrub_progress(over) == "99.99%"
    assert zfs.scrub_state(zfs.Scan("SCRUB", "CANCELED", 1, 2, 0, 0, 0)) == "UNKNOWN"


@pytest.mark.parametrize("bad", ["", "[", '{"pools": []}', '{"pools": {"p": 3}}'])
def test_status_refuses_what_is_not_its_shape(bad: str) -> None:
    with pytest.raises(zfs.ZfsError):
        zfs.parse_status(bad)


def test_datasets() -> None:
    text = json.dumps(
        {
            "datasets": {
                "local": {"properties": {"used": {"value": 10}}},
                "local/incus": {
                    "properties": {
                        "quota": {"value": 0},
                        "used": {"value": 4096},
                        "incusos:use": {"value": "incus"},
                    }
                },
            }
        }
    )
    got = zfs.parse_datasets(text)
    assert got["local/incus"] == {"quota": 0, "used": 4096, "incusos:use": "incus"}


def test_create_argv_is_incusos_s() -> None:
    argv = zfs.create_argv(
        "mypool",
        "zfs-raid10",
        ["d1", "d2", "d3", "d4"],
        keyfile="/k",
        log=["l1", "l2"],
        cache=["c"],
        special_type="zfs-raid1",
        special=["s1", "s2"],
    )
    assert argv == [
        "zpool", "create", "-o", "ashift=12", "-O", "mountpoint=none",
        "-O", "encryption=aes-256-gcm",
        "-O", "keyformat=raw", "-O", "keylocation=file:///k", "mypool",
        "mirror", "d1", "d2", "mirror", "d3", "d4",
        "cache", "c", "log", "mirror", "l1", "l2",
        "special", "mirror", "s1", "s2",
    ]  # fmt: skip
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


def test_smartctl_nvme_and_scsi() -> None:
    nvme = smart.parse_smartctl(
        json.dumps(
            {
                "device": {"type": "nvme"},
                "model_name": "QEMU NVMe Ctrl",
                "serial_number": "deadbeef",
                "smart_support": {"available": True, "enabled": True},
                "smart_status": {"passed": True},
                "power_on_time": {"hours": 7},
                "nvme_smart_health_information_log": {
                    "data_units_read": 3,
                    "data_units_written": 0,
                    "available_spare": 100,
                    "percentage_used": 0,
                },
            }
        )
    )
    assert nvme.bus == "nvme" and nvme.model_name == "QEMU NVMe Ctrl"
    assert nvme.smart is not None and nvme.smart.to_api() == {
        "enabled": True, "passed": True, "power_on_hours": 7,
        "data_units_read": 3, "available_spare": 100,
    }  # fmt: skip
    scsi = smart.parse_smartctl(
        json.dumps(
            {
                "device": {"type": "sat"},
                "scsi_vendor": "QEMU",
                "scsi_product": "QEMU HARDDISK",
                "smart_support": {"available": False},
            }
        )
    )
    assert (scsi.bus, scsi.model_family, scsi.model_name, scsi.smart) == (
        "sata",
        "QEMU",
        "QEMU HARDDISK",
        None,
    )
    assert smart.parse_smartctl("").smart is None
    assert smart.parse_smartctl("{").smart is not None


def test_nvme_smart_from_the_log_matches_what_smartctl_reports() -> None:
    """The same drive state read two ways: the raw SMART / Health log page (NVMe Base
    Specification 2.0, figure 207) through hal/nvme.py, and smartctl's JSON of it."""
    from incusos_hal.hal import nvme

    page = bytearray(512)
    page[0] = 0  # critical warning
    page[1:3] = (300).to_bytes(2, "little")  # kelvin
    page[3], page[4], page[5] = 97, 10, 4  # spare, threshold, percent used
    page[32:48] = (123456).to_bytes(16, "little")
    page[48:64] = (654321).to_bytes(16, "little")
    page[128:144] = (4242).to_bytes(16, "little")
    ident = bytearray(4096)
    ident[4:24] = b"IHALNVME0001".ljust(20)
    ident[24:64] = b"QEMU NVMe Ctrl".ljust(40)
    ours = smart.from_nvme(nvme.parse_id_ctrl(bytes(ident)), nvme.parse_smart_log(bytes(page)))
    theirs = smart.parse_smartctl(
        json.dumps(
            {
                "device": {"type": "nvme"},
                "model_name": "QEMU NVMe Ctrl",
                "serial_number": "IHALNVME0001",
                "smart_support": {"available": True, "enabled": True},
                "smart_status": {"passed": True},
                "power_on_time": {"hours": 4242},
                "nvme_smart_health_information_log": {
                    "critical_warning": 0,
                    "data_units_read": 123456,
                    "data_units_written": 654321,
                    "available_spare": 97,
                    "percentage_used": 4,
                },
            }
        )
    )
    assert ours == theirs
    page[0] = 0x04  # reliability degraded: smartctl says FAILED
    failed = smart.from_nvme(nvme.parse_id_ctrl(bytes(ident)), nvme.parse_smart_log(bytes(page)))
    assert failed.smart is not None and failed.smart.passed is False
