"""Boot a real Debian 13 guest under qemu, with this project installed, and run checks in it.

This host's kernel has no bonding, VLAN, bridge VLAN filtering, device-mapper, NVMe, TPM
or EFI, and loads no modules; a guest with Debian's own kernel has them all.

- `guest_root()`: a Debian 13 root with Debian's kernel and the tools the HAL is checked
  against, debootstrapped once and cached under $INCUSOS_HAL_CACHE/rootfs, keyed by its
  package list (nspawn.rootfs, flavor "vm").
- `build()`: an overlay on it with the checkout meson-installed (by the root's own meson,
  through systemd-nspawn), then whatever the test adds; packed into an ext4 disk image
  with `mkfs.ext4 -d` (no loop device or mount needed). The guest boots its own kernel
  and initrd directly (`-kernel`/`-initrd`), root on a virtio disk.
- `Guest`: the machine around the disk. Firmware: SeaBIOS ("bios", the fastest), OVMF
  with Secure Boot available but no keys ("uefi": setup mode, Secure Boot off), or OVMF
  with the snakeoil test keys enrolled and the kernel signed with them ("secureboot").
  A TPM 2.0 from swtpm whose state lives in the guest's work directory, so PCRs, keys and
  sealed secrets are real across boots. NVMe controllers with namespaces, a SCSI disk
  reachable through two HBAs (two paths to one WWN, for multipath), NICs with fixed MACs
  on qemu socket netdevs (two whose netdevs point at each other are a cable).
- `Guest.boot()`: KVM when it really runs guests here, else TCG (software emulation,
  slower, same results). A probe unit mounts the work directory's probe/ over 9p at
  /probe and runs the probe parts asked for (tests/guest_probe.py); their results come
  back in /probe/result.json and the guest powers off. A hung guest is killed after the
  timeout and its console log is kept for the message. The same disk boots again with
  its state (config, LUKS volumes on the NVMe disks, TPM) intact.

`ci/vm` is the command line to it: `ci/vm run -- CMD` boots a guest and runs CMD there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nspawn
import probe_result

GUEST_PACKAGES = (
    *nspawn.PACKAGES,
    "linux-image-amd64",
    "initramfs-tools",
    "udev",
    "kmod",
    # the hardware the HAL drives, and the reference tools its results are checked against
    "cryptsetup",
    "systemd-cryptsetup",
    "multipath-tools",
    "open-iscsi",
    "nvme-cli",
    "tpm2-tools",
    "lldpd",
    # zram swap as the kernel section renders it (IncusOS's is zram-generator's too)
    "systemd-zram-generator",
    "targetcli-fb",
    "sg3-utils",
    "ethtool",
    "pciutils",
    "mokutil",
    # the HAL's own dependencies as Debian ships them, and what builds its cffi parts
    "python3-cffi",
    "python3-ply",  # debootstrap resolves no virtual packages: pycparser's python3-ply-lex
    "python3-pyudev",
    "python3-tpm2-pytss",
    "python3-aiohttp",
    "python3-sdbus",
    "gcc",
    "libc6-dev",
    "python3-dev",
    "libcryptsetup-dev",
)
# panic=-1: a kernel panic reboots at once, which -no-reboot turns into qemu exiting,
# instead of a guest hanging until the boot's timeout.
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 systemd.show_status=auto panic=-1"
# qemu 7.2's multi-threaded TCG now and then runs a stale translation of kernel text that
# another vCPU is live-patching: an "Oops: int3" and a panic in the first seconds of boot,
# before the root file system is mounted (seen here once, with the host busy besides).
# Such a boot changed nothing on the guest's disks, so it is run again, once.
EARLY_PANIC = re.compile(r"Oops: int3.*Kernel panic", re.S)
# systemd runs every generator in one sandboxed child that must end within 90 s; under
# TCG, with the host busy, the lot can take longer, and PID 1 then freezes for good (a
# known flake of systemd under emulation, reported by other projects booting Fedora and
# Ubuntu the same way). The boot changed nothing a retry would mind: it is killed at
# once and run again, once.
GENERATORS_FROZE = re.compile(
    r"Failed to fork off sandboxing environment for executing generators.*"
    r"Freezing execution",
    re.S,
)
OVMF = Path("/usr/share/OVMF")
OVMF_CODE = OVMF / "OVMF_CODE_4M.secboot.fd"
FIRMWARE_VARS = {
    "uefi": OVMF / "OVMF_VARS_4M.fd",  # no keys: setup mode, Secure Boot off
    "secureboot": OVMF / "OVMF_VARS_4M.snakeoil.fd",  # PK, KEK, db: Debian's test key
}
FIRMWARES = ("bios", *FIRMWARE_VARS)
# Debian's ovmf package ships the snakeoil key that signs what those variables trust;
# its passphrase is published (README.Debian): it is test material, not a secret.
SNAKEOIL_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
SNAKEOIL_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
SNAKEOIL_PASSPHRASE = "snakeoil"  # published with the test key

PROBE_UNIT = """[Unit]
Description=Test probe: run the probe parts in /probe, then power off
After=multi-user.target

