"""`/1.0/system/update`: the update channel, check frequency and maintenance windows
(IncusOS's SystemUpdate). The checker itself is not built yet: the state says so."""

from __future__ import annotations

from typing import Any

from .base import Context, Section


def read_state(ctx: Context) -> Any:
    return {
        # IncusOS's zero time.Time: never checked.
        "last_check": "0001-01-01T00:00:00Z",
        "status": "update checks are not built in this version",
        "needs_reboot": False,
    }


SECTION = Section(
    name="update",
    attribute="update",
    summary="the update channel, frequency and windows: configuration and state",
    read_state=read_state,
)
