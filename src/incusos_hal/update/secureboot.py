"""Secure Boot certificate updates (IncusOS's `update-secureboot` files): a tar of signed
variable updates named `<KEK|db|dbx>_<SHA-256 fingerprint>.auth`, each at most 8 KiB
(lxc/incus-os incus-osd/internal/secureboot/efi_vars.go, UpdateSecureBootCerts).

An `.auth` file is an EFI_VARIABLE_AUTHENTICATION_2 (UEFI 2.10, 8.2.2): an EFI_TIME, a
WIN_CERTIFICATE_UEFI_GUID holding the PKCS#7 signature by a key of the variable's parent
(PK for KEK, KEK for db and dbx), then the EFI_SIGNATURE_LISTs to append. The firmware
checks that signature when the variable is written; this module decides whether to write
at all:

    plan(updates, variables, images)   pure: what is not applied yet, in IncusOS's order
                                       (KEK, then db, then dbx), and what is refused: a
                                       dbx append that would stop a boot image this
                                       firmware runs today (its hash, its signer or a
                                       certificate of its chain revoked)
    write(root, step)                  the edge: one append through efivarfs

One update is written per check, then a reboot (IncusOS does the same: the firmware
measures the new databases into PCR 7 at the next boot).
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import struct
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..hal import secureboot as sb

MAX_AUTH = 8192
MAX_ARCHIVE = 4 << 20
ORDER = ("KEK", "db", "dbx")
# NV | BS | RT | TIME_BASED_AUTHENTICATED_WRITE_ACCESS | APPEND_WRITE
APPEND_ATTRIBUTES = 0x00000001 | 0x00000002 | 0x00000004 | 0x00000020 | 0x00000040
WIN_CERT_TYPE_EFI_GUID = 0x0EF1
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x00000010


class BadUpdate(ValueError):
    """An archive or `.auth` file that is not what the format says."""


@dataclass(frozen=True, slots=True)
class AuthUpdate:
    variable: str
    fingerprint: str
    auth: bytes  # the whole EFI_VARIABLE_AUTHENTICATION_2, as the firmware wants it
    lists: bytes  # the EFI_SIGNATURE_LISTs it appends


def payload(auth: bytes, name: str) -> bytes:
    """The signature lists after the authentication header."""
    if len(auth) < 16 + 24:
        raise BadUpdate(f"{name}: too short for an authenticated variable")
    length, revision, kind = struct.unpack_from("<IHH", auth, 16)
    if kind != WIN_CERT_TYPE_EFI_GUID or revision != 0x0200:
        raise BadUpdate(f"{name}: not an EFI_VARIABLE_AUTHENTICATION_2")
    if length < 24 or 16 + length > len(auth):
        raise BadUpdate(f"{name}: its signature runs past the file")
    return auth[16 + length :]


def read_archive(data: bytes) -> list[AuthUpdate]:
    if len(data) > MAX_ARCHIVE:
        raise BadUpdate("the Secure Boot update archive is too large")
    updates: list[AuthUpdate] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if not name.endswith(".auth"):
                    continue
                if not member.isfile() or member.size > MAX_AUTH:
                    raise BadUpdate(f"{name}: not a file of at most {MAX_AUTH} bytes")
                variable, _, fingerprint = name[: -len(".auth")].partition("_")
                if variable not in ORDER or len(fingerprint) != 64:
                    raise BadUpdate(f"{name}: not <KEK|db|dbx>_<sha256>.auth")
                extracted = tar.extractfile(member)
                if extracted is None:
                    raise BadUpdate(f"{name}: unreadable")
                auth = extracted.read(MAX_AUTH + 1)
                lists = payload(auth, name)
                try:
                    entries = sb.parse_signature_lists(lists)
                except sb.SignatureListError as e:
                    raise BadUpdate(f"{name}: {e}") from None
                if not entries:
                    raise BadUpdate(f"{name}: appends nothing")
                certs = [e for e in entries if e.type == "x509"]
                fp = fingerprint.lower()
                if certs and not any(_sha256(e.data) == fp for e in certs):
                    raise BadUpdate(f"{name}: the name's fingerprint is not its certificate's")
                updates.append(AuthUpdate(variable, fp, auth, lists))
    except tarfile.TarError as e:
        raise BadUpdate(f"not a tar archive: {e}") from None
    return updates


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[AuthUpdate, ...]
    refused: tuple[str, ...]
    present: int  # updates already applied (nothing to do)


def plan(
    updates: Sequence[AuthUpdate],
    variables: Mapping[str, bytes],
    images: Sequence[tuple[str, bytes]],
) -> Plan:
    """`variables`: the current KEK, db and dbx data (no attribute bytes); `images`: the
    boot images that must keep booting (label, PE bytes): the running UKI and the
    fallback one. Pure."""
    steps: list[AuthUpdate] = []
    refused: list[str] = []
    present = 0
    db = sb.database("db", variables.get("db", b""))
    dbx_now = variables.get("dbx", b"")
    for variable in ORDER:
        for update in sorted(
            (u for u in updates if u.variable == variable), key=lambda u: u.fingerprint
        ):
            have = {e.data for e in sb.parse_signature_lists(variables.get(variable, b""))}
            if {e.data for e in sb.parse_signature_lists(update.lists)} <= have:
                present += 1
                continue
            if variable == "dbx":
                why = _revokes(db, dbx_now, update, images)
                if why:
                    refused.append(why)
                    continue
            steps.append(update)
    return Plan(tuple(steps), tuple(refused), present)


def _revokes(
    db: sb.Database, dbx_now: bytes, update: AuthUpdate, images: Sequence[tuple[str, bytes]]
) -> str | None:
    before = sb.database("dbx", dbx_now)
    after = sb.database("dbx", dbx_now + update.lists)
    for label, pe in images:
        try:
            runs_now = sb.check_binary(pe, db, before).allowed
        except sb.PEError:
            continue
        if not runs_now:
            continue  # not bootable today: this update changes nothing for it
        verdict = sb.check_binary(pe, db, after)
        if not verdict.allowed:
            return (
                f"refusing dbx update {update.fingerprint[:16]}: it would revoke the "
                f"{label} ({verdict.reason})"
            )
    return None


def current_variables(root: Path | str) -> dict[str, bytes]:
    return {name: sb.read_variable(root, name) or b"" for name in ORDER}


def boot_images(root: Path | str) -> list[tuple[str, bytes]]:
    """Every UKI on the ESP (the running and the fallback one among them): none of them
    may be revoked."""
    found: list[tuple[str, bytes]] = []
    for esp in ("boot", "efi"):
        directory = Path(root, esp, "EFI", "Linux")
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.efi")):
            found.append((f"boot image {path.name}", path.read_bytes()))
    return found


def write(root: Path | str, update: AuthUpdate) -> None:
    """Append `update` to its variable through efivarfs: one write() of the attributes
    and the whole authenticated payload (efivarfs takes a variable in one write); the
    firmware refuses it (EACCES / EINVAL) unless its signature verifies."""
    guid = sb.VARIABLE_GUIDS[update.variable]
    path = Path(root, sb.EFIVARS, f"{update.variable}-{guid}")
    _mutable(path)
    data = struct.pack("<I", APPEND_ATTRIBUTES) + update.auth
    flags = os.O_WRONLY | (0 if path.exists() else os.O_CREAT)
    fd = os.open(path, flags, 0o644)
    try:
        written = os.write(fd, data)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EINVAL, errno.EPERM):
            raise BadUpdate(
                f"the firmware refused the {update.variable} update (bad or untrusted signature)"
            ) from None
        raise
    finally:
        os.close(fd)
    if written != len(data):
        raise BadUpdate(f"the {update.variable} update was written short")


def _mutable(path: Path) -> None:
    """efivarfs marks variables immutable (chattr +i); clear it for this one."""
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(4)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        flags = struct.unpack("<I", buf)[0]
        if flags & FS_IMMUTABLE_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<I", flags & ~FS_IMMUTABLE_FL))
    except OSError as e:
        if e.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)