[Service]
Type=oneshot
Environment=PYTHONDONTWRITEBYTECODE=1
ExecStartPre=/bin/mkdir -p /probe
ExecStartPre=/bin/mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 probe /probe
ExecStart=/usr/bin/python3 /probe/probe.py
ExecStopPost=/bin/systemctl poweroff --no-block
StandardOutput=journal+console
StandardError=journal+console
# The host's own limit (Guest.boot's timeout) kills a hung guest; a limit here too would
# end a slow probe (the ZFS guest's, under TCG) before the host's, with no result.
TimeoutStartSec=infinity
"""
TESTS = Path(__file__).resolve().parent

_ACCEL: tuple[str, str] | None = None


# OpenZFS is in Debian's contrib (its licence keeps it out of the kernel package): the
# module is built by DKMS against the guest kernel's headers, in the cached root. The storage
# area's reference tool comes with it: smartctl (SMART for SCSI/SATA; IncusOS runs
# `smartctl -aj`). Debian 13 has no python3-blivet ("Unable to locate package", main and
# contrib, seen building this root), so blivet is not in it.
ZFS_SETUP = """
sed -i 's/^\\(deb .*\\) main$/\\1 main contrib/' /etc/apt/sources.list
grep -q contrib /etc/apt/sources.list
apt-get update -q
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends linux-headers-amd64 zfs-dkms zfsutils-linux \\
    python3-pyzfs smartmontools
kernel=$(ls /lib/modules | sort -V | tail -n 1)
dkms status
ls /lib/modules/$kernel/updates/dkms/zfs.ko*
apt-get clean
"""


# The setup-mode boot changes PCR 7: the volumes sealed to Secure Boot's PCR 7 stay locked
# and their systemd-cryptsetup units fail, as they must (tests/test_vm_security.py checks
# that they did, and that the recovery key opens them).
LOCKED_IN_SETUP_MODE = frozenset(
    {"systemd-cryptsetup@seca.service", "systemd-cryptsetup@secb.service"}
)


def failed_units(listing: str) -> set[str]:
    """Unit names from `systemctl list-units --failed --plain --no-legend`."""
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def guest_root(*, zfs: bool = False) -> Path:
    """The cached guest root; with `zfs`, a flavor with OpenZFS built for its kernel."""
    if zfs:
        return nspawn.rootfs("vm-zfs", GUEST_PACKAGES, setup=ZFS_SETUP)
    return nspawn.rootfs("vm", GUEST_PACKAGES)


def _boot_files(root: Path) -> tuple[Path, Path]:
    kernels = sorted(root.glob("boot/vmlinuz-*"))
    initrds = sorted(root.glob("boot/initrd.img-*"))
    if not kernels or not initrds:
        raise RuntimeError(f"no kernel or initrd in {root}/boot")
    return kernels[-1], initrds[-1]


def accel(kernel: Path, initrd: Path) -> tuple[str, str]:
    """("kvm", why) when KVM runs this kernel here, else ("tcg", why not). Probed once."""
    global _ACCEL
    if _ACCEL is not None:
        return _ACCEL
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _ACCEL = ("tcg", "/dev/kvm is missing or not accessible")
        return _ACCEL
    cmd = [
        "qemu-system-x86_64",
        "-machine",
        "q35",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    text = out.decode(errors="replace")
    if "Linux version" in text and "KVM internal error" not in text:
        _ACCEL = ("kvm", "KVM booted the guest kernel")
    else:
        first = next(
            (line for line in text.splitlines() if "KVM" in line or "error" in line),
            text.strip().splitlines()[-1] if text.strip() else "no output",
        )
        _ACCEL = ("tcg", f"KVM did not boot the guest kernel: {first.strip()}")
    return _ACCEL


def free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Nic:
    mac: str
    netdev: str  # a qemu -netdev spec without id=


def cables(macs: list[tuple[str, str]]) -> list[Nic]:
    """NIC pairs joined back to back: each pair's two netdevs send to each other."""
    nics: list[Nic] = []
    ports = free_udp_ports(2 * len(macs))
    for i, (a, b) in enumerate(macs):
        pa, pb = ports[2 * i], ports[2 * i + 1]
        nics.append(Nic(a, f"socket,udp=127.0.0.1:{pb},localaddr=127.0.0.1:{pa}"))
        nics.append(Nic(b, f"socket,udp=127.0.0.1:{pa},localaddr=127.0.0.1:{pb}"))
    return nics


