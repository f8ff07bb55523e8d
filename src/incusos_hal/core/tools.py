"""Running a machine's tool (sfdisk, nvme, iscsiadm, systemd-sysupdate) from the edges
that need one: stdin closed, output captured as text, bounded in time; a tool that is
not installed or does not finish becomes the caller's own error, in one wording."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence


def run(
    argv: Sequence[str],
    *,
    timeout: float | None,
    error: Callable[[str], Exception],
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The finished process (its exit status is the caller's to judge); `error(message)`
    raised when the tool is missing or outlasts `timeout` seconds (None: a step that
    runs as long as the work takes, such as a waited-for scrub)."""
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
    except OSError as e:  # not executable, too many open files, out of memory
        raise error(f"{argv[0]} could not be started: {e.strerror or e}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{argv[0]} did not finish in {timeout or 0:.0f} s") from None
