"""The install seed: `incusos-hal seed check` on golden cases (one directory per case:
its input files and the expected output), the same seeds as a tar, a FAT volume and an
ISO image; hostile tars; a seed-data partition on a loop device; first boot's apply
(stored exactly as the API's PUTs store it, once, and nothing for an invalid seed).

Set INCUSOS_HAL_REGEN_SEED=1 to rewrite the expected outputs (then read the diff)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apiserver
from conftest import require_root, require_tool

REPO = Path(__file__).resolve().parent.parent
CASES = REPO / "tests/seed"
HOST = REPO / "tests/fixtures/ci-host"
REGEN = os.environ.get("INCUSOS_HAL_REGEN_SEED") == "1"


def run(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "incusos_hal", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})},
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr


def check(path: Path) -> tuple[int, str, str]:
    return run("seed", "check", "--root", str(HOST), str(path))


def expected_text(code: int, out: str, err: str) -> str:
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    return f"exit {code}\n{out}" + "".join(f"{n}\n" for n in notes)


def case_dirs() -> list[str]:
    return sorted(p.name for p in CASES.iterdir() if (p / "input").is_dir())


@pytest.mark.parametrize("case", case_dirs())
def test_check_golden(case: str) -> None:
    directory = CASES / case
    code, out, err = check(directory / "input")
    got = expected_text(code, out, err)
    if REGEN:
        (directory / "expected").write_text(got)
    assert got == (directory / "expected").read_text(), err
    assert code in (0, 2), err
    assert "Traceback" not in err


def _tar_of(directory: Path, out: Path) -> None:
    # The system's tar (GNU), as a user makes a seed: `./` first, then `./name` entries.
    subprocess.run(["tar", "-cf", str(out), "-C", str(directory), "."], check=True)


@pytest.mark.parametrize("case", ["valid-all", "bad-network", "yaml-hostile"])
def test_tar_fat_and_iso_read_as_the_directory(case: str, tmp_path: Path) -> None:
    """One seed, four media: the same problems, line for line."""
    require_tool("tar", "mkfs.vfat", "mcopy", "genisoimage", "isoinfo")
    source = CASES / case / "input"
    want = check(source)
    tar = tmp_path / "seed.tar"
    _tar_of(source, tar)
    fat = tmp_path / "seed.fat"
    subprocess.run(["truncate", "-s", "4M", str(fat)], check=True)
    subprocess.run(["mkfs.vfat", "-n", "SEED_DATA", str(fat)], check=True, capture_output=True)
    for f in sorted(source.iterdir()):
        subprocess.run(["mcopy", "-i", str(fat), str(f), f"::/{f.name}"], check=True)
    iso = tmp_path / "seed.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-V", "SEED_DATA", "-R", "-o", str(iso), str(source)], check=True
    )
    for medium in (tar, fat, iso):
        assert check(medium) == want, medium.name


# -- hostile tars ---------------------------------------------------------------------------


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"{}", **extra: object
) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in extra.items():
        setattr(info, key, value)
    block = info.tobuf(format=tarfile.GNU_FORMAT)
    if kind == tarfile.REGTYPE:
        block += data + bytes(-len(data) % 512)
    return block


END = bytes(1024)


def _huge_header() -> bytes:
    info = tarfile.TarInfo("network.json")
    info.size = 2 << 30  # 2 GiB announced, none of it there
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _bad_checksum() -> bytes:
    block = bytearray(_member("update.json"))
    block[0] ^= 0x20
    return bytes(block)


def _pax() -> bytes:
    info = tarfile.TarInfo("update.json")
    info.size = 2
    info.pax_headers = {"comment": "x" * 100}
    return info.tobuf(format=tarfile.PAX_FORMAT) + b"{}" + bytes(510)


HOSTILE = {
    "traversal": (_member("../network.json") + END, "../network.json: a path in the seed tar"),
    "absolute": (_member("/etc/network.json") + END, "/etc/network.json: a path in the seed"),
    "subdirectory": (_member("etc/network.json") + END, "etc/network.json: a path in the seed"),
    "symlink": (
        _member("network.json", tarfile.SYMTYPE, linkname="/etc/shadow") + END,
        "network.json: a symbolic link in the seed tar is not accepted",
    ),
    "hardlink": (
        _member("update.json", tarfile.LNKTYPE, linkname="network.json") + END,
        "update.json: a hard link in the seed tar is not accepted",
    ),
    "device": (
        _member("kernel.json", tarfile.CHRTYPE, devmajor=1, devminor=3) + END,
        "kernel.json: a character device in the seed tar is not accepted",
    ),
    "fifo": (_member("kernel.json", tarfile.FIFOTYPE) + END, "kernel.json: a fifo in the seed"),
    "huge": (_huge_header() + END, "network.json: larger than 1048576 bytes (2147483648)"),
    "many": (
        b"".join(_member(f"x{i}.txt") for i in range(70)) + END,
        "seed: more than 64 members in the seed tar",
    ),
    "checksum": (_bad_checksum() + END, "seed: a seed tar header's checksum does not match"),
    "truncated": (_member("update.json", data=b"{" * 600)[:700], "update.json: the seed tar ends"),
    "twice": (_member("update.json") * 2 + END, "update.json: given twice in the seed tar"),
    "pax": (_pax() + END, "././@PaxHeader: a pax extended header in the seed tar is not"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tar_refused_naming_the_member(case: str, tmp_path: Path) -> None:
    data, line = HOSTILE[case]
    tar = tmp_path / "seed.tar"
    # Seed tars are read at the start of a partition: whatever follows the archive too
    # (a truncated one ends with the file).
    tar.write_bytes(data + (os.urandom(4096) if case != "truncated" else b""))
    code, out, err = check(tar)
    assert code == 2, (out, err)
    assert out.startswith(line), out
    assert len(out.splitlines()) == 1 and "Traceback" not in err


def test_tar_reader_reads_no_more_than_its_bounds(tmp_path: Path) -> None:
    """A 2 GiB member announced in a sparse file: refused from its header alone."""
    from incusos_hal.hal import seed as media

    tar = tmp_path / "seed.tar"
    with tar.open("wb") as f:
        f.write(_huge_header())
        f.truncate(3 << 30)
    with tar.open("rb") as f:
        with pytest.raises(media.SeedReadError) as e:
            media.read_tar(f)
        assert f.tell() == 512
    assert e.value.member == "network.json"


# -- a seed-data partition on a loop device --------------------------------------------------


def _losetup(*args: str) -> str:
    return subprocess.run(
        ["losetup", "-f", "--show", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def seed_partition(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(root, node): a 16 MiB GPT disk made by sfdisk (an ESP, a `seed-data` partition)
    on loop devices, and a root whose sysfs shows the disk's partitions as the kernel
    does (this machine's loop driver does not scan partitions: the partition is a loop
    device of its own over the same file, at the partition's offset)."""
    require_root()
    require_tool("losetup", "sfdisk")
    image = tmp_path / "disk.img"
    subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
    layout = "label: gpt\nsize=4M, type=U, name=esp\nsize=4M, type=L, name=seed-data\n"
    subprocess.run(["sfdisk", "-q", str(image)], input=layout.encode(), check=True)
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, check=True).stdout
    )
    part = table["partitiontable"]["partitions"][1]
    assert part["name"] == "seed-data"
    dev = _losetup(
        "-o", str(part["start"] * 512), "--sizelimit", str(part["size"] * 512), str(image)
    )
    root = tmp_path / "root"
    for name, uevent in (
        ("vdz", "MAJOR=254\nMINOR=16\nDEVNAME=vdz\nDEVTYPE=disk\n"),
        ("vdz1", "DEVNAME=vdz1\nDEVTYPE=partition\nPARTN=1\nPARTNAME=esp\n"),
        ("vdz2", "DEVNAME=vdz2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=seed-data\n"),
    ):
        (root / "sys/class/block" / name).mkdir(parents=True)
        (root / "sys/class/block" / name / "uevent").write_text(uevent)
    (root / "dev").mkdir()
    (root / "dev/vdz2").symlink_to(dev)
    try:
        yield root, root / "dev/vdz2"
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.root
def test_seed_data_partition_found_by_its_gpt_label(seed_partition: tuple[Path, Path]) -> None:
    from incusos_hal.hal import seed as media

    root, node = seed_partition
    found = media.find(root)
    assert found is not None and found.path == node, found
    assert found.how == "partition seed-data"
    # Blank, as the image's own seed-data partition is built: no seed, and no problem.
    assert media.read(node) == {}
    assert run("seed", "check", "--no-machine", str(node))[:2] == (0, "")
    files = {"update.json": b'{"version": "1", "channel": "testing"}'}
    media.write_tar(node, files)
    assert media.read(node) == files
    code, out, err = run("seed", "check", "--no-machine", str(node))
    assert (code, out) == (0, ""), err
    # First boot finds it there by itself.
    state = root.parent / "state"
    code, out, err = run("seed", "apply", "--state-dir", str(state), "--root", str(root))
    assert code == 0, err
    assert b'channel = "testing"' in (state / "config.toml").read_bytes()
    # A FAT volume on a block device, read without mounting it.
    require_tool("mkfs.vfat", "mcopy")
    subprocess.run(["mkfs.vfat", "-n", "SEED_DATA", str(node)], check=True, capture_output=True)
    bad = root.parent / "update.json"
    bad.write_text('{"channel": "stable", "auto_reboot": "yes"}')
    subprocess.run(["mcopy", "-i", str(node), str(bad), "::/update.json"], check=True)
    code, out, err = run("seed", "check", "--no-machine", str(node))
    assert (code, out) == (2, "update.json: auto_reboot: expected true or false, got a string\n")
    # An ISO 9660 volume written over the partition, then a reset's wipe (an empty tar):
    # the wiped partition reads as no seed, never as the ISO behind the tar.
    require_tool("genisoimage", "isoinfo")
    source = root.parent / "iso-source"
    source.mkdir()
    (source / "update.json").write_text('{"channel": "stable"}')
    iso = root.parent / "seed.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-V", "SEED_DATA", "-R", "-o", str(iso), str(source)],
        check=True,
    )
    with open(node, "r+b") as dev:
        dev.write(iso.read_bytes())
    assert media.read(node) == {"update.json": b'{"channel": "stable"}'}
    media.write_tar(node, {})
    assert media.read(node) == {}
    fresh = root.parent / "fresh-state"
    code, out, err = run("seed", "apply", "--state-dir", str(fresh), "--root", str(root))
    assert code == 0, err
    assert json.loads((fresh / "seed.status.json").read_text())["problems"] == []
    assert not (fresh / "config.toml").exists()


