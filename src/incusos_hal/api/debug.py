"""`/1.0/debug`: IncusOS's debug area (incus-osd/internal/rest/api_debug.go).

    GET  /1.0/debug                          the five entries IncusOS lists, in its order
    GET  /1.0/debug/kernel                   version, architecture, cpu_baseline, modules
                                             (and, ours, the kernel command line)
    GET  /1.0/debug/log                      journal entries as JSON, this boot by default
    GET  /1.0/debug/processes                `ps fauxww`, one string
    POST /1.0/debug/:run-script              an S/MIME-signed script, run only when the
                                             firmware's db vouches for its signer
    GET  /1.0/debug/secureboot               its one sub-resource
    GET  /1.0/debug/secureboot/event-log     {event_log, pcr4, pcr7}
    GET  /1.0/debug/seed                     ours, not listed: what first boot did with the
                                             install seed (seed.status.json: applied,
                                             source, files, problems, notes, installed)

The routes are appended to api.server's ROUTES; handlers take what they share with it
(the envelope, the proxy prefix) from there when called.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .service import ApiError

if TYPE_CHECKING:
    from .http import Route

log = logging.getLogger("incusos_hal.api")

UNIT_NAME = re.compile(r"[A-Za-z0-9:_.@\\-]{1,256}")
JOURNAL_TIME = re.compile(r"[0-9: T.+-]{1,40}|-?[0-9]+[smhdw]? ?(ago)?|today|yesterday|now")
LOG_PARAMETERS = ("unit", "boot", "entries", "since", "until")
SUBPROCESS_SECONDS = 30
# How long a signed script may run before it is stopped.
SCRIPT_SECONDS = 600.0


def _sync(request: web.Request, metadata: Any) -> web.Response:
    from .http import sync

    return sync(metadata)


def _url(request: web.Request, path: str) -> str:
    from .http import url

    return url(request, path)


async def get_debug(request: web.Request) -> web.Response:
    names = ("kernel", "log", "processes", ":run-script", "secureboot")
    return _sync(request, [_url(request, f"/1.0/debug/{n}") for n in names])


async def _in_thread(request: web.Request, work: Any) -> Any:
    from .http import SERVICE_KEY

    return await request.app[SERVICE_KEY].run_in_thread(work)


def _root(request: web.Request) -> str:
    from .http import SERVICE_KEY

    return request.app[SERVICE_KEY].settings.root


async def get_kernel(request: web.Request) -> web.Response:
    from ..hal import debuginfo

    root = _root(request)
    return _sync(request, await _in_thread(request, lambda: debuginfo.kernel(root)))


async def _run(*args: str) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SUBPROCESS_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ApiError(504, f"{args[0]} did not answer in {SUBPROCESS_SECONDS}s") from None
    return proc.returncode or 0, out, err


def journal_arguments(query: Any) -> list[str]:
    """journalctl's arguments for a query, as IncusOS builds them: this boot (`-b 0`)
    unless `boot` says otherwise, every entry unless `entries` limits them. Every value
    is checked, so none can be taken for an option."""
    unknown = sorted(set(query) - set(LOG_PARAMETERS))
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown parameter ({', '.join(LOG_PARAMETERS)})")
    args = ["journalctl", "--no-pager", "-o", "json"]
    if query.get("unit"):
        if not UNIT_NAME.fullmatch(query["unit"]):
            raise ApiError(400, "unit: not a unit name")
        args += [f"--unit={query['unit']}"]
    boot = query.get("boot") or "0"
    if not re.fullmatch(r"-?[0-9]{1,4}", boot, re.ASCII):
        raise ApiError(400, "boot: not a boot offset (0, -1, ...)")
    args += ["-b", boot]
    if query.get("entries"):
        entries = query["entries"]
        if not re.fullmatch(r"[0-9]{1,5}", entries, re.ASCII) or not 1 <= int(entries) <= 10000:
            raise ApiError(400, "entries: must be an integer in 1..10000")
        args += ["-n", entries]
    for name in ("since", "until"):
        if query.get(name):
            # Joined to its option (--since=-1h): a value is never an argument of its own.
            if not JOURNAL_TIME.fullmatch(query[name]):
                raise ApiError(400, f"{name}: not a journalctl time")
            args += [f"--{name}={query[name]}"]
    return args


async def get_log(request: web.Request) -> web.Response:
    args = journal_arguments(request.query)
    code, out, err = await _run(*args)
    if code != 0:
        # IncusOS answers 500; a boot offset the journal does not have is the usual cause.
        raise ApiError(400, f"journalctl: {err.decode(errors='replace').strip()[:500]}")
    lines = []
    for line in out.splitlines():
        try:
            lines.append(json.loads(line, parse_constant=_no_constant))
        except (ValueError, RecursionError):
            continue  # journalctl emits one object per line; skip anything else
    return _sync(request, lines)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


async def get_processes(request: web.Request) -> web.Response:
    code, out, err = await _run("ps", "fauxww")
    if code != 0:
        raise ApiError(500, f"ps: {err.decode(errors='replace').strip()[:500]}")
    return _sync(request, out.decode(errors="replace"))


async def get_secureboot(request: web.Request) -> web.Response:
    return _sync(request, [_url(request, "/1.0/debug/secureboot/event-log")])


async def get_event_log(request: web.Request) -> web.Response:
    from ..hal import debuginfo, eventlog, tpm
    from .http import SERVICE_KEY

    settings = request.app[SERVICE_KEY].settings

    def read() -> Any:
        with tpm.open_tpm_if_any(settings.tcti) as handle:
            return debuginfo.event_log(settings.root, handle)

    try:
        return _sync(request, await _in_thread(request, read))
    except FileNotFoundError:
        raise ApiError(404, "this machine has no TPM event log") from None
    except (OSError, eventlog.EventLogError, LookupError) as e:
        raise ApiError(500, f"the TPM event log cannot be read: {e}") from None


async def post_run_script(request: web.Request) -> web.Response:
    """Verified first (nothing runs on a bad or missing signature), then run; the answer
    is the script's output, or an error with its exit status and output."""
    from ..security import script
    from .http import SERVICE_KEY

    svc = request.app[SERVICE_KEY]
    body = await request.content.read(script.MAX_SCRIPT_BYTES + 1)
    root = svc.settings.root
    try:
        verified = await svc.run_in_thread(lambda: script.verify(body, root))
    except script.ScriptRefused as e:
        svc.log("warning", f"a script was refused: {e.message}")
        raise ApiError(e.status, e.message) from None
    svc.log("info", f"running a script signed by {verified.signer}")
    code, output = await svc.run_in_thread(lambda: script.run(verified.script, SCRIPT_SECONDS))
    if code != 0:
        raise ApiError(500, f"the script failed (exit status {code})\n\n{output}")
    return _sync(request, output)


