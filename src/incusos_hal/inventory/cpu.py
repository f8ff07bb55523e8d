"""The `cpu` section: sockets, cores and threads from sysfs topology, names and flags
from /proc/cpuinfo, caches and frequencies from sysfs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .omit import OMIT
from .sysfs import listdir, read, read_int


@dataclass
class CPUCache:
    """Incus's ResourcesCPUCache."""

    level: int
    type: str
    size: int


@dataclass
class CPUThread:
    """Incus's ResourcesCPUThread."""

    id: int
    numa_node: int
    thread: int
    online: bool
    isolated: bool


@dataclass
class CPUCore:
    """Incus's ResourcesCPUCore."""

    core: int
    die: int
    threads: list[CPUThread]
    frequency: int = field(default=0, metadata=OMIT)
    flags: list[str] = field(default_factory=list)


@dataclass
class CPUAddressSizes:
    """Incus's ResourcesCPUAddressSizes."""

    physical_bits: int
    virtual_bits: int


@dataclass
class CPUSocket:
    """Incus's ResourcesCPUSocket."""

    name: str = field(default="", metadata=OMIT)
    vendor: str = field(default="", metadata=OMIT)
    socket: int = 0
    cache: list[CPUCache] = field(default_factory=list, metadata=OMIT)
    cores: list[CPUCore] = field(default_factory=list)
    frequency: int = field(default=0, metadata=OMIT)
    frequency_minimum: int = field(default=0, metadata=OMIT)
    frequency_turbo: int = field(default=0, metadata=OMIT)
    address_sizes: CPUAddressSizes | None = field(default=None, metadata=OMIT)


@dataclass
class CPU:
    """Incus's ResourcesCPU."""

    architecture: str
    sockets: list[CPUSocket]
    total: int


SIZE = re.compile(r"^(\d+)([KMG]?)$")
UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_cpulist(text: str | None) -> set[int]:
    """ "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}; junk parts are skipped."""
    out: set[int] = set()
    for part in (text or "").split(","):
        first, _, last = part.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if last else lo
        except ValueError:
            continue
        if 0 <= lo <= hi < 1 << 16:
            out.update(range(lo, hi + 1))
    return out


def parse_cpuinfo(text: str) -> dict[int, dict[str, str]]:
    """processor number -> its "key: value" lines."""
    out: dict[int, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            number = current.get("processor", "")
            if number.isdigit():
                out[int(number)] = current
            current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    return out


def _cache(index: Path) -> CPUCache | None:
    level = read_int(index / "level")
    kind = read(index / "type")
    size = SIZE.match(read(index / "size") or "")
    if level is None or not kind or size is None:
        return None
    return CPUCache(level, kind, int(size.group(1)) * UNITS[size.group(2)])


def _mhz(path: Path) -> int:
    khz = read_int(path)
    return khz // 1000 if khz and khz > 0 else 0


def scan_cpu(root: str | os.PathLike[str] = "/") -> CPU:
    base = Path(root, "sys/devices/system/cpu")
    info = parse_cpuinfo(read(Path(root, "proc/cpuinfo")) or "")
    isolated = parse_cpulist(read(base / "isolated"))
    online_set = parse_cpulist(read(base / "online"))
    numbers = sorted(
        int(name[3:]) for name in listdir(base) if name[:3] == "cpu" and name[3:].isdigit()
    )
    sockets: dict[int, CPUSocket] = {}
    cores: dict[tuple[int, int, int], CPUCore] = {}
    for number in numbers:
        cpu = base / f"cpu{number}"
        topology = cpu / "topology"
        socket_id = max(read_int(topology / "physical_package_id", 0) or 0, 0)
        core_id = max(read_int(topology / "core_id", number) or 0, 0)
        die_id = max(read_int(topology / "die_id", 0) or 0, 0)
        details = info.get(number, {})
        socket = sockets.get(socket_id)
        if socket is None:
            socket = CPUSocket(
                name=details.get("model name", ""),
                vendor=details.get("vendor_id", ""),
                socket=socket_id,
            )
            for index in listdir(cpu / "cache"):
                if index.startswith("index"):
                    cache = _cache(cpu / "cache" / index)
                    if cache is not None:
                        socket.cache.append(cache)
            freq = cpu / "cpufreq"
            socket.frequency_minimum = _mhz(freq / "cpuinfo_min_freq")
            socket.frequency_turbo = _mhz(freq / "cpuinfo_max_freq")
            sizes = re.match(
                r"(\d+) bits physical, (\d+) bits virtual", details.get("address sizes", "")
            )
            if sizes:
                socket.address_sizes = CPUAddressSizes(int(sizes.group(1)), int(sizes.group(2)))
            sockets[socket_id] = socket
        key = (socket_id, die_id, core_id)
        core = cores.get(key)
        if core is None:
            core = CPUCore(core=core_id, die=die_id, threads=[])
            core.flags = details.get("flags", "").split()
            cores[key] = core
            socket.cores.append(core)
        online = number in online_set if online_set else read(cpu / "online") != "0"
        node = next(
            (int(n[4:]) for n in listdir(cpu) if n.startswith("node") and n[4:].isdigit()), 0
        )
        core.threads.append(
            CPUThread(
                id=number,
                numa_node=node,
                thread=len(core.threads),
                online=online,
                isolated=number in isolated,
            )
        )
        current = _mhz(cpu / "cpufreq/scaling_cur_freq")
        if not current:
            try:
                current = int(float(details.get("cpu MHz", "0")))
            except ValueError:
                current = 0
        core.frequency = max(core.frequency, current)
    for socket in sockets.values():
        socket.cores.sort(key=lambda c: (c.die, c.core))
        freqs = [c.frequency for c in socket.cores if c.frequency]
        socket.frequency = sum(freqs) // len(freqs) if freqs else 0
    ordered = [sockets[k] for k in sorted(sockets)]
    # The kernel says its architecture in procfs (6.1+); a recorded tree carries it.
    arch = read(Path(root, "proc/sys/kernel/arch"))
    if arch is None and Path(root).resolve() == Path("/"):
        arch = os.uname().machine
    return CPU(architecture=arch or "", sockets=ordered, total=len(numbers))
