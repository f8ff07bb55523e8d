"""The hand-off from the update checker to the installers (the A/B writer for the OS,
the system-extension manager for applications): the interface they plug into.

The checker calls these only once every file of an update is downloaded, its size and
SHA-256 equal to the signed index's, and `.gz` files expanded (bounded):

    applications() -> {name: installed version ("" = wanted but not installed yet)}
        which applications the checker should look for, in the index, as `<name>.raw.gz`
        (or `<name>.raw`) files of type "application".
    os_ready(version, path) -> bool
        "an OS update of version V is downloaded and verified at PATH": PATH is a
        directory holding one file per OS file of the index (types update-efi,
        update-usr, update-usr-verity, update-usr-verity-signature), named as the index
        names them minus `.gz`. Return True once it is written to the inactive slot and a
        reboot would run it (the API's `needs_reboot` then says so); raise to refuse it
        (the message becomes the update status).
    application_ready(name, version, path, sha256) -> None
        "an application A version V is downloaded and verified at PATH": PATH is the
        sysext image `<name>.raw`, SHA256 the hash it was verified with (an installer
        installs that file only if it still has it: nothing swapped after the check).
        Raise to refuse it.

PATH stays the installer's to move or delete; the checker never touches it again. Until
an installer registers (`use`), the default only records what was handed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class Handoff(Protocol):
    def applications(self) -> Mapping[str, str]: ...
    def os_ready(self, version: str, path: Path) -> bool: ...
    def application_ready(self, name: str, version: str, path: Path, sha256: str) -> None: ...


class RecordOnly:
    """No installer yet: nothing is installed, what was verified is left in place (the
    update state lists it)."""

    def applications(self) -> Mapping[str, str]:
        return {}

    def os_ready(self, version: str, path: Path) -> bool:
        return False

    def application_ready(self, name: str, version: str, path: Path, sha256: str) -> None:
        return None


_current: Handoff = RecordOnly()


def use(handoff: Handoff) -> None:
    """The installers plug in here (once, when the service starts)."""
    global _current
    _current = handoff


def current() -> Handoff:
    return _current
