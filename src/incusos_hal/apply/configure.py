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

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from .. import __version__
from ..boot.generator import cache_bytes as generator_cache_bytes
from ..boot.generator import refresh_cache
from ..config import dumps_toml
from ..config.model import Config
from ..core.files import Applied, Owned, apply_tree, atomic_write, describe_os_error, owned_paths
from ..hal import net, netlink
from ..render import Symlink
from ..render.system import LOCALTIME, ZONEINFO
from ..sections import Plan, owned, render_files
from ..state import store
from . import fast
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


def _plan(
    config: Config, nics: tuple[net.Nic, ...], target: Path
) -> tuple[Plan, tuple[tuple[str, bool], ...]]:
    """The files to write, and the files of the target it looked at (path, is a file)."""
    plan = render_files(config, nics)
    link = plan.files.get(LOCALTIME)
    checked: tuple[tuple[str, bool], ...] = ()
    if isinstance(link, Symlink):
        zone = link.target.removeprefix(f"..{ZONEINFO}/")
        zone_file = target / ZONEINFO.lstrip("/") / zone
        checked = ((str(zone_file), zone_file.is_file()),)
        if not checked[0][1]:
            files = dict(plan.files)
            del files[LOCALTIME]
            warning = f"time zone {zone!r} is not installed here; {LOCALTIME} left as it is"
            plan = replace(plan, files=files, warnings=(*plan.warnings, warning))
    return plan, checked


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
    first_boot: bool = True,
) -> Result:
    """Apply the stored config. `live` allows acting on this machine's links and hostname.

    `deadline` is checked before renaming and between file writes (raising TimedOut with
    the files put back). `mark_good=False` leaves config.last-good.toml to the caller:
    the API records it only once systemd accepted the change, while at boot the files
    written are the whole apply. `first_boot` (the boot's run) stores the default network
    when none is configured, as IncusOS does (`store.store_first_boot`); the files are the
    same either way."""
    with _ONE_AT_A_TIME:
        return _configure(
            state, Path(sys_root), Path(target), live, unit_dir, deadline, mark_good, first_boot
        )


def _configure(
    state: str | os.PathLike[str],
    sys_path: Path,
    target_path: Path,
    live: bool,
    unit_dir: str | None,
    deadline: Deadline | None,
    mark_good: bool,
    first_boot: bool,
) -> Result:
    sources = store.read_sources(state)
    loaded = store.load_from(state, *sources)
    problems = list(loaded.problems)
    # What it warns about before writing: the fast path, replaying this run, says it too.
    said = _said_of(loaded)
    for message in said:
        warn(message)

    facts = fast.nic_facts(str(sys_path))
    nics, nic_warnings = net.list_nics(sys_path)
    # Read again: a NIC that came or went meanwhile makes this run's facts uncertain.
    facts_held = fast.nic_facts(str(sys_path)) == facts
    problems += nic_warnings
    if first_boot:
        stored, _why = store.store_first_boot(state, nics)
        if stored is not None:
            info("first boot: the default network stored (every wired NIC: dhcp4, slaac)")
            loaded = store.Loaded(stored, "config", str(Path(state, store.CONFIG_FILE)))
            sources = store.read_sources(state)  # the boot cache keys on what is there now
    plan, checked, rendered = _render(loaded.config, nics, target_path, problems)
    for w in plan.warnings:
        warn(w)
    said += plan.warnings
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
        if unit_dir is not None:
            # The next boot's fast path would only fail the same way: no cache.
            with contextlib.suppress(OSError):
                Path(state, fast.CACHE_FILE).unlink(missing_ok=True)
        # The problem reaches API clients: the file as it is on the machine being written.
        reason = f"writing the configuration failed: {describe_os_error(e, target_path)}"
        return Result(loaded.source, loaded.config, None, tuple(renamed), (*problems, reason))
    for path in applied.written:
        info(f"wrote {path}")
    for path in applied.removed:
        info(f"removed {path}")

    if live:
        _set_hostname(loaded.config, problems)

    try:
        if mark_good and loaded.source == "config" and store.mark_good(state, loaded.config):
            info("recorded as the last good configuration")
        if unit_dir is not None:
            refresh_cache(state, unit_dir)
            # Never cached: a run that renamed links, fell back to the default after a
            # rendering bug, or saw the NICs change under it.
            cacheable = rendered and facts_held and not plan.renames
            boot = _BootRun(sources, loaded, facts, checked, tuple(said), plan)
            _store_boot_cache(state, sys_path, target_path, live, unit_dir, boot, cacheable)
    except OSError as e:
        problems.append(f"cannot update {state}: {e}")
        warn(problems[-1])
    return Result(loaded.source, loaded.config, applied, tuple(renamed), tuple(problems))