@dataclass(frozen=True)
class NvmeController:
    serial: str
    namespaces_mib: tuple[int, ...]  # one namespace per size, nsid 1, 2, ...


@dataclass(frozen=True)
class MultipathDisk:
    """One SCSI disk behind two virtio-scsi HBAs: two paths with one serial and WWN."""

    serial: str
    wwn: int  # NAA 5 identifier, 64 bits
    size_mib: int = 64


DISK_BUSES = ("scsi", "virtio", "sata")


@dataclass(frozen=True)
class Disk:
    """A blank disk: on the "scsi" HBA (virtio-scsi; by-id scsi-0QEMU_QEMU_HARDDISK_<serial>,
    as IncusOS's own test VMs name theirs), a "virtio" block device (virtio-<serial>; no
    SMART at all) or a "sata" port of q35's AHCI (ata-QEMU_HARDDISK_<serial>; qemu answers
    ATA SMART)."""

    serial: str
    size_mib: int
    bus: str = "scsi"

    @classmethod
    def parse(cls, spec: str) -> Disk:
        """BUS:SERIAL:MIB, as `ci/vm run --disk` takes it."""
        bus, serial, mib = spec.split(":")
        if bus not in DISK_BUSES or not re.fullmatch(r"[A-Za-z0-9_]{1,20}", serial):
            raise ValueError(f"--disk {spec!r}: BUS ({'|'.join(DISK_BUSES)}):SERIAL:MIB")
        return cls(serial, int(mib), bus)


@dataclass
class Result:
    # Read through probe_result: a part or step that failed in the guest raises with
    # the guest's own account when read.
    result: probe_result.Reading
    console: str
    seconds: float  # qemu start to power-off
    first_command: float | None  # qemu start to the probe's first step
    accel: str


