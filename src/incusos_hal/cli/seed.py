"""`incusos-hal seed`: check an install seed, apply it on first boot (apply/seed.py)."""

from __future__ import annotations

import argparse
import sys

from .common import EXIT_INVALID, root_of


def cmd_seed_check(args: argparse.Namespace) -> int:
    from ..apply.seed import check, problem_lines, read_problem
    from ..hal.seed import SeedReadError, read
    from ..state import store

    try:
        files = read(args.path)
    except SeedReadError as e:
        print(read_problem(e))
        return EXIT_INVALID
    base = store.load(store.state_dir(args.state_dir)).config if args.state_dir else None
    from ..config import Config

    root = None if args.no_machine else root_of(args.root)
    checked = check(files, base or Config(), root)
    for line in problem_lines(checked):
        print(line)
    for note in checked.notes:
        print(f"note: {note}", file=sys.stderr)
    return EXIT_INVALID if checked.problems else 0


def cmd_seed_apply(args: argparse.Namespace) -> int:
    """First boot's seed step (incusos-hal-seed.service runs it with --boot: problems are
    logged to the kernel's log and it exits 0; the configure step runs after it)."""
    from ..apply.seed import first_boot
    from ..core.kmsg import ERR, INFO, WARNING, kmsg
    from ..state import store

    levels = {"error": ERR, "warning": WARNING, "info": INFO}

    def log(level: str, message: str) -> None:
        if args.boot:
            kmsg("incusos-hal-seed", levels.get(level, INFO), message)
        else:
            print(f"{level}: {message}", file=sys.stderr)

    state = store.state_dir(args.state_dir)
    try:
        outcome = first_boot(state, root_of(args.root), source=args.source, log=log)
    except Exception as e:  # boot mode never fails the boot; the journal says why
        if not args.boot:
            raise
        log("error", f"seed: {type(e).__name__}: {e}")
        return 0
    if outcome.what == "install":
        from .install import run_install

        return run_install(args, outcome, log)
    if outcome.what == "invalid" and not args.boot:
        for line in outcome.problems:
            print(line)
        return EXIT_INVALID
    return 0
