"""Atomic writes, and trees of files applied all-or-nothing.

A write is a temp file beside the target, fsync'ed, renamed over it, and the directory
fsync'ed, so a crash leaves the old or the new content, never a mix. Applying a tree
snapshots what it replaces and puts it back if any step fails.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .tree import File, Symlink, Tree


def describe_os_error(e: OSError, root: str | os.PathLike[str] | None = None) -> str:
    """`e` without the paths of this machine it names, for a client: the reason and the
    file as it is under `root` (`/etc/sysctl.d` when writing into a target), or only its
    base name. The journal keeps str(e)."""
    reason = e.strerror or type(e).__name__
    name = e.filename
    if name is None:
        return reason
    path = os.fsdecode(name)
    if root is not None:
        base = os.path.abspath(os.fspath(root))
        full = os.path.abspath(path)
        if full == base or full.startswith(base.rstrip("/") + "/"):
            inside = os.path.relpath(full, base)
            return f"{reason}: /{'' if inside == '.' else inside}"
    return f"{reason}: {os.path.basename(path.rstrip('/')) or path}"


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")


def atomic_write(
    path: str | os.PathLike[str], data: bytes, mode: int = 0o644, *, durable: bool = True
) -> None:
    """Replace `path` atomically; `durable` also waits for the disk (fsync), for state."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    # O_EXCL + the final mode from the start: a secret is never readable, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)  # the umask may have narrowed it
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_symlink(path: str | os.PathLike[str], target: str, *, durable: bool = True) -> None:
    link = Path(path)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(link)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(link.parent)


def read_entry(path: Path) -> File | Symlink | None:
    """What is at `path` now, as a tree entry (None when nothing is)."""
    try:
        if path.is_symlink():
            return Symlink(os.readlink(path))
        st = path.stat()
        return File(path.read_bytes(), st.st_mode & 0o7777)
    except FileNotFoundError:
        return None


def _put(path: Path, entry: File | Symlink, *, durable: bool = True) -> None:
    if isinstance(entry, Symlink):
        atomic_symlink(path, entry.target, durable=durable)
    else:
        atomic_write(path, entry.content, entry.mode, durable=durable)


def _join(root: Path, key: str) -> Path:
    rel = key.lstrip("/")
    if not rel or ".." in Path(rel).parts:
        raise ValueError(f"refusing to write outside the root: {key!r}")
    return root / rel


def write_tree(root: str | os.PathLike[str], tree: Tree, *, durable: bool = True) -> None:
    """Write every entry of `tree` under `root`; on failure remove what was written.

    `durable=False` skips the fsyncs: for exports (`render --out`), not for state."""
    base = Path(root)
    written: list[Path] = []
    try:
        for key, entry in tree.items():
            path = _join(base, key)
            _put(path, entry, durable=durable)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class Owned:
    """Files of a directory that belong to us: `match(name)` says which."""

    directory: str
    match: Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Applied:
    written: tuple[str, ...]
    removed: tuple[str, ...]


def owned_paths(root: str | os.PathLike[str], owned: Iterable[Owned]) -> list[Path]:
    """The files under `root` that `owned` claims, as they are now."""
    base = Path(root)
    out: list[Path] = []
    for rule in owned:
        directory = _join(base, rule.directory)
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        out += [directory / n for n in names if rule.match(n)]
    # Two rules may claim one file (a section's .link files lie among networkd's): listed
    # twice, it would be snapshotted again after its removal and lost on a rollback.
    return list(dict.fromkeys(out))


def _missing_dirs(directory: Path, base: Path) -> list[Path]:
    """The directories a write into `directory` will create, outermost first."""
    missing: list[Path] = []
    while directory != base and not directory.exists() and not directory.is_symlink():
        missing.append(directory)
        directory = directory.parent
    return missing[::-1]


def apply_tree(
    root: str | os.PathLike[str],
    tree: Tree,
    owned: Iterable[Owned],
    *,
    check: Callable[[], None] | None = None,
) -> Applied:
    """Make `root` hold `tree`: write changed entries, remove our stale files.

    Entries already holding the wanted content are left alone (their mtime too, so
    daemons watching them see no change). `check` is called before every write or
    removal and once after the last (a deadline, say): whatever it raises, like any
    other failure, restores every entry touched to what it was (content, mode, link
    target, absence; directories created are removed again) and is raised.
    """
    base = Path(root)
    wanted = {_join(base, key): entry for key, entry in tree.items()}
    stale = [path for path in owned_paths(base, owned) if path not in wanted]

    before: dict[Path, File | Symlink | None] = {}
    created: list[Path] = []
    try:
        for path, entry in wanted.items():
            current = read_entry(path)
            if current == entry:
                continue
            if check is not None:
                check()
            before[path] = current
            created += _missing_dirs(path.parent, base)
            _put(path, entry)
        for path in stale:
            if check is not None:
                check()
            before[path] = read_entry(path)
            path.unlink(missing_ok=True)
        if check is not None:
            check()
    except BaseException as e:
        _undo(before, created, e)
        raise
    written = tuple(str(p) for p in before if p in wanted)
    removed = tuple(str(p) for p in stale)
    return Applied(written, removed)


def _undo(
    before: dict[Path, File | Symlink | None], created: list[Path], cause: BaseException
) -> None:
    """Put back what apply_tree touched, newest first; a failure to restore one entry
    does not stop the others (it is noted on the error being raised)."""
    for path, old in reversed(before.items()):
        try:
            if old is None:
                path.unlink(missing_ok=True)
            else:
                _put(path, old)
        except OSError as e:
            cause.add_note(f"restoring {path} failed: {e}")
    for directory in reversed(created):
        try:
            directory.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            cause.add_note(f"removing {directory} again failed: {e}")
