"""Factory reset (`POST /1.0/system/:factory-reset`), IncusOS's `SystemReset` body
(lxc/incus-os incus-osd/api/system_reset.go): `allow_tpm_reset_failure`, `seeds`
(seed name -> its JSON), `wipe_existing_seeds`.

    parse_reset(body)                          the body, strictly (400 otherwise)
    factory_reset(state_dir, root, request)    seeds checked, written, state dir emptied

Order, as IncusOS's (internal/reset/reset.go): the seeds are validated (here as first
boot will check them, over the default document: after the reset the machine starts
afresh), then written where first boot reads them, and only then is anything erased. A
seed that does not validate refuses the reset with 400 and nothing is written or erased.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..config.seed import NAMES, seed_name
from ..hal import seed as media
from ..state.paths import SEED_PATH_ENV
from .seed import check, problem_lines, read_problem

FIELDS = ("allow_tpm_reset_failure", "seeds", "wipe_existing_seeds")


class ResetRefused(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class ResetRequest:
    allow_tpm_reset_failure: bool = False
    seeds: Mapping[str, Any] = field(default_factory=dict)
    wipe_existing_seeds: bool = False


def parse_reset(body: Any) -> ResetRequest:
    if body is None:
        return ResetRequest()
    if not isinstance(body, dict):
        raise ResetRefused("the request body must be a JSON object")
    for key in body:
        if key not in FIELDS:
            raise ResetRefused(f"{key}: unknown field (expected {', '.join(FIELDS)})")
    for key in ("allow_tpm_reset_failure", "wipe_existing_seeds"):
        if not isinstance(body.get(key, False), bool):
            raise ResetRefused(f"{key}: expected true or false")
    seeds = body.get("seeds") or {}
    if not isinstance(seeds, dict):
        raise ResetRefused("seeds: expected an object (seed name -> its JSON)")
    for name, value in seeds.items():
        if name not in NAMES:
            raise ResetRefused(f"seeds.{name}: not a seed (IncusOS reads {', '.join(NAMES)})")
        if name == "install":
            raise ResetRefused(
                "seeds.install: a factory reset returns this machine to first boot; "
                "it does not install"
            )
        if value is None:
            # IncusOS's words (reset.go).
            raise ResetRefused(f"seed data for '{name}' is not defined")
    return ResetRequest(
        bool(body.get("allow_tpm_reset_failure", False)),
        dict(seeds),
        bool(body.get("wipe_existing_seeds", False)),
    )


def seed_location(root: str) -> Path | None:
    """Where first boot reads the seed: $INCUSOS_HAL_SEED, else this machine's
    `seed-data` partition (never a user's SEED_DATA stick: IncusOS writes its own
    disk's seed partition)."""
    explicit = os.environ.get(SEED_PATH_ENV)
    if explicit:
        return Path(explicit)
    found = media.find(root)
    if found is not None and found.how == f"partition {media.SEED_PARTLABEL}":
        return found.path
    return None


def merged_seed(existing: Mapping[str, bytes], request: ResetRequest) -> dict[str, bytes]:
    files = {} if request.wipe_existing_seeds else dict(existing)
    for name, value in request.seeds.items():
        for filename in list(files):
            if seed_name(filename) == name:
                del files[filename]
        files[f"{name}.json"] = json.dumps(value, indent=2).encode() + b"\n"
    return files


def factory_reset(
    state_dir: Path,
    root: str,
    request: ResetRequest,
    log: Callable[[str, str], None] = lambda level, message: None,
) -> dict[str, bytes]:
    """Returns the seed the machine will find on its next boot."""
    where = seed_location(root)
    existing: dict[str, bytes] = {}
    if where is not None and os.path.lexists(where) and not request.wipe_existing_seeds:
        try:
            existing = media.read(where)
        except media.SeedReadError as e:
            raise ResetRefused(
                f"the existing seed cannot be read: {read_problem(e)}", 500
            ) from None
    files = merged_seed(existing, request)
    checked = check(files, Config(), root)
    if checked.problems:
        raise ResetRefused("; ".join(problem_lines(checked)))
    if where is None:
        if files:
            raise ResetRefused(f"no {media.SEED_PARTLABEL} partition to write the seed to", 500)
    elif files or os.path.lexists(where):
        _write_seed(where, files)
    for entry in sorted(os.listdir(state_dir)):
        path = state_dir / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    log(
        "warning",
        f"factory reset: state cleared; the next boot applies the seed "
        f"({', '.join(sorted(files)) or 'empty'})",
    )
    return files


def _write_seed(where: Path, files: Mapping[str, bytes]) -> None:
    if where.is_dir() and not where.is_symlink():
        from ..core.files import atomic_write

        for entry in os.listdir(where):
            if seed_name(entry) is not None:
                (where / entry).unlink()
        for filename, data in files.items():
            atomic_write(where / filename, data, 0o600)
        return
    try:
        media.write_tar(where, files)
    except (OSError, media.SeedReadError) as e:
        raise ResetRefused(f"the seed cannot be written: {e}", 500) from None
