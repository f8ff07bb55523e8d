"""The configure step: stored config -> the daemons' config files on this machine.

Runs as `incusos-hal-configure.service`, early in sysinit, before systemd-networkd and
the other daemons start (and, later, from the API after a change). It reads the stored
config (falling back like the generator), lists the NICs, renders, renames the managed
NICs to their `_p<mac>` names, and applies the files all-or-nothing, removing files of
ours that the new config no longer produces.

At boot it never fails: problems are logged (with sd-daemon priority prefixes, which
journald understands) and the machine comes up with the best config available.

From the API it runs in a worker thread under a `Deadline` checked between file writes:
on expiry the files go back to what they were and `TimedOut` is raised, so no thread is
ever left writing after the API gave up. One run at a time in a process (a lock), so a
rollback's run can never interleave with the run it undoes.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..boot.generator import refresh_cache
from ..config.model import Config
from ..core.files import Applied, apply_tree, describe_os_error, owned_paths
from ..hal import net, netlink
from ..render import Symlink
from ..render.system import LOCALTIME, ZONEINFO
from ..sections import Plan, owned, render_files
from ..state import store
from .deadline import Deadline, Interrupted

# How long to wait for udev to finish with a NIC before renaming it ourselves.
UDEV_WAIT_SECONDS = 5.0
IFF_UP = 0x1
# Held for a whole run: never two configure steps writing the same files at once.
_ONE_AT_A_TIME = threading.Lock()


def _log(level: int, message: str) -> None:
    for line in message.splitlines():
        sys.stderr.write(f"<{level}>{line}\n")
    sys.stderr.flush()


def info(message: str) -> None:
    _log(6, message)


def warn(message: str) -> None:
    _log(4, message)


def error(message: str) -> None:
    _log(3, message)


@dataclass(frozen=True, slots=True)
class Result:
    source: str
    # The document applied (the stored one, or what the store fell back to).
    config: Config
    applied: Applied | None
    renamed: tuple[tuple[str, str], ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.applied is not None and not self.problems


def _plan(config: Config, nics: tuple[net.Nic, ...], target: Path) -> Plan:
    plan = render_files(config, nics)
    link = plan.files.get(LOCALTIME)
    if isinstance(link, Symlink):
        zone = link.target.removeprefix(f"..{ZONEINFO}/")
        if not (target / ZONEINFO.lstrip("/") / zone).is_file():
            files = dict(plan.files)
            del files[LOCALTIME]
            warning = f"time zone {zone!r} is not installed here; {LOCALTIME} left as it is"
            plan = replace(plan, files=files, warnings=(*plan.warnings, warning))
    return plan


def _is_up(sys_root: Path, name: str) -> bool:
    try:
        flags = (sys_root / "sys/class/net" / name / "flags").read_text().strip()
        return bool(int(flags, 16) & IFF_UP)
    except (OSError, ValueError):
        return False


def _rename(
    sys_root: Path, renames: tuple[tuple[str, str], ...]
) -> tuple[list[tuple[str, str]], list[str]]:
    done: list[tuple[str, str]] = []
    problems: list[str] = []
    if not renames:
        return done, problems
    if net.udev_running(sys_root):
        # udev names NICs as it processes their "add" events; renaming under its feet
        # races with that, so let it finish first (bounded: a stuck udev is not ours).
        deadline = time.monotonic() + UDEV_WAIT_SECONDS
        while time.monotonic() < deadline and not all(
            net.udev_done(sys_root, old) for old, _ in renames
        ):
            time.sleep(0.05)
    for old, new in renames:
        if _is_up(sys_root, old):
            problems.append(f"{old}: cannot be renamed to {new} while it is up; left as it is")
            continue
        try:
            netlink.rename_link(old, new)
        except Exception as e:  # netlink errors come in many types
            problems.append(f"{old}: renaming to {new} failed: {e}")
        else:
            done.append((old, new))
    return done, problems


def configure(
    *,
    state: str | os.PathLike[str],
    sys_root: str | os.PathLike[str] = "/",
    target: str | os.PathLike[str] = "/",
    live: bool = True,
    unit_dir: str | None = None,
    deadline: Deadline | None = None,
    mark_good: bool = True,
) -> Result:
    """Apply the stored config. `live` allows acting on this machine's links and hostname.

    `deadline` is checked before renaming and between file writes (raising TimedOut with
    the files put back). `mark_good=False` leaves config.last-good.toml to the caller:
    the API records it only once systemd accepted the change, while at boot the files
    written are the whole apply."""
    with _ONE_AT_A_TIME:
        return _configure(state, Path(sys_root), Path(target), live, unit_dir, deadline, mark_good)


def _configure(
    state: str | os.PathLike[str],
    sys_path: Path,
    target_path: Path,
    live: bool,
    unit_dir: str | None,
    deadline: Deadline | None,
    mark_good: bool,
) -> Result:
    loaded = store.load(state)
    problems = list(loaded.problems)
    for p in loaded.problems:
        warn(p)
    if loaded.problems:
        warn(f"using {loaded.path or 'the default configuration'}")

    nics, nic_warnings = net.list_nics(sys_path)
    problems += nic_warnings
    try:
        plan = _plan(loaded.config, nics, target_path)
    except Exception as e:  # a rendering bug must not cost the machine its network
        error(f"rendering failed ({type(e).__name__}: {e}); using the default configuration")
        problems.append(f"rendering failed: {e}")
        plan = _plan(Config(), nics, target_path)
    for w in plan.warnings:
        warn(w)
    problems += plan.warnings
    if deadline is not None:
        # The allowance follows the work: files to write, files of ours that may go,
        # links to rename. Checked before anything on the machine changes.
        deadline.allow(len(plan.files) + len(owned_paths(target_path, owned())) + len(plan.renames))
        deadline.check()

    renamed: list[tuple[str, str]] = []
    if live:
        renamed, rename_problems = _rename(sys_path, plan.renames)
        for p in rename_problems:
            warn(p)
        problems += rename_problems

    try:
        applied = apply_tree(
            target_path, plan.files, owned(), check=None if deadline is None else deadline.check
        )
    except Interrupted as e:
        error(f"{e}; previous files restored")
        raise
    except OSError as e:
        error(f"writing the configuration failed, previous files restored: {e}")
        # The problem reaches API clients: the file as it is on the machine being written.
        reason = f"writing the configuration failed: {describe_os_error(e, target_path)}"
        return Result(loaded.source, loaded.config, None, tuple(renamed), (*problems, reason))
    for path in applied.written:
        info(f"wrote {path}")
    for path in applied.removed:
        info(f"removed {path}")

    dns = loaded.config.network.dns
    if live and dns is not None and dns.hostname and socket.gethostname() != dns.hostname:
        try:
            socket.sethostname(dns.hostname)
            info(f"hostname set to {dns.hostname}")
        except OSError as e:
            problems.append(f"setting the hostname failed: {e}")
            warn(problems[-1])

    try:
        if mark_good and loaded.source == "config" and store.mark_good(state, loaded.config):
            info("recorded as the last good configuration")
        if unit_dir is not None:
            refresh_cache(state, unit_dir)
    except OSError as e:
        problems.append(f"cannot update {state}: {e}")
        warn(problems[-1])
    return Result(loaded.source, loaded.config, applied, tuple(renamed), tuple(problems))
