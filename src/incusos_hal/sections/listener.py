"""`/1.0/system/fallback-listener`: who may reach the API over HTTPS, and which other
users may use its unix socket (IncusOS's SystemFallbackListener, plus socket_uids)."""

from __future__ import annotations

from typing import Any

from .base import Context, Section


def read_state(ctx: Context) -> Any:
    return {"active": ctx.listener_active()}


SECTION = Section(
    name="fallback-listener",
    attribute="listener",
    summary="the HTTPS listener and the socket's users",
    read_state=read_state,
)