def test_first_boot_reads_the_boot_disks_own_seed_partition(tmp_path: Path) -> None:
    """Two disks carry a seed-data partition (another appliance's disk, an install stick
    left in): the one under the running /usr is the boot disk, and only its own is read.
    A sysfs and mountinfo in the kernel's shapes: /usr on dm-0 (verity) over vda3."""
    from incusos_hal.apply.seed import read_seed
    from incusos_hal.hal import seed as media

    root = tmp_path / "root"
    devices = root / "sys/devices"
    block = root / "sys/class/block"
    block.mkdir(parents=True)
    (root / "dev").mkdir()
    for disk, parts in (("sda", ("sda2",)), ("vda", ("vda2", "vda3"))):
        (devices / disk).mkdir(parents=True)
        (block / disk).symlink_to(devices / disk)
        for number, part in enumerate(parts, 2):
            (devices / disk / part).mkdir()
            (devices / disk / part / "partition").write_text(f"{number}\n")
            label = "seed-data" if number == 2 else "usr-x86-64"
            uevent = f"DEVNAME={part}\nDEVTYPE=partition\nPARTN={number}\nPARTNAME={label}\n"
            (devices / disk / part / "uevent").write_text(uevent)
            (block / part).symlink_to(devices / disk / part)
    (devices / "dm-0/slaves").mkdir(parents=True)
    (devices / "dm-0/slaves/vda3").symlink_to(devices / "vda/vda3")
    (root / "sys/dev/block").mkdir(parents=True)
    (root / "sys/dev/block/254:0").symlink_to(devices / "dm-0")
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/mountinfo").write_text(
        "25 1 254:0 / /usr ro,relatime - erofs /dev/mapper/usr ro\n"
    )
    other, own = root / "dev/sda2", root / "dev/vda2"
    other.write_bytes(media.tar_bytes({"update.json": b'{"channel": "testing"}'}))
    own.write_bytes(media.tar_bytes({"update.json": b'{"channel": "stable"}'}))
    assert media.find(root) == media.Found(other, "partition seed-data")  # the first by name
    assert read_seed(None, str(root)) == (
        "partition seed-data (vda2)",
        {"update.json": b'{"channel": "stable"}'},
    )
    # The boot disk's own is blank (a reset wiped it): no seed, whatever the other holds.
    own.write_bytes(bytes(64 << 10))
    assert read_seed(None, str(root)) == ("partition seed-data (vda2)", {})


