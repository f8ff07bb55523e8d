"""The image's disk layout as systemd-repart itself makes it: the build's definitions
(mkosi/mkosi.repart, their types, labels and sizes) on an empty disk, then first boot's
(mkosi/mkosi.extra/usr/lib/repart.d) on that disk, both run by the systemd-repart the
image ships (257, from the mkosi tools root), read back with the HAL's own GPT reader.

What it holds: systemd-repart matches existing partitions to definitions by type, in
order, so the blank seed-data partition (linux-generic) must never become local-data
(linux-generic too), slot A must keep its place and size, and slot B (`_empty`) must be
made for the A/B update. Formatting and TPM enrolment are left out (no TPM here, and the
booted image test, tests/test_vm_image.py, does them): Format= and Encrypt= are dropped.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from incusos_hal.hal import disk as disks
from incusos_hal.hal import repart

import image
import nspawn
from conftest import REPO, require_root, require_tool

pytestmark = [pytest.mark.image]

BUILD = REPO / "mkosi/mkosi.repart"
FIRST_BOOT = REPO / "mkosi/mkosi.extra/usr/lib/repart.d"
KEPT = ("Type", "Label", "SizeMinBytes", "SizeMaxBytes", "Weight", "NoAuto")
VERSION = "incusos-hal_0.1.0"  # the image's IMAGE_ID_IMAGE_VERSION, as %M_%A expands
SIGNATURE_BYTES = "16K"  # what mkosi's repart gives a Verity=signature partition (seen)
MIB = 1 << 20


def _layout_only(source: Path, target: Path) -> None:
    """The definitions in `source`, with only what places a partition kept."""
    target.mkdir()
    for conf in sorted(source.glob("*.conf")):
        # systemd's unit-file syntax (a key may repeat, as CopyFiles= does): the last
        # value of each key this test keeps.
        part: dict[str, str] = {}
        for line in conf.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and not line.startswith(("#", ";")):
                part[key.strip()] = value.strip()
        lines = ["[Partition]"]
        for key in KEPT:
            if key in part:
                lines.append(f"{key}={part[key].replace('%M_%A', VERSION)}")
        if part.get("Verity") == "signature" and "SizeMinBytes" not in part:
            lines += [f"SizeMinBytes={SIGNATURE_BYTES}", f"SizeMaxBytes={SIGNATURE_BYTES}"]
        (target / conf.name).write_text("\n".join(lines) + "\n")


def _repart(tools: Path, work: Path, *args: str) -> None:
    with nspawn.overlay([tools], work / f"tools-{secrets.token_hex(3)}") as merged:
        proc = subprocess.run(
            [
                "systemd-nspawn", "-q", "--register=no", "--keep-unit", "--private-network",
                "--timezone=off", "--resolv-conf=off", f"--machine=ihal-{secrets.token_hex(3)}",
                "-D", str(merged), f"--bind={work}:/w",
                "systemd-repart", "--dry-run=no", "--no-pager", *args,
            ],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_first_boot_keeps_the_image_and_adds_slot_b_root_swap_and_local_data(
    tmp_path: Path,
) -> None:
    require_root()
    require_tool("systemd-nspawn")
    tools = image.tools_root()
    _layout_only(BUILD, tmp_path / "build")
    _layout_only(FIRST_BOOT, tmp_path / "first")
    disk = tmp_path / "disk.raw"
    _repart(tools, tmp_path, "--empty=create", "--size=6G", "--definitions=/w/build", "/w/disk.raw")
    built = disks.read_gpt(disk).entries
    assert [e.name for e in built] == [
        "esp",
        "seed-data",
        f"{VERSION}_verity_sig",
        f"{VERSION}_verity",
        VERSION,
    ], built
    _repart(tools, tmp_path, "--definitions=/w/first", "/w/disk.raw")
    table = disks.read_gpt(disk)
    after = table.entries
    # The image's partitions exactly as built: same place, size, identity and name.
    assert after[: len(built)] == built
    new = after[len(built) :]
    assert sorted(e.name for e in new) == ["_empty"] * 3 + ["local-data", "root-x86-64", "swap"]
    kinds = {e.name: e for e in new}
    slot_b = [e for e in new if e.name == "_empty"]
    assert [repart.IMAGE_TYPES[e.type] for e in slot_b] == [
        "usr-x86-64-verity-sig",
        "usr-x86-64-verity",
        "usr-x86-64",
    ]
    # Slot B is slot A's size, partition by partition, so either holds any version.
    assert [e.sectors for e in slot_b] == [e.sectors for e in built[2:]]
    assert kinds["root-x86-64"].sectors * 512 >= 1024 * MIB
    assert kinds["local-data"].type == repart.LINUX_GENERIC
    assert kinds["local-data"].sectors * 512 >= 256 * MIB
    # The reset's view of this disk: the three first-boot partitions, nothing of the image.
    found = repart.first_boot_partitions(table)
    assert sorted((f.kind, f.entry.name) for f in found) == [
        ("local-data", "local-data"),
        ("root", "root-x86-64"),
        ("swap", "swap"),
    ]
