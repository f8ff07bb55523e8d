"""The shipped transfer definitions against a real A/B disk: systemd-sysupdate 257 (in a
Debian 13 root, run by nspawn without booting) writes version 2 through the HAL's edge
(hal/sysupdate.stage) into a loop device laid out as the image lays it out (ESP, then
/usr verity signature, verity and /usr for slot A holding version 1, and the same three
labelled _empty for slot B), and the UKI into the ESP with its boot counter. Version 3
then replaces 2 in slot B: the running version's partitions (1, ProtectVersion=%A) are
never written, byte for byte. A version the source lacks changes nothing. The versions
are dotted as the image's own are (meson's 0.1.0): 1 is 0.1.0, 2 is 0.2.0, 3 is 0.3.0.

The ESP is a directory here (this host's kernel mounts no vfat):
SYSTEMD_ESP_PATH with SYSTEMD_RELAX_ESP_CHECKS, as systemd documents for such cases."""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nspawn
from conftest import REPO, require_root, require_tool

pytestmark = pytest.mark.nspawn

LAYOUT = [  # repart definition name, type, label, size
    ("00-esp", "esp", "ESP", "4M"),
    ("10-usr-verity-sig", "usr-verity-sig", "incusos_0.1.0_verity_sig", "16K"),
    ("11-usr-verity", "usr-verity", "incusos_0.1.0_verity", "1M"),
    ("12-usr", "usr", "incusos_0.1.0", "8M"),
    ("20-usr-verity-sig", "usr-verity-sig", "_empty", "16K"),
    ("21-usr-verity", "usr-verity", "_empty", "1M"),
    ("22-usr", "usr", "_empty", "8M"),
]

STAGE = """
import json, os, sys
from incusos_hal.hal import sysupdate
env = dict(os.environ, SYSTEMD_ESP_PATH="/efi", SYSTEMD_RELAX_ESP_CHECKS="1")
out = {}
try:
    staged = sysupdate.stage("/exp/src", sys.argv[1], shipped="/src/sysupdate",
                             target=sys.argv[2], runtime_dir="/run/ihal", env=env)
    out["versions"] = list(staged.versions)
except sysupdate.SysupdateError as e:
    out["error"] = str(e)
print(json.dumps(out))
"""


