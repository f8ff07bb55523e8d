"""The `incusos-hal` command.

    validate --config PATH [--machine [--root DIR]]   exit 0, or 2 with `field.path: message`
    render [--config PATH] [--root DIR] --out DIR   what configure + generator would write
    save --config PATH [--state-dir DIR]       validate, then store atomically
    configure [--boot] [--state-dir DIR]       apply the stored config to this machine
    inventory [--root DIR] [--format F] [SECTION...]   Incus's GET /1.0/resources, and more
    record DIR [--root DIR]                    capture what inventory reads, to replay it
    survey [--root DIR] [--format F]           a migration tool's view: firmware, TPM, disks, OS
    eventlog [FILE | --root DIR] [--pcrs]      the TCG event log, or the PCRs it replays to
    security [--root DIR] [--tcti T]           GET /1.0/system/security's state (no secrets)
    serve [--socket P] [--listen A:P] [--target DIR]   the API service
    seed check PATH [--root DIR | --no-machine]   an install seed, as first boot checks it:
                                               exit 0, or 2 with `FILE: field.path: message`
    seed apply [--boot] [--state-dir DIR] [--source PATH]   first boot: apply it once
    remote add NAME URL [--cert C --key K] | list | remove NAME   where the API is
    get PATH | edit PATH [--file F] | confirm | tpm-rebind | backup FILE | restore FILE
                                               [--remote NAME]

Environment: INCUSOS_HAL_STATE_DIR (default /var/lib/incusos-hal), INCUSOS_HAL_ROOT
(re-roots reads of /sys, /proc, /dev and /run/udev).
"""

from __future__ import annotations

import os
import sys

from .. import __version__
from .common import DEFAULT_UNIT_DIR, EXIT_INVALID, root_of

# Not `typing.TYPE_CHECKING`: importing typing is a cost `eventlog --pcrs` does not pay.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse

# Each command lives in one of three modules, imported only when it runs: `admin` (this
# machine's config and the service), `machine` (the HAL's readings) and `remote` (the
# API's client, standard library only). A command pays for its own imports, no others;
# `eventlog --pcrs FILE`, plain `inventory` and the configure unit's `configure --boot`
# (when its cache holds) answer before argparse is even loaded (see main).


