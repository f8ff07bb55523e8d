"""The console status screen (render/console.py): pure, so checked here on the host; and
`incusos-hal console --once` against a state directory and a recorded root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from incusos_hal.render.console import MAX_ERRORS, WIDTH, Status, printable, render

FINGERPRINT = "ab" * 32

BASE = Status(
    version="0.1.0",
    hostname="node1",
    addresses=[("enp0s2", "10.0.2.15/24"), ("enp0s2", "fec0::5054:ff:fe12:3456/64")],
    listen_address="[::]:8443",
    fingerprint=FINGERPRINT,
    secure_boot=True,
    tpm_status="ok",
    encrypted=True,
    recovery_keys_retrieved=False,
)


def test_shows_what_reaching_the_machine_needs() -> None:
    screen = render(BASE)
    assert screen.startswith("incusos-hal 0.1.0 on node1\n")
    assert "  enp0s2           10.0.2.15/24\n" in screen
    assert "  enp0s2           fec0::5054:ff:fe12:3456/64\n" in screen
    assert "API: https://[::]:8443 (client certificates only)" in screen
    # The fingerprint in full, as byte pairs, on two lines of 16.
    pairs = screen.split("certificate SHA-256:\n", 1)[1].splitlines()[:2]
    assert [p.strip() for p in pairs] == [":".join(["ab"] * 16)] * 2
    assert "Secure Boot: enabled\n" in screen
    assert "TPM: ok\n" in screen
    assert "Recovery key: NOT RETRIEVED YET\n" in screen
    assert "No errors logged this boot." in screen


def test_every_line_fits_the_console() -> None:
    long_error = "x" * 300
    screen = render(Status(**{**_fields(BASE), "errors": [long_error], "hostname": "h" * 200}))
    assert all(len(line) <= WIDTH for line in screen.splitlines())
    assert "…" in screen


def test_states_a_machine_can_be_in() -> None:
    bare = Status(
        version="0.1.0",
        hostname="node1",
        addresses=[],
        listen_address="",
        fingerprint="",
        secure_boot=False,
        tpm_status="pcr mismatch",
        encrypted=False,
        recovery_keys_retrieved=False,
    )
    screen = render(bare)
    assert "none yet (no interface has an address)" in screen
    assert "the local unix socket only" in screen
    assert "no certificate yet" in screen
    assert "Secure Boot: DISABLED" in screen
    assert "TPM: pcr mismatch" in screen
    assert "Recovery key: no encrypted volumes" in screen
    assert "not available" in render(Status(**{**_fields(bare), "secure_boot": None}))
    done = render(Status(**{**_fields(BASE), "recovery_keys_retrieved": True}))
    assert "Recovery key: retrieved" in done and "NOT RETRIEVED" not in done


def test_only_the_last_errors() -> None:
    errors = [f"error {i}" for i in range(10)]
    screen = render(Status(**{**_fields(BASE), "errors": errors}))
    shown = [e for e in errors if f"  {e}\n" in screen]
    assert shown == errors[-MAX_ERRORS:]


def test_outside_text_cannot_drive_the_terminal() -> None:
    # A journal line or interface name with escape sequences: clear screen, cursor moves,
    # an OSC title, C1 CSI, a carriage return that would overwrite the line.
    evil = "boom\x1b[2J\x1b[H\x1b]0;owned\x07\x9b31m\rfake"
    screen = render(
        Status(**{**_fields(BASE), "errors": [evil], "addresses": [(evil, "10.0.0.1/8")]})
    )
    for c in screen:
        assert c == "\n" or not (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0), repr(c)
    assert printable("a\tb\x00c") == "a b?c"


def test_same_status_same_screen() -> None:
    assert render(BASE) == render(Status(**_fields(BASE)))


def test_command_draws_from_the_state_dir(tmp_path: Path) -> None:
    """`incusos-hal console --once` on a machine with no TPM, EFI or network config: it
    draws the screen, naming what it could not read, and exits 0."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.toml").write_text('[listener]\nlisten_address = "[::]:8443"\n')
    (state / "state.json").write_text('{"encryption_recovery_keys_retrieved": true}')
    root = tmp_path / "root"
    (root / "sys/block/dm-0/dm").mkdir(parents=True)
    (root / "sys/block/dm-0/dm/uuid").write_text("CRYPT-LUKS2-0123-root\n")
    env = dict(os.environ, TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=1")
    proc = subprocess.run(
        [sys.executable, "-m", "incusos_hal", "console", "--once", "--root", str(root),
         "--state-dir", str(state)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "API: https://[::]:8443" in out
    assert "no certificate yet" in out
    assert "Secure Boot: not available" in out
    assert "TPM: unavailable" in out
    assert "Recovery key: retrieved" in out
    assert "TPM: cannot open TPM" in out  # why, among the errors


def _fields(s: Status) -> dict[str, object]:
    return {name: getattr(s, name) for name in Status.__slots__}
