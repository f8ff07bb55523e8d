"""`:backup` and `:restore` of the state directory, as IncusOS does for /var/lib/incus-os.

The archive is a gzip'ed tar of every regular file in the state dir: the config, its
last good copy, the service's flags, and the API's server key. That makes it sensitive:
whoever holds it can impersonate this machine's API and read its recovery keys.

A restore is checked whole before anything changes (`read_archive`): gzip and tar must
parse, members must be regular files or directories with relative, normalised names
(no `..`, no absolute paths, no links or devices), within count and size limits, and the
config it carries must be a valid document. Only then does `swap_in` put it in place:
extract beside the state dir, rename the state dir aside, rename the new one in, so a
crash leaves one or the other, never a mix; `swap_back` undoes it if applying fails.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from ..config import Config, ConfigError, parse_toml
from ..core.files import fsync_dir
from ..state.store import CONFIG_FILE

MAX_ARCHIVE_BYTES = 16 << 20
MAX_UNPACKED_BYTES = 64 << 20
MAX_MEMBERS = 1024
# What IncusOS's restore can be told to keep from the running machine (its third,
# local-data-encryption-key, comes with the storage work: there is no such key yet).
SKIP_OPTIONS = ("encryption-recovery-keys", "network-macs")


class ArchiveError(ValueError):
    """The archive cannot be restored; the message says which member and why."""


@dataclass(frozen=True, slots=True)
class Archive:
    files: dict[str, bytes]
    config: Config


def keep_running(archived: Config, running: Config, skip: tuple[str, ...]) -> Config:
    """The archived config with what `skip` names taken from the running one: the
    recovery keys, or the hardware addresses (restoring onto other hardware: each
    interface and bond keeps this machine's MACs, matched by name)."""
    out = archived
    if "encryption-recovery-keys" in skip:
        keys = running.security.encryption_recovery_keys
        out = replace(out, security=replace(out.security, encryption_recovery_keys=keys))
    if "network-macs" in skip:
        nics = {i.name: i.hwaddr for i in running.network.interfaces}
        bonds = {b.name: b for b in running.network.bonds}
        interfaces = tuple(
            replace(i, hwaddr=nics.get(i.name, i.hwaddr)) for i in out.network.interfaces
        )
        new_bonds = tuple(
            replace(b, hwaddr=bonds[b.name].hwaddr, members=bonds[b.name].members)
            if b.name in bonds
            else b
            for b in out.network.bonds
        )
        out = replace(out, network=replace(out.network, interfaces=interfaces, bonds=new_bonds))
    return out


def create(state_dir: str | os.PathLike[str]) -> bytes:
    buf = io.BytesIO()
    base = Path(state_dir)
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(base.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                continue  # an atomic write in flight
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(base)))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if path.is_file():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def _member_name(name: str) -> str:
    pure = PurePosixPath(name)
    if pure.is_absolute() or not pure.parts or ".." in pure.parts or "\0" in name:
        raise ArchiveError(f"member {name!r}: not a relative path inside the archive")
    return str(pure)


def read_archive(data: bytes) -> Archive:
    """Everything a restore will write, checked; nothing is touched."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"archive larger than {MAX_ARCHIVE_BYTES} bytes")
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"more than {MAX_MEMBERS} members")
                name = _member_name(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveError(f"member {name!r}: only regular files are restored")
                total += member.size
                if total > MAX_UNPACKED_BYTES:
                    raise ArchiveError(f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                handle = tar.extractfile(member)
                if handle is None:
                    raise ArchiveError(f"member {name!r}: unreadable")
                if name in files:
                    raise ArchiveError(f"member {name!r}: appears twice")
                files[name] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"not a gzip'ed tar archive: {e}") from None
    # A backup always holds the config: an archive without one (an empty tar is a
    # valid tar) would restore a blank machine.
    if CONFIG_FILE not in files:
        raise ArchiveError(f"no {CONFIG_FILE} in the archive: not a backup of this service")
    try:
        config = parse_toml(files[CONFIG_FILE])
    except ConfigError as e:
        raise ArchiveError(f"{CONFIG_FILE}: {e.errors[0]}") from None
    return Archive(files, config)


def swap_in(state_dir: str | os.PathLike[str], files: dict[str, bytes]) -> Path:
    """Replace the state dir's contents with `files`; returns where the old one went."""
    base = Path(state_dir)
    tag = secrets.token_hex(4)
    new, old = (
        base.with_name(f".{base.name}.restore-{tag}"),
        base.with_name(f".{base.name}.old-{tag}"),
    )
    new.mkdir(mode=0o700)
    try:
        for name, content in files.items():
            path = new / name
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        os.rename(base, old)
        os.rename(new, base)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    fsync_dir(base.parent)
    return old


def swap_back(state_dir: str | os.PathLike[str], old: Path) -> None:
    base = Path(state_dir)
    failed = base.with_name(f"{old.name}.failed")
    os.rename(base, failed)
    os.rename(old, base)
    fsync_dir(base.parent)
    shutil.rmtree(failed, ignore_errors=True)
