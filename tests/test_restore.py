"""`:restore` is all-or-nothing and works where the service runs.

- Every damaged archive (an incomplete or mismatched server identity, hostile tar
  headers, bombs, a pending-confirmation file, bad documents, links, devices, `..`) is
  refused by a real `incusos-hal serve` with a 400 saying why, and leaves the state dir
  byte-identical: every file's content and mode, every directory, nothing beside it.
- A crash at any step of the switch (the child process dies at the k-th rename, replace
  or fsync, for every k) ends, after the start-up recovery, with either the complete old
  or the complete new state.
- A failed apply puts every file back exactly.
- The state dir as a mount point inside a read-only parent (what StateDirectory= under
  ProtectSystem=strict gives the service): backup, restore and a failed restore work.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.api import auth, backup
from incusos_hal.api.service import ApiError, Service, Settings
from incusos_hal.config import dumps_toml, from_dict

import apiserver
from conftest import REPO, require_root, require_tool

UPLINK = {"name": "uplink", "hwaddr": "52:54:00:12:34:56", "addresses": ["dhcp4"]}
LAN = {"name": "lan", "hwaddr": "52:54:00:12:34:57", "addresses": ["10.1.0.2/24"]}


def document(nic: dict[str, Any]) -> bytes:
    return dumps_toml(from_dict({"version": 1, "network": {"interfaces": [nic]}}))


CONFIG = document(UPLINK)
OTHER_CONFIG = document(LAN)


def snapshot(state: Path) -> dict[str, tuple[str, int]]:
    """Every entry under `state`: a file's SHA-256 and mode, a directory's mode."""
    out = {".": ("dir", os.lstat(state).st_mode)}
    for path in sorted(state.rglob("*")):
        st = os.lstat(path)
        kind = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        if path.is_symlink():
            kind = f"link:{os.readlink(path)}"
        out[str(path.relative_to(state))] = (kind, st.st_mode)
    return out


def identity(directory: Path) -> tuple[bytes, bytes]:
    cert, key = auth.ensure_server_certificate(directory)
    return cert.read_bytes(), key.read_bytes()


def make_tar(members: list[tuple[str, bytes, bytes]], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar.gz of (name, content, tar type) members, as a hostile client would make it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=fmt) as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = "config.toml"
                tar.addfile(info)
            else:
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def raw_header(name: str, kind: bytes, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def gzip_stream(*chunks: tuple[bytes, int]) -> bytes:
    """gzip of each chunk repeated n times, compressed as it goes (a bomb is built
    without ever holding its unpacked size)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = []
    for chunk, times in chunks:
        for _ in range(times):
            out.append(z.compress(chunk))
    out.append(z.flush())
    return b"".join(out)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes]]:
    """Two server identities, and a password-protected key."""
    from cryptography.hazmat.primitives import serialization

    base = tmp_path_factory.mktemp("identities")
    out = {name: identity(base / name) for name in ("one", "two")}
    key = serialization.load_pem_private_key(out["one"][1], password=None)
    out["encrypted"] = (
        out["one"][0],
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret-passphrase"),
        ),
    )
    return out


