"""A real HTTPS update server on loopback for the update tests: a test CA made here with
the openssl command, an index signed with `openssl smime -sign`, files with their
SHA-256; ways to misbehave (cut a body once, hang, answer garbage, lie about a file); a
small CONNECT proxy that records what went through it; and a loopback fake of Operations
Center's provisioning routes (only what the provider uses)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

# Not 127.0.0.1: the proxy's no_proxy always holds 127.0.0.1 and localhost, and the
# proxy test needs the update server to be somewhere the proxy is used for.
HOST = "127.0.0.2"
GUEST_HOST = "10.0.2.2"  # qemu's user network: the host's 127.0.0.1, seen from a guest


def openssl(*args: str, cwd: Path, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], cwd=cwd, input=data, capture_output=True)
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {done.stderr.decode()}")
    return done.stdout


@dataclass(frozen=True)
class PKI:
    directory: Path

    @property
    def ca(self) -> str:
        return (self.directory / "ca.pem").read_text()


def make_pki(directory: Path) -> PKI:
    """A CA; a TLS server certificate for HOST; an index signer; a stranger CA+signer."""
    d = directory
    for name in ("ca", "stranger"):
        openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30",
            "-subj", f"/CN=Test {name} update CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d,
        )  # fmt: skip
    for name, ca, ext in (
        # 10.0.2.2: the host's loopback as a qemu guest on user networking reaches it.
        (
            "server",
            "ca",
            f"subjectAltName=IP:{HOST},IP:127.0.0.1,IP:{GUEST_HOST}\nextendedKeyUsage=serverAuth",
        ),
        ("signer", "ca", "keyUsage=critical,digitalSignature"),
        ("forger", "stranger", "keyUsage=critical,digitalSignature"),
    ):
        openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=Test {name}", cwd=d,
        )  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-extfile", f"{name}.ext",
            cwd=d,
        )  # fmt: skip
    return PKI(d)


def sign(pki: PKI, content: bytes, signer: str = "signer") -> bytes:
    """S/MIME, as IncusOS's index.sjson is."""
    return openssl(
        "smime", "-sign", "-binary", "-signer", f"{signer}.pem", "-inkey", f"{signer}.key",
        cwd=pki.directory, data=content,
    )  # fmt: skip


def file_entry(name: str, data: bytes, component: str, kind: str) -> dict[str, Any]:
    return {
        "architecture": "x86_64",
        "component": component,
        "filename": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "type": kind,
    }


def os_files(version: str) -> dict[str, bytes]:
    """An OS update's four files (content made from the version, so each differs)."""
    seed = version.encode()
    return {
        f"IncusOS_{version}.efi.gz": _gz(b"UKI " + seed * 5000),
        f"IncusOS_{version}.usr-x86-64.raw.gz": _gz(b"USR " + seed * 90000),
        f"IncusOS_{version}.usr-x86-64-verity.raw.gz": _gz(b"VERITY " + seed * 3000),
        f"IncusOS_{version}.usr-x86-64-verity-sig.raw.gz": _gz(b'{"sig": "' + seed + b'"}'),
    }


OS_TYPES = ("update-efi", "update-usr", "update-usr-verity", "update-usr-verity-signature")


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1, mtime=0)


def release(version: str, channels: list[str], files: dict[str, bytes]) -> dict[str, Any]:
    entries = []
    for (name, data), kind in zip(files.items(), OS_TYPES, strict=False):
        entries.append(file_entry(name, data, "os", kind))
    return {
        "format": "1.0",
        "channels": channels,
        "files": entries,
        "origin": "test",
        "published_at": "2026-01-01T00:00:00Z",
        "severity": "none",
        "version": version,
    }


@dataclass
class Behaviour:
    cut_once: set[str] = field(default_factory=set)  # paths whose first body is cut
    hang: bool = False
    garbage: bool = False
    overrides: dict[str, bytes] = field(default_factory=dict)  # path -> other content


class UpdateServer:
    def __init__(self, pki: PKI, host: str = HOST) -> None:
        self.files: dict[str, bytes] = {}
        self.behaviour = Behaviour()
        self.log: list[tuple[str, str, str]] = []  # (method, path, Range)
        self.registrations: list[dict[str, Any]] = []
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                server.log.append(("GET", path, self.headers.get("Range", "")))
                b = server.behaviour
                if b.hang:
                    server._stop.wait(120)
                    return
                if b.garbage:
                    body = b"\x00\xffnot an index at all" * 10
                    self._send(200, body)
                    return
                data = b.overrides.get(path, server.files.get(path))
                if data is None:
                    self._send(404, b"not found")
                    return
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in b.cut_once:
                    b.cut_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.registrations.append(body)
                if self.path == "/register" and body.get("token") == "good-token":
                    self._send(200, b"{}")
                else:
                    self._send(400, b"unknown registration token")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.directory / "server.pem", pki.directory / "server.key")
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://{host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, pki: PKI, releases: list[tuple[dict[str, Any], dict[str, bytes]]]) -> bytes:
        """Serve these releases (newest first): their files and a signed index."""
        self.files = {}
        for rel, files in releases:
            for name, data in files.items():
                self.files[f"/{rel['version']}/{name}"] = data
        content = json.dumps({"format": "1.0", "updates": [r for r, _ in releases]}).encode()
        self.files["/index.json"] = content
        self.files["/index.sjson"] = sign(pki, content)
        return content

    def close(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class ConnectProxy:
    """An HTTP proxy that only tunnels (CONNECT), and remembers where to."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                client.close()
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode()
        method, target, _ = line.split(" ", 2)
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)), timeout=30)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.listener.close()


class FakeOperationsCenter:
    """Operations Center's provisioning routes as the provider uses them (loopback, TLS
    by the test CA): servers registration with a token, the update list, its files."""

    def __init__(self, pki: PKI, token: str, updates: list[dict[str, Any]],
                 files: dict[str, dict[str, bytes]]) -> None:  # fmt: skip
        self.registered: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, status: int, metadata: Any, error: str = "") -> None:
                doc = {"type": "sync" if status == 200 else "error", "status": "Success",
                       "status_code": status, "error": error, "metadata": metadata}  # fmt: skip
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                # The token as Operations Center reads it: the query, decoded.
                path, _, query = self.path.partition("?")
                if path == "/1.0/provisioning/servers" and parse_qs(query) == {"token": [token]}:
                    outer.registered.append(body)
                    self._json(200, {"client_certificate": ""})
                else:
                    self._json(403, None, "not authorized")

            def do_GET(self) -> None:
                path = self.path
                if path == "/1.0/provisioning/updates?recursion=1":
                    self._json(200, updates)
                    return
                for u in updates:
                    prefix = f"/1.0/provisioning/updates/{u['uuid']}/files"
                    if path == prefix:
                        entries = [
                            file_entry(n, d, "os", k)
                            for (n, d), k in zip(files[u["uuid"]].items(), OS_TYPES, strict=False)
                        ]
                        self._json(200, entries)
                        return
                    if path.startswith(prefix + "/"):
                        data = files[u["uuid"]][path[len(prefix) + 1 :]]
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                        return
                self._json(404, None, "not found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.directory / "server.pem", pki.directory / "server.key")
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def wait_until(predicate: Any, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")
