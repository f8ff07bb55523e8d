"""Nothing stored and nothing sent stops the service from answering root (issue 13): a
real `incusos-hal serve` (tests/apiserver.py) started on stored files a validator never
saw (an older version's, a damaged disk's), and driven with the requests that used to
brick it, answer 500, or answer something that is not JSON."""

from __future__ import annotations

import json
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from incusos_hal.api import auth
from incusos_hal.api import server as api_server
from incusos_hal.api.operations import hide_state_dir, public_error
from incusos_hal.api.service import MAX_HOLD_SECONDS, ApiError
from incusos_hal.core import tls
from test_api import NETWORK, OTHER_NETWORK, concrete, state_digest

import apiserver
from conftest import require_tool


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "curl")
    d = tmp_path_factory.mktemp("certs")
    return {name: apiserver.openssl_client_cert(d, name) for name in ("first", "second")}


@pytest.fixture
def api(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> Iterator[apiserver.Server]:
    srv = apiserver.make(tmp_path, [certs["first"][0]])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def unloadable(pem: str) -> str:
    """`pem` with its issuer's common name tagged [14] instead of UTF8String: the X.509
    parser behind the config's validator reads names only when asked and takes it,
    OpenSSL refuses the certificate ("not enough data")."""
    der = bytearray(ssl.PEM_cert_to_DER_cert(pem))
    at = der.index(bytes.fromhex("0603550403") + b"\x0c")  # commonName, UTF8String
    der[at + 5] = 0xAE
    out = ssl.DER_cert_to_PEM_cert(bytes(der))
    with pytest.raises(ssl.SSLError):
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=bytes(der))
    return out


def strict_json(body: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in a JSON answer: {body[:300]!r}")

    return json.loads(body, parse_constant=refuse)


def toml_listener(pems: list[str]) -> bytes:
    """A stored document written as a damaged disk or an older version would: straight
    to the file, no validator in between. (JSON's string escapes are TOML's.)"""
    items = ", ".join(json.dumps(p) for p in pems)
    return f"version = 1\n\n[listener]\ntrusted_client_certificates = [{items}]\n".encode()


# -- what is stored never stops the service ------------------------------------------------


STORED_CASES = {
    # Each certificate valid; stored without a final newline, as JSON clients send them.
    "no final newline": lambda first, second: [first.strip(), second.strip()],
    # The issue's: whitespace before -----BEGIN (a validator that refuses it makes the
    # store fall back to the last good document; the service starts either way).
    "leading whitespace": lambda first, second: [first, "\n  " + second],
    # A certificate OpenSSL cannot load at all.
    "unloadable": lambda first, second: [first, unloadable(second)],
}


@pytest.mark.parametrize("case", sorted(STORED_CASES))
def test_stored_trusted_certificates_never_stop_the_service(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]], case: str
) -> None:
    first, second = (certs[n][0].read_text() for n in ("first", "second"))
    srv = apiserver.make(tmp_path, [certs["first"][0]])
    pems = STORED_CASES[case](first, second)
    srv.config_file.write_bytes(toml_listener(pems))
    (srv.state / "config.last-good.toml").write_bytes(toml_listener([first]))
    srv.start()
    try:
        assert srv.curl("GET", "/").json["metadata"] == ["/1.0"]
        stored = srv.curl("GET", "/1.0/system/fallback-listener").json["metadata"]
        assert stored["state"]["active"] is True
        # Every stored certificate OpenSSL can load is trusted, the others are skipped.
        assert srv.curl_tls("GET", "/1.0", cert=certs["first"]).status == 200
        kept = stored["config"]["trusted_client_certificates"]
        second_usable = len(kept) == 2 and case != "unloadable"
        got = srv.curl_tls("GET", "/1.0", cert=certs["second"])
        assert (got.status == 200) is second_usable, (case, got)
    finally:
        srv.stop()
    log = "\n".join(srv.log)
    if len(kept) == 2 and not second_usable:
        assert "listener.trusted_client_certificates[1]: skipped" in log, log
    for pem in pems:  # the warning says which and why, never the certificate
        body = pem.strip().splitlines()[1]
        assert body not in log


def test_put_of_a_certificate_tls_cannot_load_is_400_and_stores_nothing(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]]
) -> None:
    first, second = (certs[n][0].read_text() for n in ("first", "second"))
    before = state_digest(api.state)
    bad = {"config": {"trusted_client_certificates": [first, unloadable(second)]}}
    r = api.put("/1.0/system/fallback-listener", bad)
    assert r.status == 400, r.body
    assert "config.trusted_client_certificates[1]" in r.json["error"], r.json
    assert state_digest(api.state) == before
    # Certificates in the shapes clients send are taken, and work at once.
    good = {"config": {"trusted_client_certificates": [first.strip(), "\n" + second.strip()]}}
    r = api.put("/1.0/system/fallback-listener", good)
    assert r.status in (200, 400), r.body  # 400: a validator that wants them normalised
    if r.status == 200:
        assert api.curl_tls("GET", "/1.0", cert=certs["second"]).status == 200
    assert api.curl_tls("GET", "/1.0", cert=certs["first"]).status == 200
    api.stop()
    api.start()  # what was stored, the service starts with
    assert api.curl_tls("GET", "/1.0", cert=certs["first"]).status == 200


