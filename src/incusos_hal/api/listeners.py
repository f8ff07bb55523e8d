"""The API's listeners: every connection from accept to close, so that peers who have not
authenticated can never starve those who have.

- Unix socket: the peer's uid (SO_PEERCRED) is checked at accept. Root and the listed uids
  are authenticated there and then; any other peer is answered 403 at once, without a
  byte of its request read, and closed as soon as it has sent its request (a second at
  most), so it never holds a descriptor while idle.
- TCP: TLS is started here (`loop.start_tls`) rather than by the listener, so the raw
  connection is in hand during the handshake and can be closed. A connection is
  authenticated when its handshake ends with a trusted client certificate; one without
  (it gets its readable 403 per request) stays pending for its whole life.
- Pending connections are bounded, in all and per source (an IPv4 address, an IPv6 /64,
  a uid). A new one beyond a bound closes the oldest pending one of its source, or of
  all, instead of being refused: whoever holds many idle connections cannot keep a new
  authorised peer out, since its own connection is the newest.
- Deadlines: the TLS handshake; the first complete request header, counted from accept
  (or the handshake's end); the keep-alive idle time between requests (aiohttp's
  keepalive_timeout, set by the caller from the same Limits).
- The defaults scale with the descriptors the process may open (`raise_nofile`): pending
  connections can take an eighth of them at most, the rest stay for authorised peers
  and the work. Each is settable through the environment (tests use short deadlines).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import resource
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from . import auth
from . import envelope as env

log = logging.getLogger("incusos_hal.api")

# Limits field -> the environment variable that overrides it.
ENVIRONMENT = {
    "handshake_seconds": "INCUSOS_HAL_TLS_HANDSHAKE_TIMEOUT",
    "header_seconds": "INCUSOS_HAL_HEADER_TIMEOUT",
    "idle_seconds": "INCUSOS_HAL_IDLE_TIMEOUT",
    "max_pending": "INCUSOS_HAL_MAX_PENDING",
    "max_pending_per_source": "INCUSOS_HAL_MAX_PENDING_PER_SOURCE",
}
NUMBER = re.compile(r"[0-9]{1,6}(\.[0-9]{1,3})?")
# How long a refused unix peer may take to send its request (answered already) before
# its connection is closed.
REFUSED_LINGER_SECONDS = 1.0
# The listen queue's length is also how many connections asyncio accepts in one go,
# before any of them reaches the guard: part of the descriptors pending peers can hold.
MAX_BACKLOG = 128


@dataclass(frozen=True, slots=True)
class Limits:
    handshake_seconds: float = 10.0
    header_seconds: float = 10.0
    idle_seconds: float = 60.0
    max_pending: int = 1024
    max_pending_per_source: int = 128


def limits_from(environ: Mapping[str, str], nofile: int) -> Limits:
    """The defaults for `nofile` descriptors, with the environment's overrides; a value
    that is not a positive number (ASCII digits, an optional fraction for seconds) is
    refused naming its variable."""
    max_pending = max(16, min(1024, nofile // 8))
    values: dict[str, Any] = {
        "max_pending": max_pending,
        "max_pending_per_source": max(4, max_pending // 8),
    }
    for f in fields(Limits):
        name = ENVIRONMENT[f.name]
        text = environ.get(name)
        if text is None:
            continue
        count = f.name.startswith("max_")
        value: float = 0
        if NUMBER.fullmatch(text) and not (count and "." in text):
            value = int(text) if count else float(text)
        if value <= 0:
            kind = "a whole number" if count else "a number of seconds"
            raise ValueError(f"{name}={text!r}: must be {kind} above 0")
        values[f.name] = value
    return Limits(**values)


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (the unit's LimitNOFILE= sets both; a
    manual `incusos-hal serve` gets the same) and return the soft limit then in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, e)
        return soft
    return target


def source_of(peer: Any) -> str:
    """What one party holds many of: an IPv4 address, an IPv6 /64 (the usual smallest
    allocation), an IPv4-mapped IPv6 address as its IPv4 one."""
    try:
        address = ipaddress.ip_address(str(peer[0]).partition("%")[0])
    except (TypeError, ValueError, IndexError):
        return "?"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


class Connection(asyncio.Protocol):
    """One accepted connection: the transport's protocol for its whole life, passing
    everything on to aiohttp's handler once it has one (so the guard sees it end)."""

    def __init__(self, guard: Guard, tls: ssl.SSLContext | None) -> None:
        self.guard = guard
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.handler: RequestHandler | None = None
        self.source = ""
        self.deadline: asyncio.TimerHandle | None = None
        # Data the TLS layer passes on between the handshake's end and the hand-over.
        self.early: list[bytes] = []
        self.eof = False
        self.refused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        try:
            self.guard.accepted(self)
        except Exception:  # whatever it was, this connection goes, the listener stays
            log.exception("accepting a connection failed")
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)
        elif not self.refused:
            self.early.append(data)

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            self.handler.eof_received()
        else:
            self.eof = True
        return None  # the transport then closes, as with aiohttp's handler alone

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.guard.forget(self)
        if self.handler is not None:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def close(self) -> None:
        """Closed by the guard (a deadline, or a newer pending connection): at once, no
        TLS shutdown exchange to wait for."""
        self.closed = True
        self.guard.unpend(self)
        if self.transport is not None:
            self.transport.abort()


