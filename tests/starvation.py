"""Peers that hold connections and never authenticate, and an authorised request timed
while they do: shared by tests/test_api_connections.py and `ci/bench --starvation`."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Run as another uid (setpriv): open `count` connections to the unix socket, say how many
# were open, then hold them until stdin closes.
HOLD_UNIX = """
import socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
held = []
end = time.monotonic() + 60
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    while True:
        try:
            s.connect(path)
            break
        except BlockingIOError:  # the listen queue is full: wait for the server to accept
            if time.monotonic() > end:
                raise
            time.sleep(0.005)
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def raise_nofile(needed: int) -> None:
    """This process (and what it starts) may open `needed` descriptors, or the caller
    learns why not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} < {needed}: raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@contextlib.contextmanager
def idle_tcp(port: int, count: int, sources: int = 40) -> Iterator[list[socket.socket]]:
    """`count` TCP connections that never start TLS, from `sources` loopback addresses
    (127.0.1.x: the kernel routes all of 127/8 to lo), held until the block ends."""
    held: list[socket.socket] = []
    try:
        for i in range(count):
            s = socket.socket()
            s.bind((f"127.0.1.{i % sources + 1}", 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            held.append(s)
        yield held
    finally:
        for s in held:
            s.close()


@contextlib.contextmanager
def idle_unix_as(uid: int, path: Path, count: int) -> Iterator[int]:
    """`count` unix connections from a process running as `uid`, held until the block
    ends; yields how many it opened."""
    proc = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
         sys.executable, "-c", HOLD_UNIX, str(path), str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the holder failed: {proc.stderr.read() if proc.stderr else ''}")
        yield int(line)
    finally:
        proc.stdin.close()
        proc.wait(30)


def _exchange(sock: socket.socket, path: str) -> int:
    """One request on a fresh connection; the response's status."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: ihal\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    status_line = data.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) > 1 else 0


def timed_unix(path: Path, request: str = "/1.0") -> tuple[int, float]:
    """(status, seconds) of an authorised request over the unix socket, connect included."""
    start = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(os.fspath(path))
        status = _exchange(s, request)
    return status, time.monotonic() - start


def tls_client(cert: Path, key: Path, server_cert: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=server_cert)
    ctx.check_hostname = False  # the certificate names the machine, not 127.0.0.1
    ctx.load_cert_chain(cert, key)
    return ctx


def timed_tls(port: int, ctx: ssl.SSLContext, request: str = "/1.0") -> tuple[int, float]:
    """(status, seconds) of a request over mutual TLS, connect and handshake included."""
    start = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        ctx.wrap_socket(raw) as s,
    ):
        status = _exchange(s, request)
    return status, time.monotonic() - start


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
