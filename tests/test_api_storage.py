"""/1.0/system/storage through a real `incusos-hal serve` on a scratch socket, on this
host where ZFS is unavailable: the state says so, a PUT with pools and the pool actions
are refused clearly with the stored document byte-identical, the scrub schedule is kept,
and every action's bad body is a 4xx in IncusOS's words."""

# ruff: noqa: E501 (a table of refusals, one a line)
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import apiserver
from conftest import require_root, require_tool


@pytest.fixture
def api(tmp_path: Path) -> Iterator[apiserver.Server]:
    require_tool("curl")
    srv = apiserver.make(tmp_path, [])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def digest(state: Path) -> dict[str, str]:
    return {
        str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(state.rglob("*"))
        if p.is_file()
    }


def put(api: apiserver.Server, doc: object) -> apiserver.Result:
    return api.curl("PUT", "/1.0/system/storage", body=json.dumps(doc).encode())


def post(api: apiserver.Server, action: str, doc: object) -> apiserver.Result:
    return api.curl("POST", f"/1.0/system/storage/:{action}", body=json.dumps(doc).encode())


def test_state_without_zfs(api: apiserver.Server) -> None:
    got = api.curl("GET", "/1.0/system/storage").json["metadata"]
    assert got["config"] == {"scrub_schedule": "0 4 * * 0"}
    state = got["state"]
    assert state["pools"] == [] and state["zfs"].startswith("ZFS unavailable")
    assert state["root_partition"]["size_in_bytes"] > 0
    assert [d["id"] for d in state["drives"]] == sorted(d["id"] for d in state["drives"])
    security = api.curl("GET", "/1.0/system/security").json["metadata"]["state"]
    assert security["pool_recovery_keys"] == {} and security["drive_recovery_keys"] == {}


def test_put_pools_refused_and_nothing_stored(api: apiserver.Server) -> None:
    before = digest(api.state)
    doc = {"config": {"pools": [{"name": "mypool", "type": "zfs-raid0", "devices": ["/dev/sda"]}]}}
    r = put(api, doc)
    assert r.status == 503 and r.json["error"].startswith("config.pools: ZFS unavailable"), r.json
    for bad, words in (
        ({"config": {"scrub_schedule": "61 * * * *"}}, "config.scrub_schedule: invalid cron"),
        ({"config": {"pools": [{"name": "mirror", "type": "zfs-raid0"}]}}, "config.pools[0].name"),
        ({"config": {"pools": [{"name": "p", "type": "zfs-raid5"}]}}, "config.pools[0].type"),
        (
            {
                "config": {
                    "pools": [{"name": "p", "type": "zfs-raid1", "devices": ["/dev/a", "/dev/a"]}]
                }
            },
            "config.pools[0].devices[1]: device /dev/a is already used by config.pools[0].devices[0]",
        ),
        (
            {"config": {"pools": [{"name": "p", "type": "zfs-raid0", "devices": ["/etc/passwd"]}]}},
            "config.pools[0].devices[0]",
        ),
    ):
        r = put(api, bad)
        assert r.status == 400 and words in r.json["error"], (bad, r.json)
    assert digest(api.state) == before


def test_scrub_schedule_stored_and_pools_never(api: apiserver.Server) -> None:
    r = put(api, {"config": {"scrub_schedule": "0 0 * * 5"}})
    assert r.status == 200, r.json
    got = api.curl("GET", "/1.0/system/storage").json["metadata"]
    assert got["config"] == {"scrub_schedule": "0 0 * * 5"}
    assert "pools" not in (api.state / "config.toml").read_text()


@pytest.mark.parametrize(
    ("action", "body", "status", "message"),
    [
        ("import-pool", {}, 400, "missing pool name and type"),
        ("import-pool", {"name": "p", "type": "lvm"}, 400, "unsupported pool type 'lvm'"),
        ("import-pool", {"name": "p", "type": "zfs", "encryption_key": "AAAA"}, 400, "expected a 32 byte raw encryption key, got 3 bytes"),
        ("import-pool", {"name": "p", "type": "zfs"}, 503, "ZFS unavailable"),
        ("delete-pool", {}, 400, "no pool name provided"),
        ("delete-pool", {"name": "local"}, 500, "cannot destroy special zpool 'local'"),
        ("scrub-pool", {"name": "../x"}, 400, "invalid pool name provided"),
        ("scrub-pool", {"name": "local"}, 503, "ZFS unavailable"),
        ("create-volume", {"pool": "local", "name": "v"}, 400, "no volume use provided"),
        ("create-volume", {"pool": "local", "name": "v", "use": "lxd"}, 400, "invalid volume use provided"),
        ("create-volume", {"pool": "a/b", "name": "v", "use": "incus"}, 400, "invalid pool name provided"),
        ("delete-volume", {"pool": "local"}, 400, "no volume name provided"),
        # An option-like pool would reach zfs's argv as `-R/v`, `-o.../v`.
        ("create-volume", {"pool": "-oquota=1", "name": "v", "use": "incus"}, 400, "invalid pool name provided"),
        ("delete-volume", {"pool": "-R", "name": "v"}, 400, "invalid pool name provided"),
        ("delete-volume", {"pool": "..", "name": "v"}, 400, "invalid pool name provided"),
        ("wipe-drive", {}, 400, "no drive specified"),
        ("wipe-drive", {"id": "/dev/disk/by-id/nothing-here"}, 400, "drive '/dev/disk/by-id/nothing-here' doesn't exist"),
        ("encrypt-drive", {"id": "/dev/sda"}, 400, "invalid disk id"),
        ("import-encrypted-drive", {"id": "/dev/disk/by-id/x", "key": "!"}, 400, "key: not base64"),
        ("wipe-drive", [], 400, "the request body must be a JSON object"),
    ],
)  # fmt: skip
def test_action_refusals(
    api: apiserver.Server, action: str, body: object, status: int, message: str
) -> None:
    before = digest(api.state)
    r = post(api, action, body)
    assert r.status == status and message in r.json["error"], r.json
    assert digest(api.state) == before


