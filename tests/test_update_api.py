"""Updates through the API of a real `incusos-hal serve`: a real HTTPS update server on
loopback (tests/updateserver.py: a CA made here, an index signed with openssl smime,
files with their SHA-256), reached through a CONNECT proxy the network section names,
trusted through the security section's custom CA. Each check is `POST
/1.0/system/update/:check` (an operation) and its outcome `GET /1.0/system/update`."""

from __future__ import annotations

import datetime
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from updateserver import (
    PKI,
    ConnectProxy,
    FakeOperationsCenter,
    UpdateServer,
    make_pki,
    os_files,
    release,
    sign,
)

from apiserver import REPO, Server, free_port, openssl_client_cert
from conftest import require_tool

READ_TIMEOUT = "2"


def start_server(base: Path, seed: dict[str, Any], root: Path) -> Server:
    state, target = base / "state", base / "target"
    base.mkdir(parents=True, exist_ok=True)
    state.mkdir(mode=0o700)
    target.mkdir()
    (base / "seed.json").write_text(json.dumps({"version": 1, **seed}))
    saved = subprocess.run(
        [sys.executable, "-m", "incusos_hal", "save", "--config", str(base / "seed.json"),
         "--state-dir", str(state)],
        env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert saved.returncode == 0, saved.stderr
    cert, key = openssl_client_cert(base, "client")
    sockets = Path(tempfile.mkdtemp(prefix="ihal-upd-"))
    server = Server(
        base, state, target, sockets / "api.sock", free_port(), cert, key, root=root,
        options=("--update-read-timeout", READ_TIMEOUT),
    )  # fmt: skip
    server.start()
    return server


def set_version(root: Path, version: str) -> None:
    (root / "usr/lib").mkdir(parents=True, exist_ok=True)
    (root / "usr/lib/os-release").write_text(f"ID=incusos\nIMAGE_VERSION={version}\n")


class Env:
    def __init__(self, base: Path) -> None:
        require_tool("openssl", "curl")
        (base / "pki").mkdir()
        self.pki: PKI = make_pki(base / "pki")
        self.updates = UpdateServer(self.pki)
        self.proxy = ConnectProxy()
        self.root = base / "root"
        set_version(self.root, "100")
        seed = {
            "provider": {
                "name": "images",
                "config": {"server_url": self.updates.url, "update_ca": self.pki.ca},
            },
            "security": {"custom_ca_certs": [self.pki.ca]},
            "network": {
                "proxy": {
                    "servers": {"p": {"host": f"127.0.0.1:{self.proxy.port}", "auth": "anonymous"}}
                }
            },
        }
        self.api = start_server(base / "api", seed, self.root)

    def publish(self) -> None:
        self.updates.behaviour.__init__()  # type: ignore[misc]
        self.updates.publish(
            self.pki,
            [
                (release("300", ["testing"], os_files("300")), os_files("300")),
                (release("200", ["stable", "testing"], os_files("200")), os_files("200")),
            ],
        )

    def reset(self) -> None:
        (self.api.state / "update.json").unlink(missing_ok=True)
        shutil.rmtree(self.api.state / "updates", ignore_errors=True)
        set_version(self.root, "100")
        self.publish()

    def check(self, body: dict[str, Any] | None = None, trigger: str = "") -> dict[str, Any]:
        path = "/1.0/system/update/:check" + (f"?trigger={trigger}" if trigger else "")
        args = ("-H", "Content-Type: application/json")
        r = self.api.curl("POST", path, *args, body=json.dumps(body or {}).encode())
        assert r.status == 202, r.body
        op = r.json["operation"]
        done = self.api.curl("GET", f"{op}/wait?timeout=120")
        assert done.status == 200, done.body
        assert done.json["metadata"]["status"] == "Success", done.json
        return self.state()

    def state(self) -> dict[str, Any]:
        r = self.api.curl("GET", "/1.0/system/update")
        assert r.status == 200, r.body
        state: dict[str, Any] = r.json["metadata"]["state"]
        return state

    def staged(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.api.state / "update.json").read_text())
        except FileNotFoundError:
            return {}
        return dict(doc.get("staged", {}))

    def close(self) -> None:
        self.api.stop()
        self.updates.close()
        self.proxy.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env(tmp_path_factory.mktemp("update-api"))
    try:
        yield e
    finally:
        e.close()


@pytest.fixture
def fresh(env: Env) -> Env:
    env.reset()
    return env