# -- first boot ---------------------------------------------------------------------------------


def _seed_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "seed"
    d.mkdir(exist_ok=True)
    for old in d.iterdir():
        old.unlink()
    for name, text in files.items():
        (d / name).write_text(text)
    return d


NETWORK = {
    "dns": {"hostname": "seeded", "nameservers": ["192.0.2.53"]},
    "interfaces": [{"name": "uplink", "hwaddr": "52:54:00:12:34:56", "addresses": ["dhcp4"]}],
}
UPDATE = {"channel": "testing", "check_frequency": "12h"}
KERNEL = {"blacklist_modules": ["nouveau"]}


def test_first_boot_stores_exactly_what_the_puts_store(tmp_path: Path) -> None:
    """The seed's sections over a stored document give the bytes three PUTs give."""
    require_tool("openssl", "curl")
    cert, _ = apiserver.openssl_client_cert(tmp_path, "trusted")
    (tmp_path / "api").mkdir()
    server = apiserver.make(tmp_path / "api", [cert])
    for made in server.state.iterdir():  # a fresh machine: no document (root on the socket)
        made.unlink()
    state = tmp_path / "state"
    seed = _seed_dir(
        tmp_path,
        {
            "network.yaml": json.dumps({"version": "1", **NETWORK}),
            "update.json": json.dumps({"version": "1", **UPDATE}),
            "kernel.yml": "blacklist_modules: [nouveau]\n",
            "README": "not read",
        },
    )
    code, out, err = run("seed", "apply", "--state-dir", str(state), "--source", str(seed))
    assert code == 0, (out, err)
    server.start()
    try:
        for name, body in (("network", NETWORK), ("update", UPDATE), ("kernel", KERNEL)):
            r = server.put(f"/1.0/system/{name}", {"config": body})
            assert r.status == 200, r.body
    finally:
        server.stop()
    assert (state / "config.toml").read_bytes() == server.config_file.read_bytes()
    marker = json.loads((state / "seed.applied").read_text())
    assert marker == {"files": ["kernel.yml", "network.yaml", "update.json"], "source": str(seed)}