def test_cleanup_root_empties_the_target_cache_and_never_the_hosts(api: apiserver.Server) -> None:
    # The service writes under --target: /var/cache there is emptied; a file outside
    # it (and the host's own /var/cache, which this service does not write) is kept.
    cache = api.target / "var/cache"
    (cache / "apt/archives").mkdir(parents=True)
    (cache / "apt/archives/x.deb").write_bytes(b"x")
    (cache / "loose").write_bytes(b"y")
    kept = api.target / "var/lib/kept"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"z")
    host = sorted(p.name for p in Path("/var/cache").iterdir())
    r = post(api, "cleanup-root", {})
    assert r.status == 200, r.json
    assert cache.is_dir() and list(cache.iterdir()) == []
    assert kept.read_bytes() == b"z"
    assert sorted(p.name for p in Path("/var/cache").iterdir()) == host


def _restore(api: apiserver.Server, archive: bytes, skip: str = "") -> apiserver.Result:
    r = api.curl("POST", "/1.0/system/:restore" + (f"?skip={skip}" if skip else ""), body=archive)
    if r.status != 202:
        return r
    done = api.curl("GET", f"{r.headers['location']}/wait?timeout=60")
    assert done.json["metadata"]["status"] == "Success", done.json
    return done


def test_backup_holds_the_storage_keys_and_restore_never_loses_one(api: apiserver.Server) -> None:
    import io
    import tarfile

    keys = {
        "zpool.local.key": b"A" * 32,
        "zpool.tank.key": b"B" * 32,
        "luks.ata-QEMU_HARDDISK_QM00002.key": b"C" * 32,
    }
    for name, data in keys.items():
        (api.state / name).write_bytes(data)
        (api.state / name).chmod(0o600)
    saved = api.curl("POST", "/1.0/system/:backup").body
    with tarfile.open(fileobj=io.BytesIO(saved)) as tar:
        assert set(keys) <= set(tar.getnames())
    # Since the backup: local's key changed, tank's went, a new pool came.
    (api.state / "zpool.local.key").write_bytes(b"D" * 32)
    (api.state / "zpool.tank.key").unlink()
    (api.state / "zpool.new.key").write_bytes(b"E" * 32)
    _restore(api, saved)
    got = {p.name: p.read_bytes() for p in api.state.glob("*.key") if p.name != "server.key"}
    assert got == {**keys, "zpool.new.key": b"E" * 32}  # the archive's, and none lost
    assert all((api.state / n).stat().st_mode & 0o777 == 0o600 for n in got)
    # skip=local-data-encryption-key: the running local key is kept over the archive's.
    (api.state / "zpool.local.key").write_bytes(b"F" * 32)
    _restore(api, saved, "local-data-encryption-key")
    assert (api.state / "zpool.local.key").read_bytes() == b"F" * 32
    assert (api.state / "zpool.tank.key").read_bytes() == b"B" * 32


def test_restore_refuses_a_key_of_the_wrong_size_naming_it_not_its_bytes(
    api: apiserver.Server,
) -> None:
    import io
    import tarfile

    saved = api.curl("POST", "/1.0/system/:backup").body
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(saved)) as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        for name, data in (("zpool.bad.key", b"SECRETKEYBYTES"),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    before = digest(api.state)
    r = _restore(api, out.getvalue())
    assert r.status == 400 and "zpool.bad.key: not a 32-byte raw key" in r.json["error"], r.json
    assert "SECRETKEYBYTES" not in r.body.decode()
    assert digest(api.state) == before


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def log(self, level: str, message: str) -> None:
        self.lines.append((level, message))


def _blkid_type(dev: str) -> str:
    done = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev], capture_output=True)
    return done.stdout.decode().strip()


