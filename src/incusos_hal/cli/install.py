"""The installer's run: first boot on the install media found an `install` seed."""

from __future__ import annotations

import argparse
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .common import EXIT_INVALID, root_of

if TYPE_CHECKING:
    from ..apply.seed import Outcome


def machine_security(root: str) -> tuple[bool, bool]:
    """(a TPM is there, Secure Boot is on), read under root."""
    from ..hal import secureboot

    tpm = any(Path(root, "sys/class/tpm").glob("tpm[0-9]*"))
    return tpm, secureboot.state(root).secure_boot


def run_install(args: argparse.Namespace, outcome: Outcome, log: Callable[[str, str], None]) -> int:
    """Pick the target, check the rules, copy, verify; on any refusal the disk is left
    as it was and the error is logged and kept in seed.status.json."""
    from ..apply import install
    from ..apply.seed import write_status
    from ..hal import disk
    from ..state import store

    assert outcome.checked is not None and outcome.checked.install is not None
    seed = outcome.checked.install
    root = root_of(args.root)
    state = store.state_dir(args.state_dir)

    def failed(message: str) -> int:
        log("error", f"install: {message}")
        write_status(
            state,
            {
                "applied": False,
                "source": outcome.where,
                "files": [],
                "problems": [f"install: {message}"],
            },
        )
        return 0 if args.boot else EXIT_INVALID

    source = os.path.basename(args.install_from) if args.install_from else None
    source = source or disk.holder_disk(root, "/usr")
    if source is None:
        return failed("cannot tell which disk this system runs from")
    try:
        tpm, secure_boot = machine_security(root)
        for warning in install.check_security(seed, tpm=tpm, secure_boot=secure_boot):
            log("warning", f"install: {warning}")
        target = install.select_target(disk.list_disks(root), seed.target, source)
        log("info", f"install: from {source} to {target.id} ({target.name})")
        done = install.install(
            seed,
            outcome.files,
            Path(root, "dev", source),
            target,
            log=lambda message: log("info", f"install: {message}"),
        )
    except install.InstallError as e:
        return failed(str(e))
    except (OSError, disk.DiskError) as e:
        return failed(f"copying to the target failed: {e}")
    for copied in done.copied:
        log(
            "info",
            f"install: partition {copied.entry.index} ({copied.entry.name}) verified, "
            f"sha256 {copied.sha256}",
        )
    write_status(
        state,
        {
            "applied": False,
            "installed": {"target": target.id, "seed": list(done.seed_files)},
            "source": outcome.where,
            "files": [],
            "problems": [],
        },
    )
    if seed.force_reboot:
        log("info", "install: done; rebooting (force_reboot)")
        if args.boot:
            subprocess.run(["systemctl", "--no-block", "reboot"], check=False)
    else:
        log("info", "install: done; remove the install media and reboot")
    return 0
