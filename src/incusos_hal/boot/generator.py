"""The systemd generator, and the cache that makes it as fast as a C generator.

systemd runs every generator at boot and on each daemon-reload, before any unit starts,
so its cost is paid on the critical path. Python's interpreter alone costs what
netplan's C generator does; parsing TOML costs twice that again. So the work is split:

- slow path (`generate`): read config.toml (falling back to the last good copy, then the
  default), validate, render the units, write them. Always correct.
- fast path (`incusos_hal.boot.fast`): `generator.cache` in the state directory holds the
  exact bytes of both config files the output was computed from, plus that output, under
  a digest (`state.cachefile`, the codec the configure step's cache shares).
  When the files on disk are byte-identical (and the version and unit directory match),
  the cached tree is written out with no module imported beyond the interpreter's own.

The cache is written by whoever already ran the slow code: the configure step at boot,
and `incusos-hal` when it stores a new config. It is computed by the same function the
slow path uses, from the same bytes, so the two paths cannot disagree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import __version__
from ..config.model import Config
from ..core.files import atomic_write, write_tree
from ..core.kmsg import ERR, INFO, WARNING, kmsg
from ..render import Symlink, Tree
from ..sections import render_units
from ..state import store
from ..state.cachefile import blob, seal
from ..state.paths import GENERATOR_CACHE

IDENT = "incusos-hal-generator"
CACHE_FILE = GENERATOR_CACHE
CACHE_MAGIC = b"incusos-hal-generator-cache 2\n"


def units_for(
    directory: str | os.PathLike[str],
    current: bytes | OSError | None,
    last_good: bytes | OSError | None,
    unit_dir: str,
) -> tuple[Tree, store.Loaded]:
    """The generator's output for these config file contents. Pure."""
    loaded = store.load_from(directory, current, last_good)
    source = str(Path(directory, store.CONFIG_FILE))
    return render_units(loaded.config, source=source, unit_dir=unit_dir), loaded


def generate(normal_dir: str, state: str, unit_dir: str) -> int:
    """The slow path. Never fails the boot: every problem is logged, and exit is 0."""
    current, last_good = store.read_sources(state)
    try:
        tree, loaded = units_for(state, current, last_good, unit_dir)
    except Exception as e:  # a bug must not cost the machine its network
        kmsg(IDENT, ERR, f"rendering failed ({type(e).__name__}: {e}); using the default")
        tree = render_units(Config(), source=str(Path(state, store.CONFIG_FILE)), unit_dir=unit_dir)
    else:
        for problem in loaded.problems:
            kmsg(IDENT, WARNING, problem)
        if loaded.source != "config" and loaded.problems:
            used = loaded.path or "the default configuration"
            kmsg(IDENT, WARNING, f"using {used}")
    try:
        write_tree(normal_dir, tree)
    except OSError as e:
        kmsg(IDENT, ERR, f"cannot write {normal_dir}: {e}; no units generated")
    return 0


def encode_cache(
    version: str,
    unit_dir: str,
    state: str,
    current: bytes | None,
    last_good: bytes | None,
    tree: Tree,
) -> bytes:
    parts = [
        f"{version}\n{unit_dir}\n{state}\n".encode(),
        blob(current),
        blob(last_good),
        b"%d\n" % len(tree),
    ]
    for path, entry in sorted(tree.items()):
        if isinstance(entry, Symlink):
            parts.append(f"L {path}\n{entry.target}\n".encode())
        else:
            parts.append(f"F {entry.mode:o} {path}\n".encode() + blob(entry.content))
    return seal(CACHE_MAGIC, b"".join(parts))


def cache_bytes(
    state: str | os.PathLike[str], unit_dir: str, current: bytes | None, last_good: bytes | None
) -> bytes:
    """`generator.cache` for these config file contents."""
    tree, _ = units_for(state, current, last_good, unit_dir)
    return encode_cache(__version__, unit_dir, str(state), current, last_good, tree)


def write_factory_cache(
    path: str | os.PathLike[str], unit_dir: str, state: str | None = None
) -> None:
    """The cache a machine with no document replays (boot/fast.py FACTORY_CACHE): made
    when the image is built, for the state directory the machine will have."""
    state = state or str(store.state_dir())
    atomic_write(Path(path), cache_bytes(state, unit_dir, None, None), 0o644)


def refresh_cache(state: str | os.PathLike[str], unit_dir: str) -> bool:
    """Bring `generator.cache` up to date with the config files; True if rewritten.

    Files that cannot be read make no cache: the generator then takes the slow path,
    which reports the problem at boot where it matters.
    """
    current, last_good = store.read_sources(state)
    if isinstance(current, OSError) or isinstance(last_good, OSError):
        return False
    data = cache_bytes(state, unit_dir, current, last_good)
    path = Path(state, CACHE_FILE)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    # 0600: it holds a copy of the config, which may hold a proxy password.
    atomic_write(path, data, 0o600)
    return True


def main(argv: list[str], *, unit_dir: str) -> int:
    if len(argv) < 2:
        sys.stderr.write(f"usage: {IDENT} NORMAL_DIR [EARLY_DIR LATE_DIR]\n")
        return 2
    state = str(store.state_dir())
    kmsg(IDENT, INFO, f"rendering units from {state} (no usable cache)")
    return generate(argv[1], state, unit_dir)
