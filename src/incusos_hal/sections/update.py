"""`/1.0/system/update`: the update channel, check frequency and maintenance windows
(IncusOS's SystemUpdate); the checker itself is update/checker.py, run by
`POST /1.0/system/update/:check` (api/server.py) and by the timer wired here.

The timer (`incusos-hal-update-check.timer`, installed) fires at boot; the generator's
drop-in adds `OnUnitActiveSec=` from `check_frequency` and one `OnCalendar=` per
maintenance window's start, so a window is not missed by a long frequency. With
`check_frequency` "never" the timer is not wanted: no scheduled and no boot check.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core.tree import File
from ..render.ini import ini
from ..render.units import HEADER, want
from ..update import windows
from .base import Context, Section, UnitInputs

if TYPE_CHECKING:
    from ..config.model import Config
    from ..core.tree import Tree

TIMER = "incusos-hal-update-check.timer"


def read_state(ctx: Context) -> Any:
    # (the generator loads this module: network code waits for what it imports)
    from ..hal import sysupdate
    from ..update import checker

    state = checker.read_state(ctx.settings.state_dir, ctx.settings.root).api()
    # Which A/B slot runs (beyond IncusOS's fields): the /usr version and root hash the
    # kernel verifies, and the UKI systemd-boot chose with its boot counter (-1: blessed).
    running = sysupdate.booted(ctx.settings.root)
    state["booted"] = {
        "version": running.version,
        "usr_hash": running.usr_hash,
        "entry": running.entry,
        "tries_left": running.tries_left,
        "tries_done": running.tries_done,
    }
    return state


def units(config: Config, inputs: UnitInputs) -> Tree:
    update = config.update
    if update.check_frequency == "never":
        return {}
    tree: Tree = {}
    want(tree, inputs.unit_dir, "timers.target", TIMER)
    seconds = update.check_frequency.seconds
    timer: list[tuple[str, str]] = []
    if seconds is not None:
        timer.append(("OnUnitActiveSec", f"{int(seconds)}s"))
    timer += [("OnCalendar", windows.calendar(w)) for w in update.maintenance_windows]
    sections = [("Unit", [("SourcePath", inputs.source)]), ("Timer", timer)]
    tree[f"{TIMER}.d/50-incusos-hal.conf"] = File(ini(sections, header=HEADER, specifiers=True))
    return tree


SECTION = Section(
    name="update",
    attribute="update",
    summary="the update channel, frequency and windows: configuration and state",
    read_state=read_state,
    units=units,
)
