"""ZFS at the edge: what `zpool`/`zfs` say (OpenZFS 2.3's JSON output), parsed by pure
functions into typed values, and the commands that change pools built as argv by pure
functions and run by small ones.

    parse_status(text)          `zpool status -jp --json-int` -> {name: PoolStatus}
    parse_datasets(text)        `zfs list -j --json-int` / `zfs get -j` -> {name: {prop: value}}
    layout(pool)                a PoolStatus as IncusOS shows it (type, by-id devices, sizes)
    create_argv(...), ...       what IncusOS runs, as argv
    availability()              "ZFS unavailable" is a state (no tools, no module), never a crash

libzfs_core (Debian's python3-pyzfs) is imported lazily, where it is installed: it answers
"does this pool or dataset exist" without a process;
everything else goes to the CLI (docs/dependencies.md says which and why).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import tools
from .zfsparse import (
    BY_ID,
    BY_PARTLABEL,
    LOCAL_PARTLABEL,
    LOCAL_POOL,
    POOL_TYPES,
    Layout,
    PoolStatus,
    PoolType,
    PropValue,
    Scan,
    Vdev,
    ZfsError,
    create_argv,
    dataset_create_argv,
    dataset_destroy_argv,
    layout,
    load_key_argv,
    parse_datasets,
    parse_status,
    scrub_progress,
    scrub_state,
    set_argv,
    touches_mounts,
    zpool_argv,
)

__all__ = [
    "BY_ID",
    "BY_PARTLABEL",
    "LOCAL_PARTLABEL",
    "LOCAL_POOL",
    "POOL_TYPES",
    "Layout",
    "PoolStatus",
    "PoolType",
    "PropValue",
    "Scan",
    "Vdev",
    "ZfsError",
    "create_argv",
    "dataset_create_argv",
    "dataset_destroy_argv",
    "layout",
    "load_key_argv",
    "parse_datasets",
    "parse_status",
    "scrub_progress",
    "scrub_state",
    "set_argv",
    "touches_mounts",
    "zpool_argv",
]
TIMEOUT_S = 600


# -- the edge ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Availability:
    ok: bool
    reason: str = ""


def availability(root: str = "/") -> Availability:
    """Whether ZFS can be used here: both tools, and the kernel module loaded (or
    loadable: /dev/zfs exists once it is). Never raises."""
    for tool in ("zpool", "zfs"):
        if shutil.which(tool) is None:
            return Availability(False, f"ZFS unavailable: the {tool} command is not installed")
    if not (Path(root) / "dev/zfs").exists():
        return Availability(False, "ZFS unavailable: the zfs kernel module is not loaded")
    return Availability(True)


def run(argv: Sequence[str], *, timeout: float | None = TIMEOUT_S) -> str:
    """Run one command; its stderr becomes the error's message, as IncusOS reports it
    ("Failed to run: zfs load-key mypool: exit status 255 (...)"). One that may mount or
    unmount runs in the machine's mount namespace (`touches_mounts`)."""
    command = " ".join(argv)
    done = tools.run(
        argv,
        timeout=timeout,
        error=lambda why: ZfsError(f"Failed to run: {command}: {why}"),
        env={**os.environ, "LC_ALL": "C"},
        mounts=touches_mounts(argv),
    )
    if done.returncode != 0:
        raise ZfsError(
            f"Failed to run: {command}: exit status {done.returncode} ({done.stderr.strip()})"
        )
    return done.stdout


def status(pool: str | None = None) -> dict[str, PoolStatus]:
    argv = ["zpool", "status", "-jp", "--json-int"]
    return parse_status(run([*argv, pool] if pool else argv))


def pool_properties(pool: str, props: Sequence[str]) -> dict[str, PropValue]:
    text = run(["zfs", "get", "-j", "--json-int", ",".join(props), pool])
    return parse_datasets(text).get(pool, {})


def volumes(pool: str) -> dict[str, dict[str, PropValue]]:
    """The pool's first-level datasets with IncusOS's columns."""
    text = run(
        ["zfs", "list", "-j", "--json-int", "-r", "-d1", "-o", "name,quota,used,incusos:use", pool]
    )
    return {k: v for k, v in parse_datasets(text).items() if k != pool}


def _lzc() -> Any:
    """libzfs_core (python3-pyzfs), or None where it is not installed."""
    try:
        import libzfs_core  # type: ignore[import-not-found]
    except ImportError:
        return None
    return libzfs_core


def pool_exists(pool: str) -> bool:
    lzc = _lzc()
    if lzc is not None:
        return bool(lzc.lzc_exists(pool.encode()))
    try:
        run(["zpool", "list", "-H", "-o", "name", pool])
    except ZfsError:
        return False
    return True


def dataset_exists(dataset: str) -> bool:
    lzc = _lzc()
    if lzc is not None:
        return bool(lzc.lzc_exists(dataset.encode()))
    try:
        run(["zfs", "list", "-H", "-o", "name", dataset])
    except ZfsError:
        return False
    return True


def load_key(dataset: str) -> None:
    """The dataset's key from its keylocation (IncusOS's key file)."""
    run(load_key_argv(dataset))