def _source_files(src: Path, version: str) -> dict[str, bytes]:
    files = {
        f"incusos_{version}.usr-x86-64.{uuid.uuid4()}.raw": version.encode() * (1 << 20),
        f"incusos_{version}.usr-x86-64-verity.{uuid.uuid4()}.raw": version.encode() * 200_000,
        f"incusos_{version}.usr-x86-64-verity-sig.{uuid.uuid4()}.raw": json.dumps(
            {"rootHash": version * 64, "signature": "MIIB"}
        ).encode(),
        f"incusos_{version}.efi": f"UKI {version}".encode(),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_root()
    require_tool("debootstrap", "systemd-nspawn", "losetup", "partx", "mount")
    work = tmp_path_factory.mktemp("sysupdate")
    root = nspawn.rootfs("container-apps", nspawn.APPS_PACKAGES)
    exp = work / "exp"
    (exp / "repart").mkdir(parents=True)
    (exp / "src").mkdir()
    (exp / "efi/EFI/Linux").mkdir(parents=True)
    for name, kind, label, size in LAYOUT:
        (exp / f"repart/{name}.conf").write_text(
            f"[Partition]\nType={kind}\nLabel={label}\nSizeMinBytes={size}\nSizeMaxBytes={size}\n"
        )
    image = exp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(40 << 20)
    (exp / "efi/EFI/Linux/incusos_0.1.0.efi").write_bytes(b"UKI 1")
    with nspawn.overlay([root], work / "machine") as merged:
        # The running system is version 1 of image "incusos".
        release = merged / "usr/lib/os-release"
        release.unlink()
        release.write_text("ID=debian\nIMAGE_ID=incusos\nIMAGE_VERSION=0.1.0\n")
        (merged / "etc/os-release").unlink(missing_ok=True)
        (merged / "etc/os-release").symlink_to("../usr/lib/os-release")
        # nspawn_run binds read-only; repart writes the disk image.
        subprocess.run(
            [
                "systemd-nspawn", "-q", "--register=no", "--keep-unit", "--private-network",
                "--timezone=off", "--resolv-conf=off", f"--machine=ihal-{secrets.token_hex(3)}",
                "-D", str(merged), f"--bind={exp}:/exp",
                "systemd-repart", "--empty=force", "--dry-run=no",
                "--definitions=/exp/repart", "/exp/disk.img",
            ],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        loop = subprocess.run(
            ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
        ).stdout.strip()
        try:
            # This kernel parses no partition tables itself: partx adds the nodes.
            subprocess.run(["partx", "-a", loop], check=True)
            parts = [f"{loop}p{i}" for i in range(1, len(LAYOUT) + 1)]
            slot_a = {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in parts[1:4]}
            devices = [loop, *parts]

            def run(script: str) -> str:
                cmd = [
                    "systemd-nspawn", "-q", "--register=no", "--keep-unit", "--private-network",
                    "--timezone=off", "--resolv-conf=off", "-D", str(merged),
                    f"--bind={exp}:/exp", f"--bind={exp}/efi:/efi", f"--bind-ro={REPO}:/src",
                    *(f"--bind={d}" for d in devices),
                    "/bin/sh", "-ec", script,
                ]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, proc.stdout + proc.stderr
                return proc.stdout

            (exp / "stage.py").write_text(STAGE)
            stage = f"cd /src && PYTHONPATH=src python3 /exp/stage.py {{v}} {loop}"

            def labels() -> list[str]:
                doc = json.loads(run(f"sfdisk -J {loop}"))
                return [p.get("name", "") for p in doc["partitiontable"]["partitions"]]

            def step(version: str) -> dict[str, Any]:
                out: dict[str, Any] = json.loads(run(stage.format(v=version)).splitlines()[-1])
                out["labels"] = labels()
                out["esp"] = sorted(p.name for p in (exp / "efi/EFI/Linux").iterdir())
                out["slot_a"] = {
                    p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in parts[1:4]
                }
                return out

            result: dict[str, Any] = {"slot_a_before": slot_a, "parts": parts, "exp": exp}
            result["files2"] = _source_files(exp / "src", "0.2.0")
            result["two"] = step("0.2.0")
            result["b_after_two"] = [Path(p).read_bytes() for p in parts[4:7]]
            result["missing"] = step("9.9")
            result["files3"] = _source_files(exp / "src", "0.3.0")
            result["three"] = step("0.3.0")
            result["b_after_three"] = [Path(p).read_bytes() for p in parts[4:7]]
            result["uki_mode"] = {
                p.name: p.stat().st_mode & 0o777 for p in (exp / "efi/EFI/Linux").iterdir()
            }
            yield result
        finally:
            subprocess.run(["partx", "-d", loop], check=False)
            subprocess.run(["losetup", "-d", loop], check=False)


def _written(files: dict[str, bytes], kind: str, partition: bytes) -> bool:
    # incusos_VERSION.KIND.UUID.raw, VERSION dotted itself
    data = next(d for n, d in files.items() if n.endswith(".raw") and n.split(".")[-3] == kind)
    return partition[: len(data)] == data


def test_version_two_goes_to_slot_b_with_a_counted_uki(disk: dict[str, Any]) -> None:
    two = disk["two"]
    assert "error" not in two, two
    assert two["labels"] == [
        "ESP",
        "incusos_0.1.0_verity_sig",
        "incusos_0.1.0_verity",
        "incusos_0.1.0",
        "incusos_0.2.0_verity_sig",
        "incusos_0.2.0_verity",
        "incusos_0.2.0",
    ], two
    assert two["versions"] == ["0.2.0", "0.1.0"], two
    sig, verity, usr = disk["b_after_two"]
    files = disk["files2"]
    assert _written(files, "usr-x86-64-verity-sig", sig)
    assert _written(files, "usr-x86-64-verity", verity)
    assert _written(files, "usr-x86-64", usr)
    assert two["esp"] == ["incusos_0.1.0.efi", "incusos_0.2.0+3-0.efi"], two
    assert two["slot_a"] == disk["slot_a_before"], "the running slot was written"


def test_a_version_the_source_lacks_changes_nothing(disk: dict[str, Any]) -> None:
    missing = disk["missing"]
    assert "error" in missing and "systemd-sysupdate update 9.9 failed" in missing["error"], missing
    assert missing["labels"] == disk["two"]["labels"]
    assert missing["esp"] == disk["two"]["esp"]
    assert missing["slot_a"] == disk["slot_a_before"]


def test_version_three_replaces_two_never_the_running_one(disk: dict[str, Any]) -> None:
    three = disk["three"]
    assert "error" not in three, three
    assert three["labels"][1:4] == [
        "incusos_0.1.0_verity_sig",
        "incusos_0.1.0_verity",
        "incusos_0.1.0",
    ]
    assert three["labels"][4:] == [
        "incusos_0.3.0_verity_sig",
        "incusos_0.3.0_verity",
        "incusos_0.3.0",
    ]
    assert three["slot_a"] == disk["slot_a_before"], "the running slot was written"
    sig, verity, usr = disk["b_after_three"]
    assert _written(disk["files3"], "usr-x86-64-verity-sig", sig)
    assert _written(disk["files3"], "usr-x86-64", usr)
    assert _written(disk["files3"], "usr-x86-64-verity", verity)
    # InstancesMax=2: the running UKI and the newest; 2's is gone.
    assert three["esp"] == ["incusos_0.1.0.efi", "incusos_0.3.0+3-0.efi"], three
    assert disk["uki_mode"]["incusos_0.3.0+3-0.efi"] == 0o444
