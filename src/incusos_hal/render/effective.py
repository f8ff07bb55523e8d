"""From the stored document to what this machine will run: defaults and name resolution.

Pure: takes the config and the NIC list, returns the network to render, the renames the
configure step must carry out, and warnings. One unusable item (a NIC name that matches
nothing, a bridge name already taken) is dropped with a warning; the rest still applies,
so one typo never takes the whole network down.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import formats as fmt
from ..config.model import VLAN, Bond, Interface, Network, Time
from ..hal.net import Nic

DEFAULT_TIMEZONE = "UTC"


def port_name(mac: str) -> str:
    """The name a configured NIC is given, freeing its kernel name for the bridge."""
    return "_p" + mac.replace(":", "").lower()


def bond_device_name(bond_name: str) -> str:
    return "_b" + bond_name


@dataclass(frozen=True, slots=True)
class Effective:
    network: Network
    renames: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


def default_network(nics: tuple[Nic, ...]) -> tuple[Interface, ...]:
    """IncusOS's first boot: every wired NIC gets a VLAN-aware bridge named after it,
    with DHCPv4 and SLAAC and LLDP on; none of them holds up network-online."""
    out: list[Interface] = []
    for nic in nics:
        if not nic.wired:
            continue
        name = nic.name
        if name == port_name(nic.hwaddr):
            # Already ours from an earlier pass: the bridge above it carries the name.
            if not nic.master:
                continue
            name = nic.master
        if fmt.check_device_name(name) is not None:
            # Kernel names can be 15 characters (enx<mac> for USB NICs); bridges here
            # take 13 at most, so such a NIC is named after the tail of its MAC.
            name = "nic" + nic.hwaddr.replace(":", "")[-6:]
        out.append(
            Interface(
                name=name,
                hwaddr=nic.hwaddr,
                addresses=("dhcp4", "slaac"),
                lldp=True,
                required_for_online="no",
            )
        )
    return tuple(out)


def first_boot_network(network: Network, nics: tuple[Nic, ...]) -> Network | None:
    """The network IncusOS stores on a first boot when none is configured: every wired
    NIC as `default_network` makes it, and the time zone UTC. None when the network has
    devices already (or there is no NIC to default to). Rendered, it gives the same files
    as the unset network it replaces: `effective_network` fills in the same values."""
    if network.has_devices:
        return None
    interfaces = default_network(nics)
    if not interfaces:
        return None
    time = network.time or Time()
    if not time.timezone:
        time = replace(time, timezone=DEFAULT_TIMEZONE)
    return replace(network, interfaces=interfaces, time=time)


def effective_network(network: Network, nics: tuple[Nic, ...]) -> Effective:
    """The network to render on these NICs: defaults filled in, NIC names resolved to
    MACs, items that cannot apply here dropped with a warning, and the renames."""
    warnings: list[str] = []
    network = _with_defaults(network, nics)
    interfaces, bonds = _resolve_macs(network, nics, warnings)
    interfaces, bonds, vlans = _free_names(network, interfaces, bonds, nics, warnings)
    network = replace(network, interfaces=tuple(interfaces), bonds=tuple(bonds), vlans=tuple(vlans))
    return Effective(network, _renames(interfaces, bonds, nics), tuple(warnings))


def _with_defaults(network: Network, nics: tuple[Nic, ...]) -> Network:
    """IncusOS's first-boot network when none is configured, and UTC when no time zone."""
    if not network.has_devices:
        network = replace(network, interfaces=default_network(nics))
    if network.time is None:
        return replace(network, time=Time(timezone=DEFAULT_TIMEZONE))
    if not network.time.timezone:
        return replace(network, time=replace(network.time, timezone=DEFAULT_TIMEZONE))
    return network