def test_provider_and_update_shapes(fresh: Env) -> None:
    system = fresh.api.curl("GET", "/1.0/system").json["metadata"]
    assert len(system) == 8 and "/1.0/system/provider" in system
    provider = fresh.api.curl("GET", "/1.0/system/provider").json["metadata"]
    assert provider["config"]["name"] == "images"
    assert provider["state"] == {"registered": False}
    state = fresh.state()
    # IncusOS's three fields, and which A/B slot runs (docs/incusos-differences.md).
    assert set(state) == {"last_check", "status", "needs_reboot", "booted"}
    assert state["last_check"] == "0001-01-01T00:00:00Z"


def test_channel_filter_proxy_and_handoff(fresh: Env) -> None:
    before = len(fresh.proxy.targets)
    state = fresh.check()
    assert state["status"] == "OS update 200 downloaded and verified", state
    assert state["needs_reboot"] is False  # nothing installs it on this branch
    assert state["last_check"] != "0001-01-01T00:00:00Z"
    staged = fresh.staged()["os"]
    assert staged["version"] == "200"
    directory = Path(staged["path"])
    for name, data in os_files("200").items():
        assert (directory / name.removesuffix(".gz")).read_bytes() == gzip.decompress(data)
    # Everything went through the proxy, to the update server.
    assert f"127.0.0.2:{fresh.updates.port}" in fresh.proxy.targets[before:]
    # The same check again: nothing new (the staged version is not fetched twice).
    fetched = len(fresh.updates.log)
    assert fresh.check()["status"] == "Update check completed"
    assert [p for _m, p, _r in fresh.updates.log[fetched:] if p != "/index.sjson"] == []
    # The testing channel has 300.
    r = fresh.api.put("/1.0/system/update", {"config": {"channel": "testing",
                                                         "check_frequency": "6h"}})  # fmt: skip
    assert r.status == 200, r.body
    try:
        assert fresh.check()["status"] == "OS update 300 downloaded and verified"
        assert fresh.staged()["os"]["version"] == "300"
    finally:
        fresh.api.put("/1.0/system/update", {"config": {"channel": "stable",
                                                        "check_frequency": "6h"}})  # fmt: skip


def test_tampered_index_refused(fresh: Env) -> None:
    signed = fresh.updates.files["/index.sjson"]
    fresh.updates.behaviour.overrides["/index.sjson"] = signed.replace(b'"200"', b'"201"', 1)
    state = fresh.check()
    assert state["status"].startswith(
        "Failed to check for updates: the index signature does not verify against the update CA"
    ), state
    assert fresh.staged() == {}
    assert not (fresh.api.state / "updates/os").exists()


def test_file_with_wrong_hash_or_size_refused(fresh: Env) -> None:
    name = next(n for n in os_files("200") if "usr-x86-64.raw" in n)
    good = fresh.updates.files[f"/200/{name}"]
    for bad, words in ((bytes(len(good)), "differs from the signed index"),
                       (good + b"more", "larger than")):  # fmt: skip
        fresh.updates.behaviour.overrides[f"/200/{name}"] = bad
        state = fresh.check()
        assert state["status"].startswith("Failed to check for OS updates:"), state
        assert words in state["status"], state
        assert "os" not in fresh.staged()
        assert not list((fresh.api.state / "updates").rglob(name))


def test_resume_after_a_cut_connection(fresh: Env) -> None:
    name = next(n for n in os_files("200") if "usr-x86-64.raw" in n)
    fresh.updates.behaviour.cut_once.add(f"/200/{name}")
    state = fresh.check()
    assert state["status"] == "OS update 200 downloaded and verified", state
    ranges = [r for _m, p, r in fresh.updates.log if p == f"/200/{name}"]
    assert ranges[-2] == "" and ranges[-1].startswith("bytes="), ranges


def test_hanging_or_garbage_provider_bounded(fresh: Env) -> None:
    fresh.updates.behaviour.garbage = True
    state = fresh.check()
    assert state["status"] == ("Failed to check for updates: the index is not S/MIME-signed"), state
    fresh.updates.behaviour.garbage = False
    fresh.updates.behaviour.hang = True
    started = time.monotonic()
    state = fresh.check()
    # The read timeout is 2 s here (30 s by default): generous bound.
    assert time.monotonic() - started < 60
    assert state["status"].startswith("Failed to check for updates:"), state
    assert "no answer in time" in state["status"], state
    fresh.updates.behaviour.hang = False


def test_downgrade_refused(fresh: Env) -> None:
    set_version(fresh.root, "900")
    state = fresh.check()
    assert "refusing to downgrade the OS from 900 to 200" in state["status"], state
    assert fresh.staged() == {}


