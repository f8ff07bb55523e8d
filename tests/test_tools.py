"""core/tools.run: a tool that is missing, cannot be started or does not finish becomes
the caller's own error, and a finished one is handed back whatever its exit status."""

from __future__ import annotations

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
