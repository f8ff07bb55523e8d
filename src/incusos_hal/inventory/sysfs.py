"""Reading sysfs, procfs and udev's database under a relocatable root, defensively.

Everything here takes paths already joined to the root. A file that is missing,
unreadable, truncated or garbage reads as None (or the default): the scan reports the
device without that field rather than crashing or guessing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
MAX_READ = 1 << 20  # sysfs attributes are a page; anything larger is not one


def read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_READ)
    except OSError:
        return None
    text = data.decode(errors="replace").strip().replace("\x00", "")
    return text


def read_int(path: Path, default: int | None = None, base: int = 10) -> int | None:
    text = read(path)
    if text is None:
        return default
    try:
        return int(text, base)
    except ValueError:
        return default


def read_hex_id(path: Path) -> str | None:
    """A PCI/USB id as Incus writes it: four lowercase hex digits, no 0x."""
    value = read_int(path, base=16)
    if value is None or not 0 <= value <= 0xFFFF:
        return None
    return f"{value:04x}"


def link_name(path: Path) -> str | None:
    """The last component of a symlink's target (driver, subsystem, iommu_group)."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def listdir(path: Path) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def resolve(path: Path) -> Path | None:
    try:
        # One stat first: a link that is not there (a virtual tty's `device`, most of
        # /sys/class/tty) fails in one system call, not one lstat per path component.
        os.stat(path)
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None


def dev_number(path: Path) -> str | None:
    """A `dev` attribute, "major:minor", checked."""
    text = read(path)
    if text is None or not re.fullmatch(r"\d+:\d+", text):
        return None
    return text


def pci_address_of(device: Path) -> str | None:
    """The PCI function a device hangs off: the nearest PCI address in its sysfs path."""
    for part in reversed(device.parts):
        if PCI_ADDRESS.match(part):
            return part
    return None


def usb_address_of(root: Path, device: Path) -> str | None:
    """ "bus:device" of the USB device a device hangs off, as Incus writes it."""
    current = device
    sys_devices = root / "sys/devices"
    while current != current.parent and str(current).startswith(str(sys_devices)):
        bus, dev = read_int(current / "busnum"), read_int(current / "devnum")
        if bus is not None and dev is not None:
            return f"{bus}:{dev}"
        current = current.parent
    return None


def driver_of(root: Path, device: Path) -> tuple[str | None, str | None]:
    """(driver, its module's version if the module says one)."""
    driver = link_name(device / "driver")
    if driver is None:
        return None, None
    module = link_name(device / "driver" / "module") or driver
    return driver, read(root / "sys/module" / module / "version")


def numa_node_of(device: Path) -> int:
    """The NUMA node of a device or its nearest parent that knows (-1 means none: 0)."""
    current = device
    for _ in range(8):
        node = read_int(current / "numa_node")
        if node is not None:
            return max(node, 0)
        if current.parent == current:
            break
        current = current.parent
    return 0


def udev_properties(root: Path, kind: str, dev: str | None) -> dict[str, str]:
    """udev's database entry for a device ("b" block or "c" char, "major:minor"): its
    E: properties and S: symlinks (as "S:" -> space-joined)."""
    if dev is None:
        return {}
    text = read(root / "run/udev/data" / f"{kind}{dev}")
    if not text:
        return {}
    props: dict[str, str] = {}
    links: list[str] = []
    for line in text.splitlines():
        if line.startswith("E:") and "=" in line:
            key, _, value = line[2:].partition("=")
            props[key] = value
        elif line.startswith("S:"):
            links.append(line[2:])
    if links:
        props["S:"] = " ".join(links)
    return props


def links_by_target(root: Path, directory: str) -> dict[str, list[str]]:
    """Every name in /dev/<directory> (disk/by-id, serial/by-path, ...), sorted, by the
    name of the node it points at: one pass over the directory for a whole scan."""
    base = os.path.join(root, "dev", directory)
    out: dict[str, list[str]] = {}
    for name in listdir(Path(base)):
        try:
            target = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        out.setdefault(os.path.basename(target), []).append(name)
    return out


def by_links(root: Path, directory: str, target_name: str) -> list[str]:
    """Names in /dev/<directory> pointing at /dev/<target_name>."""
    return links_by_target(root, directory).get(target_name, [])
