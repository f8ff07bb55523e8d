"""Whole disks for the installer: which there are (sysfs and udev's /dev/disk/by-id under
a root), their GUID partition tables (UEFI 2.10, 5.3), and copying an image's partitions
from one disk to another, verified by reading them back.

    list_disks(root)            every whole disk with its by-id names, size, bus path
    holder_disk(root, path)     the disk under a mounted path (/usr), through dm slaves
    read_gpt(path)              the primary GPT, every CRC checked
    logical_sector_size(path)   a block device's logical sector (the GPT's LBA size)
    has_partition_table(path)   a GPT or an MBR signature is there
    copy_image(src, dst, keep)  partitions `keep` of src to dst at the same places, a new
                                GPT on dst (primary and backup), each copied range's
                                SHA-256 read back from dst and compared

Reads only what the kernel shows; writes only in `copy_image`, and only once every check
has passed (a disk too small or a partition that does not fit raises before any write).
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

GPT_SIGNATURE = b"EFI PART"
HEADER_SIZE = 92
CHUNK = 4 << 20
# Disks the installer never considers: RAM disks, zram, floppies, optical drives, device
# mapper and md (IncusOS's lsblk -e 1,2 and its CD-ROM filter, by name).
NOT_DISKS = ("ram", "zram", "fd", "sr", "dm-", "md")


class DiskError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Disk:
    name: str  # the kernel's name (sda, nvme0n1, loop3)
    path: Path  # its node under the root
    size: int  # bytes
    sector: int  # logical block size
    ids: tuple[str, ...]  # its /dev/disk/by-id names, sorted
    subsystems: str  # "block:scsi:virtio:pci", as lsblk's SUBSYSTEMS
    readonly: bool

    @property
    def id(self) -> str:
        return self.ids[0] if self.ids else ""


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def _subsystems(sysdir: Path) -> str:
    """The subsystems from the device up to the root of sysfs, as lsblk lists them."""
    out: list[str] = []
    try:
        node = Path(os.path.realpath(sysdir))
    except OSError:
        return ""
    while node != node.parent and len(out) < 32:
        link = node / "subsystem"
        if link.is_symlink():
            name = os.path.basename(os.readlink(link))
            if name not in out:
                out.append(name)
        node = node.parent
    return ":".join(out)


def _by_id(root: Path) -> dict[str, list[str]]:
    ids: dict[str, list[str]] = {}
    directory = root / "dev/disk/by-id"
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return ids
    for entry in entries:
        try:
            target = os.path.basename(os.readlink(directory / entry))
        except OSError:
            continue
        ids.setdefault(target, []).append(entry)
    return ids


def list_disks(root: str | Path = "/") -> list[Disk]:
    root = Path(root)
    block = root / "sys/class/block"
    ids = _by_id(root)
    disks = []
    try:
        names = sorted(os.listdir(block))
    except OSError:
        return []
    for name in names:
        sysdir = block / name
        if name.startswith(NOT_DISKS) or (sysdir / "partition").exists():
            continue
        sectors = _int(_read(sysdir / "size"))
        if sectors == 0:
            continue  # an unbound loop device, an empty card reader
        disks.append(
            Disk(
                name=name,
                path=root / "dev" / name,
                size=sectors * 512,  # sysfs counts 512-byte sectors whatever the disk's
                sector=_int(_read(sysdir / "queue/logical_block_size"), 512),
                ids=tuple(ids.get(name, ())),
                subsystems=_subsystems(sysdir),
                readonly=_read(sysdir / "ro") == "1",
            )
        )
    return disks


def holder_disk(root: str | Path, mountpoint: str = "/usr") -> str | None:
    """The whole disk under `mountpoint` (dm-verity, LUKS and partitions followed down
    through sysfs), from /proc/self/mountinfo under root; None when it is not a disk."""
    root = Path(root)
    text = _read(root / "proc/self/mountinfo") or ""
    numbers = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == mountpoint:
            numbers = fields[2]
    if numbers is None:
        return None
    node = root / "sys/dev/block" / numbers
    for _ in range(16):
        try:
            real = Path(os.path.realpath(node))
        except OSError:
            return None
        slaves = sorted((real / "slaves").glob("*")) if (real / "slaves").is_dir() else []
        if slaves:
            node = slaves[0]
            continue
        if (real / "partition").exists():
            return real.parent.name
        return real.name
    return None


# -- the GUID partition table ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    index: int  # 1-based
    type: uuid.UUID
    unique: uuid.UUID
    first: int
    last: int
    attributes: int
    name: str

    @property
    def sectors(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class Table:
    sector: int
    disk_guid: uuid.UUID
    first_usable: int
    last_usable: int
    entry_count: int
    entry_size: int
    entries: tuple[Entry, ...]  # used ones only


def _pread(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise DiskError(f"short read at byte {offset}")
    return data


BLKSSZGET = 0x1268  # linux/fs.h: a block device's logical sector size (int)


def logical_sector_size(path: Path) -> int:
    """The logical sector size of the block device at `path` (BLKSSZGET), where its GPT
    is laid out (LBA 1 at byte 4096 on a 4Kn disk); 512 for an image file."""
    import fcntl
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if not stat.S_ISBLK(os.fstat(fd).st_mode):
            return 512
        (size,) = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0)))
    finally:
        os.close(fd)
    if size not in (512, 1024, 2048, 4096):
        raise DiskError(f"{path}: a logical sector of {size} bytes is not supported")
    return int(size)


def has_partition_table(path: Path, sector: int = 512) -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, max(2 * sector, 1024), 0)
    finally:
        os.close(fd)
    return head[510:512] == b"\x55\xaa" or head[sector : sector + 8] == GPT_SIGNATURE


def read_gpt(path: Path, sector: int = 512) -> Table:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header = _pread(fd, HEADER_SIZE, sector)
        if header[:8] != GPT_SIGNATURE:
            raise DiskError("no GUID partition table")
        (size,) = struct.unpack_from("<I", header, 12)
        if size != HEADER_SIZE:
            raise DiskError(f"a GPT header of {size} bytes is not supported")
        check = header[:16] + b"\0\0\0\0" + header[20:]
        if zlib.crc32(check) != struct.unpack_from("<I", header, 16)[0]:
            raise DiskError("the GPT header's CRC does not match")
        first_usable, last_usable = struct.unpack_from("<QQ", header, 40)
        disk_guid = uuid.UUID(bytes_le=header[56:72])
        entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", header, 72)
        if not (128 <= entry_size <= 1024 and count <= 1024):
            raise DiskError("the GPT's entry array has an unsupported shape")
        raw = _pread(fd, count * entry_size, entries_lba * sector)
    finally:
        os.close(fd)
    if zlib.crc32(raw) != entries_crc:
        raise DiskError("the GPT entry array's CRC does not match")
    entries = []
    for i in range(count):
        e = raw[i * entry_size : (i + 1) * entry_size]
        if e[:16] == bytes(16):
            continue
        first, last, attributes = struct.unpack_from("<QQQ", e, 32)
        name = e[56:128].decode("utf-16-le", errors="replace").split("\0", 1)[0]
        if not (first_usable <= first <= last <= last_usable):
            raise DiskError(f"GPT entry {i + 1} lies outside the usable sectors")
        entries.append(
            Entry(
                i + 1,
                uuid.UUID(bytes_le=e[:16]),
                uuid.UUID(bytes_le=e[16:32]),
                first,
                last,
                attributes,
                name,
            )
        )
    return Table(sector, disk_guid, first_usable, last_usable, count, entry_size, tuple(entries))


def _entry_bytes(entry: Entry, size: int) -> bytes:
    name = entry.name.encode("utf-16-le")[:72].ljust(72, b"\0")
    data = entry.type.bytes_le + entry.unique.bytes_le
    data += struct.pack("<QQQ", entry.first, entry.last, entry.attributes) + name
    return data.ljust(size, b"\0")


def gpt_bytes(table: Table, disk_sectors: int) -> tuple[bytes, bytes, int]:
    """(protective MBR + primary header + entries, backup entries + header, the backup's
    first sector) for `table` on a disk of `disk_sectors` sectors."""
    s = table.sector
    array = bytearray(table.entry_count * table.entry_size)
    for e in table.entries:
        start = (e.index - 1) * table.entry_size
        array[start : start + table.entry_size] = _entry_bytes(e, table.entry_size)
    array_sectors = -(-len(array) // s)
    last = disk_sectors - 1
    last_usable = last - array_sectors - 1
    entries_crc = zlib.crc32(bytes(array))

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        h = bytearray(
            GPT_SIGNATURE
            + struct.pack("<IIII", 0x00010000, HEADER_SIZE, 0, 0)
            + struct.pack("<QQQQ", current, backup, table.first_usable, last_usable)
            + table.disk_guid.bytes_le
            + struct.pack("<QIII", entries_lba, table.entry_count, table.entry_size, entries_crc)
        )
        struct.pack_into("<I", h, 16, zlib.crc32(bytes(h)))
        return bytes(h).ljust(s, b"\0")

    mbr = bytearray(s)
    size = min(last, 0xFFFFFFFF)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1, size)
    mbr[510:512] = b"\x55\xaa"
    array_padded = bytes(array).ljust(array_sectors * s, b"\0")
    primary = bytes(mbr) + header(1, last, 2) + array_padded
    backup_start = last - array_sectors
    backup = array_padded + header(last, 1, backup_start)
    return primary, backup, backup_start


# -- copying ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Copied:
    entry: Entry
    sha256: str  # of the range as read back from the target


def _hash_range(fd: int, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    done = 0
    while done < length:
        chunk = _pread(fd, min(CHUNK, length - done), offset + done)
        digest.update(chunk)
        done += len(chunk)
    return digest.hexdigest()


def copy_image(
    source: Path,
    target: Path,
    target_size: int,
    keep: Callable[[Entry], bool],
    *,
    rewrite: Callable[[Entry, bytes], bytes] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Copied]:
    """Copy the partitions of `source` that `keep` accepts to `target` at the same
    sectors, with a GPT listing exactly those (same type, unique GUID, name, attributes;
    a new disk GUID), and return each range's SHA-256 as read back from `target`.
    `rewrite(entry, data)` may replace a partition's content (the installer drops the
    seed's install file); the read-back is compared with what was meant to be written.
    Every check is made before the first write."""
    table = read_gpt(source)
    s = table.sector
    entries = tuple(e for e in table.entries if keep(e))
    disk_sectors = target_size // s
    primary, backup, backup_start = gpt_bytes(
        replace(table, entries=entries, disk_guid=uuid.uuid4()), disk_sectors
    )
    for e in entries:
        if e.last > backup_start - 1:
            raise DiskError(
                f"partition {e.index} ({e.name or 'no name'}) does not fit on the target "
                f"({target_size} bytes)"
            )
    copied: list[Copied] = []
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(target, os.O_RDWR | os.O_CLOEXEC | os.O_EXCL)
    try:
        expected: dict[int, str] = {}
        for e in entries:
            progress(f"copying partition {e.index} ({e.name or 'no name'}, {e.sectors * s} bytes)")
            offset, length = e.first * s, e.sectors * s
            digest = hashlib.sha256()
            if rewrite is not None:
                data = rewrite(e, _pread(src, length, offset))
                if len(data) != length:
                    raise DiskError(f"partition {e.index}: rewritten to a different size")
                os.pwrite(dst, data, offset)
                digest.update(data)
            else:
                done = 0
                while done < length:
                    chunk = _pread(src, min(CHUNK, length - done), offset + done)
                    os.pwrite(dst, chunk, offset + done)
                    digest.update(chunk)
                    done += len(chunk)
            expected[e.index] = digest.hexdigest()
        os.pwrite(dst, backup, backup_start * s)
        os.pwrite(dst, primary, 0)
        os.fsync(dst)
        # Read back from the disk, not from the page cache this process just filled.
        os.posix_fadvise(dst, 0, 0, os.POSIX_FADV_DONTNEED)
        for e in entries:
            got = _hash_range(dst, e.first * s, e.sectors * s)
            if got != expected[e.index]:
                raise DiskError(f"partition {e.index} reads back differently from what was written")
            copied.append(Copied(e, got))
    finally:
        os.close(src)
        os.close(dst)
    if read_gpt(target, s).entries != entries:
        raise DiskError("the target's partition table reads back differently")
    return copied


def entries_named(entries: Iterable[Entry], name: str) -> list[Entry]:
    return [e for e in entries if e.name == name]


def partition_node(root: str | Path, disk: Path, number: int) -> Path | None:
    """The /dev node of `disk`'s partition `number` (its GPT index), found through the
    kernel's partitions of that disk in sysfs; None when the kernel has no such
    partition or udev made no node for it."""
    parent = Path(root, "sys/class/block", Path(os.path.realpath(disk)).name)
    try:
        children = sorted(os.listdir(parent))
    except OSError:
        return None
    for child in children:
        if _read(parent / child / "partition") == str(number):
            node = Path(root, "dev", child)
            return node if node.exists() else None
    return None
