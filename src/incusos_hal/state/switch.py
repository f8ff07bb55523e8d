"""Replacing the state directory's files in one switch, crash-safe, inside the directory
itself (so it works when the state directory is a mount point under a read-only parent,
as the unit's sandbox makes it).

The new files are staged in `<state>/.restore-<id>/new/`; an atomically written marker is
the commit point; then the current files are renamed to `old/` and the new ones in. The
move is idempotent, so after a crash at any point `complete_switches` finishes a switch
whose marker was written and discards one whose marker was not. `switch_back` runs the
same switch the other way (the old files come back as the same inodes).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.files import atomic_write, fsync_dir
from .paths import IDENTITY, MARKER, MODES, STAGING_PREFIX


@contextlib.contextmanager
def locked(state_dir: Path, how: int) -> Iterator[None]:
    """flock on the state dir: a switch excludes backups and another process's recovery
    (`incusos-hal configure` at boot)."""
    try:
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class _Marker:
    into: str  # the staging subdirectory whose files go in
    out: str  # where the files they replace go
    names: tuple[str, ...]  # what `into` held when the marker was written
    done: bool = False

    def encode(self) -> bytes:
        data = {"into": self.into, "out": self.out, "names": list(self.names), "done": self.done}
        return json.dumps(data, sort_keys=True).encode() + b"\n"


class DamagedMarker(ValueError):
    """A staging directory's marker that no switch of this module wrote."""


