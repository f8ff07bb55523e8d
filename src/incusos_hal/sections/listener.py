"""`/1.0/system/fallback-listener`: who may reach the API over HTTPS, and which other
users may use its unix socket (IncusOS's SystemFallbackListener, plus socket_uids)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..config.errors import FieldError
from .base import Context, Section

if TYPE_CHECKING:
    from ..config.model import Config


def read_state(ctx: Context) -> Any:
    return {"active": ctx.listener_active()}


def check(new: Config, current: Config, root: str) -> list[FieldError]:
    """What a PUT stores must be what the listener can load, whether or not HTTPS is
    served now: the next start, or the next listen_address, uses it."""
    from ..core.tls import trust_problems

    certificates = new.listener.trusted_client_certificates
    return [
        FieldError(f"listener.trusted_client_certificates[{i}]", why)
        for i, why in trust_problems(certificates)
    ]


SECTION = Section(
    name="fallback-listener",
    attribute="listener",
    summary="the HTTPS listener and the socket's users: configuration and state",
    # IncusOS lists eight entries under /1.0/system; its fallback listener is not one,
    # although its route exists.
    listed=False,
    read_state=read_state,
    check=check,
)
