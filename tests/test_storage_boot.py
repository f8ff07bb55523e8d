"""`incusos-hal storage import` (incusos-hal-zfs-import.service at boot) and `storage
scrub` (the scrub timer's service), run as systemd runs them, on this host where ZFS is
unavailable: the import never fails the boot and says what it could not do, naming the
pools and drives and never a key; the scrub fails visibly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from incusos_hal.apply import storage

REPO = Path(__file__).resolve().parent.parent


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, "-m", "incusos_hal", "storage", *argv],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def keys(state: Path) -> dict[str, bytes]:
    state.mkdir(mode=0o700, exist_ok=True)
    out = {
        "zpool.tank.key": b"T" * 32,
        "zpool.local.key": b"L" * 32,
        "luks.ata-QEMU_HARDDISK_QM00002.key": b"D" * 32,
        "zpool..key": b"E" * 32,  # no name: not a pool
        "notes.txt": b"",
    }
    for name, data in out.items():
        (state / name).write_bytes(data)
    return out


def test_managed_pools_and_drives_are_the_state_dirs_keys(tmp_path: Path) -> None:
    keys(tmp_path / "state")
    assert storage.managed_pools(tmp_path / "state") == ["local", "tank"]
    assert storage.encrypted_drives(tmp_path / "state") == [
        "/dev/disk/by-id/ata-QEMU_HARDDISK_QM00002"
    ]
    assert storage.managed_pools(tmp_path / "none") == []


def test_import_at_boot_reports_and_never_fails(tmp_path: Path) -> None:
    written = keys(tmp_path / "state")
    root = tmp_path / "root"
    (root / "dev/disk/by-id").mkdir(parents=True)
    done = run("import", "--state-dir", str(tmp_path / "state"), "--root", str(root))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any(
        "encrypted drive /dev/disk/by-id/ata-QEMU_HARDDISK_QM00002 is not present" in x
        for x in lines
    ), lines
    assert any("ZFS unavailable" in x and "local, tank" in x for x in lines), lines
    assert all(x.startswith("<4>") for x in lines), lines  # warnings for the journal
    for data in written.values():
        if data:
            assert data.decode() not in done.stderr + done.stdout


def test_import_with_nothing_to_do_is_silent(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    done = run("import", "--state-dir", str(tmp_path / "state"), "--root", str(tmp_path))
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_scrub_without_zfs_fails_visibly(tmp_path: Path) -> None:
    done = run("scrub", "--state-dir", str(tmp_path))
    assert done.returncode == 1 and "ZFS unavailable" in done.stderr, done.stderr


# -- the local pool -----------------------------------------------------------------------


def scratch_root(tmp_path: Path, labels: dict[str, str]) -> Path:
    """sysfs block devices with their GPT labels (PARTNAME= as the kernel writes it) and
    the udev by-id links to them."""
    root = tmp_path / "root"
    by_id = root / "dev/disk/by-id"
    by_id.mkdir(parents=True)
    for kname, label in labels.items():
        d = root / "sys/class/block" / kname
        d.mkdir(parents=True)
        (d / "uevent").write_text(f"MAJOR=8\nMINOR=3\nDEVNAME={kname}\nDEVTYPE=partition\n"
                                  f"PARTN=3\nPARTNAME={label}\n")  # fmt: skip
        (by_id / f"ata-QEMU_HARDDISK_QM00001-{kname}").symlink_to(f"../../{kname}")
    (by_id / "lvm-pv-uuid-x").symlink_to("../../sda3")
    return root


def test_the_local_data_partition_is_found_by_its_gpt_label(tmp_path: Path) -> None:
    from incusos_hal.sections.storage import local_data_partition

    root = scratch_root(tmp_path, {"sda2": "root-a", "sda3": "local-data", "sdb1": "local-data2"})
    assert local_data_partition(str(root)) == "/dev/disk/by-id/ata-QEMU_HARDDISK_QM00001-sda3"
    none = scratch_root(tmp_path / "n", {"sda2": "root-a", "sda4": "local-data-x"})
    assert local_data_partition(str(none)) == ""
    assert local_data_partition(str(tmp_path / "nothing")) == ""


def test_what_the_boot_does_about_the_local_pool() -> None:
    from incusos_hal.render.zpool import local_pool_decision

    part = "/dev/disk/by-id/ata-x-part11"
    assert local_pool_decision(True, True, part) == "present"
    assert local_pool_decision(False, False, "") == "no-partition"
    # A key and no pool: its disk is missing, and what the partition holds is kept.
    assert local_pool_decision(False, True, part) == "key-without-pool"
    assert local_pool_decision(False, False, part) == "import-or-create"


def test_the_local_pool_and_application_datasets_as_incusos_makes_them() -> None:
    import pytest

    from incusos_hal.render.zpool import application_dataset_argv, local_create_argv

    part = "/dev/disk/by-id/ata-x-part11"
    assert local_create_argv(part, "/var/lib/incusos-hal/zpool.local.key") == [
        "zpool", "create", "-o", "ashift=12", "-O", "mountpoint=none",
        "-O", "encryption=aes-256-gcm", "-O", "keyformat=raw",
        "-O", "keylocation=file:///var/lib/incusos-hal/zpool.local.key", "local", part,
    ]  # fmt: skip
    assert application_dataset_argv("operations-center") == [
        "zfs", "create", "-o", "mountpoint=/var/lib/operations-center/",
        "-o", "incusos:use=operations-center", "local/operations-center",
    ]  # fmt: skip
    for bad in ("", "../x", "a b", "a/b", "x\n"):
        with pytest.raises(ValueError):
            application_dataset_argv(bad)


def test_the_local_pool_grows_into_its_grown_partition_as_incusos_does() -> None:
    from incusos_hal.hal.zfsparse import Layout
    from incusos_hal.render.zpool import local_expand_argv

    part = "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_incus_root-part11"

    def pool(kind: str, *devices: str) -> Layout:
        return Layout(kind, devices, (), (), (), (), (), "", (), (), 0, 0, 0)

    assert local_expand_argv(pool("zfs-raid0", part), 10 << 30) == [
        ["zpool", "set", "autoexpand=on", "local"],
        ["zpool", "online", "-e", "local", part],
    ]
    assert local_expand_argv(pool("zfs-raid0", part), 0) == []  # nothing to grow into
    assert local_expand_argv(pool("zfs-raid1", part, "/dev/disk/by-id/x"), 1 << 30) == []
    assert local_expand_argv(pool("zfs-raid0", part, "/dev/disk/by-id/x"), 1 << 30) == []


def test_import_at_boot_survives_a_step_that_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A step that raises (a bug, a machine without what it reads) is a warning with its
    trace; the other steps still run and the unit does not fail the boot."""
    from types import SimpleNamespace

    from incusos_hal.cli import machine

    ran: list[str] = []

    def broken(state_dir: Path) -> storage.Report:
        raise RuntimeError("a step that breaks")

    def local(state_dir: Path, root: str = "/") -> storage.Report:
        ran.append("local")
        return storage.Report()

    monkeypatch.setattr(storage, "import_pools", broken)
    monkeypatch.setattr(storage, "ensure_local_pool", local)
    args = SimpleNamespace(action="import", state_dir=str(tmp_path), root=str(tmp_path))
    assert machine.cmd_storage(args) == 0  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "<4>import: RuntimeError: a step that breaks" in err and "Traceback" in err
    assert ran == ["local"]
