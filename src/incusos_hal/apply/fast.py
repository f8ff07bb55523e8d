"""The configure step's fast path at boot, and the cache it replays (`configure.cache`).

The configure unit runs at every boot after udev and before systemd-networkd, so the
boot waits for it. Its full path (`apply.configure`) imports the config model, the
renderers and the section table, parses TOML and lists the NICs before it writes a file.
But a machine nearly always boots with the config and NICs it had last time, and then
the files are the same too. So the full path, when it is done, records in the state
directory what its result depended on, and the result:

    inputs   the exact bytes of config.toml and config.last-good.toml, the NIC facts read
             from sysfs (`nic_facts`: everything `hal.net.list_nics` reads), generator.cache
             as the run left it, the version, the state, root and target directories and
             whether it acted on this machine, whether the time zone file it looked for was
             a file
    result   every file (content, mode, link target), the hostname, the warnings it logged,
             and the names in each owned directory that are not ours

and `configure_boot`, run before argparse with nothing imported but `posix`, `sys` and the
caches' codec, makes the target hold the same files when every input is the same byte for
byte: it writes (atomically, durably, like `core.files.apply_tree`) the files that differ
from the cached ones, leaves equal ones alone, sets the hostname as the full path does.
Anything else returns False and the caller runs the full path, which is always right and
writes a new cache: an input that changed, a NIC to rename (never cached), a name in an
owned directory that is neither ours nor known foreign (a stale file of ours to remove),
a damaged or edited cache (its digest), any error (what it wrote is put back first).
"""

import posix
import sys

from ..state.cachefile import Reader, blob, read_or_none, seal, unseal

CACHE_FILE = "configure.cache"
MAGIC = b"incusos-hal-configure-cache 1\n"
# The store's and the generator's names (state.store, boot.generator), not imported:
# importing the store loads the config package, the cost this path exists to avoid.
STATE_DIR_ENV = "INCUSOS_HAL_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/incusos-hal"
CONFIG_FILE = "config.toml"
LAST_GOOD_FILE = "config.last-good.toml"
GENERATOR_CACHE = "generator.cache"

_S_IFMT = 0o170000
_S_IFLNK = 0o120000
_S_IFREG = 0o100000


def fsencode(text: str) -> bytes:
    """os.fsencode on Linux, without os."""
    return text.encode("utf-8", "surrogateescape")


def fsdecode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _read(path: bytes) -> bytes | None:
    """A whole file through posix (no io buffer objects: sysfs files are small, many)."""
    try:
        fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:  # hal.net reads every unreadable file as absent
        return None
    try:
        chunks = []
        while chunk := posix.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        posix.close(fd)


def _exists(path: bytes) -> bool:
    """pathlib's exists(): follows links; a missing file or parent is False."""
    try:
        posix.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _devtype(uevent: bytes | None) -> bytes:
    """DEVTYPE as hal.net derives it from the uevent file (the last one wins)."""
    out = ""
    text = (uevent or b"").decode(errors="replace").strip()
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == "DEVTYPE":
            out = value
    return out.encode("utf-8", "surrogatepass")


def nic_facts(sys_root: str) -> bytes:
    """Everything `hal.net.list_nics(sys_root)` reads, as bytes: equal facts, equal NICs.

    Per interface: its name, the raw address, type and bonding perm_hwaddr files, the
    uevent's DEVTYPE, whether device, wireless and phy80211 exist, the master link."""
    base = fsencode(sys_root).rstrip(b"/") + b"/sys/class/net"
    if not sys_root:
        base = b"sys/class/net"
    try:
        names = sorted(posix.listdir(fsdecode(base)))
    except OSError as e:
        return b"unlistable %d\n" % (e.errno or 0)
    parts = [b"%d\n" % len(names)]
    for name in names:
        d = base + b"/" + fsencode(name)
        try:
            master: bytes | None = posix.readlink(d + b"/master")
        except OSError:
            master = None
        flags = b"".join(
            b"1" if _exists(d + leaf) else b"0" for leaf in (b"/device", b"/wireless", b"/phy80211")
        )
        parts += [
            blob(fsencode(name)),
            blob(_read(d + b"/address")),
            blob(_read(d + b"/type")),
            blob(_read(d + b"/bonding_slave/perm_hwaddr")),
            blob(_devtype(_read(d + b"/uevent"))),
            flags + b"\n",
            blob(master),
        ]
    return b"".join(parts)


