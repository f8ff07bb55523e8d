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

Once checked, the files go in through `state.switch`: staged inside the state directory
and switched in one crash-safe step (see there), so a restore works where the service
runs (the state directory a mount point under a read-only parent) and a failed apply
puts every file back byte-identical with its mode.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import tarfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import Config, ConfigError, parse_toml
from ..sections import skip_options
from ..state import switch
from ..state.paths import (
    CONFIG_FILE,
    FLAGS_FILE,
    GENERATOR_CACHE,
    IDENTITY,
    LAST_GOOD_FILE,
    LOCAL_KEY_SKIP,
    RESTORED,
    SERVER_CERT,
    SERVER_KEY,
    STORAGE_KEY_BYTES,
    UNCONFIRMED_FILE,
    ZPOOL_KEY_PREFIX,
    is_storage_key,
)
from ..state.switch import complete_switches, discard, recover, switch_back

MAX_ARCHIVE_BYTES = 16 << 20
MAX_UNPACKED_BYTES = 16 << 20
MAX_MEMBERS = 1024
# A pax record set or GNU long name: a backup's are a few hundred bytes at most.
MAX_HEADER_BYTES = 64 << 10
MAX_CHAINED_HEADERS = 8
MAX_READ_SECONDS = 10.0
# What IncusOS's restore can be told to keep from the running machine, as the sections
# offer it (local-data-encryption-key: the storage section's; the key itself is a file,
# kept by `with_running_keys`).
SKIP_OPTIONS = tuple(skip_options())

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
    """The archived config with what `skip` names taken from the running one, as each
    section's restore skip options say (the recovery keys; the hardware addresses, for
    restoring onto other hardware)."""
    options = skip_options()
    out = archived
    for name in skip:
        out = options[name](out, running)
    return out


# -- backup --------------------------------------------------------------------------------


def _storage_keys(state_dir: Path) -> list[str]:
    """The pools' and drives' keys in the state dir (IncusOS's backup holds them too:
    without them a restored machine could not open its own pools)."""
    try:
        return sorted(n for n in os.listdir(state_dir) if is_storage_key(n))
    except OSError:
        return []


def with_running_keys(
    files: Mapping[str, bytes], state_dir: str | os.PathLike[str], skip: tuple[str, ...]
) -> dict[str, bytes]:
    """The archive's files plus every storage key the running machine holds that the
    archive does not: a restore never costs a pool or drive its key. With
    `local-data-encryption-key` in `skip`, the running `local` pool's key is kept over
    the archive's (as IncusOS's restore does; none kept when the machine has none)."""
    out = dict(files)
    base = Path(state_dir)
    local = f"{ZPOOL_KEY_PREFIX}local.key"
    if LOCAL_KEY_SKIP in skip:
        out.pop(local, None)
    for name in _storage_keys(base):
        if name not in out:
            try:
                out[name] = (base / name).read_bytes()
            except OSError:
                continue
    return out


def create(state_dir: str | os.PathLike[str]) -> bytes:
    """The archive of the state dir's `RESTORED` files, read while no switch runs."""
    buf = io.BytesIO()
    base = Path(state_dir)
    with switch.locked(base, fcntl.LOCK_SH), tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [*sorted(RESTORED), *_storage_keys(base)]:
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
        if is_storage_key(name):
            if len(files[name]) != STORAGE_KEY_BYTES:  # the size only: never the bytes
                raise ArchiveError(f"{name}: not a {STORAGE_KEY_BYTES}-byte raw key")
            continue
        if name not in RESTORED and name != GENERATOR_CACHE:
            raise ArchiveError(
                f"member {name!r}: not a file this service keeps "
                f"({', '.join(RESTORED)}, zpool.<pool>.key, luks.<drive>.key)"
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
            flags = json.loads(
                files[FLAGS_FILE], parse_constant=_not_json, parse_float=_finite_float
            )
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
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


def check_loadable(directory: Path) -> None:
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


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """JSON numbers that stay numbers: 1e999 is infinity to Python, which json.dumps
    would write back as `Infinity`, not JSON."""
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def switch_in(state_dir: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """The checked files in, in one switch (state.switch); the running machine's identity
    kept when the archive carries none; raises ArchiveError, with nothing changed, when
    OpenSSL cannot load the staged certificate and key."""
    return switch.switch_in(state_dir, files, IDENTITY, check_loadable)


__all__ = [
    "Archive",
    "ArchiveError",
    "check_files",
    "check_loadable",
    "complete_switches",
    "create",
    "discard",
    "keep_running",
    "read_archive",
    "read_members",
    "recover",
    "switch_back",
    "switch_in",
    "with_running_keys",
]
