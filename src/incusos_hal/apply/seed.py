"""The install seed on a first boot: checked as a PUT of each section is, applied once.

    check(files, base, root)      every file decoded and validated (config.seed), then the
                                  checks a PUT of each seeded section makes against the
                                  machine (the section table's `check`)
    read_seed(path, root)         (where, files): the seed at `path`, or the one `find`s
    first_boot(state_dir, root)   apply the seed once: store the document exactly as the
                                  API's PUTs would, mark it applied; or store nothing and
                                  report every problem (kmsg, seed.status.json)

A seed with an `install` file is the installer's (apply/install.py): first boot on the
install media copies the image to the target disk and applies no section there; the
installed system's first boot applies the rest.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import Config
from ..config.seed import SECTION_FILES, Checked, Problem, check_files
from ..core.files import atomic_write
from ..hal import disk as disks
from ..hal import seed as media
from ..sections import by_name
from ..state import store
from ..state.paths import (
    LAST_GOOD_FILE,
    SEED_APPLIED,
    SEED_PATH_ENV,
    SEED_STATUS,
    WANTED_APPLICATIONS,
)

Log = Callable[[str, str], None]


def check(files: Mapping[str, bytes], base: Config, root: str | None) -> Checked:
    """`check_files`, then each seeded section's machine checks (`root` None: none, for
    a seed prepared on another machine). A check's error about a field the seed does not
    set is the machine's, not the seed's: left out."""
    checked = check_files(files, base)
    if checked.config is None or root is None:
        return checked
    problems: list[Problem] = []
    for name, filename in checked.files.items():
        attribute = SECTION_FILES.get(name)
        row = by_name(attribute) if attribute else None
        if row is None or attribute is None:
            continue
        given = set(checked.raw.get(name, {}))
        for err in row.check(checked.config, base, root):
            rest = err.path[len(attribute) :].lstrip(".")
            if re.split(r"[.\[]", rest, maxsplit=1)[0] in given:
                problems.append(Problem(filename, rest, err.message))
    if not problems:
        return checked
    return replace(checked, config=None, install=None, problems=tuple(problems))


def read_seed(path: str | Path | None, root: str) -> tuple[str, dict[str, bytes]] | None:
    """(where it was, its files): `path` (or $INCUSOS_HAL_SEED) when given, else the
    seed `hal.seed.find` finds under `root`; None when there is none.
    Raises hal.seed.SeedReadError."""
    path = path or os.environ.get(SEED_PATH_ENV) or None
    if path is not None:
        if not os.path.lexists(path):
            return None
        return str(path), media.read(path)
    # The disk under the running /usr is the boot disk (None off an appliance: a test
    # root, or a machine whose /usr is not its own mount).
    found = media.find(root, disk=disks.holder_disk(root, "/usr"))
    if found is None:
        return None
    return f"{found.how} ({found.path.name})", media.read(found.path)


def problem_lines(checked: Checked) -> list[str]:
    return [str(p) for p in checked.problems]


def read_problem(e: media.SeedReadError) -> Problem:
    return Problem(e.member or "seed", "", e.message)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What first boot did with the seed: "none" (no seed), "done" (already handled on
    an earlier boot), "applied", "invalid", "install" (the installer's seed)."""

    what: str
    where: str = ""
    checked: Checked | None = None
    problems: tuple[str, ...] = ()
    files: Mapping[str, bytes] = field(default_factory=dict)


def first_boot(
    state_dir: Path,
    root: str,
    *,
    source: str | Path | None = None,
    log: Log = lambda level, message: None,
) -> Outcome:
    """Apply the seed once. Valid: every seeded section stored as its PUT stores it
    (`Section.stored`), in one atomic save, then `seed.applied`. Invalid: nothing stored
    or marked, every problem logged and in `seed.status.json` (the next boot tries
    again: the user may fix the seed). No seed at all: marked, so that a stick plugged in
    later is never taken for one. A document the configure step applied before the seed
    step ever ran (a last good one, no seed.status.json): marked, nothing applied."""
    applied = state_dir / SEED_APPLIED
    if applied.exists():
        return Outcome("done")
    if (state_dir / LAST_GOOD_FILE).exists() and not (state_dir / SEED_STATUS).exists():
        # A machine configured and booted before it had a seed step (an upgrade: a
        # document the configure step applied): what the operator stored wins over
        # whatever seed its disk still carries. A document alone is no such sign: the
        # credential step stores one on a first boot, before this step, as the base the
        # seed applies over (the booted image, after a factory reset, lost its seed so).
        log("info", "seed: not applied; this machine was configured before it had a seed step")
        write_status(state_dir, {"applied": False, "source": "", "files": [], "problems": []})
        _mark(applied, {"source": "", "files": []})
        return Outcome("done")
    try:
        found = read_seed(source, root)
    except media.SeedReadError as e:
        return _invalid(state_dir, "", (str(read_problem(e)),), log)
    if found is None or not found[1]:  # none, or a blank seed-data partition
        write_status(state_dir, {"applied": False, "source": "", "files": [], "problems": []})
        _mark(applied, {"source": "", "files": []})
        return Outcome("none")
    where, files = found
    base = store.load(state_dir).config
    checked = check(files, base, root)
    if checked.problems:
        return _invalid(state_dir, where, tuple(problem_lines(checked)), log, checked)
    for note in checked.notes:
        log("warning", f"seed: {note}")
    if checked.install is not None:
        return Outcome("install", where, checked, files=files)
    if checked.config is not None:
        config = checked.config
        for attribute in checked.sections:
            row = by_name(attribute)
            if row is not None:
                config = replace(config, **{attribute: getattr(row.stored(config), attribute)})
        store.save(state_dir, config)
    wanted = seeded_applications(checked)
    if wanted:
        # Installed by the update checker (its first check, at boot), as IncusOS
        # installs a seed's applications from its update provider.
        atomic_write(state_dir / WANTED_APPLICATIONS, json.dumps(wanted).encode() + b"\n", 0o600)
    names = sorted(checked.files.values())
    write_status(
        state_dir,
        {
            "applied": True,
            "source": where,
            "files": names,
            "problems": [],
            "notes": list(checked.notes),
        },
    )
    _mark(applied, {"source": where, "files": names})
    log("info", f"seed from {where} applied: {', '.join(names) or 'no files'}")
    return Outcome("applied", where, checked)


def seeded_applications(checked: Checked) -> list[str]:
    """The application names a checked seed's `applications` file lists, in order."""
    doc = checked.raw.get("applications")
    apps = doc.get("applications", ()) if isinstance(doc, Mapping) else ()
    return [str(a["name"]) for a in apps if isinstance(a, Mapping) and a.get("name")]


def _invalid(
    state_dir: Path, where: str, problems: tuple[str, ...], log: Log, checked: Checked | None = None
) -> Outcome:
    for line in problems:
        log("error", f"seed{f' from {where}' if where else ''}: {line}")
    write_status(
        state_dir, {"applied": False, "source": where, "files": [], "problems": list(problems)}
    )
    return Outcome("invalid", where, checked, problems)


def status(state_dir: Path) -> dict[str, Any]:
    """seed.status.json as written by the last first boot ({} when there is none)."""
    try:
        data = json.loads((state_dir / SEED_STATUS).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_status(state_dir: Path, data: dict[str, Any]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write(state_dir / SEED_STATUS, text, 0o600)


def _mark(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data, sort_keys=True).encode() + b"\n", 0o600)
