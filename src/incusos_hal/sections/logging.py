"""`/1.0/system/logging`: remote syslog through systemd-netlogd (IncusOS's SystemLogging)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..core.files import Owned
from ..render.system import NETLOGD_DROPIN, render_syslog
from ..render.units import syslog_units
from .base import Reload, Rendered, Section, UnitInputs

if TYPE_CHECKING:
    from ..config.model import Config
    from ..core.tree import Tree
    from ..hal.net import Nic


def files(config: Config, nics: tuple[Nic, ...]) -> Rendered:
    return Rendered(render_syslog(config.logging))


def units(config: Config, inputs: UnitInputs) -> Tree:
    return syslog_units(config, source=inputs.source, unit_dir=inputs.unit_dir)


SECTION = Section(
    name="logging",
    attribute="logging",
    summary="remote syslog: configuration and state",
    files=files,
    owns=(
        Owned(
            os.path.dirname(NETLOGD_DROPIN),
            lambda name: name == os.path.basename(NETLOGD_DROPIN),
        ),
    ),
    reloads=(Reload(NETLOGD_DROPIN, "systemd-netlogd.service"),),
    units=units,
)
