"""The `state` halves of the API objects, read from the machine (through `root`)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def network_state(root: str) -> dict[str, Any]:
    """IncusOS's SystemNetworkState, from sysfs (and netlink when reading this machine)."""
    from ..hal import net, netlink

    addresses: dict[str, list[str]] = {}
    if root == "/":
        with contextlib.suppress(OSError, ImportError):
            addresses = netlink.addresses()
    return net.links_state(root, addresses)


class NetworkStateCache:
    """network_state, re-read only after the kernel reported a link or address change.

    A thread listens to rtnetlink's link and address groups and counts messages; a state
    read while the count was N stays valid until it moves. Reading the state costs a
    netlink dump and a sysfs walk; a GET of /1.0/system/network between changes costs a
    comparison. Without netlink (or re-rooted reads), every call reads afresh."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.generation = 0
        self._cached: tuple[int, dict[str, Any]] | None = None
        self.watching = False
        if root == "/":
            self._start()

    def _start(self) -> None:
        import threading

        def listen() -> None:
            # Made in the thread: pyroute2's synchronous socket runs an event loop of its
            # own, which cannot start inside the service's running one.
            try:
                from pyroute2 import IPRoute
                from pyroute2.netlink.rtnl import (
                    RTMGRP_IPV4_IFADDR,
                    RTMGRP_IPV6_IFADDR,
                    RTMGRP_LINK,
                )

                ipr = IPRoute()
                ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            except (OSError, ImportError):
                return
            self.watching = True
            try:
                while True:
                    ipr.get()
                    self.generation += 1
            except Exception:  # the socket closed: stop caching rather than serve stale
                self.watching = False

        threading.Thread(target=listen, name="rtnl-watch", daemon=True).start()

    def fresh(self) -> dict[str, Any] | None:
        """The cached state if nothing changed since it was read, else None."""
        if self.watching and self._cached is not None and self._cached[0] == self.generation:
            return self._cached[1]
        return None

    def read(self) -> dict[str, Any]:
        generation = self.generation
        state = network_state(self.root)
        self._cached = (generation, state)
        return state


def security_state(root: str, tcti: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    from ..hal import tpm
    from ..security.state import Flags
    from ..security.state import security_state as read

    wanted = Flags(recovery_keys_retrieved=bool(flags.get("encryption_recovery_keys_retrieved")))
    with tpm.open_tpm_if_any(tcti) as handle:
        return read(root, handle, wanted)
