"""The `state` halves of the API objects, read from the machine (through `root`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config.model import Config


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class NetworkStateCache:
    """The network section's state, re-read only after the kernel reported a link or
    address change, the stored document changed, or MAX_AGE_SECONDS passed.

    A thread listens to rtnetlink's link and address groups and counts messages; a state
    read while the count was N for a given document stays valid until either moves.
    Reading the state costs two networkctl runs and a sysfs walk; a GET of
    /1.0/system/network between changes costs a comparison. Counters and LLDP neighbours
    change without a netlink message, hence the age bound: they are at most that old.
    Without netlink (or re-rooted reads), every call reads afresh."""

    MAX_AGE_SECONDS = 2.0

    def __init__(self, root: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.generation = 0
        self._clock = clock
        self._cached: tuple[int, Config, float, dict[str, Any]] | None = None
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

    def fresh(self, config: Config) -> dict[str, Any] | None:
        """The cached state if nothing changed since it was read, else None."""
        cached = self._cached
        if (
            self.watching
            and cached is not None
            and cached[0] == self.generation
            and cached[1] is config
            and self._clock() - cached[2] < self.MAX_AGE_SECONDS
        ):
            return cached[3]
        return None

    def read(self, config: Config) -> dict[str, Any]:
        from ..sections import network_state

        generation, now = self.generation, self._clock()
        state = network_state.read(self.root, config.network)
        self._cached = (generation, config, now, state)
        return state


def security_state(root: str, tcti: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    from ..hal import tpm
    from ..security.state import Flags
    from ..security.state import security_state as read

    wanted = Flags(recovery_keys_retrieved=bool(flags.get("encryption_recovery_keys_retrieved")))
    with tpm.open_tpm_if_any(tcti) as handle:
        return read(root, handle, wanted)
