"""`/1.0/applications`: IncusOS's routes and bodies (incus-osd/internal/rest/
api_applications.go), for applications that are system extensions (apply/applications.py).

    GET  /1.0/applications                        the installed applications' URLs, sorted
    POST /1.0/applications {"name"}               install the source's newest image
    GET  /1.0/applications/{name}                 {"state": ApplicationState, "config": {}}
    POST /1.0/applications/{name}/:check-update   update to the source's newest, if newer
    POST /1.0/applications/{name}/:restart        restart its units
    POST /1.0/applications/{name}/:switch-version  run a kept version ({"version"})
    POST /1.0/applications/{name}/:remove         stop, wipe its data, remove its image
    POST /1.0/applications/{name}/:factory-reset  wipe its data, start it again
    POST /1.0/applications/{name}/:backup         its data as a tar.gz
    POST /1.0/applications/{name}/:restore        its data from such an archive

The image source is the updates side's provider; until one is configured, a local
directory in the state dir (updates/applications: NAME_VERSION.raw and a SHA256SUMS
that names each), whose hashes are checked before anything is installed.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..apply.applications import (
    PRIMARY,
    AppError,
    Applications,
    Source,
    UpdateHandoff,
    state_document,
)
from ..apply.systemd import ApplyError
from ..core.versions import VERSION_PATTERN
from ..hal.sysext import VerifiedImage, check_name
from ..state.paths import LOCAL_APPLICATIONS_DIR
from ..update.index import compare_versions
from .service import ApiError

if TYPE_CHECKING:
    from .http import Route

APPLICATIONS_KEY = web.AppKey("applications", Applications)
SOURCE_KEY = web.AppKey("application-source", object)
MAX_BODY_BYTES = 64 << 10
_IMAGE = re.compile(rf"(?P<name>[a-z0-9][a-z0-9-]{{0,62}})_(?P<version>{VERSION_PATTERN})\.raw")


def local_source(directory: Path) -> Source:
    """The newest `NAME_VERSION.raw` in `directory` whose sha256 SHA256SUMS lists (the
    stand-in for a provider: an air-gapped machine's directory). An image SHA256SUMS
    does not list is not offered."""

    def newest(name: str) -> VerifiedImage | None:
        try:
            sums_text = (directory / "SHA256SUMS").read_text()
        except OSError:
            return None
        sums: dict[str, str] = {}
        for line in sums_text.splitlines():
            digest, _, file = line.partition("  ")
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                sums[file.strip()] = digest
        best: VerifiedImage | None = None
        for file, digest in sums.items():
            match = _IMAGE.fullmatch(file)
            if match is None or match["name"] != name or not (directory / file).is_file():
                continue
            if best is None or compare_versions(match["version"], best.version) > 0:
                best = VerifiedImage(name, match["version"], directory / file, digest)
        return best

    async def source(name: str) -> VerifiedImage | None:
        return await asyncio.get_running_loop().run_in_executor(None, newest, name)

    return source


def _apps(request: web.Request) -> Applications:
    return applications_of(request.app)


def applications_of(app: web.Application) -> Applications:
    from .http import SERVICE_KEY

    apps = app.get(APPLICATIONS_KEY)
    if apps is None:
        svc = app[SERVICE_KEY]
        apps = Applications(
            svc.settings.state_dir, svc.settings.target, svc.systemd, asyncio.Lock()
        )
        app[APPLICATIONS_KEY] = apps
    return apps


async def plug_into_updates(app: web.Application) -> None:
    """on_startup: the update checker hands verified OS files to the A/B writer and
    verified application images to these applications (update/handoff.py). Only a
    service acting on this machine does: a re-rooted one (a scratch target, the tests)
    keeps the default, which records what was handed on and installs nothing."""
    from ..update import handoff
    from .http import SERVICE_KEY

    settings = app[SERVICE_KEY].settings
    if str(settings.root) != "/" or str(settings.target) != "/":
        return
    handoff.use(UpdateHandoff(applications_of(app), asyncio.get_running_loop()))


def _source(request: web.Request) -> Source:
    from .http import SERVICE_KEY

    source = request.app.get(SOURCE_KEY)
    if source is None:
        state_dir = request.app[SERVICE_KEY].settings.state_dir
        source = local_source(state_dir / LOCAL_APPLICATIONS_DIR)
    return source  # type: ignore[return-value]


def _sync(metadata: Any) -> web.Response:
    from .http import sync

    return sync(metadata)


async def _body(request: web.Request) -> Any:
    """A JSON object, or {} for an empty body (IncusOS reads an empty body as empty)."""
    data = await request.content.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    if not data.strip():
        return {}
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _name(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_name(name)
    except ValueError:
        raise ApiError(404, "Not Found") from None


async def _run(work: Any) -> Any:
    """An application's refusal as the API's; the system manager's failure (a unit
    that does not start) as a 500 that says which."""
    try:
        return await work
    except AppError as e:
        raise ApiError(e.status, e.message) from None
    except ApplyError as e:
        raise ApiError(500, str(e)) from None


async def get_applications(request: web.Request) -> web.Response:
    from .http import url

    names = sorted(_apps(request).installed())
    return _sync([url(request, f"/1.0/applications/{n}") for n in names])


async def post_applications(request: web.Request) -> web.Response:
    body = await _body(request)
    name = body.get("name", "")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "missing application name")
    try:
        check_name(name)
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    apps = _apps(request)
    installed = apps.installed()
    if name in installed:
        raise ApiError(409, "Conflict")
    if name in PRIMARY and any(n in PRIMARY for n in installed):
        raise ApiError(400, "a primary application is already installed")
    image = await _source(request)(name)
    if image is None:
        raise ApiError(400, f"unknown application {name!r}: no image of it is available")
    await _run(apps.install_verified(image, new=True))
    return _sync({})


async def get_application(request: web.Request) -> web.Response:
    name = _name(request)
    app = await _run(_get(request, name))
    return _sync(state_document(app, _apps(request).available_versions(app)))


async def post_switch_version(request: web.Request) -> web.Response:
    """IncusOS's body: {"version"} (optional; none: the version before the installed
    one). Unknown keys are refused (IncusOS's decoder ignores them: a misspelt key would
    roll back instead of switching to the version named)."""
    name = _name(request)
    await _run(_get(request, name))  # 404 first, as IncusOS
    body = await _body(request)
    unknown = sorted(set(body) - {"version"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}")
    version = body.get("version", "")
    if not isinstance(version, str):
        raise ApiError(400, "version: expected a string")
    await _run(_apps(request).switch_version(name, version))
    return _sync({})


async def _get(request: web.Request, name: str) -> Any:
    return _apps(request).get(name)


async def post_check_update(request: web.Request) -> web.Response:
    """The source's newest image, installed if it is newer (units restarted); nothing
    when it is not. Answered once done (IncusOS answers first and updates after)."""
    name = _name(request)
    apps = _apps(request)
    current = await _run(_get(request, name))
    image = await _source(request)(name)
    if image is not None and compare_versions(image.version, current.version) > 0:
        await _run(apps.install_verified(image, new=False))
    return _sync({})


async def post_restart(request: web.Request) -> web.Response:
    await _run(_apps(request).restart(_name(request)))
    return _sync({})


async def post_remove(request: web.Request) -> web.Response:
    await _run(_apps(request).remove(_name(request)))
    return _sync({})


async def post_factory_reset(request: web.Request) -> web.Response:
    await _run(_apps(request).factory_reset(_name(request)))
    return _sync({})


async def post_backup(request: web.Request) -> web.Response:
    await _body(request)  # {"complete": bool} is accepted; the data dir is the backup
    data = await _run(_apps(request).backup(_name(request)))
    return web.Response(body=data, content_type="application/gzip")


async def post_restore(request: web.Request) -> web.Response:
    from ..hal.sysext import MAX_ARCHIVE_BYTES

    name = _name(request)
    await _run(_get(request, name))
    data = await request.content.read(MAX_ARCHIVE_BYTES + 1)
    if not data:
        raise ApiError(400, "no archive in the request body")
    await _run(_apps(request).restore(name, data))
    return _sync({})


def routes() -> list[Route]:
    from .http import Route

    one = "/1.0/applications/{name}"
    return [
        Route("GET", "/1.0/applications", get_applications, "the installed applications"),
        Route(
            "POST",
            "/1.0/applications",
            post_applications,
            "install an application (a system extension) from the image source",
        ),
        Route("GET", one, get_application, "an application's state and configuration"),
        Route(
            "POST",
            f"{one}/:check-update",
            post_check_update,
            "update the application to the source's newest image, restarting its units",
        ),
        Route("POST", f"{one}/:restart", post_restart, "restart the application's units"),
        Route(
            "POST",
            f"{one}/:switch-version",
            post_switch_version,
            "run another version kept on disk (none given: the one before), restarting it",
        ),
        Route(
            "POST",
            f"{one}/:remove",
            post_remove,
            "remove a non-primary application and its data",
        ),
        Route(
            "POST",
            f"{one}/:factory-reset",
            post_factory_reset,
            "wipe the application's data and start it again",
        ),
        Route("POST", f"{one}/:backup", post_backup, "the application's data as a tar.gz"),
        Route(
            "POST",
            f"{one}/:restore",
            post_restore,
            "replace the application's data from a backup (tar.gz) and restart it",
        ),
    ]
