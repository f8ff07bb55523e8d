"""`:backup` and `:restore` of the state directory, as IncusOS does for /var/lib/incus-os.

The archive is a gzip'ed tar of the files a restore takes back (`RESTORED`): the config,
its last good copy, the service's flags and the API's server certificate and key. That
makes it sensitive: whoever holds it can impersonate this machine's API and read its
recovery keys. Derived and transient files stay out: the generator's cache, the staging
directories of a restore, and the document a network change waits to go back to.

Reading an archive (`read_archive`) is bounded in size and time whatever it claims: the
gzip stream is read through `_BoundedStream`, which stops at MAX_UNPACKED_BYTES of
decompressed data (tar headers, pax and GNU long-name records included) or after
MAX_READ_SECONDS; a pax or GNU extended header larger than MAX_HEADER_BYTES is refused
from its 512-byte header, before tarfile reads its body into memory. Members must be
regular files (or directories, skipped) with relative, normalised names (no `..`, no
absolute paths, no links, devices or sparse files), within count and size limits.

Then the archive is checked whole (`check_files`), nothing touched yet:
- only the files this service keeps; `generator.cache` is ignored (derived from the
  config; a crafted one would be replayed by the generator at boot without any check);
- config.toml (required) and config.last-good.toml must be valid documents;
- state.json must be a JSON object;
- server.crt and server.key come together or not at all: the key an unencrypted PEM
  private key, the certificate a PEM certificate of that key. An archive without them
  (a machine that never served HTTPS has none) keeps the running machine's identity:
  the restore changes what the machine does, not which machine its clients talk to;
- `network.unconfirmed-previous.toml` is refused. It means the backup was taken while a
  network change waited for its confirmation, so the archived config.toml is a change
  nobody confirmed (possibly the one that cut the machine off). Restored, the file
  would silently roll the machine back at its next start, losing what was done since;
  dropped, the unconfirmed change would count as confirmed. Either way the restore
  would guess; the operator decides instead (back up again after confirming, or remove
  the member from the archive to restore that document as confirmed).

The switch (`switch_in`) works where the service runs: the state directory may be a
mount point (StateDirectory= under ProtectSystem=strict) inside a read-only parent, so it
cannot be renamed, and nothing can be written beside it. Everything happens inside it:

    <state>/.restore-<id>/new/     the files to put in, written and fsync'ed
    <state>/.restore-<id>/switch   the marker: which directory goes in, which names
    <state>/.restore-<id>/old/     where the files it replaces go

The marker is written atomically once `new/` is complete: before it, a crash leaves the
state untouched and the staging directory is discarded at the next start; after it,
the next start completes the moves (`complete_switches`, idempotent: a name listed in
the marker that is no longer in `new/` has already been moved in). Each move is one
rename within the same file system. A failed apply runs the same switch the other way
(`switch_back`: `old/` in, the restored files out to `failed/`), so every file comes
back byte-identical with its mode. `recover` at the service's start completes and
removes any staging directory and says what happened, so the service applies again.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import os
import secrets
import shutil
import tarfile
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import Config, ConfigError, parse_toml
from ..config.store import CONFIG_FILE, LAST_GOOD_FILE
from ..fsutil import atomic_write, fsync_dir
from .auth import SERVER_CERT, SERVER_KEY

MAX_ARCHIVE_BYTES = 16 << 20
MAX_UNPACKED_BYTES = 16 << 20
MAX_MEMBERS = 1024
# A pax record set or GNU long name: a backup's are a few hundred bytes at most.
MAX_HEADER_BYTES = 64 << 10
MAX_CHAINED_HEADERS = 8
MAX_READ_SECONDS = 10.0
# What IncusOS's restore can be told to keep from the running machine (its third,
# local-data-encryption-key, comes with the storage work: there is no such key yet).
SKIP_OPTIONS = ("encryption-recovery-keys", "network-macs")

FLAGS_FILE = "state.json"
# While a network change waits for its confirmation: the document to go back to (empty:
# none). Written before the change is stored, removed once confirmed or rolled back, so
# a service that dies (or a machine that reboots) in between still rolls back.
UNCONFIRMED_FILE = "network.unconfirmed-previous.toml"
GENERATOR_CACHE = "generator.cache"  # generator.CACHE_FILE, without importing the renderer
# The files a backup holds and a restore puts back; nothing else is restored.
RESTORED = (CONFIG_FILE, LAST_GOOD_FILE, FLAGS_FILE, SERVER_CERT, SERVER_KEY)
# Kept from the running machine when the archive has neither (see the module doc).
IDENTITY = (SERVER_CERT, SERVER_KEY)
STAGING_PREFIX = ".restore-"
MARKER = "switch"
_MODES = {SERVER_CERT: 0o644}  # as auth.ensure_server_certificate writes them; else 0600
_EXTENDED_HEADERS = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


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


# -- backup --------------------------------------------------------------------------------


def create(state_dir: str | os.PathLike[str]) -> bytes:
    """The archive of the state dir's `RESTORED` files, read while no switch runs."""
    buf = io.BytesIO()
    base = Path(state_dir)
    with _locked(base, fcntl.LOCK_SH), tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(RESTORED):
            path = base / name
            try:
                f = path.open("rb")
            except FileNotFoundError:
                continue
            with f:
                st = os.fstat(f.fileno())
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = st.st_size, st.st_mode & 0o7777, st.st_mtime
                tar.addfile(info, f)
    return buf.getvalue()


