"""Atomic writes and all-or-nothing trees."""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from pathlib import Path

import pytest

from incusos_hal.apply.deadline import Deadline, TimedOut, TimeLimit
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


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under `root`: directories with their mode, files with mode and bytes,
    symlinks with their target (temp files would show up too)."""
    out: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(directory, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def before_tree(root: Path) -> None:
    d = root / "etc/net"
    d.mkdir(parents=True)
    (d / "10-ours-a").write_text("old a")
    (d / "10-ours-same").write_text("same")
    (d / "10-ours-mode").write_text("m")
    (d / "10-ours-mode").chmod(0o600)
    (d / "10-ours-stale1").write_text("stale 1")
    (d / "10-ours-stale2").write_text("stale 2")
    (d / "90-theirs").write_text("theirs")
    os.symlink("a", d / "10-ours-link")


CHANGE = {
    "/etc/net/10-ours-a": File(b"new a"),
    "/etc/net/10-ours-same": File(b"same"),
    "/etc/net/10-ours-mode": File(b"m", 0o644),
    "/etc/net/10-ours-link": Symlink("b"),
    "/etc/net/10-ours-new": File(b"new"),
    "/etc/new/deep/10-x": File(b"in directories that do not exist yet"),
    "/etc/localtime": Symlink("../usr/share/zoneinfo/UTC"),
}


def stepping_clock() -> itertools.count[int]:
    """A clock that advances one second each time it is read (the Deadline reads it once
    when created and once per check), so a limit of k seconds runs out at check k."""
    return itertools.count()


def test_apply_tree_out_of_time_at_every_step_restores_the_tree_exactly(tmp_path: Path) -> None:
    original = tmp_path / "original"
    before_tree(original)
    want = snapshot(original)
    # The whole change once, counting its steps: a check before each of the 6 writes
    # and 2 removals, and one after the last.
    done = tmp_path / "done"
    shutil.copytree(original, done, symlinks=True)
    clock = stepping_clock()
    applied = apply_tree(
        done, CHANGE, OWNED, check=Deadline(TimeLimit(1000, 0), clock.__next__).check
    )
    steps = next(clock) - 1
    assert steps == len(applied.written) + len(applied.removed) + 1 == 9
    assert snapshot(done) != want
    for k in range(1, steps + 1):
        root = tmp_path / f"at-{k}"
        shutil.copytree(original, root, symlinks=True)
        clock = stepping_clock()
        deadline = Deadline(TimeLimit(k, 0), clock.__next__)
        with pytest.raises(TimedOut, match=f"timed out after {k} s"):
            apply_tree(root, CHANGE, OWNED, check=deadline.check)
        assert snapshot(root) == want, f"deadline at step {k}"


def test_apply_tree_any_failure_at_every_step_restores_the_tree_exactly(tmp_path: Path) -> None:
    """Not only a deadline: whatever the check raises (here an OSError, as a full disk
    would) undoes the steps before it."""
    original = tmp_path / "original"
    before_tree(original)
    want = snapshot(original)
    for k in range(9):
        root = tmp_path / f"at-{k}"
        shutil.copytree(original, root, symlinks=True)
        calls = itertools.count()

        def fail_at_k(k: int = k, calls: itertools.count[int] = calls) -> None:
            if next(calls) == k:
                raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            apply_tree(root, CHANGE, OWNED, check=fail_at_k)
        assert snapshot(root) == want, f"failure at step {k}"