def test_a_damaged_server_key_is_set_aside_and_a_new_pair_made(
    api: apiserver.Server, certs: dict[str, tuple[Path, Path]]
) -> None:
    """A key that no longer matches the certificate (or is not a key): the old pair is
    kept as *.damaged, a new one made and served, the new fingerprint in the journal."""
    old_cert = (api.state / "server.crt").read_bytes()
    api.stop()
    other_key = certs["second"][1].read_bytes()  # a valid key, not the certificate's
    for damage in (other_key, b"-----BEGIN PRIVATE KEY-----\ntruncated"):
        (api.state / "server.key").write_bytes(damage)
        for aside in api.state.glob("*.damaged"):
            aside.unlink()
        api.start()
        assert api.curl("GET", "/").status == 200
        assert api.curl_tls("GET", "/1.0", cert=certs["first"]).status == 200
        api.stop()
        assert (api.state / "server.key.damaged").read_bytes() == damage
        assert (api.state / "server.key.damaged").stat().st_mode & 0o777 == 0o600
        assert (api.state / "server.crt.damaged").exists()
        assert (api.state / "server.crt").read_bytes() != old_cert
        new = tls.fingerprint_pem((api.state / "server.crt").read_text())
        assert any(new in line and "new pair" in line for line in api.log), api.log
        assert damage.decode(errors="replace") not in "".join(api.log)


def test_without_usable_server_certificates_the_socket_still_serves(
    api: apiserver.Server,
) -> None:
    """The server's key cannot be used and a new pair cannot be put in place: HTTPS is
    not served (the journal says why), root on the unix socket is."""
    api.stop()
    (api.state / "server.key").write_bytes(b"not a key")
    blocker = api.state / "server.key.damaged"  # a directory with something in it:
    blocker.mkdir()  # the damaged key cannot be moved aside
    (blocker / "x").write_text("x")
    api.start()
    try:
        assert api.curl("GET", "/").json["metadata"] == ["/1.0"]
        listener = api.curl("GET", "/1.0/system/fallback-listener").json["metadata"]
        assert listener["state"]["active"] is False
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", api.port), timeout=10).close()
        # PUTs still work, and the trust store they would change is not needed.
        assert api.put("/1.0/system/network", NETWORK).status == 200
    finally:
        api.stop()
    assert any("HTTPS is not served" in line for line in api.log), api.log


# -- answers are JSON, parameters are checked ------------------------------------------------


def test_every_get_answers_strict_json_under_extreme_values(api: apiserver.Server) -> None:
    """A confirmation_timeout of hundreds of digits (an infinite float once parsed): no
    answer carries NaN or Infinity, the seconds left are bounded, the hold ends."""
    huge = {"config": {**OTHER_NETWORK["config"], "confirmation_timeout": "9" * 400 + "h"}}
    r = api.put("/1.0/system/network", huge)
    assert r.status in (200, 400), r.body  # 400: a validator with a maximum
    held = r.status == 200
    op = api.curl("POST", "/1.0/system/:backup")  # something for the operation routes
    assert op.status == 200
    for route in api_server.ROUTES:
        if route.method != "GET":
            continue
        got = api.curl("GET", concrete(route.path))
        assert got.status != 500, (route.path, got.body[:300])
        strict_json(got.body)
    state = strict_json(api.curl("GET", "/1.0/system/network").body)["metadata"]["state"]
    assert state["configuration_in_process"] is held
    if held:
        assert 0 < state["confirmation_seconds_left"] <= MAX_HOLD_SECONDS
        assert api.curl("POST", "/1.0/system/network/:confirm").status == 200


def test_query_parameters_take_ascii_numbers_only(api: apiserver.Server) -> None:
    for value in ("\u00b2", "\u0661\u0662", "\uff11\uff10", "0", "10001", "-5", "1e3", "+5"):
        r = api.curl("GET", f"/1.0/debug/log?entries={quote(value)}")
        assert r.status == 400 and "entries" in r.json["error"], (value, r.status, r.body)
    r = api.curl("GET", "/1.0/debug/log?boot=" + quote("\u0663"))
    assert r.status == 400 and "boot" in r.json["error"], r.body
    saved = api.curl("POST", "/1.0/system/:backup").body
    location = api.curl("POST", "/1.0/system/:restore", body=saved).headers["location"]
    for value in ("nan", "NaN", "inf", "-inf", "1e999", "infinity", "\u00b2", "\u0661", "0x10", ""):
        r = api.curl("GET", f"{location}/wait?timeout={quote(value)}")
        assert r.status == 400 and "timeout" in r.json["error"], (value, r.status, r.body)
    done = api.curl("GET", f"{location}/wait?timeout=60")
    assert done.status == 200 and done.json["metadata"]["status"] == "Success", done.body
    assert api.curl("GET", f"{location}/wait?timeout=0.5").status == 200


# -- operations ------------------------------------------------------------------------------