def test_first_boot_applies_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    seed = _seed_dir(tmp_path, {"update.json": json.dumps(UPDATE)})
    argv = ("seed", "apply", "--boot", "--state-dir", str(state), "--source", str(seed))
    assert run(*argv)[0] == 0
    stored = (state / "config.toml").read_bytes()
    assert b'channel = "testing"' in stored
    _seed_dir(tmp_path, {"update.json": json.dumps({"channel": "stable"})})
    assert run(*argv)[0] == 0
    assert (state / "config.toml").read_bytes() == stored
    # No seed at all on a first boot: marked too, so that a stick plugged in later is
    # never taken for one.
    other = tmp_path / "other"
    code, _, err = run(
        "seed", "apply", "--state-dir", str(other), "--source", str(tmp_path / "none")
    )
    assert code == 0, err
    assert sorted(os.listdir(other)) == ["seed.applied", "seed.status.json"]
    # A machine configured and booted before it had a seed step (the configure step
    # applied its document: a last good one) keeps what its operator stored.
    upgraded = tmp_path / "upgraded"
    upgraded.mkdir()
    (upgraded / "config.toml").write_bytes(b"version = 1\n")
    (upgraded / "config.last-good.toml").write_bytes(b"version = 1\n")
    code, _, err = run("seed", "apply", "--state-dir", str(upgraded), "--source", str(seed))
    assert code == 0, err
    assert (upgraded / "config.toml").read_bytes() == b"version = 1\n"
    assert (upgraded / "seed.applied").exists()
    # A document stored on this first boot before the seed step (the credential step's)
    # is the base the seed applies over: both are in what is stored.
    credential = tmp_path / "credential"
    credential.mkdir()
    (credential / "config.toml").write_bytes(b"version = 1\n[listener]\nsocket_uids = [1000]\n")
    _seed_dir(tmp_path, {"update.json": json.dumps(UPDATE)})
    code, _, err = run("seed", "apply", "--state-dir", str(credential), "--source", str(seed))
    assert code == 0, err
    stored = (credential / "config.toml").read_text()
    assert 'channel = "testing"' in stored and "1000," in stored, stored


