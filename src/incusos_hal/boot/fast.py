"""The generator's entry point and fast path. Imports no module the interpreter has not
already loaded but the caches' codec (`incusos_hal.state.cachefile`, which brings the
built-in `_blake2`): `posix` (not `os`, whose import is a sixth of this path's cost) and `sys`.

See `incusos_hal.boot.generator` for why there is a cache and how it stays correct. Here: if
`generator.cache` is intact (its digest) and matches the config files byte for byte, replay
it; otherwise (or on any surprise at all) hand over to the slow path, which is always right.
"""

import posix
import sys

from ..state.cachefile import Reader, read_or_none, unseal

STATE_DIR_ENV = "INCUSOS_HAL_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/incusos-hal"
MAGIC = b"incusos-hal-generator-cache 2\n"
# The cache for a machine with no document yet (a first boot), made when the image is
# built (generator.write_factory_cache): it replays only while the state directory has no
# config files, so a first boot takes the fast path too. Under emulation the slow path's
# imports outlasted systemd's time for generators, and PID 1 froze ("Failed to fork off
# sandboxing environment for executing generators: Protocol error").
FACTORY_CACHE = "/usr/lib/incusos-hal/generator.cache"


def _makedirs(path: str) -> None:
    parent = path.rpartition("/")[0]
    if not parent or parent == path:
        return
    try:
        posix.mkdir(path, 0o755)
    except FileExistsError:
        return
    except FileNotFoundError:
        _makedirs(parent)
        posix.mkdir(path, 0o755)


def replay(
    normal_dir: str, state: str, unit_dir: str, version: str, cache: str | None = None
) -> bool:
    """Write the cached tree (the state's `generator.cache`, or `cache`) if it is valid
    for the files on disk now; else False."""
    body = unseal(MAGIC, read_or_none(cache or state + "/generator.cache"))
    if body is None:
        return False
    r = Reader(body)
    if r.line().decode() != version or r.line().decode() != unit_dir or r.line().decode() != state:
        return False
    if r.blob() != read_or_none(state + "/config.toml"):
        return False
    if r.blob() != read_or_none(state + "/config.last-good.toml"):
        return False
    entries: list[tuple[str, str, int, bytes]] = []
    for _ in range(int(r.line())):
        head = r.line().decode().split(" ")
        if head[0] == "L" and len(head) == 2:
            entries.append(("L", head[1], 0, r.line()))
        elif head[0] == "F" and len(head) == 3:
            data = r.blob()
            entries.append(("F", head[2], int(head[1], 8), data or b""))
        else:
            return False
    if not r.at_end():
        return False
    written: list[str] = []
    try:
        for kind, rel, mode, data in entries:
            if rel.startswith("/") or ".." in rel.split("/"):
                raise ValueError("path outside the output directory")
            path = normal_dir.rstrip("/") + "/" + rel
            _makedirs(path.rpartition("/")[0])
            if kind == "L":
                posix.symlink(data.decode(), path)
            else:
                flags = posix.O_WRONLY | posix.O_CREAT | posix.O_EXCL | posix.O_CLOEXEC
                fd = posix.open(path, flags, mode)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[posix.write(fd, view) :]
                finally:
                    posix.close(fd)
            written.append(path)
    except BaseException:
        for path in written:
            try:  # noqa: SIM105 - contextlib is one import too many on this path
                posix.unlink(path)
            except OSError:
                pass
        raise
    return True


def main(argv: list[str], *, unit_dir: str, version: str) -> int:
    if len(argv) >= 2:
        state = (posix.environ.get(STATE_DIR_ENV.encode()) or DEFAULT_STATE_DIR.encode()).decode()
        try:
            if replay(argv[1], state, unit_dir, version):
                return 0
            if read_or_none(state + "/generator.cache") is None and replay(
                argv[1], state, unit_dir, version, FACTORY_CACHE
            ):
                return 0
        except Exception:  # noqa: S110 - a damaged cache only costs the slow path
            pass
    # The installed script runs with -S: bring in site-packages (and .pth files) now, for
    # the slow path's dependencies, wherever they were installed.
    if "site" not in sys.modules:
        import site

        site.main()
    from incusos_hal.boot.generator import main as slow_main

    return slow_main(argv, unit_dir=unit_dir)


if __name__ == "__main__":  # pragma: no cover - the installed script calls main()
    sys.exit(main(sys.argv, unit_dir="/usr/lib/systemd/system", version="dev"))
