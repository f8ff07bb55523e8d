"""What the API's hot-path caches may never do: admit a peer the config no longer admits.

The service keeps, per connection, who the peer is (the SO_PEERCRED uid, the client
certificate's fingerprint: both fixed when it connected), never whether it is admitted;
and it re-reads the stored config only after an inotify event in the state dir. So a
uid taken out of socket_uids, or a certificate out of the trust store, is refused at
the next request, on a new connection and on one kept open from before, whether the
change came through the API or by a hand edit of the stored file."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.api.service import Service, Settings
from incusos_hal.config import dumps_toml, from_dict
from incusos_hal.core.watch import DirectoryWatch

import apiserver
from conftest import require_root, require_tool

NOBODY = 65534
# A keep-alive client: one connection for its whole life (it says how many it made).
# Each line on stdin is a path to GET; each answer one JSON line on stdout.
KEEPALIVE_CLIENT = r"""
import http.client, json, socket, sys

class Unix(http.client.HTTPConnection):
    made = 0

    def connect(self):
        Unix.made += 1
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(sys.argv[1])

conn = Unix("ihal", timeout=60)
for line in sys.stdin:
    conn.request("GET", line.strip())
    r = conn.getresponse()
    body = json.loads(r.read())
    print(json.dumps({"status": r.status, "error": body["error"], "connections": Unix.made}))
    sys.stdout.flush()
"""


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "curl", "setpriv")
    d = tmp_path_factory.mktemp("certs")
    return {name: apiserver.openssl_client_cert(d, name) for name in ("trusted", "stranger")}


@pytest.fixture
def api(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> Iterator[apiserver.Server]:
    srv = apiserver.make(tmp_path, [certs["trusted"][0]])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def listener(certs: list[Path], uids: list[int]) -> dict[str, Any]:
    pems = [c.read_text() for c in certs]
    return {"config": {"trusted_client_certificates": pems, "socket_uids": uids}}


class Nobody:
    """A keep-alive client running as uid 65534 on the service's socket."""

    def __init__(self, sock: Path) -> None:
        python = os.path.realpath(sys.executable)  # not the venv's: nobody may not read it
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             python, "-I", "-c", KEEPALIVE_CLIENT, str(sock)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    def get(self, path: str = "/1.0") -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(path.encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.close()
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> str:
        self.proc.kill()
        _, err = self.proc.communicate()
        return err.decode(errors="replace")


def nobody_new_connection(sock: Path) -> int:
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "curl", "-sS",
         "--unix-socket", str(sock), "http://ihal/1.0"],
        capture_output=True, check=True,
    )  # fmt: skip
    code: int = json.loads(done.stdout)["error_code"] or 200
    return code


@pytest.mark.root
def test_a_uid_taken_out_of_socket_uids_is_refused_at_once_on_every_connection(
    api: apiserver.Server,
) -> None:
    require_root()
    os.chmod(api.socket, 0o666)  # the file mode lets nobody in; the peer check must not
    trusted = [api.cert]
    assert api.put("/1.0/system/fallback-listener", listener(trusted, [NOBODY])).status == 200
    client = Nobody(api.socket)
    try:
        assert client.get() == {"status": 200, "error": "", "connections": 1}

        # Out through the API: the open connection's next request is refused, and so is
        # a new connection.
        assert api.put("/1.0/system/fallback-listener", listener(trusted, [])).status == 200
        refused = client.get()
        assert refused["status"] == 403 and f"uid {NOBODY}" in refused["error"], refused
        assert refused["connections"] == 1
        assert nobody_new_connection(api.socket) == 403

        # Out by a hand edit of the stored file, in place (the same inode, the same size)
        # and replaced whole (as `incusos-hal save` writes it).
        without = stored([], [api.cert.read_text()])
        edits = {
            "in place": lambda text: api.config_file.write_text(
                text.replace(f"    {NOBODY},\n", f"    {NOBODY - 1},\n")
            ),
            "replaced": lambda text: save_replacing(api.config_file, without),
        }
        for how, edit in edits.items():
            assert (
                api.put("/1.0/system/fallback-listener", listener(trusted, [NOBODY])).status == 200
            )
            assert client.get() == {"status": 200, "error": "", "connections": 1}, how
            text = api.config_file.read_text()
            assert f"    {NOBODY},\n" in text
            edit(text)
            refused = client.get()
            assert refused["status"] == 403 and refused["connections"] == 1, (how, refused)
            assert nobody_new_connection(api.socket) == 403, how
    finally:
        client.close()


