"""Running a machine's tool (sfdisk, nvme, iscsiadm, systemd-sysupdate) from the edges
that need one: stdin closed, output captured as text, bounded in time; a tool that is
not installed or does not finish becomes the caller's own error, in one wording."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    error: Callable[[str], Exception],
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The finished process (its exit status is the caller's to judge); `error(message)`
    raised when the tool is missing or outlasts `timeout` seconds."""
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError:
        raise error(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise error(f"{argv[0]} did not finish in {timeout:.0f} s") from None