def _said_of(loaded: store.Loaded) -> list[str]:
    """What a run warns about the stored documents before it writes anything."""
    said = list(loaded.problems)
    if loaded.problems:
        said.append(f"using {loaded.path or 'the default configuration'}")
    return said


def _render(
    config: Config, nics: tuple[net.Nic, ...], target: Path, problems: list[str]
) -> tuple[Plan, tuple[tuple[str, bool], ...], bool]:
    """The plan for `config`, or for the default one when rendering fails (a rendering
    bug must not cost the machine its network); the last value says which."""
    try:
        plan, checked = _plan(config, nics, target)
    except Exception as e:
        error(f"rendering failed ({type(e).__name__}: {e}); using the default configuration")
        problems.append(f"rendering failed: {e}")
        plan, checked = _plan(Config(), nics, target)
        return plan, checked, False
    return plan, checked, True


def _set_hostname(config: Config, problems: list[str]) -> None:
    dns = config.network.dns
    # uname's nodename is the hostname; socket is imported only when it is to change.
    if dns is None or not dns.hostname or os.uname().nodename == dns.hostname:
        return
    import socket

    try:
        socket.sethostname(dns.hostname)
        info(f"hostname set to {dns.hostname}")
    except OSError as e:
        problems.append(f"setting the hostname failed: {e}")
        warn(problems[-1])


@dataclass(frozen=True, slots=True)
class _BootRun:
    """What a run used and did, for `configure.cache`."""

    sources: tuple[bytes | OSError | None, ...]
    loaded: store.Loaded
    facts: bytes
    checked: tuple[tuple[str, bool], ...]
    said: tuple[str, ...]
    plan: Plan


def _foreign(target: Path, rules: tuple[Owned, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Per owned directory: the names in it now that no rule claims."""
    out: dict[str, tuple[str, ...]] = {}
    for rule in rules:
        directory = target / rule.directory.lstrip("/")
        if str(directory) in out:
            continue
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            names = []
        claims = [r.match for r in rules if target / r.directory.lstrip("/") == directory]
        out[str(directory)] = tuple(n for n in names if not any(m(n) for m in claims))
    return tuple(out.items())


def _store_boot_cache(
    state: str | os.PathLike[str],
    sys_path: Path,
    target: Path,
    live: bool,
    unit_dir: str,
    run: _BootRun,
    cacheable: bool,
) -> None:
    """Record this run for the next boot's fast path (`apply.fast`), keyed by the state
    directory as the boot's full path would leave it: config.toml as this run read it,
    config.last-good.toml a copy of it when it was valid (as the run at boot, or the API
    once the change is confirmed, records it), and generator.cache matching both. Not
    cacheable, or the config changed meanwhile: the cache goes."""
    path = Path(state, fast.CACHE_FILE)
    current, last_good = run.sources
    if not cacheable or store.read_sources(state)[0] != current:
        path.unlink(missing_ok=True)
        return
    if isinstance(current, OSError) or isinstance(last_good, OSError):
        path.unlink(missing_ok=True)
        return
    if run.loaded.source == "config":
        last_good = dumps_toml(run.loaded.config)
    dns = run.loaded.config.network.dns
    entries = tuple(
        ("L", 0, str(target / key.lstrip("/")), fast.fsencode(entry.target))
        if isinstance(entry, Symlink)
        else ("F", entry.mode, str(target / key.lstrip("/")), entry.content)
        for key, entry in run.plan.files.items()
    )
    data = fast.encode_cache(
        header=fast.header(__version__, unit_dir, str(state), str(sys_path), str(target), live),
        inputs=(
            current,
            last_good,
            run.facts,
            generator_cache_bytes(state, unit_dir, current, last_good),
        ),
        file_checks=run.checked,
        hostname=dns.hostname if dns is not None and dns.hostname else None,
        warnings=run.said,
        foreign=_foreign(target, owned()),
        entries=entries,
    )
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    # 0600: it holds a copy of the config, which may hold a proxy password.
    atomic_write(path, data, 0o600)
