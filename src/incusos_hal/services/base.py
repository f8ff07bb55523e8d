"""One IncusOS system service (`/1.0/services/<name>`): a row of the table in
`services/__init__.py`, as a section is a row of `sections/__init__.py`.

A service differs from a section in how it takes effect: a section's files are written by
the configure step and systemd picks them up; a service talks to its tools at once
(`nvme connect`, `iscsiadm --login`, `multipath -r`), as IncusOS's Start/Stop do. So a
row carries `apply(machine, old, new)`, run when a PUT changes the service's document
and for each enabled service when the API service starts (IncusOS starts them at boot).

The files a service writes are named in `files`: the API saves them before `apply` and
puts every one back if it fails, then re-applies the previous document.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core import tools
from ..core.errors import Refusal
from ..core.files import atomic_write

if TYPE_CHECKING:
    from ..config.errors import FieldError
    from ..config.model import Services

# How long one tool may run: `nvme connect-all` and `iscsiadm --login` wait for the
# network; IncusOS bounds its connection attempts at 30 s.
TOOL_TIMEOUT_S = 30.0


class ServiceError(Refusal):
    """A service could not do what its document asks: the API answers `status`."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(status, message)


@dataclass(frozen=True, slots=True)
class Machine:
    """Where a service reads the machine (`root`: /sys, /dev), writes its files (`target`),
    and whether it acts on the running system (`live`). Off it (a scratch target, the
    tests), a command that would change the system is logged instead of run; commands
    that only compute something (`nvme gen-hostnqn`) run either way."""

    root: str = "/"
    target: str = "/"
    live: bool = True
    log: Callable[[str, str], None] = lambda level, message: None

    def path(self, relative: str) -> Path:
        return Path(self.target, relative)

    def sys(self, relative: str) -> Path:
        return Path(self.root, relative)

    def run(self, argv: Sequence[str], *, check: bool = True) -> str:
        """Run a tool that changes the running system; its output (stdout)."""
        if not self.live:
            self.log("info", f"not the running system: skipped {' '.join(argv)}")
            return ""
        return compute(argv, check=check)


def compute(argv: Sequence[str], *, check: bool = True) -> str:
    """Run a tool; a failure (when `check`) is a ServiceError with its own words."""
    done = tools.run(argv, timeout=TOOL_TIMEOUT_S, error=ServiceError)
    if check and done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise ServiceError(f"{' '.join(argv[:2])} failed: {said[-1] if said else done.returncode}")
    return done.stdout


def load_modules(machine: Machine, modules: Sequence[str]) -> None:
    """Kernel modules a service's tools need (nvme-tcp, iscsi_tcp). The API service may
    not load modules itself (its unit has ProtectKernelModules=): systemd's
    modprobe@.service loads each one, outside that sandbox."""
    for module in modules:
        if machine.sys(f"sys/module/{module.replace('-', '_')}").exists():
            continue  # built into the kernel, or loaded already
        machine.run(["systemctl", "start", f"modprobe@{module}.service"])


def write_private(machine: Machine, relative: str, data: bytes) -> None:
    """A service's file, root's only (IncusOS writes them 0600 in 0700 directories)."""
    path = machine.path(relative)
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    atomic_write(path, data, 0o600)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _no_checks(config: Any, root: str) -> list[FieldError]:
    return []


def _on_path(tools: tuple[str, ...]) -> bool:
    return all(shutil.which(tool) is not None for tool in tools)


@dataclass(frozen=True, slots=True)
class SystemService:
    # /1.0/services/<name>, also the field of config.Services holding its document.
    name: str
    summary: str
    # The tools it drives: without them it is not supported here, and not listed.
    tools: tuple[str, ...]
    # The `state` half (in a worker thread), from the machine and the service's document.
    read_state: Callable[[Machine, Any], dict[str, Any]]
    # Stop what `old` started, start what `new` asks for (in a worker thread).
    apply: Callable[[Machine, Any, Any], None]
    # Files under the target it writes (relative): put back when `apply` fails.
    files: tuple[str, ...] = ()
    # What this machine cannot honour (a WWN with no disk); paths `services.<name>...`.
    check: Callable[[Any, str], list[FieldError]] = _no_checks
    # POST /1.0/services/<name>/:reset, where IncusOS has one.
    reset: Callable[[Machine, Any], None] | None = None
    supported_here: Callable[[tuple[str, ...]], bool] = field(default=_on_path)

    @property
    def path(self) -> str:
        return f"/1.0/services/{self.name}"

    def config_of(self, services: Services) -> Any:
        return getattr(services, self.name)

    def supported(self) -> bool:
        return self.supported_here(self.tools)


def saved_files(machine: Machine, relatives: Sequence[str]) -> dict[str, bytes | None]:
    """The files as they are now (None: absent), for `restore_files`."""
    out: dict[str, bytes | None] = {}
    for relative in relatives:
        try:
            out[relative] = machine.path(relative).read_bytes()
        except FileNotFoundError:
            out[relative] = None
    return out


def restore_files(machine: Machine, saved: dict[str, bytes | None]) -> None:
    for relative, data in saved.items():
        path = machine.path(relative)
        if data is None:
            if path.is_file():
                os.unlink(path)
        else:
            atomic_write(path, data, 0o600)