@dataclass
class Guest:
    work: Path
    image: Path
    kernel: Path
    initrd: Path
    nics: list[Nic] = field(default_factory=list)
    # NICs on tap devices (MAC, tap name) in the network namespace `netns`, where qemu
    # then runs: the far side of a LAN the harness builds (nspawn.Lan, kind "tap").
    taps: list[tuple[str, str]] = field(default_factory=list)
    netns: str | None = None
    firmware: str = "bios"
    tpm: bool = False
    nvme: list[NvmeController] = field(default_factory=list)
    multipath: MultipathDisk | None = None
    disks: list[Disk] = field(default_factory=list)
    # A serial for the root disk (then /dev/disk/by-id/virtio-<serial>, as a real boot
    # drive has a by-id name); None keeps it as every other rung has it.
    root_serial: str | None = None
    memory_mb: int = 2048
    cpus: int = 2
    accelerator: str | None = None  # None: KVM if it runs guests here, else TCG

    @property
    def probe_dir(self) -> Path:
        return self.work / "probe"

    @property
    def tpm_state(self) -> Path:
        return self.work / "tpm"

    def _disk(self, name: str, mib: int) -> Path:
        """A sparse raw disk in the work directory, made once: it keeps its data across boots."""
        path = self.work / f"{name}.raw"
        if not path.exists():
            with open(path, "wb") as f:
                f.truncate(mib * 1024 * 1024)
        return path

    def _firmware_args(self) -> list[str]:
        if self.firmware == "bios":
            return ["-machine", "q35"]
        if self.firmware not in FIRMWARE_VARS:
            raise ValueError(f"firmware: one of {', '.join(FIRMWARES)}, not {self.firmware!r}")
        # Each firmware keeps its own variable store across boots, as a machine's NVRAM.
        variables = self.work / f"efivars-{self.firmware}.fd"
        if not variables.exists():
            shutil.copy(FIRMWARE_VARS[self.firmware], variables)
        return [
            # The Secure Boot capable build keeps its variables in SMM.
            "-machine",
            "q35,smm=on",
            "-global",
            "driver=cfi.pflash01,property=secure,value=on",
            "-drive",
            f"if=pflash,format=raw,unit=0,file={OVMF_CODE},readonly=on",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={variables}",
        ]

    def _root_args(self) -> list[str]:
        # qemu makes `-drive if=virtio` devices after every `-device`: with another
        # virtio-blk disk, that one would be /dev/vda and the root /dev/vdb (seen). An
        # explicit device comes first, as the command line orders it.
        if self.root_serial is None and all(d.bus != "virtio" for d in self.disks):
            return ["-drive", f"file={self.image},if=virtio,format=raw,cache=unsafe"]
        serial = f",serial={self.root_serial}" if self.root_serial else ""
        return [
            "-drive",
            f"file={self.image},if=none,id=root,format=raw,cache=unsafe",
            "-device",
            f"virtio-blk-pci,drive=root{serial}",
        ]

    def _kernel(self) -> Path:
        if self.firmware != "secureboot":
            return self.kernel
        signed = self.work / "vmlinuz.snakeoil"
        if not signed.exists() or signed.stat().st_mtime < self.kernel.stat().st_mtime:
            sign_efi(self.kernel, signed)
        return signed

    def command(self, accelerator: str, tpm_socket: Path | None = None) -> list[str]:
        cmd = [
            "qemu-system-x86_64",
            *self._firmware_args(),
            "-accel",
            accelerator,
            "-cpu",
            "host" if accelerator == "kvm" else "max",
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(self._kernel()),
            "-initrd",
            str(self.initrd),
            "-append",
            KERNEL_CMDLINE,
            *self._root_args(),
            "-virtfs",
            f"local,path={self.probe_dir},mount_tag=probe,security_model=none",
            "-nic",
            "none",
        ]
        if tpm_socket is not None:
            cmd += [
                "-chardev",
                f"socket,id=tpmchr,path={tpm_socket}",
                "-tpmdev",
                "emulator,id=tpm0,chardev=tpmchr",
                "-device",
                "tpm-crb,tpmdev=tpm0",
            ]
        for c, ctrl in enumerate(self.nvme):
            cmd += ["-device", f"nvme,id=nvme{c},serial={ctrl.serial}"]
            for n, mib in enumerate(ctrl.namespaces_mib, start=1):
                disk = self._disk(f"nvme{c}n{n}", mib)
                cmd += [
                    "-drive",
                    f"file={disk},if=none,id=nvme{c}n{n},format=raw,cache=unsafe",
                    "-device",
                    f"nvme-ns,drive=nvme{c}n{n},bus=nvme{c},nsid={n}",
                ]
        if self.multipath is not None:
            mp = self.multipath
            disk = self._disk("multipath", mp.size_mib)
            for path in (0, 1):
                # Two HBAs open one file: qemu's image locking would refuse the second.
                cmd += [
                    "-device",
                    f"virtio-scsi-pci,id=hba{path}",
                    "-drive",
                    f"file={disk},if=none,id=mp{path},format=raw,cache=none,file.locking=off",
                    "-device",
                    f"scsi-hd,drive=mp{path},bus=hba{path}.0,serial={mp.serial},"
                    f"wwn={mp.wwn:#x},share-rw=on",
                ]
        if any(d.bus == "scsi" for d in self.disks):
            cmd += ["-device", "virtio-scsi-pci,id=scsi0"]
        sata = 0
        for d in self.disks:
            path = self._disk(f"disk-{d.serial}", d.size_mib)
            ident = f"disk-{d.serial}"
            cmd += ["-drive", f"file={path},if=none,id={ident},format=raw,cache=unsafe"]
            if d.bus == "scsi":
                cmd += ["-device", f"scsi-hd,drive={ident},bus=scsi0.0,serial={d.serial}"]
            elif d.bus == "virtio":
                cmd += ["-device", f"virtio-blk-pci,drive={ident},serial={d.serial}"]
            else:  # q35's built-in AHCI has six ports, ide.0 to ide.5
                cmd += ["-device", f"ide-hd,drive={ident},bus=ide.{sata},serial={d.serial}"]
                sata += 1
        for i, (mac, tap) in enumerate(self.taps):
            cmd += [
                "-netdev",
                f"tap,id=t{i},ifname={tap},script=no,downscript=no",
                "-device",
                f"virtio-net-pci,netdev=t{i},mac={mac}",
            ]
        for i, nic in enumerate(self.nics):
            # virtio-net reports no speed or duplex unless told, and 802.3ad aggregates
            # only full-duplex ports of one speed: give it a NIC's.
            cmd += [
                "-netdev",
                f"{nic.netdev},id=n{i}",
                "-device",
                f"virtio-net-pci,netdev=n{i},mac={nic.mac},speed=10000,duplex=full",
            ]
        return cmd

    def boot(self, parts: Sequence[str], expect: dict[str, Any], *, timeout: int = 900) -> Result:
        """Boot; in the guest, run the probe parts (tests/guest_<part>.py) with `expect`;
        return what they recorded. `result[part]` is each part's result."""
        probe = self.probe_dir
        for part in parts:
            shutil.copy(TESTS / f"guest_{part}.py", probe / f"guest_{part}.py")
        (probe / "expect.json").write_text(json.dumps({**expect, "parts": list(parts)}))
        for stale in ("result.json", "started", "progress.json"):
            (probe / stale).unlink(missing_ok=True)
        accelerator = self.accelerator or accel(self.kernel, self.initrd)[0]
        for attempt in (1, 2):
            returncode, console_text, seconds, first = self._run(accelerator, timeout)
            early = not (probe / "started").exists() and (
                EARLY_PANIC.search(console_text) or GENERATORS_FROZE.search(console_text)
            )
            if not (early and attempt == 1):
                break
            shutil.copy(probe / "console.log", probe / "console-panic.log")
        result_file = probe / "result.json"
        if not result_file.exists():
            raise AssertionError(
                f"the guest probe wrote no result (qemu exit {returncode}, "
                f"{seconds:.0f}s, {accelerator}); {progress_note(probe)}; console:\n"
                f"{console_text[-8000:]}"
            )
        return Result(
            probe_result.Reading(json.loads(result_file.read_text()), f"{self.firmware} boot"),
            console_text,
            seconds,
            first[0] if first else None,
            accelerator,
        )

    def _run(self, accelerator: str, timeout: int) -> tuple[int, str, float, list[float]]:
        probe = self.probe_dir
        with contextlib.ExitStack() as stack:
            tpm_socket = stack.enter_context(swtpm(self.tpm_state, self.work)) if self.tpm else None
            cmd = self.command(accelerator, tpm_socket)
            if self.netns:
                cmd = ["ip", "netns", "exec", self.netns, *cmd]
            started = time.monotonic()
            first: list[float] = []
            watcher = threading.Thread(
                target=_watch_for, args=(probe / "started", started, first), daemon=True
            )
            watcher.start()
            returncode, console_text = nspawn.run_logged(
                cmd, probe / "console.log", timeout, stop_on=GENERATORS_FROZE
            )
            seconds = time.monotonic() - started
        return returncode, console_text, seconds, first


