"""Where the install seed is and what files it holds (lxc/incus-os
incus-osd/internal/seed/seed.go and doc/reference/seed.md, formats only).

    find(root)            the seed's device: a filesystem labelled SEED_DATA (a FAT or
                          ISO volume the user brings), else the partition whose GPT label
                          is `seed-data` (the image's own), read through sysfs and udev
                          under `root`; None when there is neither
    read(path)            file name -> bytes from a seed tar (a partition holding one at
                          its start, or a file), a FAT or ISO 9660 volume, or a directory
    tar_bytes(files)      a seed tar (what a factory reset writes)
    write_tar(path, ...)  that tar at the start of a partition, or as a file

Reading is defensive and bounded: at most `MAX_FILES` files of `MAX_FILE_BYTES` each;
in a tar, only regular files at the top level (a `./` directory entry aside) are
accepted, and a link, device, fifo, a path with a directory, `..` or an absolute path
refuses the whole seed, naming the member. Tars are parsed here, header by header, rather
than by `tarfile`, which would read an extended header of any size into memory. FAT and
ISO volumes are read without mounting them (mtools, isoinfo): nothing of a stranger's
USB stick reaches the kernel's filesystem drivers, and no mount is left behind.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

SEED_PARTLABEL = "seed-data"
SEED_FS_LABEL = "SEED_DATA"
EXTENSIONS = (".json", ".yaml", ".yml")
MAX_FILES = 32
MAX_FILE_BYTES = 1 << 20
# How many tar headers are looked at before giving up (skipped entries count too).
MAX_MEMBERS = 64
BLOCK = 512
# What `read` looks at to tell a tar, a FAT or an ISO 9660 volume (its primary volume
# descriptor at 32 KiB) from a blank partition.
HEAD_BYTES = 40 * 1024
TOOL_TIMEOUT = 30.0


class SeedReadError(Exception):
    """The seed cannot be read; `member` names the tar member or file at fault."""

    def __init__(self, message: str, member: str = "") -> None:
        super().__init__(message)
        self.member = member
        self.message = message


@dataclass(frozen=True, slots=True)
class Found:
    path: Path  # the device node (under root)
    how: str  # "partition seed-data", "filesystem SEED_DATA"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _uevent(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def find(root: str | Path = "/", disk: str | None = None) -> Found | None:
    """The user's SEED_DATA volume first (it wins over the image's, as on IncusOS),
    then the image's `seed-data` partition: with the boot disk's kernel name given, only
    that disk's own (another appliance's disk or an install stick left in also carries
    one, and a reset writes the new seeds to the boot disk's)."""
    root = Path(root)
    link = root / "dev/disk/by-label" / SEED_FS_LABEL
    if link.is_symlink() and link.exists():
        return Found(
            root / "dev" / os.path.basename(os.readlink(link)), f"filesystem {SEED_FS_LABEL}"
        )
    partition: Found | None = None
    fs_label: Found | None = None
    block = root / "sys/class/block"
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return None
    for name in names:
        uevent = _uevent(_read(block / name / "uevent") or "")
        dev = uevent.get("DEVNAME", name)
        if "/" in dev or dev in ("", ".", ".."):
            continue
        partname = uevent.get("PARTNAME")
        if partname == SEED_FS_LABEL and fs_label is None:
            fs_label = Found(root / "dev" / dev, f"partition {SEED_FS_LABEL}")
        elif (
            partname == SEED_PARTLABEL
            and partition is None
            and (disk is None or (block / disk / name).is_dir())
        ):
            partition = Found(root / "dev" / dev, f"partition {SEED_PARTLABEL}")
        numbers = (_read(block / name / "dev") or "").strip()
        udev = _uevent(_read(root / "run/udev/data" / f"b{numbers}") or "")
        if numbers and udev.get("E:ID_FS_LABEL") == SEED_FS_LABEL and fs_label is None:
            fs_label = Found(root / "dev" / dev, f"filesystem {SEED_FS_LABEL}")
    found = fs_label or partition
    # Only a node that is there: udev may not have made it yet (the caller waits or not).
    return found if found is not None and found.path.exists() else None


# -- reading --------------------------------------------------------------------------------