def header(
    version: str, unit_dir: str, state: str, sys_root: str, target: str, live: bool
) -> tuple[str, ...]:
    """Who the cache is for: a run with other values must not use it."""
    return (version, unit_dir, state, sys_root, target, "1" if live else "0")


def encode_cache(
    *,
    header: tuple[str, ...],
    inputs: tuple[bytes | None, ...],
    file_checks: tuple[tuple[str, bool], ...],
    hostname: str | None,
    warnings: tuple[str, ...],
    foreign: tuple[tuple[str, tuple[str, ...]], ...],
    entries: tuple[tuple[str, int, str, bytes], ...],
) -> bytes:
    """The cache, from what the full path used and did. `header`: see header();
    `inputs`: config.toml, config.last-good.toml, the NIC facts, generator.cache;
    `entries`: (kind "F" or "L", mode, absolute path, content or link target), in the
    order the full path writes them."""
    parts = [blob(fsencode(h)) for h in header]
    parts += [blob(i) for i in inputs]
    parts.append(b"%d\n" % len(file_checks))
    for path, is_file in file_checks:
        parts += [blob(fsencode(path)), b"1\n" if is_file else b"0\n"]
    parts.append(blob(None if hostname is None else fsencode(hostname)))
    parts.append(b"%d\n" % len(warnings))
    parts += [blob(w.encode()) for w in warnings]
    parts.append(b"%d\n" % len(foreign))
    for directory, names in foreign:
        parts += [blob(fsencode(directory)), b"%d\n" % len(names)]
        parts += [blob(fsencode(n)) for n in names]
    parts.append(b"%d\n" % len(entries))
    for kind, mode, path, data in entries:
        parts += [b"F %o\n" % mode if kind == "F" else b"L\n", blob(fsencode(path)), blob(data)]
    return seal(MAGIC, b"".join(parts))


def _is_file(path: bytes) -> bool:
    try:
        return posix.stat(path).st_mode & _S_IFMT == _S_IFREG
    except (FileNotFoundError, NotADirectoryError):
        return False


def _load(
    state: str, expected: tuple[str, ...], sys_root: str
) -> tuple[str | None, list[str], list[tuple[str, int, bytes, bytes]]] | None:
    """(hostname, warnings, entries) when the cache holds for the inputs now; else None."""
    body = unseal(MAGIC, read_or_none(state + "/" + CACHE_FILE))
    if body is None:
        return None
    r = Reader(body)
    if any(r.blob() != fsencode(h) for h in expected):
        return None
    for name in (CONFIG_FILE, LAST_GOOD_FILE):
        if r.blob() != read_or_none(state + "/" + name):
            return None
    if r.blob() != nic_facts(sys_root):
        return None
    if r.blob() != read_or_none(state + "/" + GENERATOR_CACHE):
        return None
    for _ in range(r.number()):
        path = r.present()
        if _is_file(path) != (r.line() == b"1"):
            return None
    name_bytes = r.blob()
    hostname = None if name_bytes is None else fsdecode(name_bytes)
    warnings = [r.present().decode() for _ in range(r.number())]
    foreign: list[tuple[bytes, set[bytes]]] = []
    for _ in range(r.number()):
        directory = r.present()
        foreign.append((directory, {r.present() for _ in range(r.number())}))
    entries: list[tuple[str, int, bytes, bytes]] = []
    for _ in range(r.number()):
        head = r.line().split(b" ")
        if head == [b"L"]:
            entries.append(("L", 0, r.present(), r.present()))
        elif len(head) == 2 and head[0] == b"F":
            entries.append(("F", int(head[1], 8), r.present(), r.present()))
        else:
            return None
    if not r.at_end():
        return None
    ours = {path for _, _, path, _ in entries}
    for directory, names in foreign:
        # A name that is neither ours now nor known foreign may be a stale file of ours,
        # which the full path removes (by rules this path cannot evaluate).
        try:
            present = posix.listdir(directory)
        except FileNotFoundError:
            continue
        if any(n not in names and directory + b"/" + n not in ours for n in present):
            return None
    return hostname, warnings, entries


