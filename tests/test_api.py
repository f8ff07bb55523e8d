"""The API service as a client sees it: a real `incusos-hal serve` process, driven with
curl over its unix socket and over HTTPS with openssl-made client certificates. The
configure step writes into a scratch target (no systemd here; tests/test_api_system.py
runs the same service under real systemd in a container)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.api import server as api_server

import apiserver
from conftest import REPO, require_root, require_tool

NETWORK = {
    "config": {
        "interfaces": [{"name": "uplink", "hwaddr": "52:54:00:12:34:56", "addresses": ["dhcp4"]}]
    }
}
OTHER_NETWORK = {
    "config": {
        "interfaces": [{"name": "lan", "hwaddr": "52:54:00:12:34:57", "addresses": ["10.1.0.2/24"]}]
    }
}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "curl")
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


def state_digest(state: Path) -> dict[str, str]:
    return {
        str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(state.rglob("*"))
        if p.is_file()
    }


# -- who may call --------------------------------------------------------------------------


def concrete(path: str) -> str:
    return path.replace("{name}", "iscsi").replace("{id}", "00000000-0000-0000-0000-000000000000")


def test_root_over_the_socket_with_curl(api: apiserver.Server) -> None:
    r = api.curl("GET", "/")
    assert r.status == 200 and r.json == {
        "type": "sync",
        "status": "Success",
        "status_code": 200,
        "operation": "",
        "error_code": 0,
        "error": "",
        "metadata": ["/1.0"],
    }
    env = api.curl("GET", "/1.0").json["metadata"]["environment"]
    assert env["hostname"] == Path("/proc/sys/kernel/hostname").read_text().strip()
    assert isinstance(env["uptime"], int) and env["uptime"] > 0


@pytest.mark.root
def test_socket_is_root_only_and_checks_peer_credentials(api: apiserver.Server) -> None:
    require_root()
    assert api.socket.stat().st_mode & 0o777 == 0o600
    # Loosen the file mode, as an admin might: the peer check still refuses uid 65534.
    os.chmod(api.socket, 0o666)
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "curl", "-sS"]
    before = state_digest(api.state)
    for route in api_server.ROUTES:  # every route, whatever it would do
        done = subprocess.run(
            [*as_nobody, "-X", route.method, "--unix-socket", str(api.socket),
             f"http://ihal{concrete(route.path)}"],
            capture_output=True, check=False,
        )  # fmt: skip
        answer = json.loads(done.stdout)
        assert answer["error_code"] == 403 and "uid 65534" in answer["error"], (route, done)
    assert state_digest(api.state) == before
    # Admitted once the config lists the uid.
    listener = {"trusted_client_certificates": [api.cert.read_text()], "socket_uids": [65534]}
    r = api.put("/1.0/system/fallback-listener", {"config": listener})
    assert r.status == 200, r.body
    done = subprocess.run(
        [*as_nobody, "--unix-socket", str(api.socket), "http://ihal/1.0"],
        capture_output=True, check=False,
    )  # fmt: skip
    assert json.loads(done.stdout)["status_code"] == 200


def test_every_route_refuses_a_client_without_a_trusted_certificate(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]]
) -> None:
    for route in api_server.ROUTES:
        path = concrete(route.path)
        r = api.curl_tls(route.method, path)
        assert r.status == 403, (route.method, path, r.status, r.err)
        assert r.json["error_code"] == 403
        # A certificate the store does not hold: refused during the handshake.
        stranger = api.curl_tls(route.method, path, cert=certs["stranger"])
        assert stranger.status == 0 and stranger.rc != 0, (path, stranger)
    ok = api.curl_tls("GET", "/1.0", cert=certs["trusted"])
    assert ok.status == 200 and ok.json["metadata"]["environment"]


def test_tls_is_1_3_only_and_openssl_s_client_sees_the_refusal(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = certs["trusted"]
    tls12 = ["-k", "--tls-max", "1.2", "--cert", str(cert), "--key", str(key)]
    r = apiserver.curl(tls12, f"https://127.0.0.1:{api.port}/1.0", "GET", (), None)
    assert r.status == 0 and r.rc != 0, r
    request = b"GET /1.0 HTTP/1.1\r\nHost: ihal\r\nConnection: close\r\n\r\n"

    def s_client(cert: tuple[Path, Path]) -> str:
        done = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{api.port}", "-tls1_3", "-quiet",
             "-cert", str(cert[0]), "-key", str(cert[1])],
            input=request, capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        return (done.stdout + done.stderr).decode(errors="replace")

    assert '"status_code":200' in s_client(certs["trusted"])
    refused = s_client(certs["stranger"])
    # TLS 1.3 checks the client's certificate after the client's Finished: the refusal
    # reaches s_client as an alert, or as the reset or end of stream that follows it;
    # never as an HTTP answer.
    assert '"status_code"' not in refused, refused
    assert any(w in refused for w in ("alert", "errno=104", "unexpected eof")), refused


def test_trust_store_changes_apply_to_the_next_connection(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]]
) -> None:
    assert api.curl_tls("GET", "/1.0", cert=certs["stranger"]).rc != 0
    pems = [certs["trusted"][0].read_text(), certs["stranger"][0].read_text()]
    r = api.put("/1.0/system/fallback-listener", {"config": {"trusted_client_certificates": pems}})
    assert r.status == 200, r.body
    assert api.curl_tls("GET", "/1.0", cert=certs["stranger"]).status == 200
    r = api.put(
        "/1.0/system/fallback-listener", {"config": {"trusted_client_certificates": pems[1:]}}
    )
    assert api.curl_tls("GET", "/1.0", cert=certs["trusted"]).rc != 0


def test_proxy_prefix_as_incusos_reads_it(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]]
) -> None:
    """IncusOS's getAPIRoot: the header's first value on the socket (Incus's /os proxy
    appends "/os" to the client's own header, and the client's wins); always /os over
    HTTPS, whose listener takes paths with or without /os and sets the header itself."""
    header = ("-H", "X-IncusOS-Proxy: /os")
    assert api.curl("GET", "/", *header).json["metadata"] == ["/os/1.0"]
    both = ("-H", "X-IncusOS-Proxy: /", "-H", "X-IncusOS-Proxy: /os")
    assert api.curl("GET", "/1.0/system", *both).json["metadata"][0].startswith("/1.0/system/")
    assert api.curl("GET", "/", "-H", "X-IncusOS-Proxy: /../x").json["metadata"] == ["/1.0"]
    for path in ("/", "/os", "/os/"):
        tls = api.curl_tls("GET", path, "-H", "X-IncusOS-Proxy: /x", cert=certs["trusted"])
        assert tls.json["metadata"] == ["/os/1.0"], path
    listed = api.curl_tls("GET", "/os/1.0/system", cert=certs["trusted"]).json["metadata"]
    assert "/os/1.0/system/network" in listed
    assert api.curl_tls("GET", "/os/1.0/system/network", cert=certs["trusted"]).status == 200
    # The socket does not take /os paths (IncusOS's does not either).
    assert api.curl("GET", "/os/1.0").status == 404
    # A stranger is refused under /os as everywhere (at the handshake).
    assert api.curl_tls("GET", "/os/1.0", cert=certs["stranger"]).rc != 0


# -- config through the API ------------------------------------------------------------------


def test_put_stores_applies_and_get_shows_it(api: apiserver.Server) -> None:
    r = api.put("/1.0/system/network", NETWORK)
    assert r.status == 200, r.body
    got = api.curl("GET", "/1.0/system/network")
    assert got.json["metadata"]["config"]["interfaces"][0]["hwaddr"] == "52:54:00:12:34:56"
    assert got.headers["etag"].startswith('"')
    networkd = api.target / "run/systemd/network"
    names = sorted(p.name for p in networkd.iterdir())
    assert any("525400123456" in n for n in names), names
    assert "52:54:00:12:34:56" in api.config_file.read_text()


def test_if_match_guards_against_lost_updates(api: apiserver.Server) -> None:
    etag = api.curl("GET", "/1.0/system/network").headers["etag"]
    assert api.put("/1.0/system/network", NETWORK, "-H", f"If-Match: {etag}").status == 200
    before = api.config_file.read_bytes()
    stale = api.put("/1.0/system/network", OTHER_NETWORK, "-H", f"If-Match: {etag}")
    assert stale.status == 412 and stale.json["error_code"] == 412
    assert api.config_file.read_bytes() == before
    fresh = api.curl("GET", "/1.0/system/network").headers["etag"]
    assert fresh != etag
    assert api.put("/1.0/system/network", OTHER_NETWORK, "-H", f"If-Match: {fresh}").status == 200


NIC = b'"name": "a", "hwaddr": "52:54:00:00:00:01"'
BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("malformed JSON", b'{"config": ', 400, "not valid JSON"),
    ("NaN", b'{"config": {"interfaces": [{' + NIC + b', "mtu": NaN}]}}', 400, "NaN"),
    ("not an object", b"[1, 2]", 400, "JSON object"),
    ("unknown top-level field", b'{"config": {}, "extra": 1}', 400, "extra: unknown field"),
    ("unknown config field", b'{"config": {"interfacez": []}}', 400, "config.interfacez"),
    ("wrong type", b'{"config": {"interfaces": [{' + NIC + b', "mtu": "big"}]}}', 400,
     "config.interfaces[0].mtu"),
    ("bad address", b'{"config": {"interfaces": [{' + NIC + b', "addresses": ["300.1.1.1/24"]}]}}',
     400, "config.interfaces[0].addresses[0]"),
    ("not UTF-8", b'{"config": {"dns": {"hostname": "\xff"}}}', 400, "not valid JSON"),
    ("huge", b'{"config": {"dns": {"hostname": "' + b"a" * (2 << 20) + b'"}}}', 413, "larger"),
    ("deep", b"[" * 100000 + b"]" * 100000, 400, "not valid JSON"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_bodies_are_4xx_and_change_nothing(
    api: apiserver.Server, case: tuple[str, bytes, int, str]
) -> None:
    _, body, status, words = case
    assert api.put("/1.0/system/network", NETWORK).status == 200
    before = state_digest(api.state)
    r = api.curl("PUT", "/1.0/system/network", "-H", "Content-Type: application/json", body=body)
    assert r.status == status, (r.status, r.body[:300])
    assert r.json["type"] == "error" and words in r.json["error"], r.json
    assert state_digest(api.state) == before


def test_security_put_refuses_weak_keys_without_echoing_them(api: apiserver.Server) -> None:
    secret = "short!"
    r = api.put("/1.0/system/security", {"config": {"encryption_recovery_keys": [secret]}})
    assert r.status == 400 and "config.encryption_recovery_keys[0]" in r.json["error"]
    assert secret not in r.body.decode()
    empty = api.put("/1.0/system/security", {"config": {"encryption_recovery_keys": []}})
    assert empty.status == 400 and "at least one" in empty.json["error"]
    good = api.put(
        "/1.0/system/security", {"config": {"encryption_recovery_keys": ["a-Long-enough-key!"]}}
    )
    assert good.status == 200
    assert api.config_file.stat().st_mode & 0o777 == 0o600
    state = api.curl("GET", "/1.0/system/security").json["metadata"]["state"]
    assert state["encryption_recovery_keys_retrieved"] is False
    assert api.curl("POST", "/1.0/system/security/:retrieved").status == 200
    state = api.curl("GET", "/1.0/system/security").json["metadata"]["state"]
    assert state["encryption_recovery_keys_retrieved"] is True
    assert "a-Long-enough-key!" not in "".join(api.log)


def test_unbuilt_routes_answer_501_and_unknown_ones_404(api: apiserver.Server) -> None:
    for route in api_server.ROUTES:
        if not route.built:
            r = api.curl(route.method, concrete(route.path))
            assert r.status == 501 and "not built" in r.json["error"], route.path
    assert api.curl("GET", "/1.0/services/nope").status == 404
    assert api.curl("GET", "/1.0/nothing").json["error_code"] == 404
    assert api.curl("DELETE", "/1.0/system/network").json["error_code"] == 405


# -- network changes wait for a confirmation ------------------------------------------------


def test_unconfirmed_network_change_is_rolled_back(api: apiserver.Server) -> None:
    assert api.put("/1.0/system/network", NETWORK).status == 200
    before = api.config_file.read_bytes()
    trial = {"config": {**OTHER_NETWORK["config"], "confirmation_timeout": "2s"}}
    assert api.put("/1.0/system/network", trial).status == 200
    state = api.curl("GET", "/1.0/system/network").json["metadata"]["state"]
    assert state["configuration_in_process"] is True
    networkd = api.target / "run/systemd/network"
    assert any("525400123457" in p.name for p in networkd.iterdir())
    blocked = api.put("/1.0/system/network", NETWORK)
    assert blocked.status == 409
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = api.curl("GET", "/1.0/system/network").json["metadata"]["state"]
        if not state["configuration_in_process"]:
            break
        time.sleep(0.2)
    assert api.config_file.read_bytes() == before
    # The files follow: the previous network is what the target holds again.
    names = [p.name for p in networkd.iterdir()]
    assert any("525400123456" in n for n in names) and not any("525400123457" in n for n in names)
    assert (
        api.curl("GET", "/1.0/system/network").json["metadata"]["state"]["configuration_in_process"]
        is False
    )


def test_unconfirmed_change_is_rolled_back_after_a_crash(api: apiserver.Server) -> None:
    """The service dies (kill -9) while a change waits for its confirmation: started
    again, it restores the previous network rather than keeping the unconfirmed one."""
    assert api.put("/1.0/system/network", NETWORK).status == 200
    before = api.config_file.read_bytes()
    trial = {"config": {**OTHER_NETWORK["config"], "confirmation_timeout": "10m"}}
    assert api.put("/1.0/system/network", trial).status == 200
    assert b"52:54:00:12:34:57" in api.config_file.read_bytes()
    api.stop(signal.SIGKILL)
    api.start()
    assert api.config_file.read_bytes() == before
    names = [p.name for p in (api.target / "run/systemd/network").iterdir()]
    assert any("525400123456" in n for n in names) and not any("525400123457" in n for n in names)
    assert "never confirmed" in "".join(api.log), api.log
    assert not list(api.state.glob("network.unconfirmed-*"))
    # A confirmed change is not undone by a restart.
    assert api.put("/1.0/system/network", trial).status == 200
    assert api.curl("POST", "/1.0/system/network/:confirm").status == 200
    api.stop(signal.SIGKILL)
    api.start()
    assert b"52:54:00:12:34:57" in api.config_file.read_bytes()


def test_confirmed_network_change_stays(api: apiserver.Server) -> None:
    trial = {"config": {**OTHER_NETWORK["config"], "confirmation_timeout": "2s"}}
    assert api.put("/1.0/system/network", trial).status == 200
    assert api.curl("POST", "/1.0/system/network/:confirm").status == 200
    time.sleep(3)
    assert "52:54:00:12:34:57" in api.config_file.read_text()
    assert api.curl("POST", "/1.0/system/network/:confirm").status == 400


# -- backup and restore -----------------------------------------------------------------------


def archive(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar.gz: (name, content or None for a symlink, tar type)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/shadow"
                tar.addfile(info)
            else:
                info.size = len(content or b"")
                tar.addfile(info, io.BytesIO(content or b""))
    return buf.getvalue()


def wait_operation(api: apiserver.Server, location: str) -> dict[str, Any]:
    r = api.curl("GET", f"{location}/wait?timeout=60")
    assert r.status == 200, r.body
    op: dict[str, Any] = r.json["metadata"]
    return op


def test_backup_then_restore_round_trip(api: apiserver.Server) -> None:
    assert api.put("/1.0/system/network", NETWORK).status == 200
    saved = api.curl("POST", "/1.0/system/:backup")
    assert saved.status == 200 and saved.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(saved.body)) as tar:
        names = tar.getnames()
    assert "config.toml" in names and "server.key" in names
    assert api.put("/1.0/system/network", OTHER_NETWORK).status == 200
    r = api.curl("POST", "/1.0/system/:restore", body=saved.body)
    assert r.status == 202 and r.json["type"] == "async", r.body
    op = wait_operation(api, r.headers["location"])
    assert op["status"] == "Success", op
    assert "52:54:00:12:34:56" in api.config_file.read_text()
    assert any("525400123456" in p.name for p in (api.target / "run/systemd/network").iterdir())


def test_restore_can_keep_the_running_recovery_keys(api: apiserver.Server) -> None:
    keys = {"config": {"encryption_recovery_keys": ["first-recovery-key!"]}}
    assert api.put("/1.0/system/security", keys).status == 200
    saved = api.curl("POST", "/1.0/system/:backup").body
    keys = {"config": {"encryption_recovery_keys": ["second-recovery-key!"]}}
    assert api.put("/1.0/system/security", keys).status == 200
    r = api.curl("POST", "/1.0/system/:restore?skip=encryption-recovery-keys", body=saved)
    assert wait_operation(api, r.headers["location"])["status"] == "Success"
    text = api.config_file.read_text()
    assert "second-recovery-key!" in text and "first-recovery-key!" not in text
    bad = api.curl("POST", "/1.0/system/:restore?skip=no-such-option", body=saved)
    assert bad.status == 400 and "no-such-option" in bad.json["error"]


def test_restore_onto_other_hardware_keeps_this_machines_macs(api: apiserver.Server) -> None:
    assert api.put("/1.0/system/network", NETWORK).status == 200  # uplink 52:..:56
    saved = api.curl("POST", "/1.0/system/:backup").body
    nic = {"name": "uplink", "hwaddr": "52:54:00:aa:bb:cc", "addresses": ["10.9.0.2/24"]}
    here = {"config": {"interfaces": [nic]}}
    assert api.put("/1.0/system/network", here).status == 200
    r = api.curl("POST", "/1.0/system/:restore?skip=network-macs", body=saved)
    assert wait_operation(api, r.headers["location"])["status"] == "Success"
    got = api.curl("GET", "/1.0/system/network").json["metadata"]["config"]["interfaces"]
    # The archive's addressing, this machine's MAC.
    assert got == [{"name": "uplink", "hwaddr": "52:54:00:aa:bb:cc", "addresses": ["dhcp4"]}]


BAD_ARCHIVES = [
    ("traversal", archive([("../escape", b"x", tarfile.REGTYPE)]), "relative path"),
    ("absolute", archive([("/etc/passwd", b"x", tarfile.REGTYPE)]), "relative path"),
    ("symlink", archive([("config.toml", None, tarfile.SYMTYPE)]), "regular files"),
    ("device", archive([("dev", b"", tarfile.CHRTYPE)]), "regular files"),
    ("bad config", archive([("config.toml", b"[network]\nbogus = 1\n", tarfile.REGTYPE)]),
     "config.toml"),
    ("not gzip", b"plain text", "not a gzip"),
    ("truncated", archive([("config.toml", b"version = 1\n", tarfile.REGTYPE)])[:40], "not a gzip"),
    ("empty tar", gzip.compress(b"\0" * (80 << 20)), "no config.toml"),
    ("bomb", archive([("config.toml", b"version = 1\n", tarfile.REGTYPE),
                      ("filler", b"\0" * (65 << 20), tarfile.REGTYPE)]), "unpacks to more than"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_ARCHIVES, ids=[c[0] for c in BAD_ARCHIVES])
def test_bad_archives_are_refused_before_anything_changes(
    api: apiserver.Server, case: tuple[str, bytes, str]
) -> None:
    _, data, words = case
    assert api.put("/1.0/system/network", NETWORK).status == 200
    before = state_digest(api.state)
    siblings = sorted(p.name for p in api.state.parent.iterdir())
    r = api.curl("POST", "/1.0/system/:restore", body=data)
    assert r.status == 400 and words in r.json["error"], (r.status, r.body[:300])
    assert state_digest(api.state) == before
    assert sorted(p.name for p in api.state.parent.iterdir()) == siblings
    assert not (api.base / "escape").exists()


# -- operations and events ----------------------------------------------------------------------


def test_operations_and_events_follow_a_restore(api: apiserver.Server) -> None:
    import aiohttp

    saved = api.curl("POST", "/1.0/system/:backup").body

    async def watch() -> list[dict[str, Any]]:
        connector = aiohttp.UnixConnector(path=str(api.socket))
        events = "http://ihal/1.0/events?type=operation,logging"
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.ws_connect(events) as ws,
        ):
            r = await asyncio.to_thread(api.curl, "POST", "/1.0/system/:restore", body=saved)
            assert r.status == 202
            seen: list[dict[str, Any]] = []
            while not any(
                e["type"] == "operation" and e["metadata"]["status"] == "Success" for e in seen
            ):
                seen.append(await asyncio.wait_for(ws.receive_json(), 30))
            return seen

    events = asyncio.run(watch())
    ops = [e["metadata"] for e in events if e["type"] == "operation"]
    assert ops[0]["status"] == "Running" and ops[-1]["status"] == "Success"
    stages = [o["metadata"].get("stage") for o in ops]
    assert "swapping" in stages and "applying" in stages
    assert any(e["type"] == "logging" and "restored" in e["metadata"]["message"] for e in events)
    listed = api.curl("GET", "/1.0/operations").json["metadata"]
    assert f"/1.0/operations/{ops[-1]['id']}" in listed["success"]
    assert api.curl("DELETE", f"/1.0/operations/{ops[-1]['id']}").status == 400
    assert api.curl("GET", "/1.0/events?type=bogus").status == 400


# -- crashes ---------------------------------------------------------------------------------------


def test_kill_9_during_writes_leaves_the_old_or_the_new_document(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    srv = apiserver.make(tmp_path, [certs["trusted"][0]])
    from incusos_hal.config import parse_toml

    documents: set[bytes] = set()
    rng = random.Random(7)
    allowed = {"52:54:00:12:34:56", "52:54:00:12:34:57"}
    try:
        for round_ in range(12):
            srv.start()
            if round_ == 0:  # the first start stored this machine's default network
                first_boot = parse_toml(srv.config_file.read_bytes()).network.interfaces
                allowed |= {i.hwaddr for i in first_boot}
            body = NETWORK if round_ % 2 else OTHER_NETWORK
            writer = subprocess.Popen(
                ["curl", "-sS", "-X", "PUT", "--unix-socket", str(srv.socket),
                 "--data-binary", json.dumps(body), "http://ihal/1.0/system/network"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(rng.uniform(0.0, 0.25))
            srv.stop(signal.SIGKILL)
            writer.wait(30)
            if srv.config_file.exists():
                documents.add(srv.config_file.read_bytes())
            # Never a torn file: each stored document parses and is one of the three.
            for doc in documents:
                hwaddrs = {i.hwaddr for i in parse_toml(doc).network.interfaces}
                assert hwaddrs <= allowed
    finally:
        srv.stop()
    assert documents, "no write ever landed: the kills all came too early"


def test_openapi_describes_every_route(api: apiserver.Server) -> None:
    spec = api.curl("GET", "/1.0/openapi.json").json
    assert spec["openapi"].startswith("3.")
    for route in api_server.ROUTES:
        assert route.method.lower() in spec["paths"][route.path], route.path
    network = spec["components"]["schemas"]["Network"]
    assert network["additionalProperties"] is False and "interfaces" in network["properties"]


def test_docs_api_md_is_generated_from_the_served_description() -> None:
    from incusos_hal.api.openapi import markdown, spec

    expected = markdown(spec(api_server.ROUTES))
    assert (REPO / "docs/api.md").read_text() == expected, (
        "docs/api.md is stale: python -m incusos_hal.api.docs > docs/api.md"
    )


def test_cli_client_over_the_socket_and_https(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), XDG_CONFIG_HOME=str(tmp_path / "cfg"))

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "incusos_hal", *args],
            env=env, input=stdin, capture_output=True, text=True, check=False,
        )  # fmt: skip

    unix = f"unix://{api.socket}"
    cert, key = certs["trusted"]
    assert cli("remote", "add", "here", unix).returncode == 0
    https = f"https://127.0.0.1:{api.port}"
    added = cli("remote", "add", "tls", https, "--cert", str(cert), "--key", str(key))
    assert added.returncode == 0, added.stderr
    assert (tmp_path / "cfg/incusos-hal/remotes.json").stat().st_mode & 0o777 == 0o600
    for remote in ("here", "tls"):
        got = cli("get", "/1.0", "--remote", remote, "--format", "json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)["environment"]["os_name"]
    table = cli("get", "/1.0/system/network", "--remote", "here").stdout.splitlines()
    assert any(line.split() == ["state.configuration_in_process", "false"] for line in table)
    edited = cli("edit", "/1.0/system/network", "--remote", "tls", "--file", "-",
                 stdin=json.dumps(NETWORK))  # fmt: skip
    assert edited.returncode == 0, edited.stderr
    assert "52:54:00:12:34:56" in api.config_file.read_text()
    table = cli("get", "/1.0/system/network", "--remote", "tls", "--format", "table").stdout
    assert "config.interfaces[0].hwaddr" in table and "52:54:00:12:34:56" in table
    bad = cli("edit", "/1.0/system/network", "--remote", "here", "--file", "-",
              stdin='{"config": {"interfaces": [{"name": "x"}]}}')  # fmt: skip
    assert bad.returncode == 1 and "config.interfaces[0]" in bad.stderr
    saved = tmp_path / "backup.tar.gz"
    assert cli("backup", str(saved), "--remote", "here").returncode == 0
    assert saved.stat().st_mode & 0o777 == 0o600
    restored = cli("restore", str(saved), "--remote", "tls")
    assert restored.returncode == 0 and "restored" in restored.stdout, restored.stderr
    assert cli("confirm", "--remote", "here").returncode == 1  # nothing is pending
    # A server that is not the pinned one is refused.
    remotes = json.loads((tmp_path / "cfg/incusos-hal/remotes.json").read_text())
    remotes["tls"]["server_fingerprint"] = "0" * 64
    (tmp_path / "cfg/incusos-hal/remotes.json").write_text(json.dumps(remotes))
    refused = cli("get", "/1.0", "--remote", "tls")
    assert refused.returncode == 1 and "pinned" in refused.stderr


def test_security_put_changes_the_volumes_recovery_keys(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    """Through the API, on a root whose crypttab names two LUKS2 images: the keys in the
    config are the keys that open the volumes, before and after a change."""
    from incusos_hal.hal import luks
    from test_security import two_volumes

    root, images = two_volumes(tmp_path, "first-recovery-key!")
    (tmp_path / "api").mkdir()
    srv = apiserver.make(tmp_path / "api", [certs["trusted"][0]])
    srv.root = root
    srv.start()
    try:
        first = {"config": {"encryption_recovery_keys": ["first-recovery-key!"]}}
        assert srv.put("/1.0/system/security", first).status == 200
        assert all(len(luks.header(i).keyslots) == 1 for i in images)  # nothing to change
        new = {"config": {"encryption_recovery_keys": ["second-recovery-key!"]}}
        r = srv.put("/1.0/system/security", new)
        assert r.status == 200, r.body
        for image in images:
            assert luks.opens(image, "second-recovery-key!")
            assert not luks.opens(image, "first-recovery-key!")
        # A key none of the volumes knows cannot authorise a change: refused, unchanged.
        srv.config_file.write_text(
            srv.config_file.read_text().replace("second-recovery-key!", "unknown-old-key!!")
        )
        before = state_digest(srv.state)
        r = srv.put("/1.0/system/security", first)
        assert r.status == 500 and "neither a current recovery key" in r.json["error"]
        assert "second-recovery-key!" not in r.body.decode()
        assert state_digest(srv.state) == before
        assert all(luks.opens(i, "second-recovery-key!") for i in images)
    finally:
        srv.stop()


def test_tpm_rebind_reseals_the_volumes_after_a_pcr_change(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]], swtpm: str
) -> None:
    """POST /1.0/system/security/:tpm-rebind: refused while the TPM unseals every volume;
    after PCR 7 changed, the volumes' tokens are sealed again with the configured recovery
    key authorising it, and the TPM unseals them."""
    from incusos_hal.hal import luks, tpm
    from test_security import header_bytes, two_volumes

    key = "first-recovery-key!"
    root, images = two_volumes(tmp_path, key)
    with tpm.open_tpm(swtpm) as t:
        for image in images:
            luks.enroll_tpm2(image, key, t, t.current_policy("sha256", [7]))
    (tmp_path / "api").mkdir()
    srv = apiserver.make(tmp_path / "api", [certs["trusted"][0]])
    srv.root, srv.tcti = root, swtpm
    srv.start()
    try:
        keys = {"config": {"encryption_recovery_keys": [key]}}
        assert srv.put("/1.0/system/security", keys).status == 200
        before = [header_bytes(i) for i in images]
        r = srv.curl("POST", "/1.0/system/security/:tpm-rebind")
        assert r.status == 409 and "unseals every TPM-bound volume" in r.json["error"], r.body
        # The CLI client says the same and fails.
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), XDG_CONFIG_HOME=str(tmp_path / "c"))
        cli = [sys.executable, "-m", "incusos_hal"]
        subprocess.run([*cli, "remote", "add", "here", f"unix://{srv.socket}"], env=env, check=True)
        refused = subprocess.run(
            [*cli, "tpm-rebind", "--remote", "here"], env=env, capture_output=True, text=True
        )
        assert refused.returncode == 1 and "unseals every" in refused.stderr, refused
        assert [header_bytes(i) for i in images] == before
        with tpm.open_tpm(swtpm) as t:
            t.extend(7, {"sha256": bytes(range(32))})
        done = subprocess.run(
            [*cli, "tpm-rebind", "--remote", "here"], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0 and "re-sealed" in done.stdout, done
        with tpm.open_tpm(swtpm) as t:
            for image in images:
                luks.unlock_tpm2(image, t)
                assert len(luks.header(image).token_slots(luks.TOKEN_TPM2)) == 1
    finally:
        srv.stop()
    assert any("TPM token re-sealed to PCRs 7" in line for line in srv.log), srv.log
    assert all(key not in line for line in srv.log)


def test_resources_storage_and_debug_log(api: apiserver.Server) -> None:
    resources = api.curl("GET", "/1.0/system/resources").json["metadata"]
    assert {"cpu", "memory", "network", "storage", "pci"} <= set(resources)
    assert resources["cpu"]["total"] >= 1
    storage = api.curl("GET", "/1.0/system/storage").json["metadata"]
    assert storage["config"] == {"scrub_schedule": "0 4 * * 0"}
    assert isinstance(storage["state"]["drives"], list)
    for query, words in (
        ("?unit=a;b", "unit"),
        ("?entries=0", "entries"),
        ("?boot=x", "boot"),
        ("?since=$(id)", "since"),
        ("?grep=x", "grep: unknown parameter"),
    ):
        r = api.curl("GET", f"/1.0/debug/log{query}")
        assert r.status == 400 and words in r.json["error"], (query, r.json)


def test_a_failed_apply_puts_the_previous_document_back(api: apiserver.Server) -> None:
    """A real failure of the configure step (its output directory is a file now): the
    client gets a 500 saying so, the stored document and the files are the previous ones."""
    assert api.put("/1.0/system/network", NETWORK).status == 200
    before = api.config_file.read_bytes()
    networkd = api.target / "run/systemd/network"
    files = {p.name: p.read_bytes() for p in networkd.iterdir()}
    shutil.rmtree(networkd)
    networkd.write_bytes(b"not a directory")
    r = api.put("/1.0/system/network", OTHER_NETWORK)
    assert r.status == 500 and "previous one restored" in r.json["error"], r.json
    assert api.config_file.read_bytes() == before
    networkd.unlink()
    networkd.mkdir()
    for name, data in files.items():
        (networkd / name).write_bytes(data)
    assert api.put("/1.0/system/network", OTHER_NETWORK).status == 200


# -- an apply that outruns its time limit --------------------------------------------------


def tree_digest(root: Path) -> dict[str, str]:
    """Every entry under `root` by content: files (mode and SHA-256), links, directories."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = f"{p.stat().st_mode & 0o7777:o} {digest}"
        else:
            out[rel] = "dir"
    return out


