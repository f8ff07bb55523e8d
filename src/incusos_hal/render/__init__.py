"""Pure rendering: configuration (+ the NIC list) -> trees of files. No I/O, no clock."""

from __future__ import annotations

from dataclasses import dataclass

from ..config.model import Config
from ..core.tree import Entry, File, Symlink, Tree
from ..hal.net import Nic
from .effective import effective_network
from .networkd import render_networkd
from .system import render_proxy, render_syslog, render_time
from .units import render_units

__all__ = [
    "Entry",
    "File",
    "Plan",
    "Symlink",
    "Tree",
    "render_files",
    "render_units",
]


@dataclass(frozen=True, slots=True)
class Plan:
    """What the configure step does: write `files`, rename links, report warnings."""

    files: Tree
    renames: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


def render_files(config: Config, nics: tuple[Nic, ...]) -> Plan:
    effective = effective_network(config.network, nics)
    files: Tree = {}
    files.update(render_networkd(effective.network))
    files.update(render_time(effective.network))
    files.update(render_proxy(effective.network))
    files.update(render_syslog(config.logging))
    return Plan(dict(sorted(files.items())), effective.renames, effective.warnings)
