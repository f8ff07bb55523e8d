"""`incusos-hal record DIR`: copy what the inventory reads from this machine into a tree
that `scan(DIR)` replays, with a manifest of where each entry came from.

Users send such a tree as a reproducer; tests replay real machines from them. Only
readable attribute files (up to 64 KiB), and the symlinks that give the device graph
its shape, are copied; device nodes, write-only and unreadable attributes are skipped.
Nothing secret is read: no efivars but the Secure Boot state bytes, no keys. Recording
the live machine also keeps the raw replies of the ioctls the inventory makes (ethtool,
NVMe identify and SMART, SCSI VPD) under ioctl/, which scans of the tree replay.
"""

from __future__ import annotations

import json
import os
import platform
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from . import hwdata, probe
from .sysfs import read_hex_id

FILES = (
    "proc/cpuinfo",
    "proc/meminfo",
    "proc/loadavg",
    "proc/sys/kernel/arch",
    "etc/os-release",
    "usr/lib/os-release",
    "etc/hostname",
    "run/systemd/container",
    ".dockerenv",
    "sys/devices/system/cpu/online",
    "sys/devices/system/cpu/isolated",
    "sys/devices/system/cpu/possible",
    "sys/kernel/security/tpm0/binary_bios_measurements",
)
# Class and bus directories: each entry is a symlink into /sys/devices.
LINK_DIRS = (
    "sys/class/net",
    "sys/class/block",
    "sys/class/nvme",
    "sys/class/nvme-subsystem",
    "sys/class/tty",
    "sys/class/tpm",
    "sys/class/tpmrm",
    "sys/class/drm",
    "sys/class/fc_host",
    "sys/class/fc_remote_ports",
    "sys/class/scsi_host",
    "sys/bus/pci/devices",
    "sys/bus/usb/devices",
)
TREES = (
    "sys/class/dmi/id",
    "sys/devices/system/cpu",
    "sys/devices/system/node",
)
DEV_LINK_DIRS = ("dev/disk/by-id", "dev/disk/by-path", "dev/serial/by-id", "dev/serial/by-path")
EFI_VARIABLES = ("SecureBoot", "SetupMode", "AuditMode", "DeployedMode")
# Inside device directories: what is not inventory, or is another device's (followed
# separately), or is large and irrelevant.
SKIP_DIRS = {
    "power",
    "subsystem",
    "driver",
    "firmware_node",
    "msi_irqs",
    "trace",
    "holders",
    "bdi",
    "mq",
    "integrity",
    "statistics",
    "queues",
    "wakeup",
    "hwmon",
    "iommu",
    "ptp",
    "batman_adv",
    "brport",
    "brif",
}
# Attribute files never read: reading a PCI BAR's resource file does I/O on the device
# (port reads, slow under emulation and not side-effect free), rom/eeprom/nvmem dump
# device memory, config is the raw config space; none of it is inventory.
SKIP_FILES = re.compile(r"^(resource\d*(_wc)?|rom|config|eeprom|nvmem|reset|remove|rescan)$")
# Links kept as links inside device directories: the scanners read their names.
KEEP_LINKS = {"driver", "subsystem", "iommu_group", "module", "device", "master", "lower"}
# An NVMe subsystem links to its controllers by their names.
KEEP_LINK_NAMES = re.compile(r"^nvme\d+$")
MAX_FILE = 64 * 1024
MAX_DEPTH = 6


@dataclass
class Manifest:
    root: str
    entries: list[dict[str, object]] = field(default_factory=list)
    skipped: int = 0

    def add(self, kind: str, path: str, **extra: object) -> None:
        self.entries.append({"kind": kind, "path": path, **extra})