def read(path: str | Path) -> dict[str, bytes]:
    """The seed files at `path`: a directory, or a file or block device holding a tar,
    a FAT or an ISO 9660 volume. Files whose names are not `*.json`/`*.yaml`/`*.yml` are
    left out (not read). SeedReadError when it is none of those or breaks a bound."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise SeedReadError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        return read_dir(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise SeedReadError(f"{path} is not a directory, a file or a block device")
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        if head[257:262] == b"ustar":
            f.seek(0)
            return read_tar(f)
    if len(head) >= 512 and head[510:512] == b"\x55\xaa" and b"FAT" in head[54:90]:
        return read_fat(path)
    if head[32769:32774] == b"CD001":
        return read_iso(path)
    if not head.strip(b"\0"):
        # Blank: the image's own seed-data partition as built, or a seed a reset wiped
        # (an empty tar is zeros): no seed, as IncusOS reads a partition without a tar.
        return {}
    raise SeedReadError("no seed data there (neither a tar, a FAT or ISO volume)")


def _wanted(name: str) -> bool:
    return name.endswith(EXTENSIONS)


def read_tar(f: BinaryIO) -> dict[str, bytes]:
    """A seed tar (ustar or GNU headers, plain members) from the start of `f`, up to its
    end-of-archive block (a partition holds whatever else after it)."""
    files: dict[str, bytes] = {}
    for _ in range(MAX_MEMBERS):
        header = f.read(BLOCK)
        if len(header) < BLOCK or header == bytes(BLOCK):
            return files
        name, size, kind = _header(header)
        padded = -(-size // BLOCK) * BLOCK
        if kind == "dir" and name.strip("./") == "":
            continue  # `tar -C dir .` writes "./" first
        if kind != "file":
            raise SeedReadError(f"a {kind} in the seed tar is not accepted", name)
        clean = name[2:] if name.startswith("./") else name
        if not clean or "/" in clean or clean in (".", ".."):
            raise SeedReadError("a path in the seed tar must be a plain file name", name)
        if clean in files:
            raise SeedReadError("given twice in the seed tar", clean)
        if not _wanted(clean):
            f.seek(padded, io.SEEK_CUR)
            continue
        if size > MAX_FILE_BYTES:
            raise SeedReadError(f"larger than {MAX_FILE_BYTES} bytes ({size})", clean)
        if len(files) >= MAX_FILES:
            raise SeedReadError(f"more than {MAX_FILES} seed files in the tar")
        data = f.read(padded)
        if len(data) < size:
            raise SeedReadError("the seed tar ends inside this file", clean)
        files[clean] = data[:size]
    raise SeedReadError(f"more than {MAX_MEMBERS} members in the seed tar")


_KINDS = {b"0": "file", b"\0": "file", b"7": "file", b"1": "hard link", b"2": "symbolic link"}
_KINDS |= {b"3": "character device", b"4": "block device", b"5": "dir", b"6": "fifo"}
_KINDS |= {b"x": "pax extended header", b"g": "pax global header", b"L": "GNU long name"}
_KINDS |= {b"K": "GNU long link name", b"S": "GNU sparse file"}


def _header(block: bytes) -> tuple[str, int, str]:
    stored = _octal(block[148:156], "checksum")
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise SeedReadError("a seed tar header's checksum does not match")
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX prefix (not GNU)
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise SeedReadError("a seed tar member's name is not UTF-8") from None
    if not text.isprintable():
        raise SeedReadError("a seed tar member's name holds a control character")
    flag = block[156:157]
    kind = _KINDS.get(flag, f"tar entry of type {flag!r} (an extended header or other)")
    if block[124] & 0x80:
        raise SeedReadError("a size in base-256 (over 8 GiB) in the seed tar", text)
    return text, _octal(block[124:136], "size"), kind


def _octal(field: bytes, what: str) -> int:
    text = field.split(b"\0", 1)[0].strip(b" \0")
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise SeedReadError(f"a seed tar header's {what} is not a number") from None


def read_dir(path: Path) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if not _wanted(entry.name):
            continue
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise SeedReadError("not a regular file (a link or other)", entry.name)
        if len(files) >= MAX_FILES:
            raise SeedReadError(f"more than {MAX_FILES} seed files")
        fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise SeedReadError(f"larger than {MAX_FILE_BYTES} bytes", entry.name)
        files[entry.name] = data
    return files


def _tool(argv: list[str], what: str) -> bytes:
    """A reader's output, at most MAX_FILE_BYTES + 1 bytes of it, within TOOL_TIMEOUT.

    Output and errors go to unnamed files, not pipes: a tool stuck on a crafted volume is
    killed at the deadline, and a full stderr pipe cannot stall it while its stdout is
    read. The files are capped (RLIMIT_FSIZE), so a huge member cannot fill the disk."""
    import resource
    import tempfile

    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin"), "MTOOLS_SKIP_CHECK": "1"}

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES + 1, MAX_FILE_BYTES + 1))

    with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file:
        try:
            proc = subprocess.Popen(
                argv,
                stdout=out_file,
                stderr=err_file,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=capped,
            )
        except FileNotFoundError:
            raise SeedReadError(f"{argv[0]} is needed to read a {what} volume") from None
        try:
            code = proc.wait(timeout=TOOL_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SeedReadError(f"the {what} volume cannot be read: no answer in time") from None
        out_file.seek(0)
        out = out_file.read(MAX_FILE_BYTES + 1)
        if len(out) > MAX_FILE_BYTES:
            raise SeedReadError(f"larger than {MAX_FILE_BYTES} bytes")
        if code != 0:
            err_file.seek(0)
            message = " ".join(err_file.read(4096).decode(errors="replace").split())[:200]
            raise SeedReadError(f"the {what} volume cannot be read: {message}")
        return out


def read_fat(device: Path) -> dict[str, bytes]:
    """A FAT volume's top directory, through mtools."""
    listing = _tool(["mdir", "-b", "-i", str(device), "::/"], "FAT").decode(errors="replace")
    names = sorted(line[3:] for line in listing.splitlines() if line.startswith("::/"))
    return _collect(
        names, lambda name: _tool(["mcopy", "-n", "-i", str(device), f"::/{name}", "-"], "FAT")
    )


