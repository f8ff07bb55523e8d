"""The stored document: atomic writes, 0600, and the fallback chain."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from incusos_hal.config import Config, parse_toml
from incusos_hal.state import store

GOOD = b'version = 1\n[[network.interfaces]]\nname = "uplink"\nhwaddr = "52:54:00:0a:00:01"\n'
OTHER = b'version = 1\n[network.time]\ntimezone = "Europe/Berlin"\n'


def test_no_document_is_the_default(tmp_path: Path) -> None:
    loaded = store.load(tmp_path)
    assert (loaded.config, loaded.source, loaded.problems) == (Config(), "default", ())


def test_save_writes_0600_atomically_and_loads_back(tmp_path: Path) -> None:
    config = parse_toml(GOOD)
    store.save(tmp_path, config)
    path = tmp_path / store.CONFIG_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.load(tmp_path).config == config
    assert [p.name for p in tmp_path.iterdir()] == [store.CONFIG_FILE], "temp files left over"


def test_broken_config_falls_back_to_last_good(tmp_path: Path) -> None:
    store.mark_good(tmp_path, parse_toml(GOOD))
    (tmp_path / store.CONFIG_FILE).write_bytes(b"\x00garbage[[")
    loaded = store.load(tmp_path)
    assert loaded.source == "last-good"
    assert loaded.config == parse_toml(GOOD)
    assert loaded.problems and "not valid TOML" in loaded.problems[0]


def test_broken_config_and_broken_last_good_fall_back_to_default(tmp_path: Path) -> None:
    (tmp_path / store.CONFIG_FILE).write_bytes(b'[network]\nmtu = "x"\n')
    (tmp_path / store.LAST_GOOD_FILE).write_bytes(b"version = 7\n")
    loaded = store.load(tmp_path)
    assert loaded.source == "default" and loaded.config == Config()
    assert len(loaded.problems) == 2


def test_unreadable_config_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / store.CONFIG_FILE).mkdir()  # reading a directory fails with EISDIR
    store.mark_good(tmp_path, parse_toml(OTHER))
    loaded = store.load(tmp_path)
    assert loaded.source == "last-good"
    assert "cannot read" in loaded.problems[0]


def test_mark_good_only_writes_on_change(tmp_path: Path) -> None:
    config = parse_toml(GOOD)
    assert store.mark_good(tmp_path, config) is True
    before = (tmp_path / store.LAST_GOOD_FILE).stat().st_mtime_ns
    assert store.mark_good(tmp_path, config) is False
    assert (tmp_path / store.LAST_GOOD_FILE).stat().st_mtime_ns == before


def test_state_dir_comes_from_the_environment(monkeypatch: object, tmp_path: Path) -> None:
    os.environ[store.STATE_DIR_ENV] = str(tmp_path)
    try:
        assert store.state_dir() == tmp_path
    finally:
        del os.environ[store.STATE_DIR_ENV]
    assert store.state_dir() == Path(store.DEFAULT_STATE_DIR)
