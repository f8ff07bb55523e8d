"""The table of IncusOS sections: every caller iterates it.

    SECTIONS                 the rows, in the order the API lists them
    by_name(name)            one row (/1.0/system/<name>)
    render_files(config, nics)   the configure step's files, renames and warnings
    render_units(config, ...)    the generator's .wants/ links and drop-ins
    owned()                  the files the configure step owns (stale ones removed)
    changes(written, removed) what systemd does after the configure step's files
    skip_options()           what `:restore?skip=` may keep from the running machine

A new section is one module defining a `Section` (see `base.py` and CONTRIBUTING.md) and
one entry below. Section modules import what is heavy (the TPM, netlink) inside their
functions: the generator and the configure step load this table on the boot path.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..render.units import configure_units
from . import kernel, listener, logging, network, provider, security, storage, update
from .base import Section, UnitInputs

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config.model import Config
    from ..core.files import Owned
    from ..core.tree import Tree
    from ..hal.net import Nic

SECTIONS: tuple[Section, ...] = (
    network.SECTION,
    logging.SECTION,
    update.SECTION,
    provider.SECTION,
    security.SECTION,
    listener.SECTION,
    kernel.SECTION,
    storage.SECTION,
)
_BY_NAME = {s.name: s for s in SECTIONS}


def by_name(name: str) -> Section | None:
    return _BY_NAME.get(name)


@dataclass(frozen=True, slots=True)
class Plan:
    """What the configure step does: write `files`, rename links, report warnings."""

    files: Tree
    renames: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


def render_files(config: Config, nics: tuple[Nic, ...]) -> Plan:
    """Every section's files; two sections never write the same path."""
    files: Tree = {}
    renames: list[tuple[str, str]] = []
    warnings: list[str] = []
    for section in SECTIONS:
        if section.files is None:
            continue
        rendered = section.files(config, nics)
        clash = files.keys() & rendered.files.keys()
        if clash:  # a bug in a section, not bad input
            raise AssertionError(f"{section.name} renders {sorted(clash)[0]} too")
        files.update(rendered.files)
        renames += rendered.renames
        warnings += rendered.warnings
    return Plan(dict(sorted(files.items())), tuple(renames), tuple(warnings))


def render_units(config: Config, *, source: str, unit_dir: str) -> Tree:
    """The generator's normal-directory tree for `config`.

    `source` is the config file it came from (shown as SourcePath= by systemctl status);
    `unit_dir` is where the system's unit files are installed.
    """
    tree = configure_units(unit_dir)
    inputs = UnitInputs(source, unit_dir)
    for section in SECTIONS:
        if section.units is not None:
            tree.update(section.units(config, inputs))
    return tree


def owned() -> tuple[Owned, ...]:
    return tuple(rule for section in SECTIONS for rule in section.owns)


@dataclass(frozen=True, slots=True)
class Changes:
    """In the order systemd is asked: networkd reloads, units stop, restart, start."""

    reload_networkd: bool
    restart: tuple[str, ...]
    start: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()


def changes(written: Iterable[str], removed: Iterable[str] = ()) -> Changes:
    """What to tell systemd after the configure step wrote or removed these files."""
    networkd = False
    todo: dict[str, list[str]] = {"restart": [], "start": [], "stop": []}
    for paths, event in ((written, "written"), (removed, "removed")):
        for path in paths:
            for section in SECTIONS:
                for reload in section.reloads:
                    if not reload.covers(path) or reload.on not in ("changed", event):
                        continue
                    if reload.how == "reload-networkd":
                        networkd = True
                    else:
                        todo[reload.how].append(reload.unit)
    return Changes(
        networkd,
        tuple(dict.fromkeys(todo["restart"])),
        tuple(dict.fromkeys(todo["start"])),
        tuple(dict.fromkeys(todo["stop"])),
    )


def skip_options() -> dict[str, Callable[[Config, Config], Config]]:
    return {name: keep for s in SECTIONS for name, keep in s.backup_skip.items()}
