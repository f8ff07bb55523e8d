"""The pieces of HTTP every route module shares: the route table's row, the service's
application key, Incus's JSON answers, and the URL prefix a client sees (IncusOS's
`/os`). Its own module so that route modules (`debug`) and the server both import it
without importing each other."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import envelope as env
from .service import Service

PROXY_HEADER = "X-IncusOS-Proxy"
# A path segment of the prefix: URL-safe, and not "." or "..".
PROXY_SEGMENT = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._~-]{1,64}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVICE_KEY = web.AppKey("service", Service)


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: str = ""  # "": none; "section": {config, state}; "archive": tar.gz
    built: bool = True
    names: tuple[str, ...] = ()  # the values {name} takes
    operation: bool = False  # answers 202 with an operation (Incus's async)
    # Server-side statuses the route answers by design (503: ZFS unavailable), with why;
    # the OpenAPI description declares them, so a client (and the schema test) expects them.
    failures: tuple[tuple[int, str], ...] = ()


def _respond(
    data: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return _json_bytes(_dumps(data).encode(), status, headers)


def _json_bytes(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # What web.json_response sends, without its text-to-bytes round of the body.
    return web.Response(
        body=body, status=status, headers=headers, content_type="application/json", charset="utf-8"
    )


# Made once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dumps(data: Any) -> str:
    """JSON as RFC 8259 has it: a NaN or an infinity is an error here (a 500 the journal
    explains), never the `NaN`/`Infinity` tokens that no JSON parser has to accept."""
    return _ENCODER.encode(data)


def sync(metadata: Any, headers: dict[str, str] | None = None) -> web.Response:
    return _respond(env.sync(metadata), headers=headers)


OS_PREFIX = "/os"


def _prefix(request: web.Request) -> str:
    """The prefix of the URLs in an answer, as IncusOS's getAPIRoot makes it.

    Over HTTPS it is always /os: IncusOS's own TLS listener sets X-IncusOS-Proxy to /os
    (and takes paths with or without it). On the unix socket the peer is a local
    reverse proxy the admin put in front: Incus's /os proxy adds "/os" to whatever the
    client sent, and IncusOS reads the header's first value (Go's Header.Get), so a
    client's own `X-IncusOS-Proxy: /` wins and lists read /1.0/..."""
    if request.get("listener") == "https":
        return OS_PREFIX
    values = request.headers.getall(PROXY_HEADER, [])
    value = values[0] if values else ""
    segments = value.strip("/").split("/")
    if value.startswith("/") and all(PROXY_SEGMENT.fullmatch(s) for s in segments):
        return "/" + "/".join(segments)
    return ""


def url(request: web.Request, path: str) -> str:
    return _prefix(request) + path