def damaged(keys: dict[str, tuple[bytes, bytes]]) -> list[tuple[str, bytes, str]]:
    reg = tarfile.REGTYPE
    cert, key = keys["one"]
    other_cert, _ = keys["two"]
    good = [("config.toml", CONFIG, reg)]
    cfg_member = raw_header("config.toml", reg, len(CONFIG)) + pad(CONFIG)
    end = b"\0" * 1024
    # A 60 KiB pax record, valid, repeated: each is within the header bound, together
    # far past the unpacked bound.
    record_body = b"comment=" + b"a" * (60_000 - 20)
    record = f"{len(record_body) + 7} ".encode() + record_body + b"\n"
    assert int(record.split(b" ")[0]) == len(record)
    pax = raw_header("pax", tarfile.XHDTYPE, len(record)) + pad(record)
    return [
        ("no server cert", make_tar([*good, ("server.key", key, reg)]), "server.key without"),
        ("no server key", make_tar([*good, ("server.crt", cert, reg)]), "server.crt without"),
        ("damaged key", make_tar([*good, ("server.crt", cert, reg),
                                  ("server.key", key[:200] + b"AAAA" + key[204:], reg)]),
         "server.key: not"),
        ("key not a key", make_tar([*good, ("server.crt", cert, reg), ("server.key", b"x", reg)]),
         "server.key: not"),
        ("encrypted key", make_tar([*good, ("server.crt", cert, reg),
                                    ("server.key", keys["encrypted"][1], reg)]),
         "server.key: not an unencrypted"),
        ("damaged cert", make_tar([*good, ("server.crt", cert[:100], reg),
                                   ("server.key", key, reg)]), "server.crt: not a PEM"),
        ("key not matching cert", make_tar([*good, ("server.crt", other_cert, reg),
                                            ("server.key", key, reg)]),
         "server.crt: not the certificate of server.key"),
        # The report's case: about 1 MiB on the wire, a pax header declaring 1 GiB.
        ("huge pax header", gzip_stream((raw_header("pax", tarfile.XHDTYPE, 1 << 30), 1),
                                        (b"9 a=bcde\n" * 1024, 1 << 17)),
         "extended header of 1073741824 bytes"),
        ("huge gnu long name", gzip_stream((raw_header("L", tarfile.GNUTYPE_LONGNAME, 1 << 30), 1),
                                           (b"a" * 8192, 1 << 17)), "extended header"),
        ("chained pax headers", gzip_stream((pax, 9), (cfg_member, 1), (end, 1)),
         "extended headers in a row"),
        ("pax headers past the unpacked bound",
         gzip_stream((pax + raw_header("d", tarfile.DIRTYPE, 0), 300), (end, 1)),
         "unpacks to more than"),
        ("gzip bomb", gzip_stream((cfg_member, 1), (raw_header("filler", reg, 1 << 30), 1),
                                  (b"\0" * (1 << 20), 1024)), "unpacks to more than"),
        ("pending confirmation file", make_tar([*good, ("network.unconfirmed-previous.toml",
                                                        OTHER_CONFIG, reg)]), "never confirmed"),
        ("bad config", make_tar([("config.toml", b"[network]\nbogus = 1\n", reg)]), "config.toml"),
        ("bad last good", make_tar([*good, ("config.last-good.toml", b"version = 'x'\n", reg)]),
         "config.last-good.toml"),
        ("state.json not json", make_tar([*good, ("state.json", b"{nope", reg)]),
         "state.json: not JSON"),
        ("state.json not an object", make_tar([*good, ("state.json", b"[1, 2]", reg)]),
         "state.json: not a JSON object"),
        ("no config", make_tar([("state.json", b"{}", reg)]), "no config.toml"),
        ("unknown file", make_tar([*good, ("authorized_keys", b"ssh-ed25519 AAAA", reg)]),
         "not a file this service keeps"),
        ("staging dir", make_tar([*good, (".restore-0123/switch", b"{}", reg)]),
         "not a file this service keeps"),
        ("in a subdirectory", make_tar([*good, ("sub/config.toml", CONFIG, reg)]),
         "not a file this service keeps"),
        ("twice", make_tar([*good, *good]), "appears twice"),
        ("traversal", make_tar([*good, ("../escape", b"x", reg)]), "relative path"),
        ("absolute", make_tar([*good, ("/etc/passwd", b"x", reg)]), "relative path"),
        ("symlink", make_tar([("config.toml", b"", tarfile.SYMTYPE)]), "regular files"),
        ("hard link", make_tar([*good, ("config.last-good.toml", b"", tarfile.LNKTYPE)]),
         "regular files"),
        ("device", make_tar([*good, ("dev", b"", tarfile.CHRTYPE)]), "regular files"),
        ("fifo", make_tar([*good, ("fifo", b"", tarfile.FIFOTYPE)]), "regular files"),
        ("sparse", make_tar([("config.toml", CONFIG, tarfile.GNUTYPE_SPARSE)],
                            fmt=tarfile.GNU_FORMAT), "regular files"),
        ("not gzip", b"plain text", "not a gzip"),
        ("truncated", make_tar(good)[:40], "not a gzip"),
    ]  # fmt: skip