def test_a_version_too_long_for_the_labels_is_refused_before_the_download(fresh: Env) -> None:
    # incusos-hal_VERSION_verity_sig must fit a GPT label (36 units): 13 are left.
    (fresh.root / "usr/lib/os-release").write_text(
        "ID=debian\nIMAGE_ID=incusos-hal\nIMAGE_VERSION=100\n"
    )
    long = "20251128120000"
    files = os_files(long)
    fresh.updates.publish(fresh.pki, [(release(long, ["stable"], files), files)])
    fresh.updates.log.clear()
    state = fresh.check()
    assert state["status"].startswith(f"Failed to apply the OS update {long}: "), state
    assert "longer than the 13 characters" in state["status"], state
    assert [path for _, path, _ in fresh.updates.log] == ["/index.sjson"]
    assert fresh.staged() == {}
    downloads = (fresh.api.state / "updates").rglob("*")
    assert [f.name for f in downloads if f.is_file()] == ["index.cache.json"]


def _window(start: datetime.datetime, end: datetime.datetime) -> dict[str, int]:
    return {"start_hour": start.hour, "start_minute": start.minute,
            "end_hour": end.hour, "end_minute": end.minute}  # fmt: skip


def test_maintenance_windows_keep_the_timer_check(fresh: Env) -> None:
    now = datetime.datetime.now().astimezone()
    later = _window(now + datetime.timedelta(hours=3), now + datetime.timedelta(hours=4))
    config = {"channel": "stable", "check_frequency": "6h", "maintenance_windows": [later]}
    assert fresh.api.put("/1.0/system/update", {"config": config}).status == 200
    try:
        state = fresh.check(trigger="timer")
        assert state["status"] == "Skipping update check outside of maintenance window(s)"
        assert fresh.staged() == {}
        # An operator's check runs at any time (IncusOS too).
        assert fresh.check()["status"] == "OS update 200 downloaded and verified"
        fresh.reset()
        now = datetime.datetime.now().astimezone()
        current = _window(now - datetime.timedelta(hours=1), now + datetime.timedelta(hours=1))
        config["maintenance_windows"] = [current]
        assert fresh.api.put("/1.0/system/update", {"config": config}).status == 200
        state = fresh.check(trigger="timer")
        assert state["status"] == "OS update 200 downloaded and verified", state
    finally:
        fresh.api.put("/1.0/system/update", {"config": {"check_frequency": "6h"}})


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": {"name": "nope"}}, "config.name"),
        ({"config": {"name": ""}}, "a provider name must be specified"),
        (
            {"config": {"name": "images", "config": {"server_url": "ftp://x"}}},
            "config.config.server_url",
        ),
        ({"config": {"name": "images", "config": {"bogus": "1"}}}, "config.config.bogus"),
        (
            {"config": {"name": "images", "config": {"update_ca": "not a pem"}}},
            "config.config.update_ca",
        ),
        ({"config": {"name": "local", "config": {"path": "relative"}}}, "config.config.path"),
        ({"config": {"name": "images", "config": {"server_url": 5}}}, "config.config.server_url"),
    ],
)
def test_bad_provider_config_refused(env: Env, body: dict[str, Any], field: str) -> None:
    before = env.api.curl("GET", "/1.0/system/provider").json["metadata"]
    stored = env.api.config_file.read_bytes()
    r = env.api.put("/1.0/system/provider", body)
    assert r.status == 400, r.body
    assert field in r.json["error"], r.json
    assert env.api.curl("GET", "/1.0/system/provider").json["metadata"] == before
    assert env.api.config_file.read_bytes() == stored


@pytest.mark.parametrize("body", [{"os_only": "yes"}, {"other": 1}, [1]])
def test_bad_check_body_refused(env: Env, body: Any) -> None:
    r = env.api.curl("POST", "/1.0/system/update/:check", body=json.dumps(body).encode())
    assert r.status == 400, r.body


def test_local_provider(fresh: Env, tmp_path: Path) -> None:
    local = tmp_path / "updates"
    local.mkdir()
    files = os_files("250")
    content = json.dumps({"updates": [release("250", ["stable"], files)]}).encode()
    (local / "index.sjson").write_bytes(sign(fresh.pki, content))
    (local / "250").mkdir()
    for name, data in files.items():
        (local / "250" / name).write_bytes(data)
    old = fresh.api.curl("GET", "/1.0/system/provider").json["metadata"]["config"]
    body = {"config": {"name": "local", "config": {"path": str(local), "update_ca": fresh.pki.ca}}}
    assert fresh.api.put("/1.0/system/provider", body).status == 200
    try:
        provider = fresh.api.curl("GET", "/1.0/system/provider").json["metadata"]
        assert provider["state"]["registered"] is False
        assert fresh.check()["status"] == "OS update 250 downloaded and verified"
    finally:
        assert fresh.api.put("/1.0/system/provider", {"config": old}).status == 200


