"""What every command shares: where the machine is read from, and the exit codes."""

from __future__ import annotations

import os

ROOT_ENV = "INCUSOS_HAL_ROOT"
DEFAULT_UNIT_DIR = "/usr/lib/systemd/system"
GENERATOR_DIR = "run/systemd/generator"
EXIT_INVALID = 2


def root_of(arg: str | None) -> str:
    """The root every read of /sys, /proc, /dev and /run/udev goes through."""
    return arg or os.environ.get(ROOT_ENV) or "/"