def test_invalid_seed_applies_nothing_and_says_why(tmp_path: Path) -> None:
    state = tmp_path / "state"
    kmsg = tmp_path / "kmsg"
    kmsg.touch()
    seed = _seed_dir(
        tmp_path,
        {
            "update.json": json.dumps(UPDATE),  # valid, and still not applied
            "network.json": json.dumps({"dns": {"hostname": "bad host"}}),
        },
    )
    argv = ("seed", "apply", "--boot", "--state-dir", str(state), "--source", str(seed))
    code, _out, err = run(*argv, env={"INCUSOS_HAL_KMSG": str(kmsg)})
    assert code == 0, err
    assert sorted(os.listdir(state)) == ["seed.status.json"]  # no config, no marker
    status = json.loads((state / "seed.status.json").read_text())
    expected = check(seed)[1].splitlines()
    assert expected and status["problems"] == expected
    assert status["applied"] is False
    logged = kmsg.read_text()
    for line in expected:
        assert line in logged
    assert "<27>incusos-hal-seed" in logged  # daemon.err
    # Fixed, the next boot applies it.
    _seed_dir(tmp_path, {"update.json": json.dumps(UPDATE)})
    assert run(*argv, env={"INCUSOS_HAL_KMSG": str(kmsg)})[0] == 0
    assert (state / "seed.applied").exists()


# -- factory reset ------------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


def test_factory_reset_through_the_api(tmp_path: Path) -> None:
    """A real `serve`: a bad seed (or body) is a 400 with the state dir and the seed
    byte for byte as they were; a good reset leaves exactly the merged seed and an
    empty state dir, and the next first boot applies that seed."""
    require_tool("openssl", "curl")
    from incusos_hal.hal import seed as media

    cert, _ = apiserver.openssl_client_cert(tmp_path, "trusted")
    (tmp_path / "api").mkdir()
    server = apiserver.make(tmp_path / "api", [cert])
    seed = tmp_path / "seed.tar"
    image_seed = {
        "update.yaml": b"channel: testing\n",
        "network.json": json.dumps({"dns": {"hostname": "old"}}).encode(),
    }
    seed.write_bytes(media.tar_bytes(image_seed))
    server.env = {"INCUSOS_HAL_SEED": str(seed)}
    server.start()
    try:
        assert server.put("/1.0/system/update", {"config": UPDATE}).status == 200
        before, seed_before = _snapshot(server.state), seed.read_bytes()
        assert "config.toml" in before and "server.key" in before

        def reset(body: object) -> apiserver.Result:
            return server.curl("POST", "/1.0/system/:factory-reset", body=json.dumps(body).encode())

        refused = {
            "bad seed": (
                {"seeds": {"network": {"dns": {"hostname": "bad host"}}}},
                "network.json: dns.hostname: 'bad host' is not a valid host name",
            ),
            "unknown field": ({"keep_data": True}, "keep_data: unknown field"),
            "install": ({"seeds": {"install": {}}}, "seeds.install: a factory reset"),
            "null seed": ({"seeds": {"update": None}}, "seed data for 'update' is not defined"),
            "not a seed": ({"seeds": {"storage": {}}}, "seeds.storage: not a seed"),
            "type": ({"wipe_existing_seeds": "yes"}, "wipe_existing_seeds: expected true"),
            "recovery key": (
                {"seeds": {"security": {"encryption_recovery_keys": ["x"]}}},
                "security.json: encryption_recovery_keys: cannot be set by a seed",
            ),
        }
        for what, (body, message) in refused.items():
            r = reset(body)
            assert r.status == 400, (what, r.body)
            assert message in r.json["error"], (what, r.json)
            assert _snapshot(server.state) == before, what
            assert seed.read_bytes() == seed_before, what

        r = reset({"seeds": {"network": NETWORK}, "allow_tpm_reset_failure": True})
        assert r.status == 200, r.body
        assert os.listdir(server.state) == []
        after = media.read(seed)
        assert sorted(after) == ["network.json", "update.yaml"]
        assert after["update.yaml"] == image_seed["update.yaml"]  # kept
        assert json.loads(after["network.json"]) == NETWORK  # replaced
    finally:
        server.stop()
    assert any("factory reset" in line for line in server.log), server.log
    # A scratch service: neither this machine's TPM nor its disks.
    assert any("not the running system: the TPM and the disks" in x for x in server.log)

    # The next boot: first boot applies the seed the reset left.
    code, out, err = run(
        "seed", "apply", "--state-dir", str(server.state), env={"INCUSOS_HAL_SEED": str(seed)}
    )
    assert code == 0, (out, err)
    stored = (server.state / "config.toml").read_text()
    assert 'hostname = "seeded"' in stored and 'channel = "testing"' in stored

    # wipe_existing_seeds: only the new seeds, whatever was there.
    server.start()
    try:
        r = server.curl(
            "POST",
            "/1.0/system/:factory-reset",
            body=json.dumps({"wipe_existing_seeds": True, "seeds": {"kernel": KERNEL}}).encode(),
        )
        assert r.status == 200, r.body
    finally:
        server.stop()
    assert sorted(media.read(seed)) == ["kernel.json"]
    assert os.listdir(server.state) == []