# -- reading an archive ------------------------------------------------------------------------


class _BoundedStream(io.RawIOBase):
    """The decompressed gzip stream, cut off at `limit` bytes and at `deadline`."""

    def __init__(self, data: bytes, limit: int, seconds: float) -> None:
        self._gz = gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb")
        self._left = limit
        self._limit = limit
        self._deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if time.monotonic() > self._deadline:
            raise ArchiveError(f"not read within {MAX_READ_SECONDS:g} seconds")
        view = memoryview(buffer).cast("B")
        if self._left <= 0:
            if self._gz.read(1):
                raise ArchiveError(f"unpacks to more than {self._limit} bytes")
            return 0
        n = self._gz.readinto(view[: min(len(view), self._left)])
        self._left -= n
        return n


def _checked_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo that refuses, from its 512-byte header, an extended header (pax, GNU long
    name) larger than MAX_HEADER_BYTES (tarfile reads its body whole, whatever size it
    declares) or a chain of more than MAX_CHAINED_HEADERS of them (each is read by a
    recursive call: a long chain exhausts the stack). One class per archive: it counts."""
    chained = 0

    class Checked(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Checked:
            nonlocal chained
            info = super().frombuf(buf, encoding, errors)
            if info.type not in _EXTENDED_HEADERS:
                chained = 0
                return info
            chained += 1
            if info.size > MAX_HEADER_BYTES:
                raise ArchiveError(
                    f"member {info.name!r}: an extended header of {info.size} bytes "
                    f"(at most {MAX_HEADER_BYTES})"
                )
            if chained > MAX_CHAINED_HEADERS:
                raise ArchiveError(f"more than {MAX_CHAINED_HEADERS} extended headers in a row")
            return info

    return Checked


def _member_name(name: str) -> str:
    pure = PurePosixPath(name)
    if pure.is_absolute() or not pure.parts or ".." in pure.parts or "\0" in name:
        raise ArchiveError(f"member {name!r}: not a relative path inside the archive")
    return str(pure)


def read_members(data: bytes) -> dict[str, bytes]:
    """The archive's regular files by name, read within the bounds; nothing is touched."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(f"archive larger than {MAX_ARCHIVE_BYTES} bytes")
    files: dict[str, bytes] = {}
    total = 0
    stream = _BoundedStream(data, MAX_UNPACKED_BYTES, MAX_READ_SECONDS)
    try:
        # "r|": one pass over the stream, no seeking back.
        with tarfile.open(fileobj=stream, mode="r|", tarinfo=_checked_tarinfo()) as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"more than {MAX_MEMBERS} members")
                name = _member_name(member.name)
                if member.isdir():
                    continue
                if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or member.issparse():
                    raise ArchiveError(f"member {name!r}: only regular files are restored")
                total += member.size
                if total > MAX_UNPACKED_BYTES:
                    raise ArchiveError(f"unpacks to more than {MAX_UNPACKED_BYTES} bytes")
                if name in files:
                    raise ArchiveError(f"member {name!r}: appears twice")
                handle = tar.extractfile(member)
                if handle is None:
                    raise ArchiveError(f"member {name!r}: unreadable")
                files[name] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error, UnicodeError) as e:
        raise ArchiveError(f"not a gzip'ed tar archive: {e}") from None
    except RecursionError:  # not expected past the chain bound; never a 500
        raise ArchiveError("not a gzip'ed tar archive: headers nested too deep") from None
    return files


