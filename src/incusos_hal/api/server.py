"""The aiohttp application: routes, authentication, the envelope, listeners.

Every route sits behind `authenticate`: a unix-socket peer must be root or a listed uid
(SO_PEERCRED); an HTTPS peer must present a client certificate whose fingerprint is
trusted. There is no anonymous route. Errors of every kind leave as Incus error
envelopes; an unexpected exception is a 500 whose message is generic (the journal gets
the trace, the client no internals).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import socket
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from ..config import MAX_DOCUMENT_BYTES, Config
from ..core.tls import fingerprint_der
from ..sections import SECTIONS
from ..sections.base import Action, Refused, Section
from ..services import SERVICES, SystemService
from ..services import supported as supported_services
from ..state.paths import SOCKET
from . import applications, auth, backup, debug, listeners
from . import envelope as env
from .http import (
    OS_PREFIX,
    SERVICE_KEY,
    Handler,
    Route,
    _dumps,
    _json_bytes,
    _respond,
    sync,
    url,
)
from .operations import Events, Operations, Progress
from .service import ApiError, Service, Settings
from .state import NetworkStateCache

log = logging.getLogger("incusos_hal.api")

DEFAULT_SOCKET = SOCKET
EVENT_TYPES = frozenset({"operation", "logging"})

OPERATIONS_KEY = web.AppKey("operations", Operations)
EVENTS_KEY = web.AppKey("events", Events)
TRUST_KEY = web.AppKey("trust", auth.TrustStore)
NETWORK_KEY = web.AppKey("network", NetworkStateCache)
# The last GET /1.0/system/network answer: [config, state it was made from, bytes].
NETWORK_BODY_KEY = web.AppKey("network-body", list)
# The last GET /1.0 answer: [environment, bytes].
ROOT_BODY_KEY = web.AppKey("root-body", list)


# -- helpers ------------------------------------------------------------------------------


async def _json_body(request: web.Request) -> Any:
    data = await request.read()
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _query_int(request: web.Request, name: str, default: str, low: int, high: int) -> int:
    """An integer query parameter in low..high. ASCII digits only: str.isdigit() and
    int() also take other scripts' digits (and `²`, which int() then refuses)."""
    text = request.query.get(name, default)
    if not re.fullmatch(r"-?[0-9]{1,10}", text, re.ASCII) or not low <= int(text) <= high:
        raise ApiError(400, f"{name}: must be an integer in {low}..{high}")
    return int(text)


def _not_built(what: str) -> ApiError:
    return ApiError(501, f"{what} is not built in this version of incusos-hal")


# -- authentication and errors ------------------------------------------------------------

# Who is at the other end of each open connection: ("unix", uid), ("https", the client
# certificate's fingerprint or None), or ("", None) for any other transport. Read once
# per connection: SO_PEERCRED is fixed at connect time and a TLS 1.3 peer's certificate
# at the handshake (no renegotiation; no post-handshake authentication is asked for).
# Only the identity is kept: whether it is admitted is decided on every request, against
# the config and trust store of that moment.
_PEERS: weakref.WeakKeyDictionary[asyncio.BaseTransport, tuple[str, Any]] = (
    weakref.WeakKeyDictionary()
)


def _peer(transport: asyncio.BaseTransport) -> tuple[str, Any]:
    peer = _PEERS.get(transport)
    if peer is None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            peer = ("https", None if der is None else fingerprint_der(der))
        else:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.family == socket.AF_UNIX:
                peer = ("unix", auth.peer_credentials(sock).uid)
            else:
                peer = ("", None)
        _PEERS[transport] = peer
    return peer