def _watch_for(path: Path, started: float, out: list[float], limit: float = 1800) -> None:
    while time.monotonic() - started < limit:
        if path.exists():
            out.append(time.monotonic() - started)
            return
        time.sleep(0.05)


@contextlib.contextmanager
def swtpm(state: Path, work: Path) -> Iterator[Path]:
    """A TPM 2.0 for one boot, on a unix socket; its state stays in `state`."""
    state.mkdir(exist_ok=True)
    sock = work / "swtpm.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--ctrl",
            f"type=unixio,path={sock}",
            "--log",
            f"file={work / 'swtpm.log'},level=1",
            "--terminate",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (work / "swtpm.log").read_text(errors="replace")
                raise RuntimeError(f"swtpm did not start (exit {proc.poll()}): {log[-2000:]}")
            time.sleep(0.02)
        yield sock
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def progress_note(probe: Path) -> str:
    """Where a boot without a result spent its time, from the probe's progress.json
    (tests/guest_probe.py): the first command's uptime, each ended part's seconds, and
    the part still running with the uptime it began at."""
    try:
        progress = json.loads((probe / "progress.json").read_text())
    except FileNotFoundError:
        return "the probe never started (no progress.json)"
    except ValueError as e:
        return f"progress.json unreadable ({e})"
    ended = ", ".join(f"{part} {secs}s" for part, secs in progress.get("ended", {}).items())
    running = progress.get("running")
    now = (
        f"running: {running['part']} since uptime {running['since_uptime']:.0f}s"
        if running
        else "every part ended"
    )
    return (
        f"probe began at uptime {progress.get('uptime_at_start', 0):.0f}s; "
        f"ended: {ended or 'none'}; {now}"
    )


