"""`/1.0/system/network`: links, addresses, routes, DNS, time and the proxy (IncusOS's
SystemNetwork). Rendered as networkd files, timesyncd's drop-in and the proxy environment;
a change may wait for `:confirm` and is rolled back without it."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config.errors import FieldError
from ..config.formats import is_mac, show
from ..config.model import UNSET_DURATION, Time
from ..core.files import Owned
from ..render.effective import DEFAULT_TIMEZONE, effective_network
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
    """IncusOS's SystemNetworkState, keyed by the configured names (network_state.py)."""
    from . import network_state

    return network_state.read(ctx.settings.root, ctx.config().network)


def confirmation(config: Config) -> float:
    """The change waits this long for `:confirm` (IncusOS's confirmation_timeout)."""
    return config.network.confirmation_timeout.seconds or 0.0


ZONEINFO_DIR = "usr/share/zoneinfo"


def check(new: Config, current: Config, root: str) -> list[FieldError]:
    """What the machine decides: the time zone is installed, no NIC is claimed twice."""
    return check_timezone(new, current, root) + check_claims(new, current, root)


def check_timezone(new: Config, current: Config, root: str) -> list[FieldError]:
    """A time zone must be one the machine has installed (IncusOS lets timedatectl say
    so when it applies): `Mars/Olympus` is a well-formed name, but no zone. Only a changed
    zone is checked, so a GET -> PUT round trip is accepted whatever is installed."""
    zone = new.network.time.timezone if new.network.time else ""
    was = current.network.time.timezone if current.network.time else ""
    if not zone or zone in (was, DEFAULT_TIMEZONE):
        return []
    if not _zone_installed(root, zone):
        return [
            FieldError(
                "network.time.timezone",
                f"{zone!r} is not a time zone installed on this machine "
                f"(/{ZONEINFO_DIR}/{zone} is missing or not a TZif file)",
            )
        ]
    return []


def _zone_installed(root: str, zone: str) -> bool:
    # The name passed the document's pattern (no "..", no leading "/"); the file must be
    # a compiled zone (TZif), not a directory such as "America" or a stray text file.
    path = os.path.join(root, ZONEINFO_DIR, zone)
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"TZif"
    except OSError:
        return False


def stored(config: Config) -> Config:
    """The network as IncusOS stores it: the confirmation timeout applied, never kept
    (a GET -> PUT round trip must not hold the change again), and the time zone filled
    in (UTC), as IncusOS's GET shows it; the render does the same, so the files do not
    change."""
    network = config.network
    time = network.time or Time()
    if not time.timezone:
        time = replace(time, timezone=DEFAULT_TIMEZONE)
    network = replace(network, confirmation_timeout=UNSET_DURATION, time=time)
    return replace(config, network=network)


async def confirm(ctx: Context, body: Any) -> Any:
    await ctx.confirm()
    return {}


async def flush_dns(ctx: Context, body: Any) -> Any:
    await ctx.flush_dns()
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


def check_claims(new: Config, current: Config, root: str) -> list[FieldError]:
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
    stored=stored,
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
    actions=(
        Action("confirm", "keep a network change", confirm),
        Action("flush-dns", "empty resolved's DNS cache", flush_dns),
    ),
    backup_skip={"network-macs": keep_macs},
)