def test_operations_center_register_list_and_no_deregistration(tmp_path: Path, env: Env) -> None:
    files = os_files("400")
    uuid = "0e1b2c3d-0000-4000-8000-000000000400"
    fake = FakeOperationsCenter(
        env.pki, "secret-token",
        [{"uuid": uuid, "version": "400", "channels": ["stable"]}], {uuid: files},
    )  # fmt: skip
    root = tmp_path / "root"
    set_version(root, "100")
    server_pem = (env.pki.directory / "server.pem").read_text()
    api = start_server(tmp_path / "api", {"security": {"custom_ca_certs": [env.pki.ca]}}, root)
    try:
        oc = {"server_url": fake.url, "server_certificate": server_pem}
        # A wrong token: registration fails, nothing changes.
        wrong = {"name": "operations-center", "config": {**oc, "server_token": "wrong-secret-7"}}
        r = api.put("/1.0/system/provider", {"config": wrong})
        assert r.status == 500, r.body
        assert "registering with operations-center" in r.json["error"]
        assert "wrong-secret-7" not in r.body.decode()  # a token is never repeated
        provider = api.curl("GET", "/1.0/system/provider").json["metadata"]
        assert provider == {"config": {"name": "images"}, "state": {"registered": False}}
        # The right one.
        body = {"config": {"name": "operations-center",
                           "config": {**oc, "server_token": "secret-token"}}}  # fmt: skip
        r = api.put("/1.0/system/provider", body)
        assert r.status == 200, r.body
        assert len(fake.registered) == 1 and "machine_id" in fake.registered[0]
        provider = api.curl("GET", "/1.0/system/provider").json["metadata"]
        assert provider["config"]["name"] == "operations-center"
        assert provider["state"]["registered"] is True
        # Updates listed and fetched from it.
        r = api.curl("POST", "/1.0/system/update/:check", body=b"{}")
        assert r.status == 202, r.body
        done = api.curl("GET", f"{r.json['operation']}/wait?timeout=120").json["metadata"]
        assert done["metadata"]["status"] == "OS update 400 downloaded and verified", done
        # IncusOS: Operations Center cannot be left (500, nothing changed).
        r = api.put("/1.0/system/provider", {"config": {"name": "images"}})
        assert r.status == 500 and r.json["error"] == "deregistration unsupported", r.body
        provider = api.curl("GET", "/1.0/system/provider").json["metadata"]
        assert provider["config"]["name"] == "operations-center"
        assert provider["state"]["registered"] is True
    finally:
        api.stop()
        fake.close()


def test_operations_center_needs_its_url(env: Env) -> None:
    r = env.api.put("/1.0/system/provider", {"config": {"name": "operations-center"}})
    assert r.status == 400, r.body
    assert "config.config.server_url" in r.json["error"]


def test_check_progress_on_events_and_operation(fresh: Env) -> None:
    import asyncio

    import aiohttp

    async def watch() -> list[dict[str, Any]]:
        connector = aiohttp.UnixConnector(path=str(fresh.api.socket))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.ws_connect("http://ihal/1.0/events?type=operation") as ws,
        ):
            r = await asyncio.to_thread(
                fresh.api.curl, "POST", "/1.0/system/update/:check", body=b'{"os_only": true}'
            )
            assert r.status == 202, r.body
            seen: list[dict[str, Any]] = []
            while not any(e["metadata"]["status"] == "Success" for e in seen):
                seen.append(await asyncio.wait_for(ws.receive_json(), 60))
            return seen

    ops = [e["metadata"] for e in asyncio.run(watch())]
    assert ops[0]["description"] == "Checking for updates"
    statuses = [o["metadata"].get("status") for o in ops]
    assert "Running update check" in statuses
    assert next(o["metadata"].get("step") for o in ops if o["metadata"].get("step")) == "os"
    assert any(str(o["metadata"].get("progress", "")).endswith("%") for o in ops)
    assert ops[-1]["metadata"]["status"] == "OS update 200 downloaded and verified"
    assert ops[-1]["metadata"]["needs_reboot"] is False


def test_one_check_at_a_time(fresh: Env) -> None:
    fresh.updates.behaviour.hang = True
    try:
        first = fresh.api.curl("POST", "/1.0/system/update/:check")
        assert first.status == 202, first.body
        second = fresh.api.curl("POST", "/1.0/system/update/:check")
        assert second.status == 409, second.body
        assert second.json["error"] == "an update check is already running"
        done = fresh.api.curl("GET", f"{first.json['operation']}/wait?timeout=120").json
        assert "no answer in time" in done["metadata"]["metadata"]["status"]
    finally:
        fresh.updates.behaviour.hang = False
