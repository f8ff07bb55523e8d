"""The console status screen: what tty1 shows in place of a login prompt.

The appliance has no shell; whoever stands at the machine sees what they need to reach
it through the API (its addresses and its certificate's fingerprint, to check on first
contact), whether the boot chain is trusted (Secure Boot, the TPM), whether the recovery
key still has to be fetched, and the last errors. Pure: the caller gathers `Status`
(cli/console.py); the same status always gives the same screen.

Everything shown that comes from outside (interface names, journal messages, the
hostname) has its control characters replaced, so a crafted log line cannot move the
cursor, clear the screen or change the terminal's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

WIDTH = 80
# Room for the errors at the bottom of a 25-line console.
MAX_ERRORS = 6
CLEAR = "\x1b[H\x1b[2J"


@dataclass(frozen=True, slots=True)
class Status:
    version: str
    hostname: str
    # (interface, address/prefix), in the order shown.
    addresses: Sequence[tuple[str, str]]
    # host:port of the HTTPS API, "" when only the unix socket listens.
    listen_address: str
    # SHA-256 of the API's certificate (hex), "" before it has one.
    fingerprint: str
    secure_boot: bool | None  # None: no EFI (not booted by UEFI)
    tpm_status: str  # security.state's: "ok", "swtpm", "pcr mismatch", "unavailable"
    encrypted: bool  # the machine has encrypted volumes (so recovery keys matter)
    recovery_keys_retrieved: bool
    errors: Sequence[str] = ()


def printable(text: str) -> str:
    """`text` with every control character (C0, DEL, C1) shown as "?"."""
    return "".join(
        "?" if (ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0) else c for c in text.replace("\t", " ")
    )


def _line(text: str) -> str:
    text = printable(text)
    return text if len(text) <= WIDTH else text[: WIDTH - 1] + "…"


def _fingerprint(hexdigest: str) -> list[str]:
    """Colon-separated byte pairs, on two lines of 16 bytes (fits 80 columns)."""
    pairs = [hexdigest[i : i + 2] for i in range(0, len(hexdigest), 2)]
    return [":".join(pairs[i : i + 16]) for i in range(0, len(pairs), 16)]


def render(status: Status) -> str:
    """The screen's text (no clearing sequence: the caller decides), lines ≤ 80 columns."""
    out = [f"incusos-hal {status.version} on {status.hostname}", ""]
    out.append("Addresses:")
    if status.addresses:
        out += [f"  {name:<16} {address}" for name, address in status.addresses]
    else:
        out.append("  none yet (no interface has an address)")
    out.append("")
    if status.listen_address:
        out.append(f"API: https://{status.listen_address} (client certificates only)")
    else:
        out.append("API: the local unix socket only (no listen_address configured)")
    if status.fingerprint:
        out.append("  certificate SHA-256:")
        out += [f"  {part}" for part in _fingerprint(status.fingerprint)]
    else:
        out.append("  no certificate yet")
    out.append("")
    if status.secure_boot is None:
        secure_boot = "not available (not booted through UEFI)"
    else:
        secure_boot = "enabled" if status.secure_boot else "DISABLED"
    out.append(f"Secure Boot: {secure_boot}")
    out.append(f"TPM: {status.tpm_status}")
    if status.encrypted and not status.recovery_keys_retrieved:
        out.append("Recovery key: NOT RETRIEVED YET")
        out.append("  read it from /1.0/system/security, then confirm with :retrieved")
    elif status.encrypted:
        out.append("Recovery key: retrieved")
    else:
        out.append("Recovery key: no encrypted volumes")
    out.append("")
    errors = list(status.errors)[-MAX_ERRORS:]
    if errors:
        out.append("Last errors:")
        out += [f"  {e}" for e in errors]
    else:
        out.append("No errors logged this boot.")
    return "\n".join(_line(line) for line in out) + "\n"
