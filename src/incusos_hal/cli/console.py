"""`incusos-hal console`: the status screen on tty1 (render/console.py draws it).

Gathers the status from the machine each `--interval` seconds and writes the screen to
every `--to` terminal when it changed. Each part that cannot be read is shown as such
(an error line), never a crash: the screen is what someone at a broken machine sees.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .common import root_of

if TYPE_CHECKING:
    import argparse

    from ..render.console import Status

JOURNAL_ERRORS = ["journalctl", "-b", "-p", "err", "-n", "6", "-o", "short-monotonic", "-q"]


def _encrypted(root: Path) -> bool:
    """Any open LUKS volume (device-mapper's CRYPT-LUKS uuid): root is one on the image."""
    for uuid in (root / "sys/block").glob("dm-*/dm/uuid"):
        try:
            if uuid.read_text().startswith("CRYPT-LUKS"):
                return True
        except OSError:
            continue
    return False


def gather(root: Path, state_dir: Path, errors: list[str]) -> Status:
    from .. import __version__
    from ..core.tls import fingerprint_pem
    from ..hal import secureboot
    from ..render.console import Status
    from ..security.state import tpm_status
    from ..state import store
    from ..state.paths import FLAGS_FILE, SERVER_CERT

    addresses: list[tuple[str, str]] = []
    try:
        from ..hal.netlink import addresses as kernel_addresses

        for name, addrs in sorted(kernel_addresses().items()):
            if name != "lo":
                addresses += [(name, a) for a in addrs]
    except Exception as e:
        errors.append(f"addresses: {e}")
    listen = ""
    try:
        loaded = store.load(state_dir)
        listen = loaded.config.listener.listen_address
        errors += list(loaded.problems)
    except Exception as e:
        errors.append(f"config: {e}")
    fingerprint = ""
    try:
        fingerprint = fingerprint_pem((state_dir / SERVER_CERT).read_text())
    except FileNotFoundError:
        pass
    except Exception as e:
        errors.append(f"API certificate: {e}")
    sb = secureboot.state(root)
    tpm = "unavailable"
    try:
        from ..hal.tpm import open_tpm_if_any

        with open_tpm_if_any(on_error=lambda e: errors.append(f"TPM: {e}")) as handle:
            tpm = tpm_status(root, handle)
    except Exception as e:
        errors.append(f"TPM: {e}")
    retrieved = False
    try:
        flags = json.loads((state_dir / FLAGS_FILE).read_text())
        retrieved = bool(flags.get("encryption_recovery_keys_retrieved"))
    except (OSError, ValueError, AttributeError):
        pass
    return Status(
        version=__version__,
        hostname=socket.gethostname(),
        addresses=addresses,
        listen_address=listen,
        fingerprint=fingerprint,
        secure_boot=sb.secure_boot if sb.efi else None,
        tpm_status=tpm,
        encrypted=_encrypted(root),
        recovery_keys_retrieved=retrieved,
        errors=errors + journal_errors(),
    )


def journal_errors() -> list[str]:
    try:
        proc = subprocess.run(
            JOURNAL_ERRORS, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"journal: {e}"]
    return [line for line in proc.stdout.splitlines() if line.strip()]


def cmd_console(args: argparse.Namespace) -> int:
    from ..render.console import CLEAR, render
    from ..state import store

    root = Path(root_of(args.root))
    state_dir = store.state_dir(args.state_dir)
    shown = ""
    while True:
        screen = render(gather(root, state_dir, []))
        if screen != shown:
            for path in args.to or ["-"]:
                try:
                    if path == "-":
                        sys.stdout.write(screen)
                        sys.stdout.flush()
                    else:
                        with open(path, "w") as tty:
                            tty.write(CLEAR + screen.replace("\n", "\r\n"))
                except OSError as e:
                    print(f"console: {path}: {e}", file=sys.stderr)
            shown = screen
        if args.once:
            return 0
        time.sleep(args.interval)
