"""What the kernel section checks and shows of the machine, read from sysfs and procfs
under a relocatable root (a recorded or built tree in tests).

Reads only; every function says "unknown" (None or an empty result) rather than raise
when a file is missing or unreadable, and the caller decides what that means.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PCI_DEVICES = "sys/bus/pci/devices"
CPUFREQ = "sys/devices/system/cpu/cpu0/cpufreq/scaling_available_governors"
TCP_CONGESTION = "proc/sys/net/ipv4/tcp_available_congestion_control"
ZRAM = "sys/block/zram0"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def pci_device_exists(root: str, address: str) -> bool:
    """The caller has validated `address` (DDDD:BB:DD.F): it is a name, not a path."""
    return (Path(root) / PCI_DEVICES / address).exists()


def pci_ids(root: str, address: str) -> tuple[str, str] | None:
    """(vendor, device) as 4 lower-case hex digits, or None when sysfs does not say."""
    device = Path(root) / PCI_DEVICES / address
    vendor, product = _read(device / "vendor"), _read(device / "device")
    if vendor is None or product is None:
        return None
    return vendor.lower().removeprefix("0x"), product.lower().removeprefix("0x")


def sriov_total_vfs(root: str, address: str) -> int | None:
    """How many VFs the device supports; None when it has no SR-IOV capability."""
    return _int(_read(Path(root) / PCI_DEVICES / address / "sriov_totalvfs"))


def scaling_governors(root: str) -> tuple[str, ...] | None:
    """The governors cpufreq offers; None when the machine has no frequency scaling."""
    text = _read(Path(root) / CPUFREQ)
    return None if text is None else tuple(text.split())


def tcp_congestion_algorithms(root: str) -> tuple[str, ...] | None:
    text = _read(Path(root) / TCP_CONGESTION)
    return None if text is None else tuple(text.split())


@dataclass(frozen=True, slots=True)
class ZramSwap:
    disk_size: int
    original_size: int
    compressed_size: int
    total_memory_use: int

    @property
    def compression_ratio(self) -> float:
        # IncusOS divides the original size by the memory used; with nothing stored,
        # 0 (Go would produce NaN and fail to encode it).
        return self.original_size / self.total_memory_use if self.total_memory_use else 0.0


def zram_swap(root: str) -> ZramSwap | None:
    """zram0's sizes (zramctl's DISKSIZE, DATA, COMPR, TOTAL), from disksize and mm_stat
    (orig_data_size compr_data_size mem_used_total ...); None without a zram0."""
    device = Path(root) / ZRAM
    disk_size = _int(_read(device / "disksize"))
    if disk_size is None:
        return None
    fields = (_read(device / "mm_stat") or "").split()
    stats = [_int(f) for f in fields[:3]]
    if len(stats) < 3 or any(s is None for s in stats):
        stats = [0, 0, 0]
    original, compressed, total = (s or 0 for s in stats)
    return ZramSwap(disk_size, original, compressed, total)
