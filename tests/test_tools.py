"""core/tools.run: a tool that is missing, cannot be started or does not finish becomes
the caller's own error, and a finished one is handed back whatever its exit status."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from incusos_hal.core import tools


class ToolError(Exception):
    pass


def test_a_finished_tool_is_returned_with_its_status_and_output() -> None:
    done = tools.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30, error=ToolError)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_a_missing_tool(tmp_path: Path) -> None:
    with pytest.raises(ToolError, match=r"^/nonexistent/zpool is not installed$"):
        tools.run(["/nonexistent/zpool"], timeout=30, error=ToolError)


def test_a_tool_that_cannot_be_started(tmp_path: Path) -> None:
    script = tmp_path / "zpool"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)  # not executable: EACCES, an OSError that is not FileNotFoundError
    with pytest.raises(ToolError, match=r"zpool could not be started: Permission denied"):
        tools.run([str(script)], timeout=30, error=ToolError)


def test_a_tool_that_does_not_finish_is_stopped() -> None:
    with pytest.raises(ToolError, match=r"^sleep did not finish in 0 s$"):
        tools.run(["sleep", "30"], timeout=0.2, error=ToolError)


def _proc(tmp_path: Path, own: str, pid1: str | None) -> Path:
    proc = tmp_path / "proc"
    (proc / "self/ns").mkdir(parents=True)
    (proc / "self/ns/mnt").symlink_to(own)
    if pid1 is not None:
        (proc / "1/ns").mkdir(parents=True)
        (proc / "1/ns/mnt").symlink_to(pid1)
    return proc


def test_a_namespace_other_than_pid_1s_is_private(tmp_path: Path) -> None:
    same = _proc(tmp_path / "a", "mnt:[4026531841]", "mnt:[4026531841]")
    other = _proc(tmp_path / "b", "mnt:[4026532211]", "mnt:[4026531841]")
    assert tools.private_mount_namespace(str(same), str(tmp_path)) is False
    assert tools.private_mount_namespace(str(other), str(tmp_path)) is True


def test_pid_1s_namespace_hidden_means_private_only_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PID 1's link refused (EACCES: the service has no CAP_SYS_PTRACE; root passes the
    file's own permissions, so the kernel's refusal is stood in for here): under systemd
    that is the sandbox's doing; with no systemd, no one else could start the tool."""
    proc = _proc(tmp_path, "mnt:[4026532211]", "mnt:[4026531841]")
    real = os.readlink

    def readlink(path: str) -> str:
        if path == f"{proc}/1/ns/mnt":
            raise PermissionError(13, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "readlink", readlink)
    assert tools.private_mount_namespace(str(proc), str(tmp_path)) is False
    (tmp_path / "systemd/system").mkdir(parents=True)
    assert tools.private_mount_namespace(str(proc), str(tmp_path)) is True
    # A /proc without the links (not mounted, another OS): not private.
    assert tools.private_mount_namespace(str(tmp_path / "none"), str(tmp_path)) is False


def test_machine_namespace_argv_hands_the_tool_to_systemd_run() -> None:
    argv = tools.machine_namespace_argv(["zpool", "destroy", "mypool"], 600, {"LC_ALL": "C"})
    assert argv == [
        "systemd-run",
        "--quiet",
        "--pipe",
        "--wait",
        "--collect",
        "--service-type=exec",
        "--description=incusos-hal: zpool destroy",
        "--property",
        "RuntimeMaxSec=600",
        "--setenv=LC_ALL=C",
        "--",
        "zpool",
        "destroy",
        "mypool",
    ]
    unbounded = tools.machine_namespace_argv(["zpool", "scrub", "-w", "p"], None, {})
    assert "--property" not in unbounded and unbounded[-4:] == ["zpool", "scrub", "-w", "p"]