def with_vlans(count: int) -> dict[str, Any]:
    vlans = [
        {
            "name": f"v{i}",
            "parent": "uplink",
            "id": i,
            "addresses": [f"10.{i // 250}.{i % 250}.1/24"],
        }
        for i in range(1, count + 1)
    ]
    return {"config": {**NETWORK["config"], "vlans": vlans}}


def test_an_apply_that_outruns_its_limit_restores_the_previous_files_exactly(
    api: apiserver.Server,
) -> None:
    """4,000 VLANs: 8,005 files, each written durably (about 3 ms apiece here, so some
    25 s), under a limit of 1 ms per file and none for the rest (8 s; loading and
    rendering take about 2 s): the limit runs out half way through the writes. A 500
    naming the timeout; the target byte-identical to before, the stored document and
    the last good copy the previous ones. The same change again right after times out
    the same way and leaves the same tree: no worker from the first is still writing."""
    assert api.put("/1.0/system/network", NETWORK).status == 200
    api.stop()
    # As a unit's drop-in sets it (tests/vm.py gives emulated guests minutes this way).
    api.env = {"INCUSOS_HAL_APPLY_TIME_LIMIT": "0,0.001"}
    api.start()
    files = tree_digest(api.target)
    assert any("bridge-uplink" in name for name in files), files
    stored = api.config_file.read_bytes()
    good = (api.state / "config.last-good.toml").read_bytes()
    for attempt in (1, 2):
        r = api.put("/1.0/system/network", with_vlans(4000))
        assert r.status == 500, (attempt, r.body)
        assert re.fullmatch(
            r"applying the configuration timed out after 8\.0[0-9]* s; "
            r"previous configuration restored",
            r.json["error"],
        ), r.json
        assert tree_digest(api.target) == files, attempt
        assert api.config_file.read_bytes() == stored
        assert (api.state / "config.last-good.toml").read_bytes() == good
    got = api.curl("GET", "/1.0/system/network").json["metadata"]["config"]
    assert "vlans" not in got and got["interfaces"][0]["name"] == "uplink"
    api.stop()
    # Stopped in the middle of writing (not before), both times.
    restored = re.findall(r"timed out after [0-9.]+ s; previous files restored", "\n".join(api.log))
    assert len(restored) == 2, api.log


