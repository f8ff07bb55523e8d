"""Reading real OpenZFS and smartctl JSON the way IncusOS reads it, for the storage tests
(tests/test_vm_storage.py in the guest, tests/test_storage_fixtures.py on the recorded
fixtures in tests/fixtures/zfs/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BY_ID = "/dev/disk/by-id"

# The recordings (tests/fixtures/zfs/NOTE.md) and the guest's disks as they name them.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "zfs"
RECORDED_DISKS = [f"{BY_ID}/scsi-0QEMU_QEMU_HARDDISK_incus_disk{i}" for i in range(1, 8)]
RECORDED_NVME = [
    f"{BY_ID}/nvme-QEMU_NVMe_Ctrl_IHALNVME0001",
    f"{BY_ID}/nvme-QEMU_NVMe_Ctrl_IHALNVME0002",
]


# Every recorded pool (tests/fixtures/zfs/<case>/): IncusOS's type, read from its data vdevs.
RECORDED_TYPES = {
    "raid0-1": "zfs-raid0",
    "raid0-1-unencrypted": "zfs-raid0",
    "raid0-2": "zfs-raid0",
    "raid1": "zfs-raid1",
    "raid10": "zfs-raid10",
    "raidz1": "zfs-raidz1",
    "raidz2": "zfs-raidz2",
    "raidz3": "zfs-raidz3",
    "log-cache-special": "zfs-raid1",
    "log-cache-special-create": "zfs-raid1",
    **dict.fromkeys(
        [
            "encrypted-key-loaded",
            "encrypted-key-unloaded",
            "encrypted-imported-no-key",
            "encrypted-imported-key-loaded",
            "degraded-offline",
            "degraded-removed",
            "removed-returned",
            "resilver-in-progress",  # a replacing-0 inside mirror-0
            "resilver-done",
            "scrub-in-progress",
            "scrub-paused",
            "scrub-done",
        ],
        "zfs-raid1",
    ),
}


def recorded(name: str) -> str:
    """One recorded file as the tool printed it (`raid10/zpool-status-pool.json`)."""
    return (FIXTURES / name).read_text()


def load(name: str) -> Any:
    """One recorded JSON file, parsed."""
    return json.loads(recorded(name))


def top_vdevs(status: dict[str, Any], pool: str = "mypool") -> dict[str, list[str]]:
    """`zpool status -jp --json-int`'s tree, as IncusOS reads it: the data vdevs (a
    group's name such as mirror-0 or raidz2-0, or a plain disk's path) and the log, cache
    and special classes' leaves."""
    p = status["pools"][pool]
    root = p["vdevs"][pool]
    layout: dict[str, list[str]] = {
        "data": [leaf_id(k, v) for k, v in root.get("vdevs", {}).items()]
    }
    for kind in ("logs", "l2cache", "special"):
        layout[kind] = sorted(leaves(p.get(kind, {})))
    return layout


def leaf_id(name: str, vdev: dict[str, Any]) -> str:
    """A disk vdev as IncusOS names it: its by-id path, whole disk (zpool's `path` is
    the partition it made, `...-part1`; the vdev's name is the by-id name it was given);
    a group (mirror-0, raidz2-0) by its name."""
    return f"{BY_ID}/{name}" if vdev.get("vdev_type") == "disk" else name


def leaves(vdevs: dict[str, Any]) -> list[str]:
    """The devices under a `vdevs` map, through any mirror/raidz groups."""
    found: list[str] = []
    for name, child in vdevs.items():
        found += leaves(child["vdevs"]) if "vdevs" in child else [leaf_id(name, child)]
    return found


def vdev_states(status: dict[str, Any]) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()

    def walk(node: dict[str, Any]) -> None:
        for name, child in node.get("vdevs", {}).items():
            if child.get("vdev_type") == "disk":
                found.add((leaf_id(name, child), child["state"]))
            walk(child)

    for pool in status["pools"].values():
        walk(pool)
    return found


def expected_drive(smartctl: dict[str, Any]) -> dict[str, Any]:
    """What IncusOS makes of `smartctl -aj` (incus-osd/internal/storage/storage.go,
    GetStorageInfo): model from the ATA/NVMe fields or else SCSI's vendor/product, bus
    from device.type ("sat" spelt "sata"), the SMART summary only when SMART is there."""
    out: dict[str, Any] = {
        "model_family": smartctl.get("model_family") or smartctl.get("scsi_vendor", ""),
        "model_name": smartctl.get("model_name") or smartctl.get("scsi_product", ""),
        "serial_number": smartctl.get("serial_number", ""),
        "bus": {"sat": "sata"}.get(t := smartctl.get("device", {}).get("type", ""), t),
    }
    support = smartctl.get("smart_support", {})
    if not support.get("available"):
        out["smart"] = None
        return out
    smart: dict[str, Any] = {
        "enabled": support.get("enabled", False),
        "passed": smartctl.get("smart_status", {}).get("passed", False),
    }
    hours = smartctl.get("power_on_time", {}).get("hours", 0)
    nvme = smartctl.get("nvme_smart_health_information_log", {})
    ata = {
        a["name"]: a["raw"]["value"]
        for a in smartctl.get("ata_smart_attributes", {}).get("table", [])
    }
    for key, value in (
        ("power_on_hours", hours),
        ("percentage_used", nvme.get("percentage_used", 0)),
        ("data_units_read", nvme.get("data_units_read", 0)),
        ("data_units_written", nvme.get("data_units_written", 0)),
        ("available_spare", nvme.get("available_spare", 0)),
        ("raw_read_error_rate", ata.get("Raw_Read_Error_Rate", 0)),
        ("seek_error_rate", ata.get("Seek_Error_Rate", 0)),
        ("reallocated_sectors", ata.get("Reallocated_Sector_Ct", 0)),
    ):
        if value > 0:
            smart[key] = value
    out["smart"] = smart
    return out
