"""Storage as a library: drives, pools and datasets without the service running, for a
migration tool or a script (`import incusos_hal.storage_info`). The same functions the
API's `/1.0/system/storage` uses, so the shapes are IncusOS's (SystemStorageDrive,
SystemStoragePool).

    list_drives(root="/", state_dir=None)  every disk with a /dev/disk/by-id name
    list_pools(state_dir=None)             every imported pool (Listing)
    list_datasets(pool)                    a pool's datasets with their usage (Listing)

ZFS unavailable (no tools, no kernel module) is an answer, not an exception: a Listing
with no items and `unavailable` saying why. Nothing here changes the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Listing", "list_datasets", "list_drives", "list_pools"]

DATASET_PROPERTIES = ("used", "available", "quota", "mountpoint", "encryption", "incusos:use")


@dataclass(frozen=True, slots=True)
class Listing:
    """What ZFS answered: the items, or none and why (`unavailable`, "" when it answered)."""

    items: list[dict[str, Any]] = field(default_factory=list)
    unavailable: str = ""


def _state_dir(state_dir: str | Path | None) -> Path:
    from .state import store

    return store.state_dir(str(state_dir) if state_dir is not None else None)


def list_drives(root: str = "/", state_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The drives as IncusOS lists them, sorted by id; `root` may be a recorded tree
    (tests/fixtures) or a mounted disk image. SMART is read on the running machine only."""
    from .sections.storage import read_drives, read_pools

    state = _state_dir(state_dir)
    pools = read_pools(state)[0] if root == "/" else {}
    return read_drives(root, state, pools)


def list_pools(state_dir: str | Path | None = None) -> Listing:
    """Every imported pool as IncusOS shows it (devices by id, state, usage, volumes,
    last scrub; `managed` when the state dir holds its key)."""
    from .sections.storage import pool_api, read_pools

    state = _state_dir(state_dir)
    pools, why = read_pools(state)
    if why:
        return Listing([], why)
    return Listing([pool_api(p, state) for p in pools.values()])


def list_datasets(pool: str) -> Listing:
    """Every dataset of `pool` (the pool's own included) with DATASET_PROPERTIES, as
    `zfs list` gives them (numbers as integers)."""
    from .config.validate import check_pool_name
    from .hal import zfs

    if check_pool_name(pool) is not None:
        raise ValueError(f"pool: {pool!r} is not a pool name")
    ok = zfs.availability()
    if not ok.ok:
        return Listing([], ok.reason)
    try:
        text = zfs.run(
            ["zfs", "list", "-j", "--json-int", "-r", "-o", ",".join(("name", *DATASET_PROPERTIES)),
             pool]
        )  # fmt: skip
    except zfs.ZfsError as e:
        return Listing([], str(e))
    return Listing(
        [{"name": name, **props} for name, props in sorted(zfs.parse_datasets(text).items())]
    )