def sign_efi(binary: Path, out: Path) -> None:
    """Sign an EFI binary (the kernel's EFI stub) with the snakeoil key."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "snakeoil.key"
        nspawn.run(
            [
                "openssl",
                "pkey",
                "-in",
                str(SNAKEOIL_KEY),
                "-passin",
                f"pass:{SNAKEOIL_PASSPHRASE}",
                "-out",
                str(key),
            ],
            capture_output=True,
        )
        nspawn.run(
            [
                "sbsign",
                "--key",
                str(key),
                "--cert",
                str(SNAKEOIL_CERT),
                "--output",
                str(out),
                str(binary),
            ],
            capture_output=True,
        )


def build(
    work: Path, customize: Callable[[Path], None], *, size: str = "3G", zfs: bool = False
) -> Guest:
    """A guest in `work`: its disk image is the cached guest root (with OpenZFS if
    `zfs`) + this checkout installed + the probe unit + `customize(root)`."""
    root = guest_root(zfs=zfs)
    package = work / "package"
    if not (package / "upper").exists():
        nspawn.install_layer(root, package)
    probe_dir = work / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    image = work / "disk.raw"
    with nspawn.overlay([package / "upper", root], work / "image") as merged:
        nspawn.install_probe(merged, PROBE_UNIT, probe_dir, (TESTS / "guest_probe.py").read_text())
        services_off(merged)
        slow_machine(merged)
        customize(merged)
        kernel, initrd = _boot_files(merged)
        shutil.copy(kernel, work / "vmlinuz")
        shutil.copy(initrd, work / "initrd.img")
        image.unlink(missing_ok=True)
        nspawn.run(
            ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(merged), str(image), size],
            capture_output=True,
        )
    shutil.rmtree(work / "image", ignore_errors=True)
    return Guest(work, image, work / "vmlinuz", work / "initrd.img")


# The storage services' units Debian's packages enable, which the appliance starts only
# when its document enables the service (services/, when the API service starts; the
# image's preset, mkosi/, disables them). Left enabled, with nothing configured, they held
# up boot under TCG: iscsid.service and nvmf-autoconnect.service still starting after
# 7 minutes (seen in the shared VM machine's console).
SERVICE_UNITS_OFF = (
    "iscsid.service",
    "iscsid.socket",
    "open-iscsi.service",
    "nvmf-autoconnect.service",
    "nvmefc-boot-connections.service",
    "rtslib-fb-targetctl.service",  # the iSCSI target's (the probe sets one up itself)
)


# Under TCG, on a loaded machine, one daemon-reload alone took over 25 s (the VM rung's
# kernel and rollback checks failed on it): the API's apply gets minutes here, as it
# never needs on hardware (IncusOS's 30 s for a network change).
TCG_APPLY_DROP_IN = """[Service]
Environment=INCUSOS_HAL_APPLY_TIME_LIMIT=600,0.1
"""


def slow_machine(root: Path) -> None:
    """The API unit's apply time limit for an emulated machine (see TCG_APPLY_DROP_IN)."""
    drop_in = root / "etc/systemd/system/incusos-hal.service.d/50-tcg.conf"
    drop_in.parent.mkdir(parents=True, exist_ok=True)
    drop_in.write_text(TCG_APPLY_DROP_IN)


