"""What systemd-networkd knows of each link, from `networkctl --json=short`.

`networkctl status --json=short` prints networkd's `Describe()` (its D-Bus method
org.freedesktop.network1.Manager.Describe): every link with its operational state, MTU,
addresses and routes, as networkd tracks them. `networkctl lldp --json=short` prints the
LLDP neighbours networkd's receivers heard (its varlink GetLLDPNeighbors). Both exist
since systemd 250; Debian 13 has 257. Addresses come as arrays of bytes, MACs likewise.

The parsers are pure functions of the text; `describe_text` and `lldp_text` are the thin
readers (a subprocess each, run in the API's worker thread). Malformed entries are
skipped, never raised: a link networkd describes oddly must not take the whole state down.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass
from typing import Any

NETWORKCTL_TIMEOUT_SECONDS = 10.0
AF_INET, AF_INET6 = 2, 10
MAIN_TABLE = 254


@dataclass(frozen=True, slots=True)
class Route:
    """A route through a gateway, as IncusOS shows one: `to` is "default" or a prefix."""

    to: str
    via: str


@dataclass(frozen=True, slots=True)
class Link:
    name: str
    # networkd's operational state: routable, degraded, carrier, no-carrier, off, ...
    state: str
    mtu: int = 0
    hwaddr: str = ""
    permanent_hwaddr: str = ""
    # Bare addresses (no prefix length), link-local ones left out, IPv4 first, sorted.
    addresses: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True, slots=True)
class Neighbour:
    """An LLDP neighbour heard on a link (IncusOS's SystemNetworkLLDPState)."""

    name: str
    chassis_id: str
    port_id: str
    port: str = ""


def _mac(value: Any) -> str:
    if isinstance(value, list) and len(value) == 6 and all(isinstance(b, int) for b in value):
        return ":".join(f"{b & 0xFF:02x}" for b in value)
    return ""


def _ip(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(value, list) or len(value) not in (4, 16):
        return None
    if not all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        return None
    return ipaddress.ip_address(bytes(value))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _addresses(entries: Any) -> tuple[str, ...]:
    """IPv4 then IPv6, each in address order: networkd lists them in the order they
    came, which varies from boot to boot (DHCP and SLAAC race)."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for entry in entries if isinstance(entries, list) else []:
        ip = _ip(entry.get("Address")) if isinstance(entry, dict) else None
        # IncusOS leaves out 169.254/16 and fe80::/10 (GetIPAddresses).
        if ip is not None and not ip.is_link_local:
            found.add(ip)
    return tuple(str(ip) for ip in sorted(found, key=lambda ip: (ip.version, ip)))


def _routes(entries: Any) -> tuple[Route, ...]:
    """Routes of the main table that go through a gateway (what IncusOS reads from
    `ip route show dev <link>`: lines with `via`)."""
    out: list[Route] = []
    for entry in entries if isinstance(entries, list) else []:
        if not isinstance(entry, dict) or entry.get("Table", MAIN_TABLE) != MAIN_TABLE:
            continue
        gateway = _ip(entry.get("Gateway"))
        destination = _ip(entry.get("Destination"))
        prefix = entry.get("DestinationPrefixLength")
        if gateway is None or destination is None or not isinstance(prefix, int):
            continue
        to = "default" if prefix == 0 else f"{destination}/{prefix}"
        route = Route(to, str(gateway))
        if route not in out:
            out.append(route)
    return tuple(out)


def parse_describe(text: str) -> dict[str, Link]:
    """Link name -> what networkd says of it, from `networkctl status --json=short`."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    interfaces = data.get("Interfaces") if isinstance(data, dict) else None
    out: dict[str, Link] = {}
    for entry in interfaces if isinstance(interfaces, list) else []:
        if not isinstance(entry, dict):
            continue
        name = _text(entry.get("Name"))
        if not name:
            continue
        out[name] = Link(
            name=name,
            state=_text(entry.get("OperationalState")) or "unknown",
            mtu=_int(entry.get("MTU")),
            hwaddr=_mac(entry.get("HardwareAddress")),
            permanent_hwaddr=_mac(entry.get("PermanentHardwareAddress")),
            addresses=_addresses(entry.get("Addresses")),
            routes=_routes(entry.get("Routes")),
        )
    return out


def parse_lldp(text: str) -> dict[str, tuple[Neighbour, ...]]:
    """Link name -> the LLDP neighbours heard on it, from `networkctl lldp --json=short`."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    links = data.get("Neighbors") if isinstance(data, dict) else None
    out: dict[str, tuple[Neighbour, ...]] = {}
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict):
            continue
        name = _text(link.get("InterfaceName"))
        heard = link.get("Neighbors")
        neighbours = tuple(
            Neighbour(
                name=_text(n.get("SystemName")),
                chassis_id=_text(n.get("ChassisID")),
                port_id=_text(n.get("PortID")),
                port=_text(n.get("PortDescription")),
            )
            for n in (heard if isinstance(heard, list) else [])
            if isinstance(n, dict)
        )
        if name and neighbours:
            out[name] = neighbours
    return out


def _networkctl(*args: str) -> str | None:
    """networkctl's output, or None when networkd does not answer (not running, no
    networkctl, a timeout)."""
    try:
        done = subprocess.run(
            ["networkctl", "--no-pager", "--json=short", *args],
            capture_output=True,
            text=True,
            timeout=NETWORKCTL_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def describe_text() -> str | None:
    return _networkctl("status")


def lldp_text() -> str | None:
    return _networkctl("lldp")