def _refusal(request: web.Request) -> web.Response | None:
    """The 403 for a peer not admitted now, or None."""
    transport = request.transport
    if transport is None:
        raise web.HTTPForbidden()
    listener, who = _peer(transport)
    request["listener"] = listener
    if listener == "https":
        trust = request.app.get(TRUST_KEY)
        if trust is None or not trust.trusts(who):
            return _respond(env.error(403, "not authorized: no trusted client certificate"), 403)
    elif listener == "unix":
        if not auth.uid_allowed(who, request.app[SERVICE_KEY].config().listener.socket_uids):
            message = f"not authorized: uid {who} may not use this socket"
            return _respond(env.error(403, message), 403)
    else:
        return _respond(env.error(403, "not authorized"), 403)
    return None


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, then the handler, every error as an Incus error envelope. One
    middleware, not two: each is a coroutine layer on every request."""
    try:
        refused = _refusal(request)
        if refused is not None:
            return refused
        return await handler(request)
    except ApiError as e:
        return _respond(env.error(e.status, e.message), e.status)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(str(e.status)) else e.reason
        return _respond(env.error(e.status, message), e.status)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return _respond(env.error(500, "internal error (details in the service's journal)"), 500)


# -- routes -------------------------------------------------------------------------------


async def get_root(request: web.Request) -> web.Response:
    return sync([url(request, "/1.0")])


async def get_10(request: web.Request) -> web.Response:
    # The answer changes with the uptime's second (or the hostname): its bytes are kept
    # for as long as the environment they were made from is equal to the current one.
    environment = request.app[SERVICE_KEY].environment()
    kept = request.app[ROOT_BODY_KEY]
    if not kept or kept[0] != environment:
        kept[:] = [environment, _dumps(env.sync({"environment": environment})).encode()]
    return _json_bytes(kept[1])


async def get_system(request: web.Request) -> web.Response:
    # Exactly the eight areas IncusOS lists (not its fallback listener); those not built
    # yet answer 501 with the reason.
    names = {*(row.name for row in SECTIONS if row.listed), "resources"}
    return sync([url(request, f"/1.0/system/{n}") for n in sorted(names)])


async def _get_section(request: web.Request, name: str) -> web.Response:
    svc = request.app[SERVICE_KEY]
    config = svc.config()
    section, tag = svc.section(name, config)
    if name == "network":
        return await _get_network(request, config, section, tag)
    state = await svc.run_in_thread(lambda: svc.table_row(name).read_state(svc))
    return sync({"config": section, "state": state}, {"ETag": tag})


async def _get_network(
    request: web.Request, config: Config, section: Any, tag: str
) -> web.Response:
    """The hot GET: between changes (of the stored document, or of links and addresses
    as rtnetlink reports them) the answer's bytes are the same, so they are kept."""
    svc, network = request.app[SERVICE_KEY], request.app[NETWORK_KEY]
    pending = svc.pending_seconds()
    kept = request.app[NETWORK_BODY_KEY]
    if pending is None and kept and kept[0] is config and network.fresh(config) is kept[1]:
        return web.Response(body=kept[2], content_type="application/json", headers={"ETag": tag})
    state = network.fresh(config)
    if state is None:
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(None, network.read, config)
    metadata = {
        "config": section,
        "state": {
            **state,
            "configuration_in_process": pending is not None,
            **({"confirmation_seconds_left": round(pending, 1)} if pending is not None else {}),
        },
    }
    body = _dumps(env.sync(metadata)).encode()
    request.app[NETWORK_BODY_KEY][:] = [config, state, body] if pending is None else []
    return web.Response(body=body, content_type="application/json", headers={"ETag": tag})


async def _put_section(request: web.Request, name: str) -> web.Response:
    svc = request.app[SERVICE_KEY]
    body = await _json_body(request)
    await svc.put_section(name, body, request.headers.get("If-Match"))
    return sync({})


def section_routes(row: Section) -> list[Route]:
    """GET and PUT of a section's {config, state}, and a POST per action it has."""

    async def get(request: web.Request) -> web.Response:
        return await _get_section(request, row.name)

    async def put(request: web.Request) -> web.Response:
        return await _put_section(request, row.name)

    routes = [
        Route("GET", row.path, get, row.summary),
        Route(
            "PUT",
            row.path,
            put,
            f"replace the {row.name} configuration",
            body="section",
            failures=row.put_failures,
        ),
    ]
    return routes + [action_route(row, action) for action in row.actions]


def action_route(row: Section, action: Action) -> Route:
    async def post(request: web.Request) -> web.Response:
        body = await _json_body(request) if request.can_read_body else None
        try:
            return sync(await action.run(request.app[SERVICE_KEY], body))
        except Refused as e:  # a section's refusal, in its own status and words
            raise ApiError(e.status, e.message) from None

    return Route(
        "POST", f"{row.path}/:{action.name}", post, action.summary, failures=action.failures
    )


