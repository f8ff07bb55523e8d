"""The `incusos-hal` command.

    validate --config PATH                     exit 0, or 2 with one `field.path: message` line
    render [--config PATH] [--root DIR] --out DIR   what configure + generator would write
    save --config PATH [--state-dir DIR]       validate, then store atomically
    configure [--boot] [--state-dir DIR]       apply the stored config to this machine
    inventory [--root DIR] [--format F] [SECTION...]   Incus's GET /1.0/resources, and more
    record DIR [--root DIR]                    capture what inventory reads, to replay it
    survey [--root DIR] [--format F]           a migration tool's view: firmware, TPM, disks, OS
    eventlog [FILE | --root DIR] [--pcrs]      the TCG event log, or the PCRs it replays to
    security [--root DIR] [--tcti T]           GET /1.0/system/security's state (no secrets)
    serve [--socket P] [--listen A:P] [--target DIR]   the API service
    remote add NAME URL [--cert C --key K] | list | remove NAME   where the API is
    get PATH | edit PATH [--file F] | confirm | tpm-rebind | backup FILE | restore FILE
                                               [--remote NAME]

Environment: INCUSOS_HAL_STATE_DIR (default /var/lib/incusos-hal), INCUSOS_HAL_ROOT
(re-roots reads of /sys, /proc, /dev and /run/udev).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .config import Config, ConfigError

# The config package is imported by the commands that use it: `inventory`, `record` and
# `survey` start without it (a third of the start-up time).

ROOT_ENV = "INCUSOS_HAL_ROOT"
DEFAULT_UNIT_DIR = "/usr/lib/systemd/system"
GENERATOR_DIR = "run/systemd/generator"
EXIT_INVALID = 2


def _root(arg: str | None) -> str:
    return arg or os.environ.get(ROOT_ENV) or "/"


def _format_of(path: str) -> str:
    return "json" if path.endswith(".json") else "toml"


def _load_config_file(path: str) -> Config:
    from .config import ConfigError, FieldError, parse

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([FieldError("", f"cannot read {path}: {e.strerror}")]) from None
    return parse(data, _format_of(path))


def _print_errors(e: ConfigError) -> None:
    for err in e.errors:
        print(err, file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from .config import ConfigError

    try:
        _load_config_file(args.config)
    except ConfigError as e:
        _print_errors(e)
        return EXIT_INVALID
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .config import ConfigError, store
    from .fsutil import write_tree
    from .hal.net import list_nics
    from .render import render_files, render_units

    state = store.state_dir(args.state_dir)
    if args.config:
        try:
            config = _load_config_file(args.config)
        except ConfigError as e:
            _print_errors(e)
            return EXIT_INVALID
    else:
        loaded = store.load(state)
        for problem in loaded.problems:
            print(f"warning: {problem}", file=sys.stderr)
        config = loaded.config
    nics, warnings = list_nics(_root(args.root))
    plan = render_files(config, nics)
    units = render_units(config, source=str(state / store.CONFIG_FILE), unit_dir=args.unit_dir)
    for w in (*warnings, *plan.warnings):
        print(f"warning: {w}", file=sys.stderr)
    tree = dict(plan.files)
    tree.update({f"/{GENERATOR_DIR}/{k}": v for k, v in units.items()})
    write_tree(args.out, tree, durable=False)
    for old, new in plan.renames:
        print(f"rename {old} -> {new}")
    for path in sorted(tree):
        print(path)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from .config import ConfigError, store
    from .generator import refresh_cache

    try:
        config = _load_config_file(args.config)
    except ConfigError as e:
        _print_errors(e)
        return EXIT_INVALID
    state = store.state_dir(args.state_dir)
    store.save(state, config)
    refresh_cache(state, args.unit_dir)
    print(f"stored in {state / store.CONFIG_FILE}")
    return 0


def cmd_configure(args: argparse.Namespace) -> int:
    from .api.backup import complete_switches
    from .config import store
    from .configure import configure

    state = store.state_dir(args.state_dir)
    # A restore a crash interrupted is completed (or discarded) before the config is
    # read: at boot this runs before the API service, whose start says which.
    try:
        for problem in complete_switches(state):
            print(f"warning: {problem}", file=sys.stderr)
    except OSError as e:  # the API service tries again; configure what is there
        print(f"warning: cannot complete an interrupted restore: {e}", file=sys.stderr)
    try:
        root = _root(None)
        # A re-rooted run, or one writing elsewhere, must not rename this machine's links
        # or set its hostname.
        live = root == "/" and args.target == "/"
        result = configure(
            state=state, sys_root=root, target=args.target, live=live, unit_dir=args.unit_dir
        )
    except Exception as e:
        if not args.boot:
            raise
        # At boot, a bug here must not fail sysinit; the journal keeps the trace.
        import traceback

        traceback.print_exc()
        print(f"<3>configure failed: {e}", file=sys.stderr)
        return 0
    if args.boot:
        return 0
    return 0 if result.ok else 1


def cmd_inventory(args: argparse.Namespace) -> int:
    from .inventory import UnknownSection, scan_with_warnings

    try:
        doc, warnings = scan_with_warnings(
            _root(args.root), args.sections, load_snake_case=args.load_snake_case
        )
    except UnknownSection as e:
        print(e, file=sys.stderr)
        return EXIT_INVALID
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    fmt = args.format or ("table" if sys.stdout.isatty() else "json")
    if fmt == "json":
        print(json.dumps(doc, indent=2))
    elif fmt == "yaml":
        from .yamlout import dumps

        sys.stdout.write(dumps(doc))
    else:
        from .inventory.table import table

        for name, section in doc.items():
            print(f"{name}:")
            print(table(name, section))
            print()
    return 0


def cmd_survey(args: argparse.Namespace) -> int:
    from .inventory.survey import survey

    doc = survey(_root(args.root))
    if args.format == "yaml":
        from .yamlout import dumps

        sys.stdout.write(dumps(doc))
    else:
        print(json.dumps(doc, indent=2))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from .inventory.record import record

    try:
        manifest = record(args.dir, _root(args.root))
    except (FileExistsError, OSError) as e:
        print(f"record: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"recorded {len(manifest.entries)} entries into {args.dir} (MANIFEST.json)")
    return 0


def cmd_eventlog(args: argparse.Namespace) -> int:
    from .hal import eventlog

    path = Path(args.file) if args.file else Path(_root(args.root)) / eventlog.LOG_PATH
    try:
        log = eventlog.parse(path.read_bytes())
        pcrs = {
            bank: {str(i): v.hex() for i, v in sorted(eventlog.replay(log, bank).items())}
            for bank in log.banks
            if bank in ("sha1", "sha256", "sha384", "sha512")
        }
    except OSError as e:
        print(f"eventlog: {path}: {e.strerror}", file=sys.stderr)
        return EXIT_INVALID
    except eventlog.EventLogError as e:
        print(f"eventlog: {path}: {e}", file=sys.stderr)
        return EXIT_INVALID
    doc: dict[str, object] = {"pcrs": pcrs}
    if not args.pcrs:
        doc = {"banks": list(log.banks), "events": eventlog.summary(log), **doc}
    print(json.dumps(doc, indent=2))
    return 0


def cmd_security(args: argparse.Namespace) -> int:
    import logging

    from .hal import tpm
    from .security import security_state

    # The TSS logs each failed step through Python's logging; the one line below says it.
    for name in ("tcti", "esys"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    root = _root(args.root)
    with tpm.open_tpm_if_any(args.tcti, lambda e: print(f"warning: {e}", file=sys.stderr)) as t:
        print(json.dumps(security_state(root, t), indent=2))
    return 0


def _activated_sockets() -> list[Any]:
    """Sockets systemd passed (LISTEN_FDS, sd_listen_fds(3)), if they are for us."""
    import socket

    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return [socket.socket(fileno=3 + i) for i in range(count)]


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from .api.server import serve
    from .api.service import Settings
    from .config import store

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    scratch = args.target != "/"
    settings = Settings(
        state_dir=store.state_dir(args.state_dir),
        root=_root(args.root),
        target=args.target,
        live=not scratch and _root(args.root) == "/",
        tcti=args.tcti,
        unit_dir=None if scratch else args.unit_dir,
    )
    systemd = None
    if not scratch:
        from .apply import SdbusSystemd

        systemd = SdbusSystemd()

    def ready() -> None:
        print(f"serving on {args.socket}" + (f" and {args.listen}" if args.listen else ""))
        sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                settings,
                socket_path=args.socket,
                listen=args.listen or "",
                systemd=systemd,
                ready=ready,
                sockets=_activated_sockets(),
            )
        )
    return 0


def _remote(args: argparse.Namespace) -> dict[str, str]:
    from .api.client import ClientError, load_remotes

    remotes = load_remotes()
    name = args.remote or os.environ.get("INCUSOS_HAL_REMOTE") or "local"
    if name not in remotes:
        raise ClientError(f"no remote {name!r} (incusos-hal remote list)")
    return remotes[name]


def _client(func: Any) -> Any:
    """Run a client command; a ClientError is one line on stderr and exit 1."""

    def run(args: argparse.Namespace) -> int:
        from .api.client import ClientError

        try:
            code: int = func(args)
        except ClientError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return code

    return run


def cmd_remote(args: argparse.Namespace) -> int:
    from .api.client import ClientError, fetch_server_fingerprint, load_remotes, save_remotes

    remotes = load_remotes()
    if args.action == "list":
        for name, r in sorted(remotes.items()):
            print(f"{name}\t{r['url']}")
        return 0
    if args.action == "remove":
        if args.name not in remotes or args.name == "local":
            raise ClientError(f"no remote {args.name!r} to remove")
        del remotes[args.name]
        save_remotes(remotes)
        return 0
    if not args.name or not args.url:
        raise ClientError("remote add NAME URL")
    entry = {"url": args.url}
    if args.url.startswith("https://"):
        if not args.cert:
            raise ClientError("an https remote needs --cert (and --key): the client certificate")
        entry.update(cert=os.path.abspath(args.cert), key=os.path.abspath(args.key or args.cert))
        entry["server_fingerprint"] = fetch_server_fingerprint(args.url)
        print(f"server certificate fingerprint: {entry['server_fingerprint']}")
    remotes[args.name] = entry
    save_remotes(remotes)
    return 0


def _leaves(data: Any, path: str = "") -> list[tuple[str, str]]:
    """(field path, value) for every scalar in `data`, paths as the API's errors write them."""
    if isinstance(data, dict):
        if not data:
            return [(path, "{}")] if path else []
        return [row for k, v in data.items() for row in _leaves(v, f"{path}.{k}" if path else k)]
    if isinstance(data, list):
        if not data:
            return [(path, "[]")] if path else []
        return [row for i, v in enumerate(data) for row in _leaves(v, f"{path}[{i}]")]
    return [(path, json.dumps(data) if not isinstance(data, str) else data)]