async def get_seed(request: web.Request) -> web.Response:
    """The last first boot's seed outcome ({} when none ran, or after a factory reset):
    where an invalid seed's problems can be read without the console."""
    from ..apply.seed import status
    from .http import SERVICE_KEY

    state_dir = request.app[SERVICE_KEY].settings.state_dir
    return _sync(request, await _in_thread(request, lambda: status(state_dir)))


def routes() -> list[Route]:
    from .http import Route

    return [
        Route("GET", "/1.0/debug", get_debug, "the debug endpoints"),
        Route("GET", "/1.0/debug/kernel", get_kernel, "kernel version, command line and modules"),
        Route("GET", "/1.0/debug/log", get_log, "journal entries as JSON (this boot by default)"),
        Route("GET", "/1.0/debug/processes", get_processes, "the process tree (ps fauxww)"),
        Route(
            "POST",
            "/1.0/debug/:run-script",
            post_run_script,
            "run an S/MIME-signed script whose signer the firmware's db trusts",
            body="script",
        ),
        Route("GET", "/1.0/debug/secureboot", get_secureboot, "the Secure Boot debug endpoints"),
        Route(
            "GET",
            "/1.0/debug/secureboot/event-log",
            get_event_log,
            "the TPM event log of PCRs 4, 7 and 11, and PCRs 4 and 7",
        ),
        Route("GET", "/1.0/debug/seed", get_seed, "what first boot did with the install seed"),
    ]
