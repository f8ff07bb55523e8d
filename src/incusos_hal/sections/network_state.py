"""The `state` half of `/1.0/system/network` in IncusOS's shape (SystemNetworkState).

Keys are the configured names (interfaces, bonds, VLANs) and the physical NICs this
config does not manage; our internal links (`_p<mac>` ports, `_b<bond>` bond devices)
never show, except as the keys of a bond's `members`, as on IncusOS. Each entry maps the
name back to the devices render/networkd.py made of it:

    interface N (NIC M)   the bridge N carries state, addresses, routes, MTU, counters;
                          speed and LLDP come from the port _p<M> under it
    bond B                the bridge B as above; speed from the bond device _bB;
                          members: each _p<mac> as a "bond_member" with LACP and LLDP
    vlan V                the VLAN device V; hwaddr and speed are its parent's
    physical              an unmanaged NIC, as itself

`build` is pure (config, networkd's view, the kernel's); `read` gathers those views.
Roles shown are the configured ones; when no device has `management` every routable one
gets it, and when none has `cluster` every one with `management` gets that too (IncusOS's
UpdateNetworkState: how the default config shows ["management", "cluster"]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..render.effective import bond_device_name, effective_network, port_name

if TYPE_CHECKING:
    from ..config.model import Network
    from ..hal.bonding import Lacp
    from ..hal.net import KernelLink, Nic
    from ..hal.networkd import Link, Neighbour

# networkd's word for a link it does not see at all.
MISSING = "missing"


@dataclass(frozen=True, slots=True)
class Observed:
    """What the machine says: networkd's links (or the kernel's stand-ins for them), the
    kernel's links, counters and speeds, LLDP neighbours and each bond's LACP state."""

    links: Mapping[str, Link]
    kernel: Mapping[str, KernelLink]
    counters: Mapping[str, Mapping[str, int]]
    speeds: Mapping[str, str]
    lldp: Mapping[str, tuple[Neighbour, ...]] = field(default_factory=dict)
    lacp: Mapping[str, Mapping[str, Lacp]] = field(default_factory=dict)


_ZERO = {"rx_bytes": 0, "rx_errors": 0, "tx_bytes": 0, "tx_errors": 0}


def _entry(
    kind: str, device: str, seen: Observed, *, hwaddr: str = "", speed_of: str = ""
) -> dict[str, Any]:
    """One SystemNetworkInterfaceState: `device` is the link whose state it shows,
    `speed_of` the one whose speed it gives. Empty values are left out (IncusOS's
    omitempty); `state` and `stats` are always there."""
    link = seen.links.get(device)
    state = link.state if link is not None else MISSING
    entry: dict[str, Any] = {"type": kind, "state": state}
    if link is not None and link.addresses:
        entry["addresses"] = list(link.addresses)
    if link is not None and link.routes:
        entry["routes"] = [{"to": r.to, "via": r.via} for r in link.routes]
    if link is not None and link.mtu:
        entry["mtu"] = link.mtu
    if hwaddr:
        entry["hwaddr"] = hwaddr
    if state != "off":
        entry["speed"] = seen.speeds.get(speed_of or device, "unknown")
    entry["stats"] = dict(seen.counters.get(device, _ZERO))
    return entry


def _lldp(entry: dict[str, Any], port: str, seen: Observed) -> None:
    heard = seen.lldp.get(port, ())
    if heard:
        entry["lldp"] = [
            {
                "name": n.name,
                "chassis_id": n.chassis_id,
                "port_id": n.port_id,
                **({"port": n.port} if n.port else {}),
            }
            for n in heard
        ]


def build(network: Network, nics: tuple[Nic, ...], seen: Observed) -> dict[str, Any]:
    """IncusOS's SystemNetworkState without `configuration_in_process` (the service's
    to say): {"interfaces": {name: state}}."""
    effective = effective_network(network, nics).network
    out: dict[str, dict[str, Any]] = {}
    roles: dict[str, tuple[str, ...]] = {}

    for iface in effective.interfaces:
        port = port_name(iface.hwaddr)
        entry = _entry("interface", iface.name, seen, hwaddr=iface.hwaddr, speed_of=port)
        _lldp(entry, port, seen)
        out[iface.name] = entry
        roles[iface.name] = iface.roles

    for bond in effective.bonds:
        device = bond_device_name(bond.name)
        entry = _entry("bond", bond.name, seen, hwaddr=bond.hwaddr or "", speed_of=device)
        lacp = seen.lacp.get(device, {})
        members: dict[str, Any] = {}
        for mac in bond.members:
            port = port_name(mac)
            member = _entry("bond_member", port, seen, hwaddr=mac)
            _lldp(member, port, seen)
            partner = lacp.get(port)
            if partner is not None:
                member["lacp"] = {"local_mac": partner.actor_mac, "remote_mac": partner.partner_mac}
            members[port] = member
        if members:
            entry["members"] = members
        out[bond.name] = entry
        roles[bond.name] = bond.roles

    parents = {i.name: port_name(i.hwaddr) for i in effective.interfaces}
    parents.update({b.name: bond_device_name(b.name) for b in effective.bonds})
    for vlan in effective.vlans:
        parent = out.get(vlan.parent, {})
        entry = _entry(
            "vlan",
            vlan.name,
            seen,
            hwaddr=parent.get("hwaddr", ""),
            speed_of=parents.get(vlan.parent, vlan.name),
        )
        out[vlan.name] = entry
        roles[vlan.name] = vlan.roles

    configured = {role for names in roles.values() for role in names}
    for name, entry in out.items():
        shown = list(roles[name])
        if "management" not in configured and entry["state"] == "routable":
            shown.append("management")
        if "cluster" not in configured and "management" in shown:
            shown.append("cluster")
        if shown:
            entry["roles"] = list(dict.fromkeys(shown))

    # Physical NICs this config leaves alone, as themselves (never our `_` links).
    for name, link in sorted(seen.kernel.items()):
        if name.startswith("_") or name in out or not link.physical:
            continue
        out[name] = _entry("physical", name, seen, hwaddr=link.hwaddr)

    return {"interfaces": dict(sorted(out.items()))}


def kernel_stand_ins(
    kernel: Mapping[str, KernelLink], addresses: Mapping[str, list[str]]
) -> dict[str, Link]:
    """Links as networkd would describe them, from the kernel alone: for a machine whose
    networkd does not answer (a scratch `serve`, a recorded tree). The state follows
    networkd's rules as far as the kernel tells them: off (down), no-carrier, carrier, or
    routable once a global address is there."""
    import ipaddress

    from ..hal.networkd import Link

    out: dict[str, Link] = {}
    for name, k in kernel.items():
        bare: list[str] = []
        for value in addresses.get(name, []):
            try:
                ip = ipaddress.ip_interface(value).ip
            except ValueError:
                continue
            if not ip.is_link_local:
                bare.append(str(ip))
        state = "off" if not k.up else "no-carrier" if not k.carrier else "carrier"
        if state == "carrier" and bare:
            state = "routable"
        out[name] = Link(name, state, k.mtu, k.hwaddr, "", tuple(bare))
    return out


def read(root: str, network: Network) -> dict[str, Any]:
    """The state of this machine (`root` "/") or of a recorded tree under `root`."""
    from ..hal import bonding, net, networkd

    nics, _warnings = net.list_nics(root)
    kernel = net.kernel_links(root)
    links: dict[str, Link] = {}
    lldp: dict[str, tuple[Neighbour, ...]] = {}
    if root == "/":
        text = networkd.describe_text()
        links = networkd.parse_describe(text) if text is not None else {}
        heard = networkd.lldp_text() if links else None
        lldp = networkd.parse_lldp(heard) if heard is not None else {}
    if not links:
        addresses: dict[str, list[str]] = {}
        if root == "/":
            from ..hal import netlink

            try:
                addresses = netlink.addresses()
            except (OSError, ImportError):
                addresses = {}
        links = kernel_stand_ins(kernel, addresses)
    seen = Observed(
        links=links,
        kernel=kernel,
        counters={name: net.counters(root, name) for name in kernel},
        speeds={name: net.speed(root, name) for name in kernel},
        lldp=lldp,
        lacp={name: bonding.read_lacp(root, name) for name in kernel if name.startswith("_b")},
    )
    return build(network, nics, seen)