@pytest.mark.root
def test_a_device_still_held_is_left_unwiped_and_the_change_stands(tmp_path: Path) -> None:
    """A device a pool left is wiped once nothing holds it; while something does (ZFS's
    resilver, in the ZFS guest: wipefs "Device or resource busy"), it is left as it is,
    the log says so and nothing is refused. Here the holder is a process with the loop
    device open exclusively, as ZFS keeps a vdev."""
    from incusos_hal.render.zpool import Step
    from incusos_hal.sections import storage

    require_root()
    require_tool("losetup", "mkfs.ext4", "wipefs", "blkid")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    dev = subprocess.run(
        ["losetup", "-f", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    hold = "import os, sys, time; os.open(sys.argv[1], os.O_RDONLY | os.O_EXCL); print(1, flush=True); time.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", hold, dev], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"1\n"
        ctx = _Log()
        storage.wipe_left(Step("wipe", target=dev), ctx)  # type: ignore[arg-type]
        assert _blkid_type(dev) == "ext4"
        assert len(ctx.lines) == 1 and ctx.lines[0][0] == "warning", ctx.lines
        assert f"storage: {dev} left pool '' but was not wiped" in ctx.lines[0][1]
        assert "busy" in ctx.lines[0][1]
        holder.kill()
        holder.wait()
        storage.wipe_left(Step("wipe", target=dev), ctx)  # type: ignore[arg-type]
        assert _blkid_type(dev) == ""
        assert len(ctx.lines) == 1
    finally:
        holder.kill()
        holder.wait()
        subprocess.run(["losetup", "-d", dev], check=False)


def test_commands_that_partition_disks_wait_for_udev_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zpool create/add/attach/replace partition a whole disk and open the partition by
    the link udev makes for it: each waits for udev's queue first (in CI's ZFS guest a
    create failed "no such pool or dataset" behind the events of the case before). A
    command that partitions nothing does not wait. The tools here are scripts on PATH
    that write down how they were called, in order."""
    from incusos_hal.render.zpool import Step
    from incusos_hal.sections import storage

    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("zpool", "udevadm"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    steps = (
        Step("run", ("zpool", "set", "autotrim=on", "p")),
        Step("run", ("zpool", "create", "p", "mirror", "/dev/a", "/dev/b")),
        Step("run", ("zpool", "add", "p", "cache", "/dev/c")),
    )
    storage.execute(steps, tmp_path / "state", _Log())  # type: ignore[arg-type]
    assert calls.read_text().splitlines() == [
        "zpool set autotrim=on p",
        "udevadm settle --timeout=60",
        "zpool create p mirror /dev/a /dev/b",
        "udevadm settle --timeout=60",
        "zpool add p cache /dev/c",
    ]


def _table(path: Path) -> list[str]:
    dump = subprocess.run(["sfdisk", "--dump", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    return [line for line in dump.stdout.splitlines() if line.startswith(str(path))]


def test_the_local_pools_second_disk_gets_partition_11_where_incusos_puts_it(
    tmp_path: Path,
) -> None:
    """The `partition-local` step with the image's sfdisk (gdisk is not in the image):
    partition 11 from sector 69826560 to the end, of the generic Linux type, in a new GPT
    on a blank disk, added beside what a disk's GPT already holds; a number or start
    that is no partition's is refused. Real sfdisk on sparse 40 GiB files."""
    from incusos_hal.hal import repart
    from incusos_hal.hal.disk import DiskError
    from incusos_hal.render.zpool import Step
    from incusos_hal.sections import storage

    require_tool("sfdisk", "udevadm")
    linux = "type=0FC63DAF-8483-4772-8E79-3D69D8477DE4"
    blank = tmp_path / "blank"
    with open(blank, "wb") as f:
        f.truncate(40 << 30)
    storage.execute((Step("partition-local", target=str(blank)),), tmp_path / "state", _Log())  # type: ignore[arg-type]
    (only,) = _table(blank)
    # To the last usable sector (83886046 of a 40 GiB disk), as sgdisk ends it.
    assert only.startswith(f"{blank}11 : start=    69826560, size=    14059487, {linux}"), only
    used = tmp_path / "used"
    with open(used, "wb") as f:
        f.truncate(40 << 30)
    subprocess.run(
        ["sfdisk", "--quiet", str(used)],
        input="label: gpt\nstart=2048, size=2048\n",
        text=True,
        check=True,
    )
    repart.add_to_end(str(used), 11, 69826560)
    first, eleventh = _table(used)
    assert first.startswith(f"{used}1 : start=        2048, size=        2048,"), first
    assert eleventh.startswith(f"{used}11 : start=    69826560,"), eleventh
    for number, start in ((0, 69826560), (11, 0)):
        with pytest.raises(DiskError, match="not a partition"):
            repart.add_to_end(str(used), number, start)
    with pytest.raises(DiskError, match="no room for partition 12"):
        repart.add_to_end(str(used), 12, 90000000)
    assert _table(used) == [first, eleventh]