class Guard:
    """The connections of every listener, and the bounds and deadlines on them."""

    def __init__(
        self,
        server: web.Server,
        limits: Limits,
        *,
        uid_allowed: Callable[[int], bool],
        trusted: Callable[[bytes | None], bool],
    ) -> None:
        self.server = server
        self.limits = limits
        self._uid_allowed = uid_allowed
        self._trusted = trusted
        # Pending connections, oldest first (dicts keep insertion order), in all and by
        # source.
        self.pending: dict[Connection, None] = {}
        self._sources: dict[str, dict[Connection, None]] = {}
        self._by_handler: dict[RequestHandler, Connection] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._handshakes: set[asyncio.Task[None]] = set()
        # Peers that have not authenticated hold at most max_pending descriptors, plus
        # one accept burst not yet seen, plus one of those closed but not yet released.
        self.backlog = max(8, min(MAX_BACKLOG, limits.max_pending // 2))
        make_request = server.request_factory

        def request_factory(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> BaseRequest:
            # A request's header is complete: the first one ends the header deadline.
            conn = self._by_handler.get(protocol)
            if conn is not None and conn.deadline is not None:
                conn.deadline.cancel()
                conn.deadline = None
            return make_request(message, payload, protocol, writer, task)

        server.request_factory = request_factory

    async def listen_unix(self, sock: socket.socket) -> None:
        """Serve on the unix socket (made by the caller, or handed over by systemd)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Connection(self, None), sock=sock, backlog=self.backlog
        )
        self._servers.append(server)

    async def listen_tls(self, host: str | None, port: int, tls: ssl.SSLContext) -> None:
        """HTTPS with client certificates on host:port (host None: every address)."""
        loop = asyncio.get_running_loop()
        if host == "::":
            # IncusOS's "[::]:8443" takes IPv4 clients too (Go listens dual-stack there);
            # asyncio's own IPv6 sockets are IPv6-only, which left a machine reached over
            # IPv4 (qemu's user network, most LANs) with no API at all.
            server = await loop.create_server(
                lambda: Connection(self, tls), sock=dual_stack_socket(port, self.backlog)
            )
        else:
            server = await loop.create_server(
                lambda: Connection(self, tls), host, port, backlog=self.backlog
            )
        self._servers.append(server)

    async def close(self) -> None:
        """Stop listening and close what has not authenticated (aiohttp's runner closes
        the rest)."""
        for server in self._servers:
            server.close()
        for task in self._handshakes:
            task.cancel()
        for conn in list(self.pending):
            conn.close()
        self._servers.clear()

    # -- the life of a connection -------------------------------------------------------

    def accepted(self, conn: Connection) -> None:
        transport = conn.transport
        assert transport is not None
        sock = transport.get_extra_info("socket")
        if conn.tls is None:
            if sock is None or sock.family != socket.AF_UNIX:
                conn.close()  # a socket handed over that is not a unix one: nobody's
                return
            uid = auth.peer_credentials(sock).uid
            if self._uid_allowed(uid):
                self._hand_over(conn, transport)
            else:
                self._refuse(conn, transport, uid)
            return
        self._pend(conn, source_of(transport.get_extra_info("peername")))
        transport.pause_reading()  # nothing is read before the TLS layer takes over
        task = asyncio.get_running_loop().create_task(self._handshake(conn, conn.tls))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: Connection, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        raw = conn.transport
        assert raw is not None
        try:
            wrapped = await loop.start_tls(
                raw,
                conn,
                tls,
                server_side=True,
                ssl_handshake_timeout=self.limits.handshake_seconds,
            )
        except Exception:  # ssl.SSLError, ConnectionAbortedError (the timeout), resets
            # Failed, timed out or the peer went: start_tls has closed the transport,
            # and the connection was never the handler's.
            self.unpend(conn)
            return
        if wrapped is None or conn.closed or wrapped.is_closing():
            self.unpend(conn)  # closed while the handshake ended
            return
        conn.transport = wrapped
        ssl_object = wrapped.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if self._trusted(der):
            self.unpend(conn)
        self._hand_over(conn, wrapped)

    def _hand_over(self, conn: Connection, transport: asyncio.Transport) -> None:
        handler = self.server()
        conn.handler = handler
        self._by_handler[handler] = conn
        handler.connection_made(transport)
        conn.deadline = asyncio.get_running_loop().call_later(
            self.limits.header_seconds, conn.close
        )
        early, conn.early = conn.early, []
        for data in early:
            handler.data_received(data)
        if conn.eof:
            handler.eof_received()

    def _refuse(self, conn: Connection, transport: asyncio.Transport, uid: int) -> None:
        """The answer the authenticate middleware would give, without reading the request
        or making a handler; the peer can read it, then the connection goes."""
        conn.refused = True
        self._pend(conn, f"uid {uid}")
        if conn.closed:
            return
        error = env.error(403, f"not authorized: uid {uid} may not use this socket")
        body = json.dumps(error, separators=(",", ":")).encode()
        head = (
            "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        transport.write_eof()
        conn.deadline = asyncio.get_running_loop().call_later(REFUSED_LINGER_SECONDS, conn.close)

    def _pend(self, conn: Connection, source: str) -> None:
        conn.source = source
        same = self._sources.setdefault(source, {})
        same[conn] = None
        self.pending[conn] = None
        if len(same) > self.limits.max_pending_per_source:
            next(iter(same)).close()
        if len(self.pending) > self.limits.max_pending:
            next(iter(self.pending)).close()

    def unpend(self, conn: Connection) -> None:
        """No longer pending: authenticated, or gone."""
        if conn in self.pending:
            del self.pending[conn]
            same = self._sources[conn.source]
            del same[conn]
            if not same:
                del self._sources[conn.source]

    def forget(self, conn: Connection) -> None:
        self.unpend(conn)
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None
        if conn.handler is not None:
            self._by_handler.pop(conn.handler, None)


def dual_stack_socket(port: int, backlog: int) -> socket.socket:
    """A listening socket on every IPv6 and IPv4 address (`[::]:port`)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
