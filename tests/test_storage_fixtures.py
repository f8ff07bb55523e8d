"""The storage tests' reading of zpool and smartctl JSON (tests/storage_reference.py),
checked on real output recorded in the ZFS guest (tests/fixtures/zfs/, NOTE.md there):
what test_vm_storage compares the API with must itself read the real tools right."""

from __future__ import annotations

import pytest

from storage_reference import (
    RECORDED_DISKS,
    RECORDED_NVME,
    RECORDED_TYPES,
    expected_drive,
    load,
    recorded,
    top_vdevs,
    vdev_states,
)

D, NVME = RECORDED_DISKS, RECORDED_NVME

LAYOUTS = {  # case: (data vdevs, logs, l2cache, special), as the case made them
    "raid0-1": (D[:1], [], [], []),
    "raid0-2": (D[:2], [], [], []),
    "raid1": (["mirror-0"], [], [], []),
    "raid10": (["mirror-0", "mirror-1"], [], [], []),
    "raidz1": (["raidz1-0"], [], [], []),
    "raidz2": (["raidz2-0"], [], [], []),
    "raidz3": (["raidz3-0"], [], [], []),
    "raid0-1-unencrypted": (D[:1], [], [], []),
    "log-cache-special": (["mirror-0"], D[3:5], D[2:3], NVME),
    "log-cache-special-create": (["mirror-0"], D[3:5], D[2:3], NVME),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_top_vdevs_reads_each_recorded_layout(case: str) -> None:
    data, logs, cache, special = LAYOUTS[case]
    layout = top_vdevs(load(f"{case}/zpool-status-pool.json"))
    assert layout == {"data": data, "logs": logs, "l2cache": cache, "special": special}
    # the all-pools form IncusOS runs has the same tree
    assert top_vdevs(load(f"{case}/zpool-status.json")) == layout


def test_disk_states_are_by_id_whole_disks() -> None:
    states = vdev_states(load("raid10/zpool-status-pool.json"))
    assert states == {(d, "ONLINE") for d in D[:4]}


def test_expected_drive_from_real_smartctl() -> None:
    nvme = expected_drive(load("smartctl-aj-nvme-namespace.json"))
    assert nvme["bus"] == "nvme" and nvme["model_name"] == "QEMU NVMe Ctrl"
    assert nvme["serial_number"] == "IHALNVME0001"
    # qemu's NVMe reports spare, wear and hours as 0: IncusOS leaves zeros out
    assert nvme["smart"] == {"enabled": True, "passed": True, "data_units_read": 6}
    scsi = expected_drive(load("smartctl-aj-scsi.json"))
    assert (scsi["bus"], scsi["model_family"], scsi["model_name"]) == (
        "scsi",
        "QEMU",
        "QEMU HARDDISK",
    )
    assert scsi["serial_number"] == "incus_disk1" and scsi["smart"] is None
    sata = expected_drive(load("smartctl-aj-sata.json"))
    assert sata["bus"] == "sata" and sata["serial_number"] == "sdisk1"
    assert sata["smart"] == {"enabled": True, "passed": True, "power_on_hours": 1}
    virtio = expected_drive(load("smartctl-aj-virtio-blk.json"))
    assert virtio == {
        "model_family": "",
        "model_name": "",
        "serial_number": "",
        "bus": "",
        "smart": None,
    }


@pytest.mark.parametrize("case", LAYOUTS)
def test_the_hal_reads_each_recorded_pool_as_incusos_does(case: str) -> None:
    """hal/zfsparse on the real `zpool status -jp --json-int`: the pool's type, its by-id
    data, log, cache and special devices (sorted, as IncusOS lists them), its size."""
    from incusos_hal.hal import zfsparse

    pools = zfsparse.parse_status(recorded(f"{case}/zpool-status-pool.json"))
    assert list(pools) == ["mypool"]
    layout = zfsparse.layout(pools["mypool"])
    reference = load(f"{case}/zpool-status-pool.json")
    data_disks = sorted(d for d, _ in vdev_states(reference))  # the data vdevs' leaves
    _, logs, cache, special = LAYOUTS[case]
    assert layout.type == RECORDED_TYPES[case]
    assert list(layout.devices) == data_disks
    assert (list(layout.log), list(layout.cache), list(layout.special)) == (
        sorted(logs),
        sorted(cache),
        sorted(special),
    )
    assert layout.special_type == ("zfs-raid1" if special else "")
    assert not layout.devices_degraded and layout.raw_size > 0


SCANS = {  # case: (pool state, scan function, scan state), as recorded
    "degraded-offline": ("DEGRADED", None, None),
    "resilver-in-progress": ("DEGRADED", "RESILVER", "SCANNING"),
    "resilver-done": ("ONLINE", "RESILVER", "FINISHED"),
    "scrub-in-progress": ("ONLINE", "SCRUB", "SCANNING"),
    "scrub-done": ("ONLINE", "SCRUB", "FINISHED"),
}


@pytest.mark.parametrize("case", SCANS)
def test_scan_stats_as_test_vm_storage_reads_them(case: str) -> None:
    """zfs_scan_suspend_progress held the resilver and the scrub in progress for real."""
    pool = load(f"{case}/zpool-status-pool.json")["pools"]["mypool"]
    scan = pool.get("scan_stats", {})
    assert (pool["state"], scan.get("function"), scan.get("state")) == SCANS[case]


def test_offlined_and_replaced_disks_by_id() -> None:
    assert (D[0], "OFFLINE") in vdev_states(load("degraded-offline/zpool-status-pool.json"))
    done = vdev_states(load("resilver-done/zpool-status-pool.json"))
    assert done == {(d, "ONLINE") for d in (D[1], D[2], D[3])}