def services_off(root: Path) -> None:
    """As `systemctl disable` would: the units' links in /etc removed.

    The links are absolute (/usr/lib/systemd/system/...) and so dangle seen from the
    host: they are found by name, never by following them (Path.glob on Python 3.11
    skipped every link whose target the host lacks, and the units stayed enabled)."""
    wants_dirs = [d for d in (root / "etc/systemd/system").iterdir() if d.is_dir()]
    for unit in SERVICE_UNITS_OFF:
        for wants in wants_dirs:
            link = wants / unit
            if link.is_symlink():
                link.unlink()


def no_network(root: Path) -> None:
    """A guest with no NIC (ci/vm run's) has no network to wait for: without this,
    systemd-networkd-wait-online holds multi-user.target, and the probe, with no end
    (seen: over 6 minutes, "no limit")."""
    unit = root / "etc/systemd/system/systemd-networkd-wait-online.service"
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.unlink(missing_ok=True)
    unit.symlink_to("/dev/null")


def main(argv: list[str] | None = None) -> int:
    """ci/vm: boot a guest with the devices asked for, run a command in it, print what it
    printed, exit with its status."""
    parser = argparse.ArgumentParser(prog="ci/vm", description=main.__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="build (or find cached) the guest root; print its path")
    b.add_argument("--zfs", action="store_true", help="the flavor with OpenZFS (DKMS)")
    run = sub.add_parser("run", help="boot a guest, run COMMAND in it (cwd /probe)")
    run.add_argument("--firmware", choices=FIRMWARES, default="bios")
    run.add_argument("--tpm", action="store_true", help="a TPM 2.0 from swtpm")
    run.add_argument("--nvme", action="store_true", help="two NVMe controllers")
    run.add_argument("--multipath", action="store_true", help="a disk with two paths")
    run.add_argument("--zfs", action="store_true", help="the root flavor with OpenZFS built")
    run.add_argument(
        "--disk",
        action="append",
        default=[],
        type=Disk.parse,
        help="a blank disk BUS:SERIAL:MIB (bus scsi, virtio or sata); repeatable",
    )
    run.add_argument("--memory", type=int, default=2048, help="guest memory in MiB")
    run.add_argument("--file", action="append", default=[], help="copy into /probe")
    run.add_argument("--work", type=Path, help="keep the guest here (boot it again later)")
    run.add_argument("--timeout", type=int, default=900)
    run.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.verb == "build":
        print(guest_root(zfs=args.zfs))
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("run: give a COMMAND (after --)")
    work = args.work or Path(tempfile.mkdtemp(prefix="ihal-vm-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    guest = (
        build(work, no_network, size="4G" if args.zfs else "3G", zfs=args.zfs)
        if not (work / "disk.raw").exists()
        else Guest(work, work / "disk.raw", work / "vmlinuz", work / "initrd.img")
    )
    guest.firmware, guest.tpm = args.firmware, args.tpm
    if args.nvme:
        guest.nvme = DEFAULT_NVME
    if args.multipath:
        guest.multipath = DEFAULT_MULTIPATH
    guest.disks, guest.memory_mb = args.disk, args.memory
    for name in args.file:
        shutil.copy(name, guest.probe_dir / Path(name).name)
    try:
        result = guest.boot(
            ["command"],
            {"command": {"argv": command, "timeout": args.timeout}},
            timeout=args.timeout + 300,
        )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    ran = result.result.raw("command")
    if probe_result.is_failure(ran):
        sys.stderr.write(probe_result.describe(ran) + "\n")
        ran = {"rc": 1}
    sys.stdout.write(ran.get("out", ""))
    sys.stderr.write(ran.get("err", ""))
    print(
        f"ci/vm: {result.accel}, first command at {result.first_command or 0:.1f}s, "
        f"power-off at {result.seconds:.1f}s",
        file=sys.stderr,
    )
    return int(ran.get("rc", 1))


DEFAULT_NVME = [
    NvmeController("IHALNVME0001", (256, 64)),
    NvmeController("IHALNVME0002", (256,)),
]
DEFAULT_MULTIPATH = MultipathDisk("IHALMPATH01", 0x5000C50015EA71AC)

if __name__ == "__main__":
    raise SystemExit(main())