def test_seed_unit_runs_once_before_the_configure_step(tmp_path: Path) -> None:
    require_tool("systemd-analyze")
    from incusos_hal.cli import parser
    from incusos_hal.state.paths import DEFAULT_STATE_DIR, SEED_APPLIED

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "incusos-hal").write_text("#!/bin/sh\n")
    (bindir / "incusos-hal").chmod(0o755)
    text = (REPO / "units/incusos-hal-seed.service.in").read_text()
    unit = tmp_path / "incusos-hal-seed.service"
    unit.write_text(text.replace("@BINDIR@", str(bindir)).replace("@DOCDIR@", str(tmp_path)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = unit.read_text().splitlines()
    assert f"ConditionPathExists=!{DEFAULT_STATE_DIR}/{SEED_APPLIED}" in lines
    assert "Before=incusos-hal-configure.service sysinit.target shutdown.target" in lines
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    args = parser().parse_args(exec_start.split()[1:])
    assert (args.command, args.boot) == (("seed", "cmd_seed_apply"), True)
    configure = (REPO / "units/incusos-hal-configure.service.in").read_text().splitlines()
    assert {"Wants=incusos-hal-seed.service", "After=incusos-hal-seed.service"} <= set(configure)


def test_seed_problems_readable_through_the_api(tmp_path: Path) -> None:
    require_tool("openssl", "curl")
    cert, _ = apiserver.openssl_client_cert(tmp_path, "trusted")
    (tmp_path / "api").mkdir()
    server = apiserver.make(tmp_path / "api", [cert])
    for made in server.state.iterdir():  # a fresh machine: no document yet
        made.unlink()
    seed = _seed_dir(tmp_path, {"update.json": json.dumps({"channel": 1})})
    argv = ("seed", "apply", "--boot", "--state-dir", str(server.state), "--source", str(seed))
    assert run(*argv)[0] == 0
    server.start()
    try:
        r = server.curl("GET", "/1.0/debug/seed")
    finally:
        server.stop()
    assert r.status == 200, r.body
    meta = r.json["metadata"]
    assert meta["applied"] is False and meta["source"] == str(seed)
    assert meta["problems"] == ["update.json: channel: expected a string, got a number"]


# -- whatever the bytes ---------------------------------------------------------------------


def _valid_tar() -> bytes:
    from incusos_hal.hal import seed as media

    return media.tar_bytes({"network.json": b'{"dns": {"hostname": "a"}}', "x.txt": b"y" * 700})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=8),
    cut=st.integers(0, 4096),
)
def test_tar_reader_any_damage_is_a_read_error(flips: list[tuple[int, int]], cut: int) -> None:
    """A damaged seed tar is refused with a SeedReadError (a problem line), never
    anything else, and never a file larger than the bound."""
    from incusos_hal.hal import seed as media

    data = bytearray(_valid_tar())
    for offset, value in flips:
        if offset < len(data):
            data[offset] = value
    try:
        files = media.read_tar(io.BytesIO(bytes(data[:cut])))
    except media.SeedReadError:
        return
    assert all(len(v) <= media.MAX_FILE_BYTES for v in files.values())
    assert all("/" not in name and name not in (".", "..") for name in files)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(["network.json", "network.yaml", "install.yml", "services.yaml"]),
    text=st.text(max_size=300) | st.binary(max_size=300),
)
def test_any_seed_file_is_problems_or_valid(name: str, text: str | bytes) -> None:
    from incusos_hal.config import Config
    from incusos_hal.config.seed import check_files

    data = text if isinstance(text, bytes) else text.encode()
    checked = check_files({name: data}, Config())
    for problem in checked.problems:
        assert problem.file == name and "\n" not in str(problem)


