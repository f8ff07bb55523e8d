"""The table of IncusOS system services (`/1.0/services/<name>`): every caller iterates it.

    SERVICES          the rows built here, in the order IncusOS lists them (by name)
    by_name(name)     one row
    supported()       the rows this machine can run (their tools installed): the ones
                      GET /1.0/services lists and /1.0/services/<name> serves

A new service is one module defining a `SystemService` (see `base.py`), its document in
config.model.Services, and one entry below. IncusOS's other services (ceph, linstor, lvm,
netbird, ovn, tailscale, usbip) are not built: docs/incusos-differences.md says why.
"""

from __future__ import annotations

from . import iscsi, multipath, nvme
from .base import Machine, ServiceError, SystemService

__all__ = ["SERVICES", "Machine", "ServiceError", "SystemService", "by_name", "supported"]

SERVICES: tuple[SystemService, ...] = (iscsi.SERVICE, multipath.SERVICE, nvme.SERVICE)
_BY_NAME = {s.name: s for s in SERVICES}


def by_name(name: str) -> SystemService | None:
    return _BY_NAME.get(name)


def supported() -> tuple[SystemService, ...]:
    return tuple(s for s in SERVICES if s.supported())