# -- the real service ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[apiserver.Server]:
    require_tool("openssl", "curl")
    srv = apiserver.make(tmp_path_factory.mktemp("served"), [])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_every_damaged_archive_is_refused_and_changes_nothing(
    served: apiserver.Server, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    assert served.put("/1.0/system/network", {"config": {"interfaces": [UPLINK]}}).status == 200
    assert served.process is not None
    before = snapshot(served.state)
    assert {"config.toml", "server.crt", "server.key"} <= set(before)
    beside = sorted(os.listdir(served.state.parent))
    failures = []
    for name, data, words in damaged(keys):
        assert len(data) < backup.MAX_ARCHIVE_BYTES, name
        r = served.curl("POST", "/1.0/system/:restore", body=data)
        error = r.json.get("error", "") if r.body.startswith(b"{") else r.body[:200]
        if r.status != 400 or words not in error:
            failures.append((name, r.status, error))
        if snapshot(served.state) != before or sorted(os.listdir(served.state.parent)) != beside:
            failures.append((name, "state changed", ""))
    assert not failures, failures
    assert not (served.base / "escape").exists()
    # The 1 GiB claims were never read into memory (the report: 4 GB before).
    assert peak_rss_kib(served.process.pid) < 400 << 10, peak_rss_kib(served.process.pid)
    # ...and the service answers as before.
    assert served.curl("GET", "/1.0").status == 200


def test_a_server_key_is_never_quoted(
    served: apiserver.Server, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    cert, key = keys["one"]
    body = key.splitlines()[1]
    for bad_key in (key[:-40], key.replace(body, body[::-1])):
        data = make_tar(
            [
                ("config.toml", CONFIG, tarfile.REGTYPE),
                ("server.crt", cert, tarfile.REGTYPE),
                ("server.key", bad_key, tarfile.REGTYPE),
            ]
        )
        r = served.curl("POST", "/1.0/system/:restore", body=data)
        assert r.status == 400 and b"server.key" in r.body, r.body
        assert body[:16] not in r.body and body[-16:] not in r.body


def test_a_backup_holds_only_what_a_restore_takes(served: apiserver.Server) -> None:
    """Not the pending-confirmation document, the generator's cache, a staging dir or
    an atomic write in flight; and it restores as it is."""
    strays = {
        "network.unconfirmed-previous.toml": OTHER_CONFIG,
        ".restore-feedc0ffee00/new/config.toml": OTHER_CONFIG,
        ".config.toml.0123abcd.tmp": OTHER_CONFIG,
        "generator.cache": b"incusos-hal-generator-cache 1\n",
    }
    for name, data in strays.items():
        (served.state / name).parent.mkdir(parents=True, exist_ok=True)
        (served.state / name).write_bytes(data)
    try:
        saved = served.curl("POST", "/1.0/system/:backup")
    finally:
        shutil.rmtree(served.state / ".restore-feedc0ffee00")
        for name in strays:
            (served.state / name).unlink(missing_ok=True)
    assert saved.status == 200
    with tarfile.open(fileobj=io.BytesIO(saved.body)) as tar:
        names = sorted(tar.getnames())
    assert names == sorted(n for n in backup.RESTORED if (served.state / n).exists()), names
    assert (
        backup.read_archive(saved.body).files["config.toml"]
        == (served.state / "config.toml").read_bytes()
    )


def test_reading_is_bounded_in_time() -> None:
    data = make_tar([("config.toml", CONFIG, tarfile.REGTYPE)])
    stream = backup._BoundedStream(data, backup.MAX_UNPACKED_BYTES, seconds=-1)
    with pytest.raises(backup.ArchiveError, match="not read within"):
        stream.read(512)


def test_mangled_archives_give_archive_errors_only() -> None:
    """Bytes flipped, cut or inserted anywhere in a real backup's tar and gzip layers:
    ArchiveError or a valid archive, never another exception."""
    members = [
        ("config.toml", CONFIG, tarfile.REGTYPE),
        ("state.json", b'{"a": true}', tarfile.REGTYPE),
        ("a-rather-long-name-" * 8, b"x", tarfile.REGTYPE),
    ]
    plain = gzip.decompress(make_tar(members))
    rng = random.Random(13)
    for _ in range(400):
        tar = bytearray(plain)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(tar))
            tar[i] = rng.randrange(256)
        if rng.random() < 0.2:
            del tar[rng.randrange(len(tar)) :]
        data = gzip.compress(bytes(tar))
        if rng.random() < 0.2:
            raw = bytearray(data)
            raw[rng.randrange(len(raw))] ^= 0xFF
            data = bytes(raw)
        with contextlib.suppress(backup.ArchiveError):
            backup.read_archive(data)


# -- the switch, in process ---------------------------------------------------------------------


def seeded_state(base: Path, keys: dict[str, tuple[bytes, bytes]]) -> Path:
    """A state dir as a running machine has it, modes included."""
    state = base / "state"
    state.mkdir(mode=0o700)
    for name, data, mode in (
        ("config.toml", OTHER_CONFIG, 0o600),
        ("config.last-good.toml", OTHER_CONFIG, 0o600),
        ("state.json", b'{"encryption_recovery_keys_retrieved": true}\n', 0o600),
        ("server.crt", keys["one"][0], 0o644),
        ("server.key", keys["one"][1], 0o600),
        ("generator.cache", b"incusos-hal-generator-cache 1\nstale\n", 0o600),
    ):
        (state / name).write_bytes(data)
        (state / name).chmod(mode)
    return state


def service(state: Path, target: Path) -> Service:
    target.mkdir(exist_ok=True)
    return Service(Settings(state_dir=state, target=str(target), live=False), None)


def restore(svc: Service, data: bytes) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = []
    files = svc.check_restore(data, ())
    asyncio.run(svc.restore(files, stages.append))
    return stages


def test_without_an_identity_the_running_one_is_kept(
    tmp_path: Path, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    state = seeded_state(tmp_path, keys)
    before = snapshot(state)
    svc = service(state, tmp_path / "target")
    restore(svc, make_tar([("config.toml", CONFIG, tarfile.REGTYPE)]))
    after = snapshot(state)
    assert (state / "config.toml").read_bytes() == CONFIG
    assert after["server.crt"] == before["server.crt"]
    assert after["server.key"] == before["server.key"]
    # What the archive does not hold is gone: it is the state being restored.
    assert "state.json" not in after
    assert not [n for n in after if n.startswith(".restore-")]
    assert any(
        "525400123456" in p.name for p in (tmp_path / "target/run/systemd/network").iterdir()
    )


def test_an_archived_identity_replaces_the_running_one(
    tmp_path: Path, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    state = seeded_state(tmp_path, keys)
    cert, key = keys["two"]
    svc = service(state, tmp_path / "target")
    restore(
        svc,
        make_tar(
            [
                ("config.toml", CONFIG, tarfile.REGTYPE),
                ("server.crt", cert, tarfile.REGTYPE),
                ("server.key", key, tarfile.REGTYPE),
                ("generator.cache", b"incusos-hal-generator-cache 1\ncrafted\n", tarfile.REGTYPE),
            ]
        ),
    )
    assert (state / "server.crt").read_bytes() == cert
    assert (state / "server.key").read_bytes() == key
    assert (state / "server.key").stat().st_mode & 0o777 == 0o600
    # The archive's generator cache is never taken: the configure step's own, or none.
    cache = state / "generator.cache"
    assert not cache.exists() or b"crafted" not in cache.read_bytes()


def test_a_failed_apply_puts_every_file_back_exactly(
    tmp_path: Path, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    """A real failure of the configure step (its output directory is a file)."""
    state = seeded_state(tmp_path, keys)
    target = tmp_path / "target"
    (target / "run/systemd").mkdir(parents=True)
    (target / "run/systemd/network").write_bytes(b"not a directory")
    before = snapshot(state)
    cert, key = keys["two"]
    svc = service(state, target)
    data = make_tar(
        [
            ("config.toml", CONFIG, tarfile.REGTYPE),
            ("state.json", b"{}", tarfile.REGTYPE),
            ("server.crt", cert, tarfile.REGTYPE),
            ("server.key", key, tarfile.REGTYPE),
        ]
    )
    with pytest.raises(ApiError) as failed:
        restore(svc, data)
    assert failed.value.status == 500 and "previous kept" in failed.value.message
    assert snapshot(state) == before


# -- crashes ------------------------------------------------------------------------------------

CRASHING_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from incusos_hal.api import backup

state, at, direction = Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
files = backup.read_archive(Path(sys.argv[5]).read_bytes()).files
calls = 0

def crashing(real):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == at:
            os._exit(17)  # no cleanup, no finally: as if the power went
        return real(*args, **kwargs)
    return call

for name in ("rename", "replace", "fsync"):
    setattr(os, name, crashing(getattr(os, name)))
stage = backup.switch_in(state, files)
if direction == "back":
    backup.switch_back(state, stage)
backup.discard(stage)
os._exit(0)
"""


@pytest.mark.parametrize("direction", ["in", "back"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_state(
    tmp_path: Path, keys: dict[str, tuple[bytes, bytes]], direction: str
) -> None:
    """For every k, the child dies at its k-th rename/replace/fsync; then the start-up
    step (complete_switches, then recover) runs, and the state is exactly the one
    before or the one after, nothing left over."""
    (tmp_path / "seed").mkdir()
    seed = seeded_state(tmp_path / "seed", keys)
    cert, key = keys["two"]
    archive = tmp_path / "archive.tar.gz"
    archive.write_bytes(
        make_tar(
            [
                ("config.toml", CONFIG, tarfile.REGTYPE),
                ("config.last-good.toml", CONFIG, tarfile.REGTYPE),
                ("server.crt", cert, tarfile.REGTYPE),
                ("server.key", key, tarfile.REGTYPE),
            ]
        )
    )
    old = snapshot(seed)
    done = tmp_path / "done"
    shutil.copytree(seed, done)
    stage = backup.switch_in(done, backup.read_archive(archive.read_bytes()).files)
    backup.discard(stage)
    new = snapshot(done)
    assert new != old
    outcomes = {"old": 0, "new": 0}
    at = 0
    while True:
        at += 1
        state = tmp_path / f"run{at}"
        shutil.copytree(seed, state)
        child = subprocess.run(
            [sys.executable, "-c", CRASHING_CHILD, str(REPO / "src"), str(state), str(at),
             direction, str(archive)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert child.returncode in (0, 17), child.stderr
        backup.complete_switches(state)  # ensure_state_dir's step
        backup.recover(state)  # Service.recover's step
        now = snapshot(state)
        if child.returncode == 0:  # ran to its end: restored, or restored and undone
            assert now == (old if direction == "back" else new)
        assert now in (old, new), (at, sorted(set(now.items()) ^ set(old.items())))
        outcomes["old" if now == old else "new"] += 1
        shutil.rmtree(state)
        if child.returncode == 0:
            break
    assert at > 10 and outcomes["old"] and outcomes["new"], (at, outcomes)


def test_recover_applies_a_restore_its_crash_interrupted(
    tmp_path: Path, keys: dict[str, tuple[bytes, bytes]]
) -> None:
    """Committed but never applied: the start keeps the restored state and applies it;
    staged but not committed: the start discards it."""
    state = seeded_state(tmp_path, keys)
    files = backup.read_archive(make_tar([("config.toml", CONFIG, tarfile.REGTYPE)])).files
    backup.switch_in(state, files)  # the "crash": no apply, no discard
    uncommitted = state / ".restore-00000000aaaa/new"
    uncommitted.mkdir(parents=True)
    (uncommitted / "config.toml").write_bytes(OTHER_CONFIG)
    svc = service(state, tmp_path / "target")
    logged: list[tuple[str, str]] = []
    svc.log = lambda level, message: logged.append((level, message))
    asyncio.run(svc.recover())
    assert (state / "config.toml").read_bytes() == CONFIG
    assert not [p for p in state.iterdir() if p.name.startswith(".restore-")]
    assert any("restored state is kept" in m for _, m in logged), logged
    assert any("before its switch was discarded" in m for _, m in logged), logged
    networkd = tmp_path / "target/run/systemd/network"
    assert any("525400123456" in p.name for p in networkd.iterdir())


# -- where the service runs ---------------------------------------------------------------------


@pytest.fixture
def sandboxed(tmp_path: Path) -> Iterator[apiserver.Server]:
    """A real server in a mount namespace where its state dir is a mount point (a bind
    mount of itself, as StateDirectory= makes it) inside a read-only parent (as
    ProtectSystem=strict makes /var/lib), the configure step's target writable."""
    require_root()
    require_tool("unshare", "mount", "openssl", "curl")
    srv = apiserver.make(tmp_path, [])
    script = (
        'set -e; b="$0"; mount --bind "$b/state" "$b/state"; '
        'mount --bind "$b/target" "$b/target"; mount --rbind "$b" "$b"; '
        'mount -o remount,bind,ro "$b"; '
        'if touch "$b/probe" 2>/dev/null; then echo "parent writable" >&2; exit 1; fi; '
        'exec "$@"'
    )
    srv.wrapper = ("unshare", "-m", "--propagation", "private", "sh", "-c", script, str(tmp_path))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.root
def test_restore_with_the_state_dir_a_mount_point_in_a_read_only_parent(
    sandboxed: apiserver.Server,
) -> None:
    srv = sandboxed
    beside = sorted(os.listdir(srv.base))
    assert srv.put("/1.0/system/network", {"config": {"interfaces": [UPLINK]}}).status == 200
    saved = srv.curl("POST", "/1.0/system/:backup")
    assert saved.status == 200
    assert srv.put("/1.0/system/network", {"config": {"interfaces": [LAN]}}).status == 200
    r = srv.curl("POST", "/1.0/system/:restore", body=saved.body)
    assert r.status == 202, r.body
    op = srv.curl("GET", f"{r.headers['location']}/wait?timeout=60").json["metadata"]
    assert op["status"] == "Success", (op, srv.log[-20:])
    assert b"52:54:00:12:34:56" in srv.config_file.read_bytes()
    networkd = srv.target / "run/systemd/network"
    assert any("525400123456" in p.name for p in networkd.iterdir())
    assert not [p for p in srv.state.iterdir() if p.name.startswith(".restore-")]
    assert sorted(os.listdir(srv.base)) == beside  # nothing made beside the state dir
    # A failed apply there: every file back exactly.
    before = snapshot(srv.state)
    shutil.rmtree(networkd)
    networkd.write_bytes(b"not a directory")
    r = srv.curl("POST", "/1.0/system/:restore", body=saved.body)
    op = srv.curl("GET", f"{r.headers['location']}/wait?timeout=60").json["metadata"]
    assert op["status"] == "Failure" and "previous kept" in op["err"], op
    assert snapshot(srv.state) == before
    assert srv.curl("GET", "/1.0").status == 200


def test_backup_then_restore_keeps_the_tls_identity_when_the_archive_has_none(
    served: apiserver.Server,
) -> None:
    """A backup from a machine that never served HTTPS (no server.crt): restored here,
    this machine's identity stays, and HTTPS still answers with it."""
    before = (served.state / "server.crt").read_bytes(), (served.state / "server.key").read_bytes()
    data = make_tar([("config.toml", CONFIG, tarfile.REGTYPE)])
    r = served.curl("POST", "/1.0/system/:restore", body=data)
    assert r.status == 202, r.body
    op = served.curl("GET", f"{r.headers['location']}/wait?timeout=60").json["metadata"]
    assert op["status"] == "Success", op
    after = (served.state / "server.crt").read_bytes(), (served.state / "server.key").read_bytes()
    assert after == before
    assert json.loads(served.curl("GET", "/1.0").body)["status_code"] == 200