class RecordingSystemd:
    """The systemd side of an apply, on a machine without a system bus: it notes what
    config.last-good.toml holds when systemd is asked to reload, and refuses the next
    reload when told to (as systemd refuses a unit it cannot load)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.seen: list[bytes | None] = []
        self.refuse_next = False

    async def daemon_reload(self) -> None:
        path = self.state / "config.last-good.toml"
        self.seen.append(path.read_bytes() if path.exists() else None)
        if self.refuse_next:
            self.refuse_next = False
            from incusos_hal.apply.systemd import ApplyError

            raise ApplyError("daemon-reload: Unit incusos-test.service failed to load")

    async def reload_networkd(self) -> None:
        pass

    async def restart(self, unit: str) -> None:
        pass

    async def start(self, unit: str, mode: str) -> None:
        pass

    async def stop(self, unit: str) -> None:
        pass

    async def active_state(self, unit: str) -> str:
        return "active"


def in_process(tmp_path: Path, systemd: Any = None, **settings: Any) -> Any:
    from incusos_hal.api.service import Service, Settings, ensure_state_dir

    state = tmp_path / "state"
    ensure_state_dir(state)
    (tmp_path / "target").mkdir()
    return Service(
        Settings(state_dir=state, target=str(tmp_path / "target"), live=False, **settings),
        systemd,
    )


def test_last_good_follows_only_what_systemd_accepted(tmp_path: Path) -> None:
    from incusos_hal.api.service import ApiError
    from incusos_hal.config import dumps_toml

    systemd = RecordingSystemd(tmp_path / "state")
    service = in_process(tmp_path, systemd)
    last_good = tmp_path / "state/config.last-good.toml"

    async def run() -> None:
        await service.put_section("network", NETWORK)
        first = dumps_toml(service.config())
        assert systemd.seen == [None] and last_good.read_bytes() == first
        # Refused by systemd: at no point did last-good hold the rejected document.
        systemd.refuse_next = True
        with pytest.raises(ApiError) as refused:
            await service.put_section("network", OTHER_NETWORK)
        assert refused.value.status == 500
        assert "previous one restored: daemon-reload: Unit" in refused.value.message
        assert systemd.seen[1:] == [first, first] and last_good.read_bytes() == first
        assert dumps_toml(service.config()) == first
        # Held for confirmation: good only once confirmed.
        held = {"config": {**OTHER_NETWORK["config"], "confirmation_timeout": "10m"}}
        await service.put_section("network", held)
        assert last_good.read_bytes() == first
        await service.confirm()
        assert last_good.read_bytes() == dumps_toml(service.config()) != first

    asyncio.run(run())


def test_a_timed_out_apply_returns_only_after_its_worker_ended(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """In the service itself, the limit running out while the worker thread writes (3,000
    VLANs, 1 ms per file: 6 s, where loading and rendering take 1-2 s): when put_section
    reports the timeout, no configure step is running any more (the one-at-a-time lock is
    free) and the files are the previous ones."""
    import dataclasses

    from incusos_hal.api.service import ApiError
    from incusos_hal.apply import configure
    from incusos_hal.apply.deadline import TimeLimit

    service = in_process(tmp_path)
    target = tmp_path / "target"

    async def run() -> None:
        await service.put_section("network", NETWORK)
        files = tree_digest(target)
        limit = TimeLimit(0, 0.001)
        service.settings = dataclasses.replace(service.settings, apply_limit=limit)
        capfd.readouterr()
        with pytest.raises(ApiError) as late:
            await service.put_section("network", with_vlans(3000))
        assert not configure._ONE_AT_A_TIME.locked()
        assert tree_digest(target) == files
        assert "; previous files restored" in capfd.readouterr().err
        assert re.fullmatch(
            r"applying the configuration timed out after 6\.0[0-9]* s; "
            r"previous configuration restored",
            late.value.message,
        )

    asyncio.run(run())


def test_a_malformed_apply_time_limit_in_the_environment_is_said_and_ignored(
    tmp_path: Path,
) -> None:
    """A unit's drop-in with a bad $INCUSOS_HAL_APPLY_TIME_LIMIT is named in the log, and
    the service starts anyway (with the default limit): it is the way into the machine."""
    srv = apiserver.make(tmp_path, [])
    srv.env = {"INCUSOS_HAL_APPLY_TIME_LIMIT": "fast"}
    srv.start()
    try:
        assert srv.curl("GET", "/1.0").status == 200
    finally:
        srv.stop()
    assert any("$INCUSOS_HAL_APPLY_TIME_LIMIT" in line for line in srv.log), srv.log