def read_iso(device: Path) -> dict[str, bytes]:
    """An ISO 9660 volume's top directory (Rock Ridge names), through isoinfo."""
    listing = _tool(["isoinfo", "-i", str(device), "-R", "-f"], "ISO 9660").decode(errors="replace")
    names = sorted(line[1:] for line in listing.splitlines() if line.count("/") == 1)
    return _collect(
        names,
        lambda name: _tool(["isoinfo", "-i", str(device), "-R", "-x", f"/{name}"], "ISO 9660"),
    )


def _collect(names: list[str], fetch: object) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for name in names:
        if not _wanted(name):
            continue
        if not name.isprintable() or "/" in name:
            raise SeedReadError("a file name holds a control character", name)
        if len(files) >= MAX_FILES:
            raise SeedReadError(f"more than {MAX_FILES} seed files")
        try:
            files[name] = fetch(name)  # type: ignore[operator]
        except SeedReadError as e:
            raise SeedReadError(e.message, name) from None
    return files


# -- writing --------------------------------------------------------------------------------


def tar_bytes(files: Mapping[str, bytes]) -> bytes:
    """A seed tar of `files` (sorted, mode 0600, owned by root, mtime 0: the same files
    make the same bytes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(files[name]))
    return out.getvalue()


def write_tar(path: Path, files: Mapping[str, bytes]) -> None:
    """The seed tar at the start of a block device (the rest of which is left as it is:
    a tar reader stops at the end-of-archive blocks), or as a file, replaced atomically."""
    data = tar_bytes(files)
    if not path.exists() and not path.parent.is_dir():
        raise SeedReadError(f"{path.parent} is not a directory")
    if path.exists() and not (path.is_block_device() or path.is_file()):
        raise SeedReadError(f"{path} is neither a block device nor a file")
    if path.is_block_device():
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if len(data) > size:
                raise SeedReadError(f"the seed ({len(data)} bytes) does not fit in {path} ({size})")
            # Zeros over the whole head `read` looks at, so that no FAT or ISO 9660
            # volume written there before (its descriptor is at 32 KiB) outlives a
            # smaller or empty tar.
            data += bytes(max(0, min(HEAD_BYTES, size) - len(data)))
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    from ..core.files import atomic_write

    atomic_write(path, data, 0o600)
