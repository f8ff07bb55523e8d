"""Network interfaces as sysfs shows them, read under a relocatable root.

The configure step needs, per interface: its name, its permanent MAC address and whether it
is a wired NIC backed by hardware. Everything here reads files only (no netlink), so the
same code runs on a machine and on a recorded tree (`tests/fixtures/*/sys/...`).
Unreadable or malformed entries are skipped with a warning, never raised.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

# How the kernel prints an Ethernet address in sysfs. (Not the config's MAC check, which
# also accepts what people type: importing the config package costs the inventory a
# third of its start-up.)
_SYSFS_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def is_mac(value: str) -> bool:
    return bool(_SYSFS_MAC.match(value))


ARPHRD_ETHER = 1


@dataclass(frozen=True, slots=True)
class Nic:
    name: str
    # The MAC the interface came with when sysfs can tell (bond members keep it in
    # bonding_slave/perm_hwaddr), else the current one; lower case, colon separated.
    hwaddr: str
    # Backed by a device (PCI, USB, platform...), not created in software.
    physical: bool
    wireless: bool = False
    arp_type: int = ARPHRD_ETHER
    # The kernel's own kind for software links ("bridge", "bond", "vlan", "veth"...).
    kind: str = ""
    # Upper device when enslaved to a bridge or bond.
    master: str = ""

    @property
    def wired(self) -> bool:
        """A wired Ethernet NIC: what the default config turns into a bridge."""
        return self.physical and not self.wireless and self.arp_type == ARPHRD_ETHER


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _uevent(path: Path) -> dict[str, str]:
    text = _read(path / "uevent") or ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value
    return out


def list_nics(root: str | os.PathLike[str] = "/") -> tuple[tuple[Nic, ...], list[str]]:
    """Every network interface with an Ethernet-style MAC, sorted by name.

    Returns the interfaces and warnings about entries that could not be read.
    """
    base = Path(root, "sys/class/net")
    nics: list[Nic] = []
    warnings: list[str] = []
    try:
        names = sorted(os.listdir(base))
    except OSError as e:
        return (), [f"cannot list {base}: {e.strerror}"]
    for name in names:
        d = base / name
        if not d.is_dir():
            continue  # bonding_masters: a control file beside the links, not a link
        address = _read(d / "address")
        arp_type_text = _read(d / "type")
        if address is None or arp_type_text is None or not arp_type_text.isdigit():
            warnings.append(f"{name}: unreadable address or type in {d}, skipped")
            continue
        arp_type = int(arp_type_text)
        if arp_type != ARPHRD_ETHER:
            continue  # loopback, tunnels, InfiniBand...: nothing for the bridge model
        hwaddr = address.lower()
        if not is_mac(hwaddr):
            warnings.append(f"{name}: malformed address {address!r}, skipped")
            continue
        # Bonding rewrites its members' MACs; the original stays readable here.
        perm = _read(d / "bonding_slave" / "perm_hwaddr")
        if perm is not None and is_mac(perm):
            hwaddr = perm.lower()
        uevent = _uevent(d)
        master = ""
        with contextlib.suppress(OSError):
            master = os.path.basename(os.readlink(d / "master"))
        nics.append(
            Nic(
                name=name,
                hwaddr=hwaddr,
                physical=(d / "device").exists(),
                wireless=(d / "wireless").exists() or (d / "phy80211").exists(),
                arp_type=arp_type,
                kind=uevent.get("DEVTYPE", ""),
                master=master,
            )
        )
    return tuple(nics), warnings


def udev_running(root: str | os.PathLike[str] = "/") -> bool:
    """Whether systemd-udevd runs (it does not inside containers)."""
    return Path(root, "run/udev/control").exists()


def udev_done(root: str | os.PathLike[str], name: str) -> bool:
    """Whether udev has finished its first pass over interface `name`."""
    ifindex = _read(Path(root, "sys/class/net", name, "ifindex"))
    return ifindex is not None and Path(root, f"run/udev/data/n{ifindex}").exists()


COUNTERS = ("rx_bytes", "rx_errors", "tx_bytes", "tx_errors")


def counters(root: str | os.PathLike[str], name: str) -> dict[str, int]:
    """The kernel's traffic counters of a link (IncusOS's SystemNetworkInterfaceStats);
    0 for one it cannot read (a link that is gone)."""
    base = Path(root, "sys/class/net", name, "statistics")
    out: dict[str, int] = {}
    for counter in COUNTERS:
        text = _read(base / counter) or ""
        out[counter] = int(text) if text.isdigit() else 0
    return out


def speed(root: str | os.PathLike[str], name: str) -> str:
    """The link's speed in Mb/s as the kernel prints it ("-1" when the driver does not
    know, as on virtio), or "unknown" when it cannot be read (IncusOS's words)."""
    text = _read(Path(root, "sys/class/net", name, "speed"))
    return text if text else "unknown"


@dataclass(frozen=True, slots=True)
class KernelLink:
    """A link as sysfs shows it: for links networkd does not describe."""

    name: str
    hwaddr: str
    mtu: int
    up: bool
    carrier: bool
    # Backed by hardware: its sysfs device path is not under /devices/virtual/.
    physical: bool


def kernel_links(root: str | os.PathLike[str] = "/") -> dict[str, KernelLink]:
    """Every link but lo, by name."""
    base = Path(root, "sys/class/net")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return {}
    out: dict[str, KernelLink] = {}
    for name in names:
        d = base / name
        if name == "lo" or not d.is_dir():
            continue  # bonding_masters: a control file beside the links, not a link
        try:
            target = os.readlink(d)
        except OSError:
            target = ""
        flags = _read(d / "flags") or "0"
        try:
            up = bool(int(flags, 16) & 1)  # IFF_UP
        except ValueError:
            up = False
        mtu = _read(d / "mtu") or ""
        out[name] = KernelLink(
            name=name,
            hwaddr=(_read(d / "address") or "").lower(),
            mtu=int(mtu) if mtu.isdigit() else 0,
            up=up,
            carrier=_read(d / "carrier") == "1",
            physical=bool(target) and "/virtual/" not in target,
        )
    return out