def test_a_failed_operation_is_listed_under_failure(api: apiserver.Server) -> None:
    """As Incus lists them: by status in lower case. The restore's apply fails for real
    (the configure step's output directory is a file)."""
    saved = api.curl("POST", "/1.0/system/:backup").body
    networkd = api.target / "run/systemd/network"
    networkd.mkdir(parents=True, exist_ok=True)
    networkd.rmdir()
    networkd.write_bytes(b"not a directory")
    r = api.curl("POST", "/1.0/system/:restore", body=saved)
    assert r.status == 202, r.body
    op = api.curl("GET", f"{r.headers['location']}/wait?timeout=60").json["metadata"]
    assert op["status"] == "Failure" and op["err"], op
    listed = api.curl("GET", "/1.0/operations").json["metadata"]
    assert listed == {"failure": [r.headers["location"]]}, listed
    assert str(api.state) not in op["err"] and "Traceback" not in op["err"]


def test_a_failed_operation_shows_no_state_directory_path(api: apiserver.Server) -> None:
    """The state directory cannot be written (immutable, so even root cannot): the
    restore fails, and says why without the service's paths."""
    require_tool("chattr")
    saved = api.curl("POST", "/1.0/system/:backup").body
    subprocess.run(["chattr", "+i", str(api.state)], check=True)
    try:
        r = api.curl("POST", "/1.0/system/:restore", body=saved)
        if r.status == 202:
            got = api.curl("GET", f"{r.headers['location']}/wait?timeout=60")
            answer, text = got.json["metadata"], got.json["metadata"]["err"]
            assert answer["status"] == "Failure", answer
        else:  # refused before an operation started: the same rule for its error
            text = r.json["error"]
    finally:
        subprocess.run(["chattr", "-i", str(api.state)], check=True)
    assert "not permitted" in text, text
    for internal in (str(api.state), str(api.state.parent), "Traceback", 'File "'):
        assert internal not in text, text
    assert api.curl("GET", "/").status == 200


def test_public_error_and_hide_state_dir() -> None:
    state = "/var/lib/incusos-hal"
    err = OSError(1, "Operation not permitted")
    err.filename = f"{state}/.restore-1/config.toml"
    assert public_error(err, state) == "Operation not permitted: .restore-1/config.toml"
    assert public_error(ValueError(f"{state}/x\nTraceback"), state).startswith("internal error")
    assert public_error(ApiError(500, f"failed: {state}/server.key"), state) == (
        "failed: server.key"
    )
    assert hide_state_dir(f"'{state}' and /var/lib/.incusos-hal.old-ab/x", state) == (
        "'the state directory' and a directory beside the state directory"
    )
    assert hide_state_dir(f"{state}2/x /run/systemd/network/a", state) == (
        f"{state}2/x /run/systemd/network/a"
    )


def test_event_subscribers_that_go_away_mid_send_are_no_fault(api: apiserver.Server) -> None:
    """Subscribers that reset their connection while a burst of events goes out: the
    service's log stays free of tracebacks, and it keeps answering."""
    assert api.process is not None and api.process.stdout is not None
    stdout = api.process.stdout

    def pump() -> None:  # the log, read as it comes (a full pipe would stall the service)
        for line in stdout:
            api.log.append(line.decode(errors="replace"))

    threading.Thread(target=pump, daemon=True).start()
    upgrade = (
        b"GET /1.0/events?type=operation,logging HTTP/1.1\r\nHost: ihal\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )

    def subscriber() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(api.socket))
        s.sendall(upgrade)
        assert s.recv(4096).startswith(b"HTTP/1.1 101"), "no websocket"
        return s

    saved = api.curl("POST", "/1.0/system/:backup").body
    for _ in range(10):
        subscribers = [subscriber() for _ in range(8)]
        assert api.curl("POST", "/1.0/system/:restore", body=saved).status == 202
        for s in subscribers:  # a reset, not a close handshake
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        time.sleep(0.05)
    listed = api.curl("GET", "/1.0/operations").json["metadata"]
    for location in listed.get("running", []):
        api.curl("GET", f"{location}/wait?timeout=60")
    assert api.curl("GET", "/").status == 200
    assert len(api.curl("GET", "/1.0/operations").json["metadata"]["success"]) == 10
    log = "".join(api.log)
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


# -- the trust store alone -------------------------------------------------------------------


def test_trust_store_skips_what_it_cannot_load(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = auth.ensure_server_certificate(tmp_path)
    first, second = (certs[n][0].read_text() for n in ("first", "second"))
    warnings: list[str] = []
    garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----"
    pems = [garbage, "\n" + first.strip(), "not a PEM", unloadable(second), second.strip()]
    store = auth.TrustStore(cert, key, pems, warnings.append)
    assert store.fingerprints == {tls.fingerprint_pem(first), tls.fingerprint_pem(second)}
    assert [w.split(":")[0] for w in warnings] == [
        f"listener.trusted_client_certificates[{i}]" for i in (0, 2, 3)
    ]
    assert all("AAAA" not in w for w in warnings)
    assert [i for i, _ in tls.trust_problems(pems)] == [0, 2, 3]
    store.update([])
    assert store.fingerprints == frozenset()
