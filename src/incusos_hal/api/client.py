"""The CLI's client for the API (stdlib only): the unix socket, or HTTPS with a client
certificate, the server's certificate pinned by fingerprint (as `incus remote add`
pins an unknown server's certificate).

Remotes live in $XDG_CONFIG_HOME/incusos-hal/remotes.json (0600):
    {"local": {"url": "unix:///run/incusos-hal/unix.socket"},
     "rack1": {"url": "https://10.0.0.5:8443", "cert": "...", "key": "...",
               "server_fingerprint": "<sha256 hex>"}}
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core.files import atomic_write
from ..state.paths import SOCKET

LOCAL = {"url": f"unix://{SOCKET}"}


class ClientError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def envelope(self) -> dict[str, Any]:
        try:
            data = json.loads(self.body)
        except ValueError:
            raise ClientError(f"the server answered {self.status} with no JSON") from None
        if not isinstance(data, dict):
            raise ClientError("the server's answer is not an envelope")
        if data.get("type") == "error":
            raise ClientError(f"{data.get('error_code')}: {data.get('error')}")
        return data


def remotes_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base, "incusos-hal", "remotes.json")


def load_remotes(path: Path | None = None) -> dict[str, dict[str, str]]:
    path = path or remotes_file()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    except ValueError as e:
        raise ClientError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ClientError(f"{path}: not an object")
    return {"local": dict(LOCAL), **data}


def save_remotes(remotes: dict[str, dict[str, str]], path: Path | None = None) -> None:
    path = path or remotes_file()
    stored = {k: v for k, v in remotes.items() if k != "local"}
    atomic_write(path, json.dumps(stored, indent=2).encode() + b"\n", 0o600)


def fetch_server_fingerprint(url: str) -> str:
    """The SHA-256 of the certificate the server presents (to pin it on `remote add`)."""
    parts = urlsplit(url)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((parts.hostname, parts.port or 8443), timeout=10) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ClientError("the server presented no certificate")
    return hashlib.sha256(der).hexdigest()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("ihal", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def _connection(remote: dict[str, str], timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(remote["url"])
    if parts.scheme == "unix":
        return _UnixConnection(parts.path, timeout)
    if parts.scheme != "https":
        raise ClientError(f"{remote['url']}: only unix:// and https:// remotes")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # The server's certificate is self-signed: it is checked by its pinned fingerprint
    # after the handshake, not by a CA.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if remote.get("cert"):
        ctx.load_cert_chain(remote["cert"], remote.get("key") or None)
    return http.client.HTTPSConnection(
        parts.hostname or "", parts.port or 8443, context=ctx, timeout=timeout
    )


def request(
    remote: dict[str, str],
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> Reply:
    conn = _connection(remote, timeout)
    try:
        conn.connect()
        pinned = remote.get("server_fingerprint")
        if isinstance(conn, http.client.HTTPSConnection) and pinned:
            der = conn.sock.getpeercert(binary_form=True)
            if der is None or hashlib.sha256(der).hexdigest() != pinned:
                raise ClientError("the server's certificate is not the one pinned for it")
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    except (OSError, http.client.HTTPException) as e:
        raise ClientError(f"{remote['url']}: {e}") from None
    finally:
        conn.close()