def _read_marker(stage: Path) -> _Marker | None:
    """The staging directory's marker; None when there is none (or no directory)."""
    try:
        raw = json.loads(Path(stage, MARKER).read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        raise DamagedMarker(f"{stage.name}/{MARKER}: unreadable") from None
    try:
        into, out, names = raw["into"], raw["out"], list(raw["names"])
    except (KeyError, TypeError):
        raise DamagedMarker(f"{stage.name}/{MARKER}: not a switch marker") from None
    for part in (into, out, *names):
        if not isinstance(part, str) or "/" in part or part in ("", ".", ".."):
            raise DamagedMarker(f"{stage.name}/{MARKER}: not a switch marker")
    return _Marker(into, out, tuple(names), raw.get("done") is True)


def _write_marker(stage: Path, marker: _Marker) -> None:
    atomic_write(stage / MARKER, marker.encode(), 0o600)


def _move(state: Path, stage: Path, marker: _Marker) -> None:
    """Every entry of the state dir out to `marker.out`, then `marker.into`'s in.
    Idempotent: run again after a crash at any point, it ends in the same place."""
    source, out = stage / marker.into, stage / marker.out
    out.mkdir(mode=0o700, exist_ok=True)
    listed = set(marker.names)
    for name in sorted(os.listdir(state)):
        if name.startswith(STAGING_PREFIX):
            continue
        if name in listed and not os.path.lexists(source / name):
            continue  # moved in before the crash
        os.rename(state / name, out / name)
    fsync_dir(out)
    fsync_dir(state)
    for name in sorted(os.listdir(source)):
        os.rename(source / name, state / name)
    fsync_dir(state)
    fsync_dir(source)
    _write_marker(stage, replace(marker, done=True))


def _stagings(state: Path) -> list[Path]:
    try:
        names = os.listdir(state)
    except FileNotFoundError:
        return []
    return [state / n for n in sorted(names) if n.startswith(STAGING_PREFIX)]


def _write_new(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # past the umask
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def _current(state: Path, names: tuple[str, ...]) -> dict[str, tuple[bytes, int]]:
    """`names` as they are in the state dir (content, mode), all of them or none."""
    out: dict[str, tuple[bytes, int]] = {}
    for name in names:
        try:
            with open(state / name, "rb") as f:
                out[name] = (f.read(), os.fstat(f.fileno()).st_mode & 0o7777)
        except FileNotFoundError:
            return {}
    return out


def switch_in(
    state_dir: str | os.PathLike[str],
    files: Mapping[str, bytes],
    keep: tuple[str, ...] = IDENTITY,
    check: Callable[[Path], None] = lambda staged: None,
) -> Path:
    """Put `files` in place of the state dir's contents in one switch; returns the
    staging directory (holding the previous files) for `switch_back` or `discard`.
    `keep` names files carried over from the running state when `files` has none of
    them. `check` sees the staged directory before the commit point: whatever it raises
    is raised, with nothing changed."""
    state = Path(state_dir)
    stage = state / f"{STAGING_PREFIX}{os.urandom(6).hex()}"
    with locked(state, fcntl.LOCK_EX):
        new = stage / "new"
        new.mkdir(mode=0o700, parents=True)
        try:
            content = {name: (data, MODES.get(name, 0o600)) for name, data in files.items()}
            if not any(name in files for name in keep):
                content.update(_current(state, keep))
            for name, (data, mode) in sorted(content.items()):
                _write_new(new / name, data, mode)
            check(new)
            fsync_dir(new)
            fsync_dir(stage)
        except BaseException:
            _rmtree(stage, ignore_errors=True)
            raise
        marker = _Marker("new", "old", tuple(sorted(os.listdir(new))))
        _write_marker(stage, marker)  # the commit point
        _move(state, stage, marker)
    return stage


def switch_back(state_dir: str | os.PathLike[str], stage: Path) -> None:
    """The files from before `switch_in` back in place, exactly (they are the same
    inodes, moved); what the restore put there goes to `failed/`."""
    state = Path(state_dir)
    with locked(state, fcntl.LOCK_EX):
        marker = _Marker("old", "failed", tuple(sorted(os.listdir(stage / "old"))))
        _write_marker(stage, marker)
        _move(state, stage, marker)


def discard(stage: Path) -> None:
    _rmtree(stage, ignore_errors=True)
    with contextlib.suppress(OSError):
        fsync_dir(stage.parent)


def complete_switches(state_dir: str | os.PathLike[str]) -> list[str]:
    """Make the state dir whole after a crash: a staged switch whose marker was written
    is completed; one without a marker (interrupted before its commit point) is
    discarded. Staging directories with a completed switch are left for `recover`.
    Returns the problems: a damaged marker leaves its staging directory as it is."""
    state = Path(state_dir)
    problems: list[str] = []
    with locked(state, fcntl.LOCK_EX):
        for stage in _stagings(state):
            try:
                marker = _read_marker(stage)
            except DamagedMarker as e:
                problems.append(str(e))
                continue
            if marker is None:
                if stage.is_dir() and not stage.is_symlink():
                    _rmtree(stage, ignore_errors=True)
                else:
                    stage.unlink(missing_ok=True)
            elif not marker.done:
                _move(state, stage, marker)
    return problems


def recover(state_dir: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """At the service's start: complete any interrupted switch, remove its staging
    directory; returns what happened (empty: nothing was interrupted) and the problems
    (a damaged marker: its staging directory is left for an operator to look at)."""
    state = Path(state_dir)
    done: list[str] = []
    markers: dict[Path, _Marker | None] = {}
    with locked(state, fcntl.LOCK_EX):
        for stage in _stagings(state):
            with contextlib.suppress(DamagedMarker):
                markers[stage] = _read_marker(stage)
    problems = complete_switches(state)
    for stage, marker in markers.items():
        if marker is None:
            done.append("a restore interrupted before its switch was discarded")
        elif marker.into == "new":
            done.append("a restore interrupted after its switch: the restored state is kept")
        else:
            done.append("a restore whose apply failed was interrupted: the previous state is back")
        discard(stage)
    return done, problems


def _rmtree(path: Path, ignore_errors: bool = False) -> None:
    import shutil  # only on the paths that write (its imports are not in the boot path's)

    shutil.rmtree(path, ignore_errors=ignore_errors)
