"""System extension images (`.raw`) on disk: their names, their formats, the versions
kept of each and the link in /var/lib/extensions that picks one, an application's data
as a tar archive.

systemd-sysext merges every image in /var/lib/extensions over /usr (an overlay) when
systemd-sysext.service starts or reloads (`systemd-sysext refresh`); an image named
NAME.raw must carry usr/lib/extension-release.d/extension-release.NAME whose ID= is the
host's or `_any`, or the refresh refuses it. Everything here is files; asking systemd
to refresh is the caller's (through the system manager, so the overlay is mounted in
the host's mount namespace and not this service's own).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.versions import VERSION

EXTENSIONS_DIR = "var/lib/extensions"
# Each application's images, one per version kept (IncusOS's /var/lib/incus-os-extensions):
# NAME/VERSION.raw, which /var/lib/extensions/NAME.raw links to. Never inside
# /var/lib/extensions, where systemd-sysext would take a directory for an extension.
VERSIONS_DIR = "var/lib/incusos-extensions"

RELEASE_DIR = "usr/lib/extension-release.d"
# An application's name: a file name, a unit-name-safe word, never a hidden file.
NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)
# What an image starts with: a GPT disk (a DDI with verity), erofs or squashfs.
_MAGICS = (
    (512, b"EFI PART"),  # GPT header in LBA 1 (512-byte sectors)
    (4096, b"EFI PART"),  # ... or 4096-byte sectors
    (1024, (0xE0F5E1E2).to_bytes(4, "little")),  # erofs superblock
    (0, b"hsqs"),  # squashfs
)
# An application's data archive: how much it may hold when restored.
MAX_ARCHIVE_BYTES = 4 << 30
MAX_MEMBERS = 100_000


class ImageError(ValueError):
    """An image or archive that is refused; the message names what is wrong."""


def check_name(name: str, field: str = "name") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ImageError(f"{field}: {name!r} is not an application name (a-z, 0-9, -; at most 63)")
    return name


def check_format(path: Path) -> str:
    """Which image format `path` holds ("gpt", "erofs", "squashfs"); refuses anything
    else before it goes near /var/lib/extensions."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096 + 8)
    except OSError as e:
        raise ImageError(f"the image cannot be read: {e.strerror}") from None
    for (offset, magic), kind in zip(_MAGICS, ("gpt", "gpt", "erofs", "squashfs"), strict=True):
        if head[offset : offset + len(magic)] == magic:
            return kind
    raise ImageError("the image is neither a GPT disk image, erofs nor squashfs")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def image_path(root: str, name: str) -> Path:
    return Path(root) / EXTENSIONS_DIR / f"{check_name(name)}.raw"


def version_path(root: str, name: str, version: str) -> Path:
    return Path(root) / VERSIONS_DIR / check_name(name) / f"{check_version(version)}.raw"


def check_version(version: str) -> str:
    """A version that can be a file name (the update index's version words)."""
    if not VERSION.fullmatch(version):
        raise ImageError(f"{version!r} is not a version (0-9, A-Z, a-z, '._-')")
    return version


def versions(root: str, name: str) -> list[str]:
    """The versions of `name` kept on disk, unordered (the caller orders versions)."""
    try:
        entries = os.listdir(Path(root) / VERSIONS_DIR / check_name(name))
    except OSError:
        return []
    return [e[:-4] for e in entries if e.endswith(".raw") and VERSION.fullmatch(e[:-4])]


def keep(root: str, name: str, version: str, source: Path, sha256_hex: str) -> None:
    """Copy `source` in as version `version` of `name`, hashing what is copied: kept
    (renamed into place) only when that is `sha256_hex`, so a file changed after its
    check is never kept. The temporary file is made anew (O_EXCL, O_NOFOLLOW)."""
    dest = version_path(root, name, check_version(version))
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.unlink(missing_ok=True)
    digest = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256_hex.lower():
            raise ImageError("the image's sha256 is not the one it was verified with")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def adopt(root: str, name: str, version: str) -> None:
    """An image placed by a version before versions were kept (a file, not a link, at
    /var/lib/extensions/NAME.raw) becomes version `version`, linked as the others. The
    file stays at its place until the link replaces it (a hard link first): a crash in
    between leaves an image there either way."""
    link = image_path(root, name)
    if link.is_symlink() or not link.is_file():
        return
    dest = version_path(root, name, version)
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not dest.exists():
        os.link(link, dest)
    point(root, name, str(dest))


