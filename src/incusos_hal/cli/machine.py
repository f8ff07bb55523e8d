"""Commands that read the machine: inventory, survey, record, eventlog, security.

Each imports only the part of the HAL its answer needs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import EXIT_INVALID, root_of

# Not `typing.TYPE_CHECKING`, and argparse for its type only: `inventory` answers without
# either (see cli.main).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

    from ..apply import storage


def cmd_inventory(args: argparse.Namespace) -> int:
    return inventory(args.root, args.format, args.sections, args.load_snake_case)


def inventory(
    root: str | None, fmt: str | None, sections: list[str], load_snake_case: bool = False
) -> int:
    """`inventory`, from argparse's answer or from cli.main's reading of a plain shape."""
    from ..inventory import UnknownSection, scan_with_warnings

    try:
        doc, warnings = scan_with_warnings(root_of(root), sections, load_snake_case=load_snake_case)
    except UnknownSection as e:
        print(e, file=sys.stderr)
        return EXIT_INVALID
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    fmt = fmt or ("table" if sys.stdout.isatty() else "json")
    if fmt == "json":
        print(json.dumps(doc, indent=2))
    elif fmt == "yaml":
        from ..core.yamlout import dumps

        sys.stdout.write(dumps(doc))
    else:
        from ..inventory.table import table

        for name, section in doc.items():
            print(f"{name}:")
            print(table(name, section))
            print()
    return 0


def cmd_survey(args: argparse.Namespace) -> int:
    from ..inventory.survey import survey

    doc = survey(root_of(args.root))
    if args.format == "yaml":
        from ..core.yamlout import dumps

        sys.stdout.write(dumps(doc))
    else:
        print(json.dumps(doc, indent=2))
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from ..inventory.record import record

    try:
        manifest = record(args.dir, root_of(args.root))
    except (FileExistsError, OSError) as e:
        print(f"record: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"recorded {len(manifest.entries)} entries into {args.dir} (MANIFEST.json)")
    return 0


def cmd_eventlog(args: argparse.Namespace) -> int:
    from ..hal import eventlog

    path = Path(args.file) if args.file else Path(root_of(args.root)) / eventlog.LOG_PATH
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

    from ..hal import tpm
    from ..security.state import security_state

    # The TSS logs each failed step through Python's logging; the one line below says it.
    for name in ("tcti", "esys"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    root = root_of(args.root)
    with tpm.open_tpm_if_any(args.tcti, lambda e: print(f"warning: {e}", file=sys.stderr)) as t:
        print(json.dumps(security_state(root, t), indent=2))
    return 0


def cmd_storage(args: argparse.Namespace) -> int:
    """`storage import` never fails (a boot must go on without a missing disk): each
    problem is a warning line in the journal, and so is anything unforeseen (a bug, a
    machine without what a step reads), after its trace. `storage scrub` fails when a
    scrub did, so the timer's service shows it."""
    if args.action == "scrub":
        from ..apply import storage

        report = storage.scrub_pools()
        _print_report("scrub", report)
        return 1 if report.problems else 0
    try:
        _storage_import(args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        print(f"<4>import: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


def _storage_import(args: argparse.Namespace) -> None:
    from ..apply import storage
    from ..state import store

    state = store.state_dir(args.state_dir)
    root = root_of(args.root)
    steps: tuple[Callable[[], storage.Report], ...] = (
        lambda: storage.open_drives(state, root),
        lambda: storage.import_pools(state),
        lambda: storage.ensure_local_pool(state, root),
    )
    for step in steps:
        try:
            _print_report("import", step())
        except Exception as e:  # one step's trouble leaves the others to run
            import traceback

            traceback.print_exc()
            print(f"<4>import: {type(e).__name__}: {e}", file=sys.stderr)


def _print_report(action: str, report: storage.Report) -> None:
    for done in report.done:
        print(f"<6>{action}: {done}", file=sys.stderr)
    for problem in report.problems:
        print(f"<4>{problem}", file=sys.stderr)