def _print(data: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return
    if fmt == "table":
        rows = _leaves(data)
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            print(f"{key:{width}}  {value}" if key else value)
        return
    from .yamlout import dumps

    sys.stdout.write(dumps(data))


def cmd_get(args: argparse.Namespace) -> int:
    from .api.client import request

    reply = request(_remote(args), "GET", args.path)
    _print(reply.envelope()["metadata"], args.format)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """GET the object, edit its config (a file, or $EDITOR), PUT it with If-Match."""
    import subprocess
    import tempfile

    from .api.client import ClientError, request

    remote = _remote(args)
    reply = request(remote, "GET", args.path)
    current = reply.envelope()["metadata"]
    if args.file:
        text = Path(args.file).read_text() if args.file != "-" else sys.stdin.read()
    else:
        with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
            json.dump({"config": current.get("config", {})}, f, indent=2)
        editor = os.environ.get("EDITOR", "vi")
        subprocess.run([editor, f.name], check=True)
        text = Path(f.name).read_text()
        os.unlink(f.name)
    try:
        body = json.loads(text)
    except ValueError as e:
        raise ClientError(f"not JSON: {e}") from None
    headers = {"Content-Type": "application/json", "If-Match": reply.headers.get("etag", "*")}
    request(remote, "PUT", args.path, json.dumps(body).encode(), headers).envelope()
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    from .api.client import request

    request(_remote(args), "POST", "/1.0/system/network/:confirm").envelope()
    return 0


def cmd_tpm_rebind(args: argparse.Namespace) -> int:
    from .api.client import request

    request(_remote(args), "POST", "/1.0/system/security/:tpm-rebind").envelope()
    print("volumes re-sealed to the TPM; the service reboots the machine to use them")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from .api.client import request
    from .fsutil import atomic_write

    reply = request(_remote(args), "POST", "/1.0/system/:backup")
    if reply.status != 200:
        reply.envelope()
    atomic_write(args.file, reply.body, 0o600)  # recovery keys and the server's key
    print(f"wrote {args.file} ({len(reply.body)} bytes; it holds secrets)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .api.client import ClientError, request

    remote = _remote(args)
    query = f"?skip={','.join(args.skip)}" if args.skip else ""
    data = Path(args.file).read_bytes()
    op = request(remote, "POST", f"/1.0/system/:restore{query}", data).envelope()
    done = request(remote, "GET", f"{op['operation']}/wait?timeout=600").envelope()
    if done["metadata"]["status"] != "Success":
        raise ClientError(f"restore failed: {done['metadata']['err']}")
    print("restored")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="incusos-hal", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a config file")
    v.add_argument("--config", required=True, help="TOML as stored, or .json in the API's shape")
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("render", help="write what configure and the generator would")
    r.add_argument("--config", help="config file (default: the stored one, with fallback)")
    r.add_argument("--root", help="read /sys from this root (default $INCUSOS_HAL_ROOT or /)")
    r.add_argument("--out", required=True, help="directory to write the tree into")
    r.add_argument("--state-dir", help="where the config is stored (for SourcePath=)")
    r.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_render)

    s = sub.add_parser("save", help="validate a config and store it")
    s.add_argument("--config", required=True)
    s.add_argument("--state-dir")
    s.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_save)

    c = sub.add_parser("configure", help="apply the stored config to this machine")
    c.add_argument("--boot", action="store_true", help="boot mode: log problems, exit 0")
    c.add_argument("--state-dir")
    c.add_argument("--target", default="/", help="write under this root instead of /")
    c.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_configure)

    i = sub.add_parser("inventory", help="the Incus-shaped resources document")
    i.add_argument("--root", help="read a recorded tree (or a mounted root) instead of /")
    i.add_argument("--format", choices=("json", "yaml", "table"), help="default: table on a tty")
    i.add_argument(
        "--load-snake-case",
        action="store_true",
        help="`load` with snake_case keys (Incus writes Go's field names)",
    )
    i.add_argument("sections", nargs="*", metavar="SECTION", help="default: Incus's sections")
    i.set_defaults(func=cmd_inventory)

    sv = sub.add_parser("survey", help="what a migration needs to know about a machine")
    sv.add_argument("--root", help="a recorded tree or a mounted disk image instead of /")
    sv.add_argument("--format", choices=("json", "yaml"), default="json")
    sv.set_defaults(func=cmd_survey)

    ev = sub.add_parser("eventlog", help="the TCG event log, parsed and replayed")
    ev.add_argument("file", nargs="?", metavar="FILE", help="default: the running machine's")
    ev.add_argument("--root", help="read the log under this root")
    ev.add_argument("--pcrs", action="store_true", help="only the replayed PCR values")
    ev.set_defaults(func=cmd_eventlog)

    se = sub.add_parser("security", help="Secure Boot, TPM and encrypted volumes")
    se.add_argument("--root", help="read efivarfs, the event log and crypttab under this root")
    se.add_argument("--tcti", help="the TPM (default: $TPM2TOOLS_TCTI or device:/dev/tpmrm0)")
    se.set_defaults(func=cmd_security)

    sr = sub.add_parser("serve", help="the API service")
    sr.add_argument("--state-dir")
    sr.add_argument("--socket", default="/run/incusos-hal/unix.socket")
    sr.add_argument("--listen", help="HTTPS on host:port (default: the config's listen_address)")
    sr.add_argument("--root", help="read the machine under this root")
    sr.add_argument(
        "--target", default="/", help="write config under this root; not /: no systemd calls"
    )
    sr.add_argument("--tcti", help="the TPM (default: $TPM2TOOLS_TCTI or device:/dev/tpmrm0)")
    sr.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    sr.set_defaults(func=cmd_serve)

    def client(name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--remote", help="a remote's name (default $INCUSOS_HAL_REMOTE or local)")
        c.set_defaults(func=_client(func))
        return c

    rm = client("remote", "the API endpoints this client knows", cmd_remote)
    rm.add_argument("action", choices=("add", "list", "remove"))
    rm.add_argument("name", nargs="?")
    rm.add_argument("url", nargs="?", help="unix:///path or https://host:port")
    rm.add_argument("--cert", help="client certificate (PEM) for https")
    rm.add_argument("--key", help="its key (default: in the certificate file)")
    g = client("get", "GET an API path", cmd_get)
    g.add_argument("path")
    g.add_argument("--format", choices=("table", "yaml", "json"), default="table")
    ed = client("edit", "change a {config, state} object (If-Match guarded)", cmd_edit)
    ed.add_argument("path")
    ed.add_argument("--file", help="the new {config} as JSON (- for stdin); default: $EDITOR")
    client("confirm", "keep a network change that waits for confirmation", cmd_confirm)
    client("tpm-rebind", "re-seal the volumes to the TPM after a recovery-key boot", cmd_tpm_rebind)
    b = client("backup", "save the state directory (holds secrets)", cmd_backup)
    b.add_argument("file")
    rs = client("restore", "replace the state directory from a backup", cmd_restore)
    rs.add_argument("file")
    rs.add_argument("--skip", action="append", default=[], help="encryption-recovery-keys")

    rec = sub.add_parser("record", help="copy what inventory reads into DIR, to replay it")
    rec.add_argument("dir", metavar="DIR")
    rec.add_argument("--root", help="record from this root instead of /")
    rec.set_defaults(func=cmd_record)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    code: int = args.func(args)
    return code