async def get_resources(request: web.Request) -> web.Response:
    from ..inventory import scan

    root = request.app[SERVICE_KEY].settings.root
    doc = await asyncio.get_running_loop().run_in_executor(None, scan, root)
    return sync(doc)


async def post_backup(request: web.Request) -> web.Response:
    data = await asyncio.get_running_loop().run_in_executor(None, request.app[SERVICE_KEY].backup)
    return web.Response(body=data, content_type="application/gzip")


async def post_restore(request: web.Request) -> web.Response:
    """Checked whole here (a bad archive is a 400 at once); swapped in and applied as
    an operation, since applying can take a while."""
    data = await request.read()
    if not data:
        raise ApiError(400, "no archive in the request body")
    skip = tuple(s for s in request.query.get("skip", "").split(",") if s)
    svc = request.app[SERVICE_KEY]
    # Off the event loop: reading is bounded (backup.py), parsing the documents is not free.
    files = await asyncio.get_running_loop().run_in_executor(None, svc.check_restore, data, skip)
    if svc.pending is not None:
        raise ApiError(409, "a network change is waiting for its confirmation")

    async def work(progress: Progress) -> None:
        await svc.restore(files, progress)

    op = request.app[OPERATIONS_KEY].start("Restoring the system state", work)
    op_url = url(request, f"/1.0/operations/{op.id}")
    return _respond(env.async_(op.to_dict(), op_url), 202, {"Location": op_url})


