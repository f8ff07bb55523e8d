"""`/1.0/system/network`: links, addresses, routes, DNS, time and the proxy (IncusOS's
SystemNetwork). Rendered as networkd files, timesyncd's drop-in and the proxy environment;
a change may wait for `:confirm` and is rolled back without it."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config.errors import FieldError
from ..config.formats import is_mac, show
from ..core.files import Owned
from ..render.effective import effective_network
from ..render.networkd import NETWORK_DIR, PREFIX, render_networkd
from ..render.system import PROXY_ENV, TIMESYNCD_DROPIN, render_proxy, render_time
from ..render.units import network_units
from .base import Action, Context, Reload, Rendered, Section, UnitInputs

if TYPE_CHECKING:
    from ..config.model import Config
    from ..core.tree import Tree
    from ..hal.net import Nic


def files(config: Config, nics: tuple[Nic, ...]) -> Rendered:
    effective = effective_network(config.network, nics)
    tree: Tree = {}
    tree.update(render_networkd(effective.network))
    tree.update(render_time(effective.network))
    tree.update(render_proxy(effective.network))
    return Rendered(tree, effective.renames, effective.warnings)


def units(config: Config, inputs: UnitInputs) -> Tree:
    return network_units(config, source=inputs.source, unit_dir=inputs.unit_dir)


def read_state(ctx: Context) -> Any:
    from ..hal import net, netlink

    addresses: dict[str, list[str]] = {}
    if ctx.settings.root == "/":
        try:
            addresses = netlink.addresses()
        except (OSError, ImportError):
            addresses = {}
    return net.links_state(ctx.settings.root, addresses)


def confirmation(config: Config) -> float:
    """The change waits this long for `:confirm` (IncusOS's confirmation_timeout)."""
    return config.network.confirmation_timeout.seconds or 0.0


async def confirm(ctx: Context, body: Any) -> Any:
    await ctx.confirm()
    return {}


def keep_macs(archived: Config, running: Config) -> Config:
    """Restoring onto other hardware: each interface and bond keeps this machine's MACs,
    matched by name."""
    nics = {i.name: i.hwaddr for i in running.network.interfaces}
    bonds = {b.name: b for b in running.network.bonds}
    interfaces = tuple(
        replace(i, hwaddr=nics.get(i.name, i.hwaddr)) for i in archived.network.interfaces
    )
    new_bonds = tuple(
        replace(b, hwaddr=bonds[b.name].hwaddr, members=bonds[b.name].members)
        if b.name in bonds
        else b
        for b in archived.network.bonds
    )
    network = replace(archived.network, interfaces=interfaces, bonds=new_bonds)
    return replace(archived, network=network)


def check(new: Config, current: Config, root: str) -> list[FieldError]:
    """A NIC claimed twice once its kernel name is resolved against the NICs under
    `root` (`eth0` and eth0's MAC): the document's validation cannot see it, the boot
    would drop the second claimant (render.effective), a PUT refuses it."""
    from ..hal.net import list_nics

    if new.network == current.network:
        return []
    by_name = {nic.name: nic.hwaddr for nic in list_nics(root)[0]}
    claims: list[tuple[str, str]] = [
        (f"network.interfaces[{i}].hwaddr", iface.hwaddr)
        for i, iface in enumerate(new.network.interfaces)
        if iface.hwaddr
    ]
    claims += [
        (f"network.bonds[{i}].members[{j}]", member)
        for i, bond in enumerate(new.network.bonds)
        for j, member in enumerate(bond.members)
    ]
    seen: dict[str, str] = {}
    errors: list[FieldError] = []
    for where, value in claims:
        mac = value.lower() if is_mac(value) else by_name.get(value)
        if mac is None:
            continue  # a NIC not here: skipped at boot with a warning, as IncusOS does
        if mac in seen:
            errors.append(
                FieldError(where, f"{show(value)} is the NIC {mac}, already used by {seen[mac]}")
            )
        else:
            seen[mac] = where
    return errors


def _named(path: str) -> Owned:
    return Owned(os.path.dirname(path), lambda name: name == os.path.basename(path))


SECTION = Section(
    name="network",
    attribute="network",
    summary="links, addresses, routes, DNS, time and proxy: configuration and state",
    read_state=read_state,
    check=check,
    confirmation=confirmation,
    files=files,
    owns=(
        Owned(NETWORK_DIR, lambda name: name.startswith(PREFIX)),
        _named(TIMESYNCD_DROPIN),
        _named(PROXY_ENV),
    ),
    # The proxy file restarts nothing yet: the units that read it (Incus, the updater)
    # are not this project's to restart.
    reloads=(
        Reload(NETWORK_DIR + "/", "systemd-networkd.service", "reload-networkd"),
        Reload(TIMESYNCD_DROPIN, "systemd-timesyncd.service"),
    ),
    units=units,
    actions=(Action("confirm", "keep a network change", confirm),),
    backup_skip={"network-macs": keep_macs},
)
