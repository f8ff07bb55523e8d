""":wipe-drive and :encrypt-drive on real block devices: a real `incusos-hal serve` whose
--root is a scratch tree where two disks (sysfs entries and /dev/disk/by-id links) lead
to loop devices. The drive is really wiped (no signature left) or LUKS2-formatted
(cryptsetup luksDump), the key file 0600 and 32 bytes; a refused request leaves the
device byte-identical (its first MiB hashed). device-mapper cannot map here, so the
encrypted drive is not opened now: the service says so in its log and keeps the key."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import apiserver
from conftest import require_root, require_tool

pytestmark = pytest.mark.root

DATA_ID = "scsi-0QEMU_QEMU_HARDDISK_incus_disk1"
BOOT_ID = "scsi-0QEMU_QEMU_HARDDISK_incus_root"


def losetup(image: Path) -> str:
    return subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()


def fake_disk(root: Path, name: str, loop: str, dev: str, drive_id: str) -> None:
    """A disk as sysfs and udev show one, named `name`, whose /dev node is the loop."""
    block = root / "sys/class/block" / name
    (block / "device").mkdir(parents=True)
    (block / "dev").write_text(dev + "\n")
    size = Path(f"/sys/class/block/{os.path.basename(loop)}/size").read_text()
    (block / "size").write_text(size)
    (block / "removable").write_text("0\n")
    (root / "dev" / name).symlink_to(loop)
    (root / "dev/disk/by-id" / drive_id).symlink_to(f"../../{name}")


def first_mib(device: str) -> str:
    with open(device, "rb") as f:
        return hashlib.sha256(f.read(1 << 20)).hexdigest()


@pytest.fixture
def drives(tmp_path: Path) -> Iterator[tuple[apiserver.Server, str, str]]:
    require_root()
    require_tool("losetup", "wipefs", "cryptsetup", "curl")
    loops: list[str] = []
    for name in ("data.img", "boot.img"):
        with open(tmp_path / name, "wb") as f:
            f.truncate(64 << 20)
        loops.append(losetup(tmp_path / name))
    try:
        root = tmp_path / "root"
        (root / "dev/disk/by-id").mkdir(parents=True)
        (root / "etc").mkdir()
        data_dev = Path(f"/sys/class/block/{os.path.basename(loops[0])}/dev").read_text().strip()
        fake_disk(root, "sdx", loops[0], data_dev, DATA_ID)
        # The boot disk is the one holding the root's /etc, as the service finds it.
        st = os.stat(root / "etc")
        fake_disk(root, "sdy", loops[1], f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", BOOT_ID)
        base = tmp_path / "srv"
        base.mkdir()
        srv = apiserver.make(base, [])
        srv.root = root
        srv.start()
        try:
            yield srv, loops[0], loops[1]
        finally:
            srv.stop()
    finally:
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)


def post(api: apiserver.Server, action: str, body: object) -> apiserver.Result:
    return api.curl("POST", f"/1.0/system/storage/:{action}", body=json.dumps(body).encode())


def signatures(device: str) -> str:
    return subprocess.run(
        ["wipefs", "--no-act", "--output", "TYPE", "--noheadings", device],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def test_the_drives_are_seen_as_the_service_sees_a_machines(
    drives: tuple[apiserver.Server, str, str],
) -> None:
    api, _, _ = drives
    state = api.curl("GET", "/1.0/system/storage").json["metadata"]["state"]
    by_id = {d["id"]: d for d in state["drives"]}
    assert set(by_id) == {f"/dev/disk/by-id/{DATA_ID}", f"/dev/disk/by-id/{BOOT_ID}"}
    assert by_id[f"/dev/disk/by-id/{BOOT_ID}"]["boot"] is True
    assert by_id[f"/dev/disk/by-id/{DATA_ID}"]["boot"] is False
    assert by_id[f"/dev/disk/by-id/{DATA_ID}"]["capacity_in_bytes"] == 64 << 20


def test_encrypt_then_wipe_a_real_drive(drives: tuple[apiserver.Server, str, str]) -> None:
    api, data, _ = drives
    drive = f"/dev/disk/by-id/{DATA_ID}"
    subprocess.run(["mkfs.ext4", "-q", "-F", data], check=True, capture_output=True)
    assert signatures(data) == "ext4"
    r = post(api, "encrypt-drive", {"id": drive})
    assert r.status == 200, r.json
    dump = subprocess.run(
        ["cryptsetup", "luksDump", data], capture_output=True, text=True, check=True
    ).stdout
    assert "Version:       \t2" in dump
    key = api.state / f"luks.{DATA_ID}.key"
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    opened = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key), data],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert opened.returncode == 0, opened.stderr
    got = api.curl("GET", "/1.0/system/storage").json["metadata"]["state"]
    (entry,) = [d for d in got["drives"] if d["id"] == drive]
    assert entry["encrypted"] is True
    assert entry["encrypted_id"] == f"/dev/mapper/luks-{DATA_ID}"
    security = api.curl("GET", "/1.0/system/security").json["metadata"]["state"]
    assert list(security["drive_recovery_keys"]) == [DATA_ID]
    # :wipe-drive: the LUKS header gone, the key forgotten.
    r = post(api, "wipe-drive", {"id": drive})
    assert r.status == 200, r.json
    assert signatures(data) == ""
    assert not key.exists()
    assert (
        api.curl("GET", "/1.0/system/security").json["metadata"]["state"]["drive_recovery_keys"]
        == {}
    )


@pytest.mark.parametrize("action", ["wipe-drive", "encrypt-drive"])
def test_the_boot_drive_is_refused_and_untouched(
    drives: tuple[apiserver.Server, str, str], action: str
) -> None:
    api, data, boot = drives
    subprocess.run(["mkfs.ext4", "-q", "-F", boot], check=True, capture_output=True)
    before = first_mib(boot), first_mib(data)
    keys = sorted(p.name for p in api.state.iterdir())
    r = post(api, action, {"id": f"/dev/disk/by-id/{BOOT_ID}"})
    assert r.status == 400 and r.json["error"] == "cannot wipe boot drive", r.json
    for bad, words in (
        ({"id": "/dev/disk/by-id/not-there"}, "doesn't exist"),
        ({"id": f"/dev/disk/by-id/{DATA_ID}\n"}, "control characters"),
        ({"id": 7}, "id: must be a string"),
    ):
        r = post(api, action, bad)
        assert r.status == 400 and words in r.json["error"], (bad, r.json)
    assert (first_mib(boot), first_mib(data)) == before
    assert signatures(boot) == "ext4"
    assert sorted(p.name for p in api.state.iterdir()) == keys


@pytest.mark.parametrize("action", ["wipe-drive", "encrypt-drive"])
def test_a_drive_whose_node_is_no_block_device_is_refused_and_untouched(
    drives: tuple[apiserver.Server, str, str], action: str
) -> None:
    """A recorded tree's /dev holds files where a machine has disks: a drive whose node is
    not a block device is never wiped or formatted, whatever its by-id link says."""
    api, _, _ = drives
    root = api.root
    assert root is not None
    block = root / "sys/class/block/sdw"
    (block / "device").mkdir(parents=True)
    (block / "dev").write_text("8:48\n")
    (block / "size").write_text("131072\n")
    (block / "removable").write_text("0\n")
    stand_in = root / "dev/sdw"
    stand_in.write_bytes(b"recorded, not a disk\n" * 100)
    (root / "dev/disk/by-id/scsi-recorded").symlink_to("../../sdw")
    before = stand_in.read_bytes()
    r = post(api, action, {"id": "/dev/disk/by-id/scsi-recorded"})
    assert r.status == 400 and "not a block device" in r.json["error"], r.json
    assert stand_in.read_bytes() == before
    assert not any("scsi-recorded" in p.name for p in api.state.iterdir())
