"""HTTP(S) for updates: small documents read whole (bounded), files downloaded resumably
and verified. The edge of this package that touches the network.

Everything is bounded: connecting and every read wait at most `read_timeout` seconds, a
whole request at most its deadline, a document at most its byte limit, a file exactly
the size the signed index gives (a server that sends more is cut off). A download goes to
`<name>.part` beside its destination; a cut connection resumes with an HTTP Range request
from where it stopped (the bytes kept are hashed again, not trusted); only a file whose
size and SHA-256 match the signed index is renamed into place.

The proxy is the network section's (the same choice the services get in their
environment: one server, or direct for the no_proxy destinations); HTTPS goes through it
with CONNECT. TLS trusts the system's store plus the security section's custom CAs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 1 << 16
MAX_ATTEMPTS = 5
USER_AGENT = "incusos-hal-update"


class FetchError(Exception):
    """A request that did not give what was asked: the reason, safe to show (no
    credentials: URLs in messages never carry them)."""


@dataclass(frozen=True, slots=True)
class Transport:
    proxy: str | None = None  # http://[user:pass@]host:port, or None for direct
    no_proxy: tuple[str, ...] = ()
    extra_cas: tuple[str, ...] = ()  # PEM, trusted beside the system's store
    read_timeout: float = 30.0
    deadline: float = 600.0  # seconds for one document or one file
    use_system_store: bool = True
    client_cert: tuple[Path, Path] | None = None  # (certificate, key) for TLS client auth


def _context(transport: Transport) -> ssl.SSLContext:
    context = ssl.create_default_context() if transport.use_system_store else None
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # A pinned server certificate is trusted as itself, not only as a CA's child.
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    if transport.extra_cas:
        context.load_verify_locations(cadata="\n".join(transport.extra_cas))
    if transport.client_cert is not None:
        context.load_cert_chain(*transport.client_cert)
    return context


def _bypass(host: str, no_proxy: tuple[str, ...]) -> bool:
    host = host.lower().strip("[]")
    for entry in no_proxy:
        entry = entry.lower().strip()
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                    return True
            continue
        bare = entry.lstrip(".")
        if host == bare or host.endswith("." + bare):
            return True
    return False


def safe_url(url: str) -> str:
    """A URL as messages show it: no credentials, no query (a token may be there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise FetchError(f"{what}: no answer in time")


def _connect(
    transport: Transport, url: str, deadline: _Deadline
) -> tuple[http.client.HTTPConnection, str]:
    """A connection for `url` (through the proxy when it applies) and the request target."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{safe_url(url)}: not an http(s) URL")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    timeout = max(0.1, min(transport.read_timeout, deadline.left()))
    proxy = transport.proxy if not _bypass(host, transport.no_proxy) else None
    conn: http.client.HTTPConnection
    if proxy is None:
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=_context(transport)
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        return conn, target
    p = urlsplit(proxy)
    if p.scheme != "http" or not p.hostname:
        raise FetchError("the update client reaches proxies over plain http:// only")
    headers = {}
    if p.username is not None:
        pair = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode()
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            p.hostname, p.port or 80, timeout=timeout, context=_context(transport)
        )
        conn.set_tunnel(host, port, headers=headers)
        return conn, target
    # Plain HTTP through a proxy: the absolute URL (the credentials go with the request).
    return http.client.HTTPConnection(p.hostname, p.port or 80, timeout=timeout), url


def _request(
    transport: Transport,
    url: str,
    deadline: _Deadline,
    headers: dict[str, str],
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn, target = _connect(transport, url, deadline)
    all_headers = {"User-Agent": USER_AGENT, **headers}
    if transport.proxy and target == url:
        p = urlsplit(transport.proxy)
        if p.username is not None:
            pair = f"{unquote(p.username)}:{unquote(p.password or '')}".encode()
            all_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(pair).decode()
    try:
        conn.request(method, target, body=body, headers=all_headers)
        response = conn.getresponse()
    except ssl.SSLCertVerificationError as e:
        conn.close()
        raise FetchError(
            f"{safe_url(url)}: TLS certificate not trusted: {e.verify_message}"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise FetchError(f"{safe_url(url)}: {_describe(e)}") from None
    return conn, response


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "no answer in time"
    if isinstance(e, http.client.IncompleteRead):
        return "the connection was cut"
    if isinstance(e, http.client.InvalidURL):
        return "not a valid URL"  # http.client's text repeats the query (a token)
    text = str(e) or type(e).__name__
    return text[:200]


def get(
    transport: Transport,
    url: str,
    max_bytes: int,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """A whole small document: its status and body, at most `max_bytes`."""
    status, data, _headers = get_full(
        transport, url, max_bytes, method=method, body=body, headers=headers
    )
    return status, data


def get_full(
    transport: Transport,
    url: str,
    max_bytes: int,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    """`get`, with the answer's headers (names in lower case)."""
    deadline = _Deadline(transport.deadline)
    conn, response = _request(transport, url, deadline, headers or {}, method, body)
    try:
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(f"{safe_url(url)}: larger than {max_bytes} bytes")
        chunks: list[bytes] = []
        got = 0
        while True:
            deadline.check(safe_url(url))
            try:
                chunk = response.read1(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise FetchError(f"{safe_url(url)}: {_describe(e)}") from None
            if not chunk:
                break
            got += len(chunk)
            if got > max_bytes:
                raise FetchError(f"{safe_url(url)}: larger than {max_bytes} bytes")
            chunks.append(chunk)
        answer = {k.lower(): v for k, v in response.getheaders()}
        return response.status, b"".join(chunks), answer
    finally:
        conn.close()


Progress = Callable[[int, int], None]  # (bytes so far, total)


def download(
    transport: Transport,
    url: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    progress: Progress | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """`dest`, holding exactly the `size` bytes whose SHA-256 is `sha256`, or FetchError
    with nothing at `dest` (the `.part` stays for the next attempt to resume, unless it
    proved wrong)."""
    part = dest.with_name(dest.name + ".part")
    deadline = _Deadline(transport.deadline)
    last_error = ""
    for _attempt in range(MAX_ATTEMPTS):
        deadline.check(safe_url(url))
        try:
            done = _attempt_download(transport, url, part, size, deadline, progress, headers)
        except _Retry as e:
            last_error = str(e)
            continue
        if done:
            break
    else:
        raise FetchError(f"{safe_url(url)}: {last_error or 'incomplete'} ({MAX_ATTEMPTS} attempts)")
    digest = _hash_file(part)
    if os.path.getsize(part) != size or digest != sha256:
        part.unlink(missing_ok=True)
        raise FetchError(
            f"{dest.name}: SHA-256 {digest} differs from the signed index's {sha256}; "
            "the file was deleted"
        )
    os.replace(part, dest)


class _Retry(Exception):
    """A cut connection or a timeout mid-body: resume from what was kept."""


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _attempt_download(
    transport: Transport,
    url: str,
    part: Path,
    size: int,
    deadline: _Deadline,
    progress: Progress | None,
    headers: dict[str, str] | None,
) -> bool:
    have = part.stat().st_size if part.exists() else 0
    if have > size:  # longer than the index says: cannot be right
        part.unlink()
        have = 0
    if have == size:
        return True
    wanted = dict(headers or {})
    if have:
        wanted["Range"] = f"bytes={have}-"
    try:
        conn, response = _request(transport, url, deadline, wanted)
    except FetchError as e:
        raise _Retry(str(e).split(": ", 1)[-1]) from None
    try:
        if response.status == 206 and have:
            content_range = response.getheader("Content-Range", "")
            if not content_range.startswith(f"bytes {have}-"):
                raise FetchError(f"{safe_url(url)}: the server resumed at the wrong place")
            mode = "ab"
        elif response.status == 200:
            have, mode = 0, "wb"  # no Range support: from the start
        elif response.status == 416 and have:
            part.unlink()
            raise _Retry("the server refused to resume")
        else:
            raise FetchError(f"{safe_url(url)}: HTTP {response.status} {response.reason}"[:200])
        declared = response.getheader("Content-Length")
        if declared is not None and declared.isdigit() and have + int(declared) > size:
            raise FetchError(f"{safe_url(url)}: larger than the {size} bytes the index gives")
        with open(part, mode) as f:
            while True:
                if deadline.left() <= 0:
                    raise FetchError(f"{safe_url(url)}: not downloaded in time")
                try:
                    chunk = response.read1(CHUNK)
                except (OSError, http.client.HTTPException) as e:
                    raise _Retry(_describe(e)) from None
                if not chunk:
                    break
                have += len(chunk)
                if have > size:
                    f.close()
                    part.unlink()
                    raise FetchError(
                        f"{safe_url(url)}: larger than the {size} bytes the index gives"
                    )
                f.write(chunk)
                if progress is not None:
                    progress(have, size)
        if have < size:
            raise _Retry("the connection was cut")
        return True
    finally:
        conn.close()
