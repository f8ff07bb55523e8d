"""A bond's 802.3ad (LACP) state per member, from the bonding driver's /proc/net/bonding/<bond>.

The file is the kernel's own report (drivers/net/bonding/bond_procfs.c): a header, then
one block per member starting "Slave Interface: <name>"; in 802.3ad mode each block ends
with "details actor lacp pdu:" and "details partner lacp pdu:" sub-blocks, whose
"system mac address" lines say who speaks LACP on either end of that member's cable.
sysfs has the actor's half only (bonding_slave/ad_*), so this file is what tells whether
a switch answered. Parsing is a pure function of the text; `read_lacp` is the thin reader.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# A partner that never answered is shown as the all-zero system.
NO_PARTNER = "00:00:00:00:00:00"


@dataclass(frozen=True, slots=True)
class Lacp:
    """One member's LACP state: the system MACs of this end (the bond's) and of the far
    end (the switch's; NO_PARTNER while none answered), and the aggregator it is in."""

    actor_mac: str
    partner_mac: str
    aggregator_id: int | None = None


def parse_bonding(text: str) -> dict[str, Lacp]:
    """Member name -> its LACP state, for the members the file shows LACP details for
    (none unless the bond runs 802.3ad). Lines it does not know are ignored: the file
    grows fields between kernel versions."""
    out: dict[str, Lacp] = {}
    member = ""
    part = ""
    fields: dict[str, dict[str, str]] = {}

    def flush() -> None:
        actor = fields.get("actor", {}).get("system mac address", "").lower()
        partner = fields.get("partner", {}).get("system mac address", "").lower()
        if member and _MAC.match(actor) and _MAC.match(partner):
            aggregator = fields.get("", {}).get("aggregator id", "")
            out[member] = Lacp(actor, partner, int(aggregator) if aggregator.isdigit() else None)

    for raw in text.splitlines():
        line = raw.strip()
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "slave interface" and sep:
            flush()
            member, part, fields = value, "", {}
        elif not member:
            continue
        elif line.lower() in ("details actor lacp pdu:", "details partner lacp pdu:"):
            part = line.split()[1].lower()
        elif not line:
            part = ""
        elif sep:
            fields.setdefault(part, {})[key] = value
    flush()
    return out


def read_lacp(root: str | os.PathLike[str], bond: str) -> dict[str, Lacp]:
    """The LACP state of `bond`'s members; empty when the bond is not there (or not a
    bond, or its file cannot be read)."""
    if "/" in bond or bond in ("", ".", ".."):
        return {}
    try:
        text = Path(root, "proc/net/bonding", bond).read_text(errors="replace")
    except OSError:
        return {}
    return parse_bonding(text)
