"""The administrator's commands on this machine: validate, render, save, configure, serve."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import EXIT_INVALID, GENERATOR_DIR, root_of

if TYPE_CHECKING:
    import argparse

    from ..apply.deadline import TimeLimit
    from ..config import Config, ConfigError


APPLY_TIME_LIMIT_ENV = "INCUSOS_HAL_APPLY_TIME_LIMIT"


def _time_limit(text: str) -> TimeLimit | None:
    """`BASE,PER_ITEM` seconds; None when malformed or out of range."""
    from ..apply.deadline import TimeLimit

    try:
        base, per_item = (float(part) for part in text.split(","))
    except ValueError:
        return None
    if not (0 <= base < 86400 and 0 <= per_item < 3600):
        return None
    return TimeLimit(base, per_item)


def _format_of(path: str) -> str:
    return "json" if path.endswith(".json") else "toml"


def _load_config_file(path: str) -> Config:
    from ..config import ConfigError, FieldError, parse

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError([FieldError("", f"cannot read {path}: {e.strerror}")]) from None
    return parse(data, _format_of(path))


def _print_errors(e: ConfigError) -> None:
    for err in e.errors:
        print(err, file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..config import ConfigError

    try:
        config = _load_config_file(args.config)
    except ConfigError as e:
        _print_errors(e)
        return EXIT_INVALID
    if args.machine:
        from ..sections import SECTIONS
        from ..state import store

        running = store.load(store.state_dir(args.state_dir)).config
        root = root_of(args.root)
        problems = [
            err
            for row in SECTIONS
            if getattr(config, row.attribute) != getattr(running, row.attribute)
            for err in row.check(config, running, root)
        ]
        if problems:
            _print_errors(ConfigError(problems))
            return EXIT_INVALID
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..core.files import write_tree
    from ..hal.net import list_nics
    from ..sections import render_files, render_units
    from ..state import store

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
    nics, warnings = list_nics(root_of(args.root))
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
    from ..boot.generator import refresh_cache
    from ..config import ConfigError
    from ..state import store

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
    from ..apply.configure import configure
    from ..state import store
    from ..state.switch import complete_switches

    state = store.state_dir(args.state_dir)
    # A restore a crash interrupted is completed (or discarded) before the config is
    # read: at boot this runs before the API service, whose start says which.
    try:
        for problem in complete_switches(state):
            print(f"warning: {problem}", file=sys.stderr)
    except OSError as e:  # the API service tries again; configure what is there
        print(f"warning: cannot complete an interrupted restore: {e}", file=sys.stderr)
    try:
        root = root_of(None)
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

    from ..api.server import serve
    from ..api.service import Settings
    from ..state import store

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    scratch = args.target != "/"
    limit = _time_limit(args.apply_time_limit) if args.apply_time_limit else None
    if args.apply_time_limit and limit is None:
        print("serve: --apply-time-limit: expected BASE,PER_ITEM seconds in range", file=sys.stderr)
        return EXIT_INVALID
    # A slow machine's (an emulated test VM's) own limit, from the unit's environment. A
    # bad value there is said and ignored: the API is the way into the machine, and it
    # must start whatever a drop-in says.
    from_env = os.environ.get(APPLY_TIME_LIMIT_ENV, "")
    if limit is None and from_env:
        limit = _time_limit(from_env)
        if limit is None:
            print(
                f"serve: ${APPLY_TIME_LIMIT_ENV}: expected BASE,PER_ITEM seconds in range; "
                "the default limit applies",
                file=sys.stderr,
            )
    extra: dict[str, Any] = {"apply_limit": limit} if limit else {}
    if args.update_read_timeout:
        extra["update_read_timeout"] = float(args.update_read_timeout)
    settings = Settings(
        state_dir=store.state_dir(args.state_dir),
        root=root_of(args.root),
        target=args.target,
        live=not scratch and root_of(args.root) == "/",
        tcti=args.tcti,
        unit_dir=None if scratch else args.unit_dir,
        **extra,
    )
    systemd = None
    if not scratch:
        from ..apply.systemd import SdbusSystemd

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