def _current(path: bytes) -> tuple[str, int, bytes] | None:
    """What is at `path`, as core.files.read_entry sees it."""
    try:
        st = posix.lstat(path)
    except FileNotFoundError:
        return None
    if st.st_mode & _S_IFMT == _S_IFLNK:
        return ("L", 0, posix.readlink(path))
    st = posix.stat(path)
    with open(path, "rb") as f:
        return ("F", st.st_mode & 0o7777, f.read())


def _fsync_dir(directory: bytes) -> None:
    fd = posix.open(directory, posix.O_RDONLY | posix.O_DIRECTORY | posix.O_CLOEXEC)
    try:
        posix.fsync(fd)
    finally:
        posix.close(fd)


def _makedirs(directory: bytes, created: list[bytes], known: set[bytes]) -> None:
    """mkdir -p, noting each directory it made (outermost first) in `created`; `known`
    holds the directories already seen to exist."""
    if directory in known:
        return
    try:
        posix.stat(directory)
    except FileNotFoundError:
        parent = directory.rpartition(b"/")[0]
        if parent and parent != directory:
            _makedirs(parent, created, known)
        posix.mkdir(directory, 0o777)
        created.append(directory)
    known.add(directory)


def _put(path: bytes, kind: str, mode: int, data: bytes, token: bytes) -> bytes:
    """core.files' atomic_write / atomic_symlink: a temp file beside it (`.NAME.TOKEN.tmp`,
    created exclusively), fsync'ed, renamed. Returns the directory, for the caller to
    fsync (once per directory, not per file)."""
    directory, _, name = path.rpartition(b"/")
    tmp = directory + b"/." + name + b"." + token + b".tmp"
    try:
        if kind == "L":
            posix.symlink(data, tmp)
        else:
            flags = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC
            fd = posix.open(tmp, flags, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[posix.write(fd, view) :]
                posix.fchmod(fd, mode)
                posix.fsync(fd)
            finally:
                posix.close(fd)
        posix.replace(tmp, path)
    except BaseException:
        try:  # noqa: SIM105 - contextlib is an import this path does not pay for
            posix.unlink(tmp)
        except OSError:
            pass
        raise
    return directory or b"/"


def _apply(entries: list[tuple[str, int, bytes, bytes]]) -> list[bytes]:
    """Write the entries that differ; on any failure put every one back and raise."""
    before: list[tuple[bytes, tuple[str, int, bytes] | None]] = []
    created: list[bytes] = []
    known: set[bytes] = set()
    directories: dict[bytes, None] = {}
    token = posix.urandom(4).hex().encode()
    try:
        for kind, mode, path, data in entries:
            current = _current(path)
            if current == (kind, mode, data):
                continue
            before.append((path, current))
            _makedirs(path.rpartition(b"/")[0], created, known)
            directories[_put(path, kind, mode, data, token)] = None
        for directory in directories:  # the renames durable, as apply_tree makes them
            _fsync_dir(directory)
    except BaseException:
        for path, old in reversed(before):
            try:
                if old is None:
                    posix.unlink(path)
                else:
                    _fsync_dir(_put(path, *old, token))
            except OSError:
                pass  # the full path, run next, puts the files right or says why
        for directory in reversed(created):
            try:  # noqa: SIM105
                posix.rmdir(directory)
            except OSError:
                pass
        raise
    return [path for path, _ in before]


def _log(level: int, message: str) -> None:
    for line in message.splitlines():
        sys.stderr.write(f"<{level}>{line}\n")


def configure_boot(*, state: str, sys_root: str, target: str, unit_dir: str, version: str) -> bool:
    """`incusos-hal configure --boot` from the cache; False (nothing changed): run the
    full path."""
    live = sys_root == "/" and target == "/"
    try:
        loaded = _load(state, header(version, unit_dir, state, sys_root, target, live), sys_root)
        if loaded is None:
            return False
        hostname, warnings, entries = loaded
        written = _apply(entries)
    except Exception:  # a damaged cache or a surprise on disk: the full path knows why
        return False
    for warning in warnings:
        _log(4, warning)
    for path in written:
        _log(6, f"wrote {fsdecode(path)}")
    if live and hostname:
        import _socket  # built in; only a machine whose hostname is configured pays

        if _socket.gethostname() != hostname:
            try:
                _socket.sethostname(hostname)
                _log(6, f"hostname set to {hostname}")
            except OSError as e:
                _log(4, f"setting the hostname failed: {e}")
    sys.stderr.flush()
    return True