def linked(root: str, name: str) -> str | None:
    """Where /var/lib/extensions/NAME.raw points (None: nothing there, or no link)."""
    try:
        return os.readlink(image_path(root, name))
    except OSError:
        return None


def link(root: str, name: str, version: str) -> str | None:
    """Point /var/lib/extensions/NAME.raw at kept version `version`, atomically (a new
    link renamed over the old). Returns where it pointed before, for `point` to put
    back if the refresh then fails."""
    previous = linked(root, name)
    point(root, name, str(version_path(root, name, version)))
    return previous


def point(root: str, name: str, target: str | None) -> None:
    """/var/lib/extensions/NAME.raw as a link to `target`, or gone (None)."""
    dest = image_path(root, name)
    if target is None:
        dest.unlink(missing_ok=True)
        return
    dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    tmp = dest.with_name(f".{dest.name}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, dest)


def forget(root: str, name: str, versions_kept: set[str]) -> None:
    """Every kept version of `name` but `versions_kept` deleted."""
    for version in versions(root, name):
        if version not in versions_kept:
            version_path(root, name, version).unlink(missing_ok=True)


def remove(root: str, name: str) -> None:
    image_path(root, name).unlink(missing_ok=True)
    shutil.rmtree(Path(root) / VERSIONS_DIR / check_name(name), ignore_errors=True)


def release(root: str, name: str) -> dict[str, str] | None:
    """The merged extension-release.NAME (None: the image is not merged)."""
    path = Path(root) / RELEASE_DIR / f"extension-release.{check_name(name)}"
    try:
        text = path.read_text()
    except OSError:
        return None
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            out[key] = value.strip().strip("\"'")
    return out


# -- an application's data ------------------------------------------------------------


def backup_data(data_dir: Path) -> bytes:
    """The data directory as a tar.gz, its members relative to it; empty if none yet."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        if data_dir.is_dir():
            for path in sorted(data_dir.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(data_dir)), recursive=False)
    return buffer.getvalue()


def _check_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    members = []
    for n, member in enumerate(tar):
        if n >= MAX_MEMBERS:
            raise ImageError(f"the archive has more than {MAX_MEMBERS} members")
        name = member.name
        parts = Path(name).parts
        if name.startswith("/") or ".." in parts or not parts:
            raise ImageError(f"the archive's member {name!r} is outside the data directory")
        if not (member.isfile() or member.isdir()):
            raise ImageError(f"the archive's member {name!r} is not a file or a directory")
        members.append(member)
    return members


def unpack_data(data_dir: Path, archive: bytes) -> Path:
    """The archive checked whole (only files and directories, none outside, bounded)
    and unpacked beside the data directory; returns that staging directory for
    `swap_data`. A bad archive raises ImageError and leaves nothing behind."""
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise ImageError(f"the archive is larger than {MAX_ARCHIVE_BYTES} bytes")
    staging = data_dir.with_name(f".{data_dir.name}.restore")
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:*") as tar:
            members = _check_members(tar)
            total = sum(m.size for m in members)
            if total > MAX_ARCHIVE_BYTES:
                raise ImageError(f"the archive unpacks to more than {MAX_ARCHIVE_BYTES} bytes")
            data_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(mode=0o700)
            try:
                # Members are files and directories inside it (checked above); Pythons
                # that have extraction filters also drop set-id bits and owners.
                safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(staging, members=members, **safe)  # noqa: S202
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImageError(f"the archive cannot be read: {e}") from None
    staging.chmod(0o755)
    return staging


def swap_data(data_dir: Path, staging: Path) -> None:
    """The unpacked archive in place of the data directory (two renames)."""
    old = data_dir.with_name(f".{data_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if data_dir.exists():
        os.rename(data_dir, old)
    os.rename(staging, data_dir)
    shutil.rmtree(old, ignore_errors=True)


def restore_data(data_dir: Path, archive: bytes) -> None:
    """Replace the data directory with the archive's contents; a bad archive leaves the
    data as it was."""
    swap_data(data_dir, unpack_data(data_dir, archive))


def wipe_data(data_dir: Path) -> None:
    """Empty the data directory (kept, so the application's unit finds it)."""
    if data_dir.is_dir():
        for child in data_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


@dataclass(frozen=True, slots=True)
class VerifiedImage:
    """What the updates side hands over: application `name` at `version`, its image at
    `path`, already checked against the signed index (`sha256` is the index's hash,
    checked again here before install)."""

    name: str
    version: str
    path: Path
    sha256: str