def parser() -> argparse.ArgumentParser:
    import argparse

    from ..state.paths import SOCKET

    p = argparse.ArgumentParser(prog="incusos-hal", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser(
        "validate",
        help="check a config file",
        description="Check the document alone (pure: the same answer on any machine). "
        "With --machine, also the checks a PUT and a restore make against the machine "
        "under --root, for what differs from the stored document (--state-dir): at least "
        "one recovery key, PCI addresses that exist, the CPU governor and congestion "
        "algorithm, a listen address this machine has, NIC names that resolve once.",
    )
    v.add_argument("--config", required=True, help="TOML as stored, or .json in the API's shape")
    v.add_argument("--machine", action="store_true", help="also check against this machine")
    v.add_argument("--root", help="with --machine: read the machine under this root")
    v.add_argument("--state-dir", help="with --machine: where the running document is stored")
    v.set_defaults(command=("admin", "cmd_validate"))

    r = sub.add_parser("render", help="write what configure and the generator would")
    r.add_argument("--config", help="config file (default: the stored one, with fallback)")
    r.add_argument("--root", help="read /sys from this root (default $INCUSOS_HAL_ROOT or /)")
    r.add_argument("--out", required=True, help="directory to write the tree into")
    r.add_argument("--state-dir", help="where the config is stored (for SourcePath=)")
    r.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    r.set_defaults(command=("admin", "cmd_render"))

    s = sub.add_parser("save", help="validate a config and store it")
    s.add_argument("--config", required=True)
    s.add_argument("--state-dir")
    s.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    s.set_defaults(command=("admin", "cmd_save"))

    c = sub.add_parser("configure", help="apply the stored config to this machine")
    c.add_argument("--boot", action="store_true", help="boot mode: log problems, exit 0")
    c.add_argument("--state-dir")
    c.add_argument("--target", default="/", help="write under this root instead of /")
    c.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    c.set_defaults(command=("admin", "cmd_configure"))

    i = sub.add_parser("inventory", help="the Incus-shaped resources document")
    i.add_argument("--root", help="read a recorded tree (or a mounted root) instead of /")
    i.add_argument("--format", choices=INVENTORY_FORMATS, help="default: table on a tty")
    i.add_argument(
        "--load-snake-case",
        action="store_true",
        help="`load` with snake_case keys (Incus writes Go's field names)",
    )
    i.add_argument("sections", nargs="*", metavar="SECTION", help="default: Incus's sections")
    i.set_defaults(command=("machine", "cmd_inventory"))

    sv = sub.add_parser("survey", help="what a migration needs to know about a machine")
    sv.add_argument("--root", help="a recorded tree or a mounted disk image instead of /")
    sv.add_argument("--format", choices=("json", "yaml"), default="json")
    sv.set_defaults(command=("machine", "cmd_survey"))

    ev = sub.add_parser("eventlog", help="the TCG event log, parsed and replayed")
    ev.add_argument("file", nargs="?", metavar="FILE", help="default: the running machine's")
    ev.add_argument("--root", help="read the log under this root")
    ev.add_argument("--pcrs", action="store_true", help="only the replayed PCR values")
    ev.set_defaults(command=("machine", "cmd_eventlog"))

    se = sub.add_parser("security", help="Secure Boot, TPM and encrypted volumes")
    se.add_argument("--root", help="read efivarfs, the event log and crypttab under this root")
    se.add_argument("--tcti", help="the TPM (default: $TPM2TOOLS_TCTI or device:/dev/tpmrm0)")
    se.set_defaults(command=("machine", "cmd_security"))

    st = sub.add_parser(
        "storage",
        help="open encrypted drives and import managed pools (boot), or scrub every pool",
    )
    st.add_argument("action", choices=("import", "scrub"))
    st.add_argument("--state-dir")
    st.add_argument("--root", help="import: find the drives under this root")
    st.set_defaults(command=("machine", "cmd_storage"))

    sr = sub.add_parser("serve", help="the API service")
    sr.add_argument("--state-dir")
    sr.add_argument("--socket", default=SOCKET)
    sr.add_argument("--listen", help="HTTPS on host:port (default: the config's listen_address)")
    sr.add_argument("--root", help="read the machine under this root")
    sr.add_argument(
        "--target", default="/", help="write config under this root; not /: no systemd calls"
    )
    sr.add_argument("--tcti", help="the TPM (default: $TPM2TOOLS_TCTI or device:/dev/tpmrm0)")
    sr.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    # BASE,PER_ITEM seconds (apply.deadline.TimeLimit): for tests that need an apply to run out.
    sr.add_argument("--apply-time-limit", help=argparse.SUPPRESS)
    # Seconds: for tests of an update server that hangs.
    sr.add_argument("--update-read-timeout", type=float, help=argparse.SUPPRESS)
    sr.set_defaults(command=("admin", "cmd_serve"))

    sd = sub.add_parser("seed", help="the install seed: check it, apply it on first boot")
    seed_sub = sd.add_subparsers(dest="seed_command", required=True)
    sc = seed_sub.add_parser(
        "check",
        help="validate a seed as first boot would; apply nothing",
        description="Every file of the seed (a tar, a directory, or a device holding a "
        "tar, a FAT or an ISO volume) decoded and validated as first boot does, and each "
        "section as its PUT is checked against this machine (--root). One line per "
        "problem, `FILE: field.path: message`; exit 0 when all are valid, 2 otherwise.",
    )
    sc.add_argument("path", metavar="PATH")
    sc.add_argument("--root", help="check against the machine under this root")
    sc.add_argument(
        "--no-machine", action="store_true", help="the document's rules only (another machine's)"
    )
    sc.add_argument("--state-dir", help="the stored document the seed applies over")
    sc.set_defaults(command=("seed", "cmd_seed_check"))
    sa = seed_sub.add_parser("apply", help="first boot: apply the seed once, or install")
    sa.add_argument("--boot", action="store_true", help="boot mode: log problems, exit 0")
    sa.add_argument("--state-dir")
    sa.add_argument("--root", help="read the machine under this root")
    sa.add_argument("--source", help="the seed (default: $INCUSOS_HAL_SEED, else found)")
    # The install media's disk (default: the disk under /usr): for tests on loop devices.
    sa.add_argument("--install-from", help=argparse.SUPPRESS)
    sa.set_defaults(command=("seed", "cmd_seed_apply"))

    def client(name: str, help_text: str, func: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--remote", help="a remote's name (default $INCUSOS_HAL_REMOTE or local)")
        c.set_defaults(command=("remote", func))
        return c

    rm = client("remote", "the API endpoints this client knows", "cmd_remote")
    rm.add_argument("action", choices=("add", "list", "remove"))
    rm.add_argument("name", nargs="?")
    rm.add_argument("url", nargs="?", help="unix:///path or https://host:port")
    rm.add_argument("--cert", help="client certificate (PEM) for https")
    rm.add_argument("--key", help="its key (default: in the certificate file)")
    g = client("get", "GET an API path", "cmd_get")
    g.add_argument("path")
    g.add_argument("--format", choices=("table", "yaml", "json"), default="table")
    ed = client("edit", "change a {config, state} object (If-Match guarded)", "cmd_edit")
    ed.add_argument("path")
    ed.add_argument("--file", help="the new {config} as JSON (- for stdin); default: $EDITOR")
    client("confirm", "keep a network change that waits for confirmation", "cmd_confirm")
    rebind_help = "re-seal the volumes to the TPM after a recovery-key boot"
    client("tpm-rebind", rebind_help, "cmd_tpm_rebind")
    b = client("backup", "save the state directory (holds secrets)", "cmd_backup")
    b.add_argument("file")
    rs = client("restore", "replace the state directory from a backup", "cmd_restore")
    rs.add_argument("file")
    rs.add_argument("--skip", action="append", default=[], help="encryption-recovery-keys")

    uc = client("update-check", "check for updates now (waits for the check)", "cmd_update_check")
    uc.add_argument("--os-only", action="store_true", help="the OS only, no applications")
    # The timer and the boot check say who asked: a timer check keeps to the windows.
    uc.add_argument("--trigger", choices=("user", "boot", "timer"), default="user")
    co = sub.add_parser("console", help="the status screen (tty1 on the appliance)")
    co.add_argument("--to", action="append", help="a terminal to draw on (default: stdout)")
    co.add_argument("--once", action="store_true", help="draw once and exit")
    co.add_argument("--interval", type=float, default=5.0, help="seconds between redraws")
    co.add_argument("--root", help="read the machine under this root")
    co.add_argument("--state-dir")
    co.set_defaults(command=("console", "cmd_console"))

    rec = sub.add_parser("record", help="copy what inventory reads into DIR, to replay it")
    rec.add_argument("dir", metavar="DIR")
    rec.add_argument("--root", help="record from this root instead of /")
    rec.set_defaults(command=("machine", "cmd_record"))
    return p


INVENTORY_FORMATS = ("json", "yaml", "table")


def _inventory_args(argv: list[str]) -> tuple[str | None, str | None, list[str]] | None:
    """(root, format, sections) when the arguments are `inventory` with `--root DIR`,
    `--format F` and SECTIONs in a shape argparse reads the same way: what main answers
    without argparse (a third of the command's start-up). Anything else (another option,
    --help, `--opt=value`, an abbreviation, a repeated option, a dash-led or empty value,
    sections split by an option, which argparse refuses) goes through the parser."""
    if not argv or argv[0] != "inventory":
        return None
    options: dict[str, str] = {}
    sections: list[str] = []
    after_sections = False  # an option came after the run of sections
    rest = argv[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--root", "--format"):
            value = rest[i + 1] if i + 1 < len(rest) else ""
            if arg in options or not value or value.startswith("-"):
                return None
            if arg == "--format" and value not in INVENTORY_FORMATS:
                return None
            options[arg] = value
            after_sections = bool(sections)
            i += 2
        elif arg.startswith("-") or after_sections:
            return None
        else:
            sections.append(arg)
            i += 1
    return options.get("--root"), options.get("--format"), sections


def _eventlog_pcrs_file(argv: list[str]) -> str | None:
    """FILE when the arguments are exactly `eventlog --pcrs FILE` (or `eventlog FILE
    --pcrs`): what main answers without argparse, the command a script runs at every boot to
    compare with the TPM. Anything else (another option, --help, an abbreviation argparse
    would expand, an empty or dash-led FILE) goes through the parser."""
    if len(argv) != 3 or argv[0] != "eventlog" or argv[1:].count("--pcrs") != 1:
        return None
    file = argv[2] if argv[1] == "--pcrs" else argv[1]
    return file if file and not file.startswith("-") else None


def _eventlog_pcrs(file: str) -> int:
    """cmd_eventlog's `--pcrs FILE`, byte for byte, importing only hal.eventrecords."""
    from ..hal import eventrecords

    try:
        with open(file, "rb") as f:
            text = eventrecords.pcrs_json(f.read())
    except (OSError, eventrecords.EventLogError) as e:
        from pathlib import Path  # how cmd_eventlog names the file

        why = e.strerror if isinstance(e, OSError) else e
        print(f"eventlog: {Path(file)}: {why}", file=sys.stderr)
        return EXIT_INVALID
    print(text)
    return 0


_CONFIGURE_BOOT_OPTIONS = ("--unit-dir", "--target", "--state-dir")


def _configure_boot_options(argv: list[str]) -> dict[str, str] | None:
    """The options when the arguments are `configure --boot` with at most one each of
    --unit-dir, --target and --state-dir as `--opt=VALUE` or `--opt VALUE` (the
    configure unit's ExecStart=, and a scratch run of it): what main tries the boot
    cache for. Anything else (--help, an abbreviation argparse would expand, an empty or
    dash-led value, a repeated option) goes through the parser."""
    if not argv or argv[0] != "configure" or argv.count("--boot") != 1:
        return None
    rest = [arg for arg in argv[1:] if arg != "--boot"]
    options: dict[str, str] = {}
    i = 0
    while i < len(rest):
        name, eq, value = rest[i].partition("=")
        if not eq and i + 1 < len(rest):
            i += 1
            value = rest[i]
        i += 1
        if name not in _CONFIGURE_BOOT_OPTIONS or name in options:
            return None
        if not value or value.startswith("-"):
            return None
        options[name] = value
    return options


def _configure_boot(options: dict[str, str]) -> bool:
    """cmd_configure's `--boot` run from the cache (apply.fast); False: nothing done."""
    from ..apply import fast

    state = options.get("--state-dir") or os.environ.get(fast.STATE_DIR_ENV)
    return fast.configure_boot(
        state=state or fast.DEFAULT_STATE_DIR,
        sys_root=root_of(None),
        target=options.get("--target", "/"),
        unit_dir=options.get("--unit-dir", DEFAULT_UNIT_DIR),
        version=__version__,
    )


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    fast = _eventlog_pcrs_file(given)
    if fast is not None:
        return _eventlog_pcrs(fast)
    boot = _configure_boot_options(given)
    if boot is not None:
        if _configure_boot(boot):
            return 0
        # The full path, without building the parser: argparse is a tenth of its imports,
        # and the boot waits for this step.
        from types import SimpleNamespace

        from .admin import cmd_configure

        return cmd_configure(
            SimpleNamespace(  # type: ignore[arg-type]  # the parser's Namespace, by duck
                boot=True,
                state_dir=boot.get("--state-dir"),
                target=boot.get("--target", "/"),
                unit_dir=boot.get("--unit-dir", DEFAULT_UNIT_DIR),
            )
        )
    inventory = _inventory_args(given)
    if inventory is not None:
        from .machine import inventory as run_inventory

        return run_inventory(*inventory)
    import importlib

    args = parser().parse_args(argv)
    module_name, function = args.command
    module = importlib.import_module(f"{__name__}.{module_name}")
    if module_name == "remote":
        code: int = module.client_command(getattr(module, function))(args)
    else:
        code = getattr(module, function)(args)
    return code
