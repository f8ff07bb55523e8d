"""Logging for code that runs before journald: generators and the early configure step.

systemd.generator(7): generators log to /dev/kmsg. Where that is not writable (an
unprivileged run) messages go to stderr instead. $INCUSOS_HAL_KMSG names another file to
append the same records to (tests read it back).
"""

from __future__ import annotations

import os
import sys

ERR, WARNING, INFO = 3, 4, 6
# syslog facility "daemon" (3), shifted as /dev/kmsg's <PRI> expects.
_FACILITY = 3 << 3


def kmsg(ident: str, level: int, message: str) -> None:
    kmsg_path = os.environ.get("INCUSOS_HAL_KMSG") or "/dev/kmsg"
    for line in message.splitlines() or [""]:
        record = f"<{_FACILITY | level}>{ident}[{os.getpid()}]: {line}\n".encode(errors="replace")
        try:
            fd = os.open(kmsg_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            sys.stderr.write(f"{ident}: {line}\n")
            continue
        try:
            # The kernel takes one record per write and caps its length; the tail of an
            # overlong line is lost, not the next record.
            os.write(fd, record[:1000])
        except OSError:
            sys.stderr.write(f"{ident}: {line}\n")
        finally:
            os.close(fd)