async def post_update_check(request: web.Request) -> web.Response:
    """IncusOS's `:check` (body `{"os_only": bool}`, optional), run as an operation whose
    metadata and /1.0/events carry its progress. `?trigger=timer` is the timer's check,
    which keeps to the maintenance windows; an operator's runs at once."""
    import datetime

    from ..update import checker

    body = await _json_body(request) if request.can_read_body else None
    if body is None:
        body = {}
    if not isinstance(body, dict) or set(body) - {"os_only"}:
        raise ApiError(400, 'the body is {"os_only": true|false}')
    os_only = body.get("os_only", False)
    if not isinstance(os_only, bool):
        raise ApiError(400, "os_only: expected a boolean")
    triggers: dict[str, checker.Trigger] = {"user": "user", "boot": "boot", "timer": "timer"}
    trigger = triggers.get(request.query.get("trigger", "user"))
    if trigger is None:
        raise ApiError(400, "trigger: expected user, boot or timer")
    svc = request.app[SERVICE_KEY]
    loop = asyncio.get_running_loop()

    async def work(progress: Progress) -> dict[str, Any]:
        def report(values: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(progress, values)

        try:
            inputs = checker.Inputs(
                config=svc.config(),
                state_dir=Path(svc.settings.state_dir),
                root=svc.settings.root,
                now=lambda: datetime.datetime.now().astimezone(),
                bounds={"read_timeout": svc.settings.update_read_timeout},
                tcti=svc.settings.tcti,
            )
        except BaseException:
            checker.release()  # the check never started: its slot is free again
            raise
        state = await loop.run_in_executor(
            None,
            lambda: checker.check(
                inputs,
                trigger,
                os_only=os_only,
                progress=report,
                reserved=True,
            ),
        )
        return state.api()

    if not checker.reserve():
        raise ApiError(409, "an update check is already running")
    try:
        op = request.app[OPERATIONS_KEY].start("Checking for updates", work)
    except BaseException:
        checker.release()
        raise
    op_url = url(request, f"/1.0/operations/{op.id}")
    return _respond(env.async_(op.to_dict(), op_url), 202, {"Location": op_url})


POWER_TARGETS = {
    ":reboot": "reboot.target",
    ":poweroff": "poweroff.target",
    ":suspend": "suspend.target",  # what `systemctl suspend` starts
}


async def post_power(request: web.Request) -> web.Response:
    target = POWER_TARGETS[request.path.rsplit("/", 1)[-1]]
    if not request.app[SERVICE_KEY].schedule(target):
        raise ApiError(503, "this service runs without systemd (a scratch target)")
    return sync({})


async def post_factory_reset(request: web.Request) -> web.Response:
    """An empty body is an empty request, as IncusOS reads it (its countWrapper)."""
    data = await request.read()
    body: Any = {}
    if data.strip():
        body = await _json_body(request)
    await request.app[SERVICE_KEY].factory_reset(body)
    return sync({})


async def get_services(request: web.Request) -> web.Response:
    # Only the services built here whose tools this machine has: each one listed answers
    # 200 (IncusOS lists its Supported() ones, and its test GETs every one).
    return sync([url(request, row.path) for row in supported_services()])


async def get_unknown_service(request: web.Request) -> web.Response:
    raise ApiError(404, f"no service {request.match_info['name']!r}")


def service_routes(row: SystemService) -> list[Route]:
    """GET and PUT of a service's {config, state}, and `:reset`; each a 404 on a machine
    without the service's tools, as IncusOS answers for a service not Supported()."""

    async def get(request: web.Request) -> web.Response:
        svc = request.app[SERVICE_KEY]
        config = svc.config()
        data, tag = svc.service_doc(row.name, config)
        machine = svc.machine()
        part = row.config_of(config.services)
        state = await svc.run_in_thread(lambda: row.read_state(machine, part))
        return sync({"config": data, "state": state}, {"ETag": tag})

    async def put(request: web.Request) -> web.Response:
        svc = request.app[SERVICE_KEY]
        svc.system_service(row.name)  # a 404 before the body is read
        body = await _json_body(request)
        await svc.put_service(row.name, body, request.headers.get("If-Match"))
        return sync({})

    async def reset(request: web.Request) -> web.Response:
        await request.app[SERVICE_KEY].reset_service(row.name)
        return sync({})

    reset_summary = (
        "connect to the targets again"
        if row.reset is not None
        else "400: this service has no reset (as on IncusOS)"
    )
    return [
        Route("GET", row.path, get, row.summary),
        Route("PUT", row.path, put, f"replace the {row.name} configuration", body="section"),
        Route("POST", f"{row.path}/:reset", reset, reset_summary),
    ]


async def get_operations(request: web.Request) -> web.Response:
    """Incus's shape: the operations' URLs by their status in lower case (`running`,
    `success`, `failure`, `cancelled`, ...), a status with none left out."""
    out: dict[str, list[str]] = {}
    for op in request.app[OPERATIONS_KEY].all():
        status = env.STATUS_TEXT[op.status_code].lower()
        out.setdefault(status, []).append(url(request, f"/1.0/operations/{op.id}"))
    return sync(out)


def _operation(request: web.Request) -> Any:
    op = request.app[OPERATIONS_KEY].get(request.match_info["id"])
    if op is None:
        raise ApiError(404, "no such operation")
    return op


async def get_operation(request: web.Request) -> web.Response:
    return sync(_operation(request).to_dict())


async def get_operation_wait(request: web.Request) -> web.Response:
    # Incus's: whole seconds, -1 (the default) for no limit; a fraction is taken too.
    # Only ASCII decimals: float() would also take nan, inf, 1e999 and other digits.
    text = request.query.get("timeout", "-1")
    if not re.fullmatch(r"-?[0-9]{1,9}(\.[0-9]{1,6})?", text, re.ASCII):
        raise ApiError(400, "timeout: must be -1 (no limit) or a number of seconds")
    timeout = float(text)
    op = _operation(request)
    await request.app[OPERATIONS_KEY].wait(op, None if timeout < 0 else min(timeout, 3600))
    return sync(op.to_dict())


async def delete_operation(request: web.Request) -> web.Response:
    op = _operation(request)
    if not request.app[OPERATIONS_KEY].cancel(op):
        raise ApiError(400, "this operation cannot be cancelled")
    return sync({})


async def get_events(request: web.Request) -> web.StreamResponse:
    types = frozenset(t for t in request.query.get("type", "operation,logging").split(",") if t)
    if not types <= EVENT_TYPES:
        raise ApiError(400, f"type: one of {', '.join(sorted(EVENT_TYPES))}")
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    events = request.app[EVENTS_KEY]
    queue = events.subscribe(types)

    async def drain() -> None:
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break

    reader = asyncio.ensure_future(drain())
    getter: asyncio.Future[str] | None = None
    try:
        while not ws.closed:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:  # the subscriber closed or went away
                break
            await ws.send_str(getter.result())
    except ConnectionError:
        # Gone mid-send (a reset, a closing transport): the usual end of a subscriber,
        # not a fault of the service's.
        log.debug("an event subscriber went away while an event was sent")
    finally:
        events.unsubscribe(queue)
        reader.cancel()
        if getter is not None:
            getter.cancel()
    return ws


async def get_openapi(request: web.Request) -> web.Response:
    from .openapi import spec

    return web.json_response(spec(ROUTES), dumps=_dumps)


def _https_only(handler: Handler) -> Handler:
    """A route under /os: IncusOS's TLS listener trims a leading /os (as Incus's /os
    proxy and the fallback listener's clients send it); its unix socket does not."""

    async def os_prefixed(request: web.Request) -> web.StreamResponse:
        if request.get("listener") != "https":
            raise web.HTTPNotFound()
        return await handler(request)

    return os_prefixed


def _unbuilt(what: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        raise _not_built(what)

    return handler


ROUTES: list[Route] = [
    Route("GET", "/", get_root, "the API versions"),
    Route("GET", "/1.0", get_10, "the server's environment"),
    Route("GET", "/1.0/openapi.json", get_openapi, "this API's OpenAPI 3 description"),
    Route("GET", "/1.0/system", get_system, "the system's sub-resources"),
    *(r for row in SECTIONS for r in section_routes(row)),
    Route(
        "GET",
        "/1.0/system/resources",
        get_resources,
        "the hardware inventory (Incus's resources API)",
    ),
    Route(
        "POST",
        "/1.0/system/update/:check",
        post_update_check,
        "check for updates now (an operation; body {os_only}, query trigger=user|boot|timer)",
        body="update-check",
        operation=True,
    ),
    Route("POST", "/1.0/system/:reboot", post_power, "reboot"),
    Route("POST", "/1.0/system/:poweroff", post_power, "power off"),
    Route("POST", "/1.0/system/:suspend", post_power, "suspend to RAM (suspend.target)"),
    Route(
        "POST", "/1.0/system/:backup", post_backup, "the state directory as a tar.gz (sensitive)"
    ),
    Route(
        "POST",
        "/1.0/system/:restore",
        post_restore,
        "replace the state directory from a backup",
        body="archive",
    ),
    Route(
        "POST",
        "/1.0/system/:factory-reset",
        post_factory_reset,
        "back to first boot, with new seeds (IncusOS's SystemReset body)",
    ),
    Route("GET", "/1.0/services", get_services, "the services"),
    *(r for row in SERVICES for r in service_routes(row)),
    Route(
        "GET",
        "/1.0/services/{name}",
        get_unknown_service,
        "any other service: 404 (not built, or its tools are not installed)",
    ),
    Route("PUT", "/1.0/services/{name}", get_unknown_service, "any other service: 404"),
    Route("POST", "/1.0/services/{name}/:reset", get_unknown_service, "any other service: 404"),
    *debug.routes(),
    *applications.routes(),
    Route("GET", "/1.0/operations", get_operations, "the operations"),
    Route("GET", "/1.0/operations/{id}", get_operation, "one operation"),
    Route("GET", "/1.0/operations/{id}/wait", get_operation_wait, "wait for an operation to end"),
    Route("DELETE", "/1.0/operations/{id}", delete_operation, "cancel an operation"),
    Route("GET", "/1.0/events", get_events, "operation and logging events (websocket)"),
]


# -- the application and its listeners -----------------------------------------------------


def make_app(service: Service, trust: auth.TrustStore | None = None) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=backup.MAX_ARCHIVE_BYTES)
    app[SERVICE_KEY] = service
    app[NETWORK_KEY] = NetworkStateCache(service.settings.root)
    app[NETWORK_BODY_KEY] = []
    app[ROOT_BODY_KEY] = []
    events = Events()
    app[EVENTS_KEY] = events
    app[OPERATIONS_KEY] = Operations(events, str(service.settings.state_dir))
    if trust is not None:
        app[TRUST_KEY] = trust
    for r in ROUTES:
        app.router.add_route(r.method, r.path, r.handler)
        for path in (OS_PREFIX + r.path.rstrip("/"), *(["/os/"] if r.path == "/" else [])):
            app.router.add_route(r.method, path, _https_only(r.handler))

    def emit(level: str, message: str) -> None:
        getattr(log, level if level != "warning" else "warning")(message)
        events.send("logging", {"message": message, "level": level, "context": {}})

    app.on_startup.append(applications.plug_into_updates)
    service.log = emit
    service.listener_active = lambda: trust is not None
    if trust is not None:
        service.on_config = lambda config: trust.update(config.listener.trusted_client_certificates)
    return app


def unix_socket(path: str) -> socket.socket:
    """A listening socket at `path`, created 0600 (bound under a 0077 umask, so there is
    no moment where another user could connect)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    with _suppress_missing():
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is FileNotFoundError


def _trust_store(settings: Settings, config: Config) -> auth.TrustStore | None:
    """The HTTPS side's certificates, or None when they cannot be had: then only the
    unix socket serves (root must always be answered), and the journal says why."""
    try:
        cert, key = auth.ensure_server_certificate(settings.state_dir)
        return auth.TrustStore(cert, key, config.listener.trusted_client_certificates)
    except Exception as e:  # an OSError, an SSLError: whatever it is, not fatal
        log.error("HTTPS is not served, the server certificate cannot be used: %s", e)
        return None


async def serve(
    settings: Settings,
    *,
    socket_path: str = DEFAULT_SOCKET,
    listen: str = "",
    systemd: Any = None,
    ready: Callable[[], None] = lambda: None,
    sockets: list[socket.socket] | None = None,
    limits: listeners.Limits | None = None,
) -> None:
    """Serve until cancelled (or SIGTERM). `limits` bound the connections that have not
    authenticated and the deadlines of every connection; by default they scale with the
    open-files limit, raised to its hard limit first, and the environment may override
    each (listeners.ENVIRONMENT)."""
    from ..config.formats import split_host_port
    from .service import ensure_state_dir

    nofile = listeners.raise_nofile()
    limits = limits or listeners.limits_from(os.environ, nofile)
    ensure_state_dir(settings.state_dir)
    service = Service(settings, systemd)
    config = service.config()
    listen = listen or config.listener.listen_address
    trust = None
    if listen:
        trust = _trust_store(settings, config)
    app = make_app(service, trust)
    if systemd is not None:
        try:
            await systemd.connect()
        except Exception as e:  # reads still work; a write connects again or says why
            log.warning("the system bus is not reachable yet: %s", e)
    await service.recover()
    # In the background, under the write lock: a target that does not answer holds up
    # neither the API nor the boot (nvme-cli and iscsiadm wait up to 30 s each).
    service.spawn(service.start_services())
    service.store_first_boot()
    # In the background too: a keyslot's PBKDF per encrypted volume takes seconds (minutes
    # under emulation), and the API must answer meanwhile (the boot's update check timed
    # out waiting on the socket). Writes wait for it: it holds the write lock.
    service.spawn(service.first_boot_recovery_key())
    runner = web.AppRunner(
        app, access_log=None, handle_signals=True, keepalive_timeout=limits.idle_seconds
    )
    await runner.setup()
    assert runner.server is not None
    guard = listeners.Guard(
        runner.server,
        limits,
        uid_allowed=lambda uid: auth.uid_allowed(uid, service.config().listener.socket_uids),
        trusted=trust.allows if trust is not None else lambda der: False,
    )
    try:
        # The unix socket: handed over by systemd (socket activation), or made here.
        for sock in sockets or [unix_socket(socket_path)]:
            await guard.listen_unix(sock)
        if listen and trust is not None:
            try:
                parsed = split_host_port(listen)
                if parsed is None or parsed[1] is None:
                    raise ValueError(f"listen address {listen!r}: not host:port")
                await guard.listen_tls(parsed[0] or None, parsed[1], trust.listener)
            except (OSError, ValueError) as e:
                # An address this machine no longer has, a port taken, a name that does
                # not resolve: HTTPS is not served, root on the unix socket still is.
                log.error("HTTPS is not served on %s: %s", listen, e)
                service.listener_active = lambda: False
        # What start-up made (the modules, the app) lives as long as the process: kept
        # out of the collector's view, a full collection walks what requests made, not
        # tens of thousands of module objects (measured under load: a 50 ms pause, a p99
        # outlier).
        gc.collect()
        gc.freeze()
        ready()
        await asyncio.Event().wait()
    finally:
        await guard.close()
        await runner.cleanup()
