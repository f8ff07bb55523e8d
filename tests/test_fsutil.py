"""Atomic writes and all-or-nothing trees."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from incusos_hal.core.files import Owned, apply_tree, atomic_write, write_tree
from incusos_hal.render import File, Symlink


def test_atomic_write_creates_with_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a/b/secret", b"x", 0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a/b/secret").stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "a/b") == ["secret"]


def test_write_tree_removes_what_it_wrote_on_failure(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a directory is needed")
    tree = {"ok/one": File(b"1"), "ok/two": Symlink("/x"), "blocker/three": File(b"3")}
    with pytest.raises(OSError):
        write_tree(tmp_path, tree)
    assert not (tmp_path / "ok/one").exists()
    assert not (tmp_path / "ok/two").is_symlink()


def test_write_tree_refuses_paths_outside_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="outside"):
        write_tree(tmp_path / "r", {"../escape": File(b"x")})
    assert not (tmp_path / "escape").exists()


OWNED = [Owned("/etc/net", lambda n: n.startswith("10-ours-"))]


def test_apply_tree_writes_removes_stale_and_keeps_foreign(tmp_path: Path) -> None:
    d = tmp_path / "etc/net"
    d.mkdir(parents=True)
    (d / "10-ours-stale").write_text("old")
    (d / "10-ours-same").write_text("same")
    (d / "90-theirs").write_text("theirs")
    same_mtime = (d / "10-ours-same").stat().st_mtime_ns
    applied = apply_tree(
        tmp_path,
        {"/etc/net/10-ours-new": File(b"new"), "/etc/net/10-ours-same": File(b"same")},
        OWNED,
    )
    assert sorted(os.listdir(d)) == ["10-ours-new", "10-ours-same", "90-theirs"]
    assert (d / "10-ours-same").stat().st_mtime_ns == same_mtime, "unchanged file rewritten"
    assert applied.written == (str(d / "10-ours-new"),)
    assert applied.removed == (str(d / "10-ours-stale"),)


def test_apply_tree_rolls_back_on_failure(tmp_path: Path) -> None:
    d = tmp_path / "etc/net"
    d.mkdir(parents=True)
    (d / "10-ours-a").write_text("old a")
    (d / "10-ours-stale").write_text("stale")
    (tmp_path / "etc/blocked").write_text("a file where a directory is needed")
    tree = {
        "/etc/net/10-ours-a": File(b"new a"),
        "/etc/net/10-ours-b": File(b"new b"),
        "/etc/blocked/x": File(b"fails"),
    }
    with pytest.raises(OSError):
        apply_tree(tmp_path, tree, OWNED)
    assert sorted(os.listdir(d)) == ["10-ours-a", "10-ours-stale"]
    assert (d / "10-ours-a").read_text() == "old a"