def test_a_volume_reader_that_hangs_floods_or_overflows_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mtools and isoinfo read what a crafted volume holds: one that never ends is killed at
    the deadline, a flood on stderr cannot stall it, an oversized member is refused."""
    from incusos_hal.hal import seed as hal_seed

    monkeypatch.setattr(hal_seed, "TOOL_TIMEOUT", 1.0)
    with pytest.raises(hal_seed.SeedReadError, match="no answer in time"):
        hal_seed._tool(["sleep", "30"], "FAT")
    flood = "head -c 1000000 /dev/zero >&2; echo done; exit 3"
    with pytest.raises(hal_seed.SeedReadError, match="cannot be read"):
        hal_seed._tool(["sh", "-c", flood], "FAT")
    big = f"head -c {hal_seed.MAX_FILE_BYTES + 4096} /dev/zero"
    with pytest.raises(hal_seed.SeedReadError, match="larger than"):
        hal_seed._tool(["sh", "-c", big], "ISO")
    assert hal_seed._tool(["sh", "-c", "printf seed"], "FAT") == b"seed"


def test_seeded_applications_are_wanted_by_the_update_checker(tmp_path: Path) -> None:
    """The applications file of a seed becomes the list the update hand-off gives the
    checker (each not installed yet with version ""); a bad name is a seed problem, and
    nothing is stored."""
    import asyncio

    from incusos_hal.apply.applications import Applications, UpdateHandoff

    state = tmp_path / "state"
    apps = {"version": "1", "applications": [{"name": "incus"}, {"name": "gpu-support"}]}
    seed = _seed_dir(tmp_path, {"applications.json": json.dumps(apps)})
    code, out, err = run("seed", "apply", "--state-dir", str(state), "--source", str(seed))
    assert code == 0, (out, err)

    async def wanted() -> dict[str, str]:
        manager = Applications(state, str(tmp_path / "root"), None, asyncio.Lock())
        return UpdateHandoff(manager, asyncio.get_running_loop()).applications()

    assert asyncio.run(wanted()) == {"incus": "", "gpu-support": ""}
    # Installed ones report their version instead (the record the installer keeps).
    (state / "applications.json").write_text(
        json.dumps({"incus": {"version": "202601010000", "units": [], "sha256": ""}})
    )
    assert asyncio.run(wanted()) == {"incus": "202601010000", "gpu-support": ""}

    other = tmp_path / "other"
    bad = {"version": "1", "applications": [{"name": "../incus"}]}
    seed = _seed_dir(tmp_path, {"applications.json": json.dumps(bad)})
    code, out, err = run("seed", "apply", "--state-dir", str(other), "--source", str(seed))
    assert code != 0
    assert "applications[0].name: '../incus' is not an application name" in out + err
    assert not (other / "applications.wanted.json").exists()


def test_the_primary_applications_seed_gives_the_api_its_client_certificates(
    tmp_path: Path,
) -> None:
    """IncusOS's tests reach its API with the client certificate they put in the incus
    seed (`preseed.certificates`): here that certificate is the HTTPS listener's trust
    once the seed is applied, and the listener is on (IncusOS's :8443, here the test's
    port) with no other config. A restricted or metrics certificate is not; a seed whose
    primary application is operations-center gives its `trusted_client_certificates`."""
    require_tool("curl", "openssl")
    (tmp_path / "api").mkdir()
    server = apiserver.make(tmp_path / "api", [])
    for made in server.state.iterdir():  # a fresh machine: nothing stored
        made.unlink()
    admin = apiserver.openssl_client_cert(tmp_path, "admin")
    restricted = apiserver.openssl_client_cert(tmp_path, "restricted")
    metrics = apiserver.openssl_client_cert(tmp_path, "metrics")
    operator = apiserver.openssl_client_cert(tmp_path, "operator")
    certificates = [
        {"type": "client", "certificate": admin[0].read_text()},
        {"type": "client", "restricted": True, "certificate": restricted[0].read_text()},
        {"type": "metrics", "certificate": metrics[0].read_text()},
    ]
    incus = {"version": "1", "apply_defaults": True, "preseed": {"certificates": certificates}}
    seed = _seed_dir(tmp_path, {"incus.json": json.dumps(incus)})
    code, out, err = run("seed", "apply", "--state-dir", str(server.state), "--source", str(seed))
    assert code == 0, (out, err)
    stored = (server.state / "config.toml").read_text()
    assert 'listen_address = "[::]:8443"' in stored, stored
    server.start()
    try:
        for cert, status in ((admin, 200), (restricted, 403), (metrics, 403), (operator, 403)):
            r = server.curl_tls("GET", "/1.0/system", cert=cert)
            assert (r.status, r.rc) == (status, 0) or (status == 403 and r.rc != 0), (cert, r)
    finally:
        server.stop()

    # Operations Center primary: its own list is the trust, the incus seed's is not.
    other = tmp_path / "other"
    apps = {"version": "1", "applications": [{"name": "operations-center"}]}
    oc = {"version": "1", "trusted_client_certificates": [operator[0].read_text()]}
    seed = _seed_dir(
        tmp_path,
        {
            "applications.json": json.dumps(apps),
            "operations-center.json": json.dumps(oc),
            "incus.json": json.dumps(incus),
        },
    )
    code, out, err = run("seed", "apply", "--state-dir", str(other), "--source", str(seed))
    assert code == 0, (out, err)
    from incusos_hal.state import store

    listener = store.load(other).config.listener
    assert listener.trusted_client_certificates == (operator[0].read_text(),)

    # Applied over a document that already trusts the certificate and names an address:
    # neither changes.
    from incusos_hal.config.seed import check_files

    base = store.load(other).config
    again = check_files(
        {
            "applications.json": json.dumps(apps).encode(),
            "operations-center.json": json.dumps(oc).encode(),
        },
        base,
    )
    assert again.config is not None and again.config.listener == listener


def test_seeded_certificates_that_are_not_certificates_are_named() -> None:
    from incusos_hal.config import Config
    from incusos_hal.config.seed import check_files

    incus = {
        "preseed": {
            "certificates": [
                "not an object",
                {"type": "admin", "restricted": "no", "certificate": "-----BEGIN nothing"},
                {"certificate": 5},
            ]
        }
    }
    oc = {"trusted_client_certificates": ["garbage"]}
    files = {
        "incus.json": json.dumps(incus).encode(),
        "operations-center.json": json.dumps(oc).encode(),
    }
    checked = check_files(files, Config())
    lines = [str(p) for p in checked.problems]
    assert checked.config is None
    assert lines[:4] == [
        "incus.json: preseed.certificates[0]: expected an object",
        "incus.json: preseed.certificates[1].type: 'admin' is not one of client, metrics",
        "incus.json: preseed.certificates[1].restricted: expected true or false",
        lines[3],
    ]
    assert lines[3].startswith("incus.json: preseed.certificates[1].certificate: ")
    assert "incus.json: preseed.certificates[2].certificate: expected a PEM certificate" in lines
    assert any(
        line.startswith("operations-center.json: trusted_client_certificates[0]: ")
        for line in lines
    )


def test_a_token_entry_is_incus_business_and_two_primaries_are_refused() -> None:
    from incusos_hal.config import Config
    from incusos_hal.config.seed import check_files

    token = {"preseed": {"certificates": [{"type": "client", "name": "later", "token": True}]}}
    checked = check_files({"incus.json": json.dumps(token).encode()}, Config())
    assert checked.problems == () and checked.config is None  # nothing the API trusts
    apps = {"applications": [{"name": "operations-center"}, {"name": "incus"}]}
    checked = check_files({"applications.json": json.dumps(apps).encode()}, Config())
    assert [str(p) for p in checked.problems] == [
        "applications.json: applications: at most one primary application (incus, "
        "migration-manager, operations-center); listed: operations-center, incus"
    ]
