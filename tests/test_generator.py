"""The generator: slow path, cache fast path, fallbacks, and never failing the boot.

Each run is a separate process, as systemd runs it, with the generator's log going to a
file ($INCUSOS_HAL_KMSG) instead of this machine's kernel log.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from incusos_hal import __version__
from incusos_hal.boot.generator import CACHE_FILE, encode_cache, refresh_cache
from incusos_hal.config import parse_toml
from incusos_hal.sections import render_units
from incusos_hal.state import store

from golden import manifest

SRC = str(Path(__file__).resolve().parent.parent / "src")
UNIT_DIR = "/usr/lib/systemd/system"
GOOD = b'[[network.interfaces]]\nname = "up"\nhwaddr = "52:54:00:0a:00:01"\n'
SYSLOG = GOOD + b'[logging.syslog]\naddress = "192.0.2.9"\n'

# Runs the generator's entry point as the installed script does, then reports which
# modules it loaded, so the fast path's import set is checked, not assumed.
RUNNER = f"""
import sys
sys.path.insert(0, {SRC!r})
from incusos_hal.boot.fast import main
code = main(sys.argv, unit_dir={UNIT_DIR!r}, version={__version__!r})
modules = sorted(sys.modules)  # before json below adds its own
import json
sys.stdout.write(json.dumps({{"code": code, "modules": modules}}))
"""


def run_generator(state: Path, out: Path, log: Path, *args: str) -> tuple[int, list[str], str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin"),
        "INCUSOS_HAL_STATE_DIR": str(state),
        "INCUSOS_HAL_KMSG": str(log),
    }
    log.touch()  # like /dev/kmsg, it exists before anyone writes to it
    argv = [str(out), str(out) + ".early", str(out) + ".late"] if not args else list(args)
    # -I -S: as the installed script's #! line runs it.
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", RUNNER, *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout, proc.stderr
    result = json.loads(proc.stdout)
    text = log.read_text() if log.exists() else ""
    return result["code"], result["modules"], text


def expected_tree(state: Path, config_bytes: bytes | None) -> list[str]:
    config = parse_toml(config_bytes) if config_bytes is not None else parse_toml(b"")
    tree = render_units(config, source=str(state / store.CONFIG_FILE), unit_dir=UNIT_DIR)
    lines = []
    for path, entry in sorted(tree.items()):
        lines.append(
            f"l /{path} -> {entry.target}"
            if hasattr(entry, "target")
            else f"f {entry.mode:04o} /{path}"
        )
    return sorted(lines)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    state = tmp_path / "state"
    state.mkdir()
    return state, tmp_path / "normal", tmp_path / "kmsg.log"


def test_slow_path_renders_the_stored_config(dirs: tuple[Path, Path, Path]) -> None:
    state, out, log = dirs
    (state / store.CONFIG_FILE).write_bytes(SYSLOG)
    code, modules, _ = run_generator(state, out, log)
    assert code == 0
    assert manifest(out)[0] == expected_tree(state, SYSLOG)
    assert "incusos_hal.config" in modules  # no cache: the slow path ran
    # The slow path runs on a boot after a change: none of what only the API or a writer
    # needs (named by weight: each cost milliseconds of a boot when it was imported here).
    heavy = {"secrets", "hmac", "random", "socket", "shutil", "ssl", "asyncio", "aiohttp"}
    assert heavy.isdisjoint(modules), sorted(heavy & set(modules))


def test_cache_replays_identically_importing_only_os_and_sys(
    dirs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    state, out, log = dirs
    (state / store.CONFIG_FILE).write_bytes(SYSLOG)
    run_generator(state, tmp_path / "slow", log)
    assert refresh_cache(state, UNIT_DIR) is True
    assert refresh_cache(state, UNIT_DIR) is False  # already current
    code, modules, _ = run_generator(state, out, log)
    assert code == 0
    assert manifest(out) == manifest(tmp_path / "slow")
    # Against what the bare interpreter (-I -S, as the script's #! line) loads: nothing
    # more but our modules and the built-in BLAKE2 the cache's digest needs (not even os).
    bare = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; print(repr(sorted(sys.modules)))"],
        env={"PATH": os.environ.get("PATH", "/usr/bin")},
        capture_output=True,
        text=True,
        check=True,
    )
    baseline = set(ast.literal_eval(bare.stdout))
    ours = sorted(set(modules) - baseline)
    assert ours == [
        "_blake2",
        "incusos_hal",
        "incusos_hal.boot",
        "incusos_hal.boot.fast",
        "incusos_hal.state",
        "incusos_hal.state.cachefile",
    ]


def test_changed_config_misses_the_cache(dirs: tuple[Path, Path, Path]) -> None:
    state, out, log = dirs
    (state / store.CONFIG_FILE).write_bytes(GOOD)
    refresh_cache(state, UNIT_DIR)
    (state / store.CONFIG_FILE).write_bytes(SYSLOG)  # edited behind the store's back
    code, modules, _ = run_generator(state, out, log)
    assert code == 0 and "incusos_hal.config" in modules
    assert manifest(out)[0] == expected_tree(state, SYSLOG)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b.replace(b"\nL ", b"\nX ", 1),  # unknown entry type
        lambda b: b.replace(b"L sysinit", b"L ../../etc/evil", 1),  # path traversal
        lambda b: b"\x00" * 64,  # garbage
        lambda b: b.replace(__version__.encode(), b"0.0.0-other", 1),  # other version
        lambda b: b[:-2] + bytes([b[-2] ^ 1]) + b[-1:],  # hand-edited: a unit's content
        lambda b: b + b"F 644 extra\n0\n\n",  # an entry appended
        lambda b: b"",  # empty
    ],
)
def test_damaged_cache_falls_back_to_the_slow_path(
    dirs: tuple[Path, Path, Path], damage: object
) -> None:
    state, out, log = dirs
    (state / store.CONFIG_FILE).write_bytes(SYSLOG)
    refresh_cache(state, UNIT_DIR)
    cache = state / CACHE_FILE
    cache.write_bytes(damage(cache.read_bytes()))  # type: ignore[operator]
    code, _, _ = run_generator(state, out, log)
    assert code == 0
    assert manifest(out)[0] == expected_tree(state, SYSLOG)
    assert not (out.parent / "etc").exists()


def test_cache_of_another_version_or_directory_is_not_replayed(
    dirs: tuple[Path, Path, Path],
) -> None:
    """Intact caches (valid digest) made for another version, unit or state directory."""
    state, out, log = dirs
    (state / store.CONFIG_FILE).write_bytes(SYSLOG)
    current = (state / store.CONFIG_FILE).read_bytes()
    tree = render_units(parse_toml(SYSLOG), source="/elsewhere/config.toml", unit_dir="/x")
    for version, unit_dir, where in (
        ("0.0.0-other", UNIT_DIR, str(state)),
        (__version__, "/x", str(state)),
        (__version__, UNIT_DIR, "/elsewhere"),
    ):
        data = encode_cache(version, unit_dir, where, current, None, tree)
        (state / CACHE_FILE).write_bytes(data)
        code, modules, _ = run_generator(state, out, log)
        assert code == 0 and "incusos_hal.config" in modules
        assert manifest(out)[0] == expected_tree(state, SYSLOG)
        subprocess.run(["rm", "-rf", str(out)], check=True)


def test_garbage_config_boots_with_last_good(dirs: tuple[Path, Path, Path]) -> None:
    state, out, log = dirs
    store.mark_good(state, parse_toml(SYSLOG))
    (state / store.CONFIG_FILE).write_bytes(b"\xff\xfe garbage [[[")
    code, _, text = run_generator(state, out, log)
    assert code == 0
    assert manifest(out)[0] == expected_tree(state, SYSLOG)
    assert "not UTF-8" in text and "config.last-good.toml" in text
    assert "<28>incusos-hal-generator[" in text  # daemon.warning, in kmsg's format


def test_garbage_everywhere_boots_with_the_default(dirs: tuple[Path, Path, Path]) -> None:
    state, out, log = dirs
    (state / store.CONFIG_FILE).write_bytes(b"[network]\nbogus = 1\n")
    (state / store.LAST_GOOD_FILE).write_bytes(b"version = 'x'\n")
    code, _, text = run_generator(state, out, log)
    assert code == 0
    assert manifest(out)[0] == expected_tree(state, None)
    assert "network.bogus: unknown key" in text and "the default configuration" in text


def test_unwritable_output_logs_and_exits_zero(dirs: tuple[Path, Path, Path]) -> None:
    state, out, log = dirs
    (state / store.CONFIG_FILE).write_bytes(GOOD)
    out.write_text("not a directory")
    code, _, text = run_generator(state, out, log)
    assert code == 0
    assert "no units generated" in text
    assert out.read_text() == "not a directory"


def test_missing_arguments_is_a_usage_error(dirs: tuple[Path, Path, Path]) -> None:
    state, _, log = dirs
    env = {"INCUSOS_HAL_STATE_DIR": str(state), "INCUSOS_HAL_KMSG": str(log)}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", RUNNER],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert json.loads(proc.stdout)["code"] == 2
    assert "usage" in proc.stderr


def test_a_first_boot_replays_the_factory_cache(
    dirs: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache the image ships for a machine with no document (built with it) gives a
    first boot exactly the slow path's tree, with the fast path's imports; it is never
    replayed once a document exists (nor over the state's own cache)."""
    from incusos_hal.boot import fast
    from incusos_hal.boot.generator import write_factory_cache

    state, out, log = dirs
    factory = tmp_path / "factory.cache"
    write_factory_cache(factory, UNIT_DIR, state=str(state))
    run_generator(state, tmp_path / "slow", log)  # no document, no cache: the slow path
    monkeypatch.setattr(fast, "FACTORY_CACHE", str(factory))
    monkeypatch.setenv(fast.STATE_DIR_ENV, str(state))
    quiet = tmp_path / "kmsg-fast.log"
    quiet.touch()
    monkeypatch.setenv("INCUSOS_HAL_KMSG", str(quiet))
    assert fast.main(["gen", str(out)], unit_dir=UNIT_DIR, version=__version__) == 0
    assert manifest(out) == manifest(tmp_path / "slow")
    assert quiet.read_text() == ""  # the slow path says "(no usable cache)": it did not run
    assert not (state / "generator.cache").exists()  # the factory's is read, not copied
    # A document now: the factory cache no longer matches; replay refuses it.
    (state / store.CONFIG_FILE).write_bytes(SYSLOG)
    assert not fast.replay(str(tmp_path / "n2"), str(state), UNIT_DIR, __version__, str(factory))
    assert not (tmp_path / "n2").exists()
