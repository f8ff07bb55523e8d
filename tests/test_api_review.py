"""What an attacker's review of the hardening found (issue 13), each against a real
`incusos-hal serve` (tests/apiserver.py) or the code it runs: a request that stops the
service from starting, a backup that captures a change not yet confirmed, a restore
that skips what a PUT checks, a NIC claimed twice, secrets in readable files, archives
that answer 500, internal paths in errors."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_api import state_digest

import apiserver
from conftest import require_tool

UNASSIGNED = "192.0.2.77:8443"  # TEST-NET-1: never an address of this machine


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "curl")
    d = tmp_path_factory.mktemp("certs")
    return {name: apiserver.openssl_client_cert(d, name) for name in ("first",)}


@pytest.fixture
def api(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> Iterator[apiserver.Server]:
    srv = apiserver.make(tmp_path, [certs["first"][0]])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# -- 1. the listen address ---------------------------------------------------------------


@pytest.mark.parametrize("address", [UNASSIGNED, "nosuchhost.invalid:8443", "taken"])
def test_a_stored_listen_address_that_cannot_be_had_never_stops_the_service(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]], address: str
) -> None:
    """Stored by an older version (or before the machine lost the address): the service
    starts, serves root on the unix socket and says HTTPS is not active."""
    srv = apiserver.make(tmp_path, [certs["first"][0]])
    with socket.socket() as holder:
        if address == "taken":
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            address = f"127.0.0.1:{holder.getsockname()[1]}"
        text = srv.config_file.read_text()
        assert "[listener]\n" in text
        text = text.replace("[listener]\n", f'[listener]\nlisten_address = "{address}"\n')
        srv.config_file.write_text(text)
        srv.options = ("--listen", "")  # the stored address, not the test's
        srv.start()
        try:
            assert srv.curl("GET", "/").json["metadata"] == ["/1.0"]
            listener = srv.curl("GET", "/1.0/system/fallback-listener").json["metadata"]
            assert listener["config"]["listen_address"] == address
            assert listener["state"]["active"] is False
        finally:
            srv.stop()
    assert any("HTTPS is not served on" in line for line in srv.log), srv.log


def test_put_of_a_listen_address_the_machine_cannot_have_is_400(api: apiserver.Server) -> None:
    before = state_digest(api.state)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        for address in (UNASSIGNED, "[2001:db8::77]:8443", "localhost:8443", taken):
            r = api.put("/1.0/system/fallback-listener", {"config": {"listen_address": address}})
            assert r.status == 400, (address, r.body)
            assert "config.listen_address" in r.json["error"], r.json
            assert state_digest(api.state) == before
    # An address of this machine with a free port is taken (used at the next start).
    free = f"127.0.0.1:{apiserver.free_port()}"
    listener = api.curl("GET", "/1.0/system/fallback-listener").json["metadata"]["config"]
    r = api.put("/1.0/system/fallback-listener", {"config": {**listener, "listen_address": free}})
    assert r.status == 200, r.body