def _resolve_macs(
    network: Network, nics: tuple[Nic, ...], warnings: list[str]
) -> tuple[list[Interface], list[Bond]]:
    """Interfaces and bonds with every NIC named by its kernel name resolved to its MAC;
    one that names no NIC here is dropped (a bond only when none of its members is).

    A NIC claimed twice once names are resolved (`eth0` and eth0's MAC: validation
    cannot see it, the NICs decide) goes to its first claimant; the second is dropped
    with a warning, as a missing NIC is, so a boot never fails on it."""
    by_name = {nic.name: nic for nic in nics}
    claimed: dict[str, str] = {}

    def resolve(hwaddr: str, what: str, *, claim: bool = True) -> str | None:
        if fmt.is_mac(hwaddr):
            mac = hwaddr.lower()
        else:
            nic = by_name.get(hwaddr)
            if nic is None:
                warnings.append(f"{what}: no interface named {hwaddr!r} on this machine; skipped")
                return None
            mac = nic.hwaddr
        if not claim:  # a bond's own MAC (often a member's): the address, not the NIC
            return mac
        if mac in claimed:
            warnings.append(f"{what}: {mac} is already used by {claimed[mac]}; skipped")
            return None
        claimed[mac] = what
        return mac

    interfaces: list[Interface] = []
    for iface in network.interfaces:
        mac = resolve(iface.hwaddr, f"interface {iface.name}")
        if mac is not None:
            interfaces.append(replace(iface, hwaddr=mac))
    bonds: list[Bond] = []
    for bond in network.bonds:
        members = [resolve(m, f"bond {bond.name} member") for m in bond.members]
        resolved = tuple(m for m in members if m is not None)
        if not resolved:
            warnings.append(f"bond {bond.name}: none of its members is present; skipped")
            continue
        hwaddr = resolve(bond.hwaddr, f"bond {bond.name}", claim=False) if bond.hwaddr else None
        bonds.append(replace(bond, members=resolved, hwaddr=hwaddr or resolved[0]))
    return interfaces, bonds


def _free_names(
    network: Network,
    interfaces: list[Interface],
    bonds: list[Bond],
    nics: tuple[Nic, ...],
    warnings: list[str],
) -> tuple[list[Interface], list[Bond], list[VLAN]]:
    """What is left once names held by NICs this config does not manage are dropped, and
    VLANs whose parent is gone with them."""
    # A bridge cannot take a name some other link already has. Our own NICs are renamed
    # to _p<mac> first, so only names held by NICs outside the config conflict.
    ours = {i.hwaddr for i in interfaces} | {m for b in bonds for m in b.members}
    taken = {nic.name: nic for nic in nics if nic.hwaddr not in ours}

    def free(name: str, what: str) -> bool:
        if name in taken:
            warnings.append(
                f"{what} {name}: the name belongs to interface {name} "
                f"({taken[name].hwaddr}), which this config does not manage; skipped"
            )
            return False
        return True

    interfaces = [i for i in interfaces if free(i.name, "interface")]
    bonds = [b for b in bonds if free(b.name, "bond")]
    parents = {i.name for i in interfaces} | {b.name for b in bonds}
    vlans: list[VLAN] = []
    for vlan in network.vlans:
        if vlan.parent not in parents:
            warnings.append(
                f"vlan {vlan.name}: its parent {vlan.parent} is not configured; skipped"
            )
        elif free(vlan.name, "vlan"):
            vlans.append(vlan)
    return interfaces, bonds, vlans


def _renames(
    interfaces: list[Interface], bonds: list[Bond], nics: tuple[Nic, ...]
) -> tuple[tuple[str, str], ...]:
    """Each managed NIC present under another name goes to its _p<mac> name."""
    present = {nic.hwaddr: nic for nic in nics}
    managed = {i.hwaddr for i in interfaces} | {m for b in bonds for m in b.members}
    renames = []
    for mac in sorted(managed):
        nic = present.get(mac)
        if nic is not None and nic.name != port_name(mac):
            renames.append((nic.name, port_name(mac)))
    return tuple(renames)