class Recorder:
    def __init__(self, root: Path, dest: Path) -> None:
        self.root, self.dest = root, dest
        self.manifest = Manifest(str(root))
        self.done: set[str] = set()

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def copy_file(self, path: Path) -> None:
        rel = self.rel(path)
        if rel in self.done:
            return
        self.done.add(rel)
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o444:
                return
            with open(path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except OSError:
            self.manifest.skipped += 1
            return
        if len(data) > MAX_FILE:
            self.manifest.skipped += 1
            return
        out = self.dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        self.manifest.add("file", rel, bytes=len(data))

    def copy_link(self, path: Path) -> None:
        rel = self.rel(path)
        if rel in self.done:
            return
        self.done.add(rel)
        try:
            target = os.readlink(path)
        except OSError:
            return
        if os.path.isabs(target):
            # /dev links are relative in udev's tree; an absolute one is re-rooted.
            target = os.path.relpath(self.dest / target.lstrip("/"), (self.dest / rel).parent)
        out = self.dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_symlink() or out.exists():
            out.unlink()
        out.symlink_to(target)
        self.manifest.add("symlink", rel, target=target)

    def copy_dir(self, path: Path, depth: int = 0, *, recurse: bool = True) -> None:
        """A device directory: its attribute files, kept links, and (if `recurse`)
        its subdirectories."""
        # A directory first met as some device's parent (files only) is walked again
        # when met as a device itself (with its subdirectories).
        key = self.rel(path) + ("/" if recurse else "/.")
        if key in self.done or self.rel(path) + "/" in self.done or depth > MAX_DEPTH:
            return
        self.done.add(key)
        try:
            children = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            return
        for entry in children:
            child = Path(entry.path)
            if entry.is_symlink():
                # slaves/: a device-mapper map's paths, links named after the devices;
                # drm/: a GPU's minors, some of them links to the others.
                if (
                    entry.name in KEEP_LINKS
                    or KEEP_LINK_NAMES.match(entry.name)
                    or path.name in ("slaves", "drm")
                ):
                    self.copy_link(child)
                    if entry.name == "driver":
                        self.copy_driver(child)
            elif entry.is_file(follow_symlinks=False) and not SKIP_FILES.match(entry.name):
                self.copy_file(child)
            elif recurse and entry.is_dir(follow_symlinks=False) and entry.name not in SKIP_DIRS:
                self.copy_dir(child, depth + 1)

    def copy_driver(self, link: Path) -> None:
        """A driver's module link (its name differs from the driver's: virtio-pci is
        module virtio_pci) and the module's version, which the inventory reports."""
        try:
            driver = link.resolve(strict=True)
        except (OSError, RuntimeError):
            return
        module = driver / "module"
        if self.root not in driver.parents or not module.is_symlink():
            return
        self.copy_link(module)
        self.copy_file(self.root / "sys/module" / os.path.basename(os.readlink(module)) / "version")

    def copy_device(self, device: Path) -> None:
        """A device and, for the attributes scanners read off parents (numa_node,
        busnum), each ancestor's own files up to /sys/devices."""
        self.copy_dir(device)
        devices = self.root / "sys/devices"
        parent = device.parent
        while parent != devices and devices in parent.parents:
            self.copy_dir(parent, recurse=False)
            parent = parent.parent

    def record(self) -> Manifest:
        for rel in FILES:
            self.copy_file(self.root / rel)
        for rel in TREES:
            if (self.root / rel).is_dir():
                self.copy_dir(self.root / rel)
        for rel in LINK_DIRS:
            self.copy_class(rel)
        for rel in DEV_LINK_DIRS:
            base = self.root / rel
            for name in sorted(os.listdir(base)) if base.is_dir() else []:
                self.copy_link(base / name)
        udev = self.root / "run/udev/data"
        for name in sorted(os.listdir(udev)) if udev.is_dir() else []:
            if name[:1] in ("b", "c", "n"):
                self.copy_file(udev / name)
        self.copy_efi()
        self.copy_names()
        if self.root == Path("/"):
            self.copy_ioctls()
        return self.manifest

    def copy_class(self, rel: str) -> None:
        """A /sys/class directory's links and the hardware devices they point at."""
        base = self.root / rel
        try:
            names = sorted(os.listdir(base))
        except OSError:
            return
        virtual = self.root / "sys/devices/virtual"
        for name in names:
            link = base / name
            if not link.is_symlink():
                continue
            self.copy_link(link)
            try:
                device = link.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if (
                rel in ("sys/class/tty", "sys/class/block")
                and virtual in device.parents
                and not name.startswith("dm-")  # multipath maps are virtual devices
            ):
                continue  # ptys, consoles, loop and zram devices: not hardware
            if self.root / "sys" in device.parents:
                self.copy_device(device)

    def copy_efi(self) -> None:
        """The EFI variables the inventory reads (never the others: they can be secrets)."""
        efivars = self.root / "sys/firmware/efi/efivars"
        for name in sorted(os.listdir(efivars)) if efivars.is_dir() else []:
            if name.split("-", 1)[0] in EFI_VARIABLES:
                self.copy_file(efivars / name)
        if (self.root / "sys/firmware/efi").is_dir():
            (self.dest / "sys/firmware/efi").mkdir(parents=True, exist_ok=True)

    def copy_ioctls(self) -> None:
        """The raw replies of the ioctls the inventory makes, for the tree to replay."""
        live = probe.Live()
        wanted: list[tuple[tuple[str, ...], bytes | None]] = []
        for name in sorted(os.listdir("/sys/class/net")):
            if os.path.exists(f"/sys/class/net/{name}/device"):
                wanted.append((("ethtool", name, "drvinfo"), live.ethtool_drvinfo(name)))
                wanted.append((("ethtool", name, "link-settings"), live.ethtool_link(name)))
        for name in (
            sorted(os.listdir("/sys/class/nvme")) if os.path.isdir("/sys/class/nvme") else []
        ):
            wanted.append((("nvme", name, "id-ctrl"), live.nvme_id_ctrl(name)))
            wanted.append((("nvme", name, "smart-log"), live.nvme_smart(name)))
        for name in sorted(os.listdir("/sys/class/block")):
            if name.startswith("sd") and not os.path.exists(f"/sys/class/block/{name}/partition"):
                for page in (0x80, 0x83):
                    wanted.append((("scsi", name, f"vpd-{page:02x}"), live.scsi_vpd(name, page)))
        for parts, data in wanted:
            if data is None:
                continue
            rel = "/".join((probe.IOCTL_DIR, *parts))
            out = self.dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
            self.manifest.add("ioctl", rel, bytes=len(data))

    def copy_names(self) -> None:
        """pci.ids and usb.ids cut down to the devices recorded, so the tree replays the
        names this machine shows (the full files are megabytes)."""
        for kind, candidates, vendor_file, device_file, bus in (
            ("pci", hwdata.PCI_IDS, "vendor", "device", "sys/bus/pci/devices"),
            ("usb", hwdata.USB_IDS, "idVendor", "idProduct", "sys/bus/usb/devices"),
        ):
            wanted: set[tuple[str, str]] = set()
            for name in sorted(os.listdir(self.dest / bus)) if (self.dest / bus).is_dir() else []:
                vendor = read_hex_id(self.dest / bus / name / vendor_file)
                device = read_hex_id(self.dest / bus / name / device_file)
                if vendor and device:
                    wanted.add((vendor, device))
            vendors, devices = hwdata.load(str(self.root), candidates)
            lines = []
            for vendor in sorted({v for v, _ in wanted}):
                if vendor in vendors:
                    lines.append(f"{vendor}  {vendors[vendor]}")
                    lines += [
                        f"\t{d}  {devices[(v, d)]}"
                        for v, d in sorted(wanted)
                        if v == vendor and (v, d) in devices
                    ]
            if lines:
                rel = candidates[0]
                out = self.dest / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                text = f"# {kind}.ids, cut to the devices recorded\n" + "\n".join(lines) + "\n"
                out.write_text(text)
                self.manifest.add("file", rel, bytes=len(text), derived_from=candidates)


def record(dest: str | os.PathLike[str], root: str | os.PathLike[str] = "/") -> Manifest:
    """Record into `dest` (created; must be empty or absent) and write its MANIFEST.json."""
    out = Path(dest)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    manifest = Recorder(Path(root).resolve(), out.resolve()).record()
    header = {
        "recorded_by": f"incusos-hal {__version__}",
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": platform.release(),
        "root": manifest.root,
        "skipped_unreadable": manifest.skipped,
        "entries": manifest.entries,
    }
    (out / "MANIFEST.json").write_text(json.dumps(header, indent=1) + "\n")
    return manifest