def save_replacing(path: Path, data: bytes) -> None:
    tmp = path.with_name(".edit.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Https(http.client.HTTPSConnection):
    made = 0

    def connect(self) -> None:
        Https.made += 1
        super().connect()


def test_a_certificate_taken_out_of_the_trust_store_is_refused_on_its_open_connection(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]]
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(api.state / "server.crt")
    ctx.load_cert_chain(*certs["trusted"])
    Https.made = 0
    conn = Https("127.0.0.1", api.port, context=ctx, timeout=60)

    def get() -> tuple[int, str]:
        conn.request("GET", "/1.0")
        r = conn.getresponse()
        return r.status, json.loads(r.read())["error"]

    try:
        assert get() == (200, "")
        # The store now trusts another certificate only: this connection's next request
        # is refused (its fingerprint was kept, not its admission), a new one fails the
        # handshake.
        put = api.put("/1.0/system/fallback-listener", listener([certs["stranger"][0]], []))
        assert put.status == 200, put.body
        assert get() == (403, "not authorized: no trusted client certificate")
        assert Https.made == 1
        assert api.curl_tls("GET", "/1.0", cert=certs["trusted"]).status == 0
        # Trusted again: the same connection is admitted again.
        assert api.put("/1.0/system/fallback-listener", listener([api.cert], [])).status == 200
        assert get() == (200, "")
        assert Https.made == 1
    finally:
        conn.close()


# -- the stored config, re-read after any change in the state dir --------------------------


def stored(uids: list[int], pems: list[str] | None = None) -> bytes:
    listener = {"socket_uids": uids, "trusted_client_certificates": pems or []}
    return dumps_toml(from_dict({"version": 1, "listener": listener}))


def uids(service: Service) -> tuple[int, ...]:
    return service.config().listener.socket_uids


@pytest.fixture
def service(tmp_path: Path) -> Service:
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.toml").write_bytes(stored([1000]))
    return Service(Settings(state_dir=state), None)


def test_config_is_kept_until_the_state_dir_changes(service: Service) -> None:
    first = service.config()
    assert uids(service) == (1000,) and service.config() is first
    # Something else in the directory changed: read again, the same content.
    (service.settings.state_dir / "flags.json").write_text("{}")
    assert service.config() is not first and uids(service) == (1000,)


def test_a_rewrite_the_files_stat_cannot_tell_is_still_seen(service: Service) -> None:
    """In place, the same size, the mtime put back: inode, mtime and size are those of the
    version already read; only the directory's events say it changed."""
    path = service.settings.state_dir / "config.toml"
    assert uids(service) == (1000,)
    before = path.stat()
    path.write_bytes(stored([1001]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert uids(service) == (1001,)


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_a_stored_file_with_another_name_is_checked_on_every_call(
    service: Service, tmp_path: Path, link: str
) -> None:
    """A change through a name outside the state dir is not reported to its watch: while
    either file has one, every call compares the files' stat, as before the watch."""
    path = service.settings.state_dir / "config.toml"
    other = tmp_path / "elsewhere.toml"
    if link == "hard":
        os.link(path, other)
    else:
        os.replace(path, other)
        path.symlink_to(other)
    assert uids(service) == (1000,)
    assert uids(service) == (1000,)  # the watch has nothing to report now
    other.write_bytes(stored([1000, 1002]))  # another size: the stat sees it
    assert uids(service) == (1000, 1002)


def test_a_lost_watch_falls_back_to_the_files_stat(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    watch = DirectoryWatch(state)
    assert watch.changed() is False
    (state / "x").write_text("x")
    assert watch.changed() is True and watch.changed() is False
    os.rename(state, tmp_path / "moved")
    assert watch.changed() is True and watch.lost
    assert watch.changed() is True


def test_a_new_uid_is_admitted_and_a_removed_one_refused_through_the_same_service(
    service: Service,
) -> None:
    path = service.settings.state_dir / "config.toml"
    for wanted in ([1000, 1003], [], [1004]):
        tmp = path.with_name(".tmp")
        tmp.write_bytes(stored(wanted))
        os.replace(tmp, path)
        assert uids(service) == tuple(wanted)
