"""The installer on loop devices: a source "USB" disk with the image's GPT (ESP,
seed-data, /usr verity signature, verity and /usr, plus the swap, root and local-data
partitions a first boot makes) and two large sparse target disks. First boot with an
install seed picks the target by IncusOS's selectors, refuses what IncusOS refuses with
the disks untouched, copies the image's partitions and reads them back.

The machine the installer sees is a root whose sysfs block class is this machine's and
whose /dev/disk/by-id names the loop devices as udev names disks (loop devices have no
by-id names of their own; IncusOS skips disks without one)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_root, require_tool

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
USR = "8484680c-9521-48c6-9c11-b0720656f69e"
USR_VERITY = "77ff5f63-e7b6-4633-acf4-1565b864c0e6"
USR_VERITY_SIG = "e7bb33fb-06cf-4e81-8273-e543b413e2e2"
SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
ROOT = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
LAYOUT = [  # name, type, MiB; the last three are what systemd-repart makes on first boot
    ("esp", ESP, 4),
    ("seed-data", LINUX, 1),
    ("IncusOS_1_verity_sig", USR_VERITY_SIG, 1),
    ("IncusOS_1_verity", USR_VERITY, 2),
    ("IncusOS_1", USR, 8),
    ("swap", SWAP, 2),
    ("root", ROOT, 4),
    ("local-data", LINUX, 2),
]
SECURE_BOOT = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


@dataclass
class Rig:
    root: Path
    state: Path
    seed: Path
    source: str  # /dev/loopN
    targets: dict[str, str]  # by-id name -> /dev/loopN
    images: dict[str, Path]


def _losetup(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()


def _table(device: str) -> list[dict[str, object]]:
    out = subprocess.run(["sfdisk", "--json", device], capture_output=True, check=True).stdout
    parts: list[dict[str, object]] = json.loads(out)["partitiontable"]["partitions"]
    return parts


def _read(device: str, offset: int, length: int) -> bytes:
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def _digest(device: str, offset: int = 0, length: int = 64 * MiB) -> str:
    return hashlib.sha256(_read(device, offset, length)).hexdigest()


def _fingerprint(device: str, size: int) -> tuple[str, str]:
    """The start and end of a disk: where an install writes its partitions and GPTs."""
    return _digest(device, 0, 64 * MiB), _digest(device, size - MiB, MiB)


SEED = {
    "install.json": {"target": {"id": "TARGET", "sort_order": "smallest"}},
    "network.json": {"dns": {"hostname": "installed"}},
}


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    require_root()
    require_tool("losetup", "sfdisk", "truncate")
    from incusos_hal.hal import seed as media

    source_img = tmp_path / "usb.img"
    subprocess.run(["truncate", "-s", "64M", str(source_img)], check=True)
    script = "label: gpt\n" + "".join(
        f"size={size}MiB, type={kind}, name={name}\n" for name, kind, size in LAYOUT
    )
    subprocess.run(["sfdisk", "-q", str(source_img)], input=script.encode(), check=True)
    parts = _table(str(source_img))
    with source_img.open("r+b") as f:
        for part, (name, _, _) in zip(parts, LAYOUT, strict=True):
            f.seek(int(part["start"]) * 512)  # type: ignore[call-overload]
            size = int(part["size"]) * 512  # type: ignore[call-overload]
            if name == "seed-data":
                files = {k: json.dumps(v).encode() for k, v in SEED.items()}
                f.write(media.tar_bytes(files))
            else:
                f.write(os.urandom(size))
    images = {"scsi-0QEMU_TARGET_A": tmp_path / "a.img", "nvme-TARGET_B": tmp_path / "b.img"}
    subprocess.run(["truncate", "-s", "50G", str(images["scsi-0QEMU_TARGET_A"])], check=True)
    subprocess.run(["truncate", "-s", "60G", str(images["nvme-TARGET_B"])], check=True)
    devices = [_losetup(source_img)]
    try:
        targets = {}
        for name, image in images.items():
            devices.append(_losetup(image))
            targets[name] = devices[-1]
        root = tmp_path / "root"
        (root / "sys/class/tpm/tpm0").mkdir(parents=True)
        (root / "sys/class/block").symlink_to("/sys/class/block")
        efivars = root / "sys/firmware/efi/efivars"
        efivars.mkdir(parents=True)
        (efivars / SECURE_BOOT).write_bytes(b"\x06\x00\x00\x00\x01")
        (root / "dev/disk/by-id").mkdir(parents=True)
        for device in devices:
            (root / "dev" / Path(device).name).symlink_to(device)
        (root / "dev/disk/by-id/usb-INSTALL_MEDIA").symlink_to(f"../../{Path(devices[0]).name}")
        for name, device in targets.items():
            (root / "dev/disk/by-id" / name).symlink_to(f"../../{Path(device).name}")
        seed = tmp_path / "seed"
        seed.mkdir()
        yield Rig(root, tmp_path / "state", seed, devices[0], targets, images)
    finally:
        for device in devices:
            subprocess.run(["losetup", "-d", device], check=False)


def install(rig: Rig, seed: dict[str, object]) -> tuple[int, str, dict[str, object]]:
    for old in rig.seed.iterdir():
        old.unlink()
    for name, value in seed.items():
        (rig.seed / name).write_text(json.dumps(value))
    proc = subprocess.run(
        [
            sys.executable, "-m", "incusos_hal", "seed", "apply", "--root", str(rig.root),
            "--state-dir", str(rig.state), "--source", str(rig.seed),
            "--install-from", rig.source,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        check=False,
    )  # fmt: skip
    status = json.loads((rig.state / "seed.status.json").read_text())
    return proc.returncode, proc.stderr, status


def test_install_refusals_leave_every_disk_untouched(rig: Rig) -> None:
    sizes = {name: image.stat().st_size for name, image in rig.images.items()}
    before = {name: _fingerprint(dev, sizes[name]) for name, dev in rig.targets.items()}
    source_before = _digest(rig.source)
    refusals = [
        ({"target": {"id": "NOPE"}}, "no target device matched provided install seed selectors"),
        ({"target": {"id": "INSTALL_MEDIA"}}, "no target device matched"),  # never the media
        ({"target": {"id": "TARGET"}}, "more than one target device matched"),
        ({}, "didn't find exactly one install device"),
        ({"target": {"id": "TARGET", "bus": "usb"}}, "no target device matched"),
        ({"target": {"id": "TARGET", "min_size": "55GiB", "max_size": "58GiB"}}, "no target"),
        (
            {"target": {"id": "TARGET_A"}, "security": {"missing_tpm": True}},
            "a physical TPM was found, but install seed wants to configure a swtpm-backed TPM",
        ),
        (
            {"target": {"id": "TARGET_A"}, "security": {"missing_secure_boot": True}},
            "Secure Boot is enabled, but install seed expects it to be disabled",
        ),
    ]
    for seed, message in refusals:
        code, err, status = install(rig, {"install.json": seed})
        assert code == 2, err
        assert status["problems"] and message in status["problems"][0], (seed, status, err)
    # No TPM and no Secure Boot: refused whatever the seed allows.
    (rig.root / "sys/class/tpm/tpm0").rmdir()
    code, err, status = install(rig, {"install.json": {"target": {"id": "TARGET_A"}}})
    assert "no working TPM found, but install seed doesn't allow" in status["problems"][0]
    (rig.root / "sys/firmware/efi/efivars" / SECURE_BOOT).write_bytes(b"\x06\x00\x00\x00\x00")
    code, err, status = install(
        rig, {"install.json": {"target": {"id": "TARGET_A"}, "security": {"missing_tpm": True}}}
    )
    assert "cannot run if Secure Boot is disabled and no physical TPM" in status["problems"][0]
    # An invalid seed file stops the install before anything is looked at.
    code, err, status = install(
        rig, {"install.json": {"target": {"id": "TARGET_A"}}, "network.json": {"mtu": 1}}
    )
    assert status["problems"] == ["network.json: mtu: unknown key"], status
    after = {name: _fingerprint(dev, sizes[name]) for name, dev in rig.targets.items()}
    assert after == before
    assert _digest(rig.source) == source_before
    assert not (rig.state / "seed.applied").exists()


def test_install_copies_the_image_and_reads_it_back(rig: Rig) -> None:
    from incusos_hal.apply.install import seed_of

    target = rig.targets["scsi-0QEMU_TARGET_A"]
    other = rig.targets["nvme-TARGET_B"]
    other_before = _fingerprint(other, 60 << 30)
    source_before = _digest(rig.source)
    code, err, status = install(rig, {k: v for k, v in SEED.items()})
    assert code == 0, err
    assert status["installed"] == {"target": "scsi-0QEMU_TARGET_A", "seed": ["network.json"]}
    source_parts = _table(rig.source)
    copied = _table(target)  # read by sfdisk: a GPT it accepts
    assert [p["name"] for p in copied] == [name for name, _, _ in LAYOUT[:5]]
    for got, want in zip(copied, source_parts, strict=False):
        for key in ("start", "size", "type", "uuid", "name"):
            assert got[key] == want[key], (key, got, want)
        offset, length = int(want["start"]) * 512, int(want["size"]) * 512  # type: ignore[call-overload]
        if want["name"] != "seed-data":
            assert _digest(target, offset, length) == _digest(rig.source, offset, length)
    # The installed seed: the image's, without the install file.
    assert seed_of(Path(target)) == {"network.json": json.dumps(SEED["network.json"]).encode()}
    # The disk GUID is the target's own; the backup GPT is at its end.
    verify = subprocess.run(["sfdisk", "--verify", target], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert _read(target, (50 << 30) - 512, 8) == b"EFI PART"
    assert _digest(rig.source) == source_before
    assert _fingerprint(other, 60 << 30) == other_before
    for line in ("partition 5 (IncusOS_1) verified, sha256", "remove the install media"):
        assert line in err, err

    # Again: the target has a partition table now.
    before = _fingerprint(target, 50 << 30)
    code, err, status = install(rig, {k: v for k, v in SEED.items()})
    assert (
        "a partition table already exists on device 'scsi-0QEMU_TARGET_A'" in status["problems"][0]
    )
    assert _fingerprint(target, 50 << 30) == before
    forced = {**SEED, "install.json": {**SEED["install.json"], "force_install": True}}
    code, err, status = install(rig, forced)
    assert code == 0, err
    assert status["installed"]["target"] == "scsi-0QEMU_TARGET_A"  # type: ignore[index]