def check_identity(cert: bytes, key: bytes) -> None:
    """The server certificate and key a restore would install: both parse, and the
    certificate is the key's. Messages never quote the key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert)
    except ValueError:
        raise ArchiveError(f"{SERVER_CERT}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):  # TypeError: encrypted
        raise ArchiveError(f"{SERVER_KEY}: not an unencrypted PEM private key") from None
    except Exception:  # an unsupported algorithm, say; its text is not for the client
        raise ArchiveError(f"{SERVER_KEY}: not a usable private key") from None

    def spki(public: Any) -> bytes:
        encoded: bytes = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return encoded

    try:
        matches = spki(certificate.public_key()) == spki(private.public_key())
    except Exception:
        matches = False
    if not matches:
        raise ArchiveError(f"{SERVER_CERT}: not the certificate of {SERVER_KEY}")


def check_files(files: Mapping[str, bytes]) -> Config:
    """Everything a restore would put in place, checked whole (see the module doc);
    returns the archived config."""
    if UNCONFIRMED_FILE in files:
        raise ArchiveError(
            f"{UNCONFIRMED_FILE}: the backup was taken while a network change waited for "
            f"its confirmation, so its {CONFIG_FILE} was never confirmed; back up again "
            "after confirming, or remove this member to restore that document as it is"
        )
    for name in sorted(files):
        if name not in RESTORED and name != GENERATOR_CACHE:
            raise ArchiveError(
                f"member {name!r}: not a file this service keeps ({', '.join(RESTORED)})"
            )
    # A backup always holds the config: an archive without one (an empty tar is a
    # valid tar) would restore a blank machine.
    if CONFIG_FILE not in files:
        raise ArchiveError(f"no {CONFIG_FILE} in the archive: not a backup of this service")
    try:
        config = parse_toml(files[CONFIG_FILE])
    except ConfigError as e:
        raise ArchiveError(f"{CONFIG_FILE}: {e.errors[0]}") from None
    if LAST_GOOD_FILE in files:
        try:
            parse_toml(files[LAST_GOOD_FILE])
        except ConfigError as e:
            raise ArchiveError(f"{LAST_GOOD_FILE}: {e.errors[0]}") from None
    if FLAGS_FILE in files:
        try:
            flags = json.loads(files[FLAGS_FILE])
        except ValueError:
            raise ArchiveError(f"{FLAGS_FILE}: not JSON") from None
        if not isinstance(flags, dict):
            raise ArchiveError(f"{FLAGS_FILE}: not a JSON object")
    has_cert, has_key = SERVER_CERT in files, SERVER_KEY in files
    if has_cert != has_key:
        there, missing = (SERVER_CERT, SERVER_KEY) if has_cert else (SERVER_KEY, SERVER_CERT)
        raise ArchiveError(f"{there} without {missing}: the server identity is incomplete")
    if has_cert:
        check_identity(files[SERVER_CERT], files[SERVER_KEY])
    return config


def read_archive(data: bytes) -> Archive:
    """Everything a restore will write, checked; nothing is touched. The generator's
    cache is left out (derived; rebuilt by the configure step)."""
    files = read_members(data)
    config = check_files(files)
    files.pop(GENERATOR_CACHE, None)
    return Archive(files, config)


# -- the switch ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(state_dir: Path, how: int) -> Iterator[None]:
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


def _check_loadable(directory: Path) -> None:
    """The staged certificate and key as the service will load them (OpenSSL, through
    the ssl module): what check_identity accepted must also start the service."""
    import ssl

    if not (directory / SERVER_CERT).exists():
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(directory / SERVER_CERT, directory / SERVER_KEY)
    except (ssl.SSLError, OSError):
        raise ArchiveError(f"{SERVER_CERT}, {SERVER_KEY}: not loadable by OpenSSL") from None


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
    state_dir: str | os.PathLike[str], files: Mapping[str, bytes], keep: tuple[str, ...] = IDENTITY
) -> Path:
    """Put `files` in place of the state dir's contents in one switch; returns the
    staging directory (holding the previous files) for `switch_back` or `discard`.
    `keep` names files carried over from the running state when `files` has none of
    them. Raises ArchiveError (nothing changed) if the staged files cannot be loaded."""
    state = Path(state_dir)
    stage = state / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    with _locked(state, fcntl.LOCK_EX):
        new = stage / "new"
        new.mkdir(mode=0o700, parents=True)
        try:
            content = {name: (data, _MODES.get(name, 0o600)) for name, data in files.items()}
            if not any(name in files for name in keep):
                content.update(_current(state, keep))
            for name, (data, mode) in sorted(content.items()):
                _write_new(new / name, data, mode)
            _check_loadable(new)
            fsync_dir(new)
            fsync_dir(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        marker = _Marker("new", "old", tuple(sorted(os.listdir(new))))
        _write_marker(stage, marker)  # the commit point
        _move(state, stage, marker)
    return stage


def switch_back(state_dir: str | os.PathLike[str], stage: Path) -> None:
    """The files from before `switch_in` back in place, exactly (they are the same
    inodes, moved); what the restore put there goes to `failed/`."""
    state = Path(state_dir)
    with _locked(state, fcntl.LOCK_EX):
        marker = _Marker("old", "failed", tuple(sorted(os.listdir(stage / "old"))))
        _write_marker(stage, marker)
        _move(state, stage, marker)


def discard(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
    with contextlib.suppress(OSError):
        fsync_dir(stage.parent)


def complete_switches(state_dir: str | os.PathLike[str]) -> list[str]:
    """Make the state dir whole after a crash: a staged switch whose marker was written
    is completed; one without a marker (interrupted before its commit point) is
    discarded. Staging directories with a completed switch are left for `recover`.
    Returns the problems: a damaged marker leaves its staging directory as it is."""
    state = Path(state_dir)
    problems: list[str] = []
    with _locked(state, fcntl.LOCK_EX):
        for stage in _stagings(state):
            try:
                marker = _read_marker(stage)
            except DamagedMarker as e:
                problems.append(str(e))
                continue
            if marker is None:
                if stage.is_dir() and not stage.is_symlink():
                    shutil.rmtree(stage, ignore_errors=True)
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
    with _locked(state, fcntl.LOCK_EX):
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
