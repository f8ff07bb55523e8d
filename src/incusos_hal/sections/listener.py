"""`/1.0/system/fallback-listener`: who may reach the API over HTTPS, and which other
users may use its unix socket (IncusOS's SystemFallbackListener, plus socket_uids)."""

from __future__ import annotations

import errno
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
    problems = [
        FieldError(f"listener.trusted_client_certificates[{i}]", why)
        for i, why in trust_problems(certificates)
    ]
    address = new.listener.listen_address
    if address and address != current.listener.listen_address:
        why = listen_problem(address, machine=root == "/")
        if why is not None:
            problems.append(FieldError("listener.listen_address", why))
    return problems


def listen_problem(address: str, *, machine: bool) -> str | None:
    """Why the service could not listen on `address` at its next start, or None.

    A host name is refused: it is resolved when the service starts, which may be before
    the network (or DNS) is up, and what it names can change after the PUT; an IP
    address is what IncusOS users write here. On this machine (`machine`; a re-rooted
    or scratch run reads another machine, so skips it) the address is test-bound: it
    must be one of this machine's (or every address, 0.0.0.0 / ::) and the port free.
    An address the running listener already has is not asked for: only a change is."""
    from ..config.formats import is_ip, split_host_port

    parsed = split_host_port(address)
    if parsed is None or parsed[1] is None:
        return None  # the document's validation says why
    host, port = parsed
    if host and not is_ip(host):
        return f"{host!r}: a host name is not taken here, give an IP address of this machine"
    if not machine:
        return None
    import socket  # only when a listen address is checked: not in the boot path

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{host} is not an IP address of this machine"
        return f"cannot listen on {address}: {e.strerror or e}"
    return None


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
