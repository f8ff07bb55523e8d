"""Boot a real Debian 13 guest under qemu, with this project installed, and run checks in it.

This host's kernel has no bonding, VLAN, bridge VLAN filtering, device-mapper, NVMe or
TPM, and loads no modules; a guest with Debian's own kernel has them all.

- `guest_root()`: a Debian 13 root with Debian's kernel, debootstrapped once and cached
  under $INCUSOS_HAL_CACHE/rootfs (nspawn.rootfs, flavor "vm").
- `build()`: an overlay on it with the checkout meson-installed (by the root's own meson,
  through systemd-nspawn), then whatever the test adds; packed into an ext4 disk image
  with `mkfs.ext4 -d` (no loop device or mount needed). The guest boots its own kernel
  and initrd directly (`-kernel`/`-initrd`), root on a virtio disk.
- `Guest.boot()`: qemu with KVM when it really runs guests here, else TCG (software
  emulation, slower, same results); NICs with fixed MACs on qemu socket netdevs (two NICs
  whose netdevs point at each other are a cable); a 9p share mounted at /probe. A probe
  unit runs /probe/probe.py after boot, writes /probe/result.json and powers off. A hung
  guest is killed after the timeout and its console log is kept for the message. The
  same disk can be booted again (state that must survive a reboot).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nspawn

GUEST_PACKAGES = (
    *nspawn.PACKAGES,
    "linux-image-amd64",
    "initramfs-tools",
    "udev",
    "kmod",
)
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 systemd.show_status=auto"

PROBE_UNIT = """[Unit]
Description=Test probe: run /probe/probe.py, then power off
After=multi-user.target network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStartPre=/bin/mkdir -p /probe
ExecStartPre=/bin/mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 probe /probe
ExecStart=/usr/bin/python3 /probe/probe.py
ExecStopPost=/bin/systemctl poweroff --no-block
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=600
"""

_ACCEL: tuple[str, str] | None = None


def guest_root() -> Path:
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


@dataclass
class Result:
    result: dict[str, Any]
    console: str
    seconds: float
    accel: str


@dataclass
class Guest:
    image: Path
    kernel: Path
    initrd: Path
    probe_dir: Path
    nics: list[Nic] = field(default_factory=list)
    memory_mb: int = 2048
    cpus: int = 2

    def command(self, accelerator: str) -> list[str]:
        cmd = [
            "qemu-system-x86_64",
            "-machine",
            "q35",
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
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            KERNEL_CMDLINE,
            "-drive",
            f"file={self.image},if=virtio,format=raw,cache=unsafe",
            "-virtfs",
            f"local,path={self.probe_dir},mount_tag=probe,security_model=none",
            "-nic",
            "none",
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

    def boot(self, expect: dict[str, Any], *, timeout: int = 600) -> Result:
        """Boot, let the probe run with `expect`, return what it recorded."""
        (self.probe_dir / "expect.json").write_text(json.dumps(expect))
        result_file = self.probe_dir / "result.json"
        result_file.unlink(missing_ok=True)
        accelerator, _ = accel(self.kernel, self.initrd)
        started = time.monotonic()
        returncode, console_text = nspawn.run_logged(
            self.command(accelerator), self.probe_dir / "console.log", timeout
        )
        seconds = time.monotonic() - started
        if not result_file.exists():
            raise AssertionError(
                f"the guest probe wrote no result (qemu exit {returncode}, "
                f"{seconds:.0f}s, {accelerator}); console:\n{console_text[-8000:]}"
            )
        return Result(json.loads(result_file.read_text()), console_text, seconds, accelerator)


def build(work: Path, probe: str, customize: Callable[[Path], None], *, size: str = "3G") -> Guest:
    """A disk image: the cached guest root + this checkout installed + the probe (Python
    source run after boot) + `customize(root)`."""
    root = guest_root()
    package = work / "package"
    if not (package / "upper").exists():
        nspawn.install_layer(root, package)
    probe_dir = work / "probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    image = work / "disk.raw"
    with nspawn.overlay([package / "upper", root], work / "image") as merged:
        nspawn.install_probe(merged, PROBE_UNIT, probe_dir, probe)
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
    return Guest(image, work / "vmlinuz", work / "initrd.img", probe_dir)
