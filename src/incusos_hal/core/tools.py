"""Running a machine's tool (sfdisk, nvme, iscsiadm, systemd-sysupdate) from the edges
that need one: stdin closed, output captured as text, bounded in time; a tool that is
not installed or does not finish becomes the caller's own error, in one wording.

A tool that mounts or unmounts (`zpool import`, `zfs destroy`) must act in the machine's
mount namespace. The API service's unit gives it one of its own (ProtectSystem=strict)
and a system call filter without mount(2) and umount2(2): a mount made there would be
seen by no other process, and none can be made or undone ("cannot unmount: permission
denied", seen in the ZFS guest). Such a tool is started by the system manager instead
(`systemd-run --pipe --wait`), whose units run in the machine's namespace, with the
caller's pipes and exit status."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence


def private_mount_namespace(proc: str = "/proc", run_dir: str = "/run") -> bool:
    """Whether this process's mount namespace is not the machine's (PID 1's). PID 1's is
    hidden from a process without CAP_SYS_PTRACE, as the API service's unit leaves it:
    then a system booted with systemd (its /run/systemd/system) is taken to have put us
    in a namespace of our own; without systemd there is no one else to ask."""
    try:
        return os.readlink(f"{proc}/self/ns/mnt") != os.readlink(f"{proc}/1/ns/mnt")
    except PermissionError:
        return os.path.isdir(f"{run_dir}/systemd/system")
    except OSError:
        return False


@functools.cache
def _private_mount_namespace() -> bool:  # a process's namespace does not change
    return private_mount_namespace()


def machine_namespace_argv(
    argv: Sequence[str], timeout: float | None, env: Mapping[str, str]
) -> list[str]:
    """`argv` started by the system manager as a transient service in the machine's mount
    namespace: systemd-run hands it our stdin/stdout/stderr (--pipe), waits, and exits
    with its exit status; `env` is set in it (a unit inherits none of ours); the unit is
    stopped after `timeout` seconds, as the caller stops waiting (killing systemd-run
    would leave it running), and collected whatever its end."""
    limit = [] if timeout is None else ["--property", f"RuntimeMaxSec={max(1, round(timeout))}"]
    setenv = [f"--setenv={k}={v}" for k, v in sorted(env.items())]
    return [
        "systemd-run",
        "--quiet",
        "--pipe",
        "--wait",
        "--collect",
        "--service-type=exec",
        f"--description=incusos-hal: {' '.join(argv[:2])}",
        *limit,
        *setenv,
        "--",
        *argv,
    ]


def run(
    argv: Sequence[str],
    *,
    timeout: float | None,
    error: Callable[[str], Exception],
    env: Mapping[str, str] | None = None,
    mounts: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """The finished process (its exit status is the caller's to judge); `error(message)`
    raised when the tool is missing or outlasts `timeout` seconds (None: a step that
    runs as long as the work takes, such as a waited-for scrub). `mounts`: the tool
    mounts or unmounts, so it runs in the machine's mount namespace (module docstring);
    of `env`, what differs from ours is set there. `input`: the tool's stdin (closed
    when None)."""
    if mounts and _private_mount_namespace():
        extra = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
        argv, env = machine_namespace_argv(argv, timeout, extra), None
    try:
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **({"input": input} if input is not None else {"stdin": subprocess.DEVNULL}),
            env=None if env is None else dict(env),
        )
    except FileNotFoundError:
        raise error(f"{argv[0]} is not installed") from None
    except OSError as e:  # not executable, too many open files, out of memory
        raise error(f"{argv[0]} could not be started: {e.strerror or e}") from None
    except subprocess.TimeoutExpired:
        raise error(f"{argv[0]} did not finish in {timeout or 0:.0f} s") from None
