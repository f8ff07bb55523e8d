"""Boot a real Debian root with systemd-nspawn, with this project installed in it.

- `rootfs()` debootstraps Debian 13 (12 if the mirror has no 13) once and caches it under
  $INCUSOS_HAL_CACHE/rootfs, keyed by everything that goes into it; an interrupted build
  never leaves a usable-looking cache behind.
- `install_layer()` installs the checkout into an overlay on top of it with the root's own
  meson (`meson setup --prefix=/usr && meson install`), as a distribution would.
- `Lan` is the machine's network: a namespace holding the far ends of veth pairs handed
  to the container, with addresses, a DHCP/RA server (dnsmasq) and a syslog listener.
- `boot()` boots the root to multi-user; a probe unit inside collects what the tests assert
  on into /probe/result.json and powers the container off. A hung boot is killed after a
  timeout, and the console log is kept for the failure message.

Needs root, systemd-nspawn, debootstrap, overlayfs, iproute2 and dnsmasq (ci/setup).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import probe_result
from guest_lib import failed

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("INCUSOS_HAL_CACHE") or "/var/cache/incusos-hal")
MIRROR = os.environ.get("INCUSOS_HAL_MIRROR") or "http://deb.debian.org/debian"
SUITES = ("trixie", "bookworm")
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "iproute2",
    "iputils-ping",
    "python3",
    "systemd-resolved",
    "systemd-timesyncd",
    "systemd-netlogd",
    "python3-pyroute2",
    "python3-tomli-w",
    "meson",
    "ninja-build",
    "pkgconf",
    "systemd-dev",
    "tzdata",
)
# The API service's container adds its runtime (a root of its own, so the system test's
# and the VM's cached roots stay as they are).
API_PACKAGES = (
    *PACKAGES,
    "python3-aiohttp",
    "python3-sdbus",
    "python3-cryptography",
    # debootstrap resolves no virtual packages: cryptography's python3-cffi-backend-api-*
    "python3-cffi-backend",
)
# Applications as system extensions and A/B updates (tests/test_apps_system.py,
# tests/test_sysupdate.py): systemd-sysupdate (in systemd-container), an erofs maker for
# the test's sysext images, systemd-repart and sfdisk for the A/B disk.
APPS_PACKAGES = (*API_PACKAGES, "systemd-container", "erofs-utils", "systemd-repart", "fdisk")
# Bump when the way the root is built changes, so caches from before are not reused.
ROOTFS_RECIPE = 2


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)


def _log(message: str) -> None:
    print(f"[nspawn] {message}", file=sys.stderr, flush=True)


def rootfs(
    flavor: str = "container", packages: tuple[str, ...] = PACKAGES, setup: str = ""
) -> Path:
    """The cached Debian root of this flavor (its package set), built on first use.
    `setup` is a shell script run in it afterwards, with the host's network (for what
    debootstrap cannot do: other components, building modules); it is part of the key."""
    base = CACHE / "rootfs"
    base.mkdir(parents=True, exist_ok=True)

    def cached(suite: str) -> Path:
        key = hashlib.sha256(
            json.dumps(
                [ROOTFS_RECIPE, suite, MIRROR, packages, *([setup] if setup else [])]
            ).encode()
        ).hexdigest()[:12]
        return base / f"{flavor}-{suite}-{key}"

    # A built root is used without waiting; a build holds its flavor's lock only, so a
    # long one (the ZFS flavor compiles a module) never holds up the other flavors.
    for suite in SUITES:
        if (cached(suite) / ".complete").exists():
            return cached(suite)
    with open(base / f".{flavor}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for suite in SUITES:
            dest = cached(suite)
            if (dest / ".complete").exists():
                return dest
            tmp = base / f".{dest.name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            _log(f"debootstrapping Debian {suite} into {dest} (cached for later runs)")
            started = time.monotonic()
            proc = subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(packages)}",
                    suite,
                    str(tmp),
                    MIRROR,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                _log(
                    f"debootstrap {suite} failed ({proc.returncode}): "
                    f"{(proc.stdout + proc.stderr)[-2000:]}"
                )
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            # A machine-id is made at first boot of each container, as on real hardware.
            (tmp / "etc/machine-id").write_text("uninitialized\n")
            if setup:
                _log(f"setting up {dest.name}")
                # nspawn copies the host's resolv.conf over the root's (resolved's stub
                # link) for the downloads; the link is put back for the booted system.
                resolv = tmp / "etc/resolv.conf"
                link = os.readlink(resolv) if resolv.is_symlink() else None
                try:
                    nspawn_run(tmp, setup, network=True, timeout=3600)
                except (RuntimeError, subprocess.TimeoutExpired):
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
                if link is not None:
                    resolv.unlink(missing_ok=True)
                    resolv.symlink_to(link)
            (tmp / ".complete").write_text(f"{suite} {time.monotonic() - started:.0f}s\n")
            tmp.rename(dest)
            for old in base.glob(f"{flavor}-{suite}-*"):
                if old != dest:
                    shutil.rmtree(old, ignore_errors=True)
            return dest
    raise RuntimeError(f"debootstrap failed for every suite of {SUITES} from {MIRROR}")


@contextlib.contextmanager
def overlay(lowers: list[Path], work: Path) -> Iterator[Path]:
    """`lowers` (first on top) overlaid with a writable upper dir in `work`."""
    for d in ("upper", "work", "merged"):
        (work / d).mkdir(parents=True, exist_ok=True)
    merged = work / "merged"
    options = (
        f"lowerdir={':'.join(map(str, lowers))},upperdir={work / 'upper'},workdir={work / 'work'}"
    )
    run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])
    try:
        yield merged
    finally:
        subprocess.run(["umount", "-l", str(merged)], check=False)


def nspawn_run(
    root: Path,
    script: str,
    *,
    binds: tuple[str, ...] = (),
    network: bool = False,
    timeout: float = 600,
) -> str:
    """Run a shell script in `root` (no boot; the host's network only if `network`);
    return its output."""
    cmd = [
        "systemd-nspawn",
        "-q",
        "--register=no",
        "--keep-unit",
        *([] if network else ["--private-network"]),
        "--timezone=off",
        f"--resolv-conf={'replace-host' if network else 'off'}",
        # A name of its own: nspawn names a machine after its directory ("merged" for
        # every overlay) and keys /run/systemd/nspawn/propagate/ on it, so two runs side by
        # side (ci/test's second phase) would share that directory.
        f"--machine=ihal-run-{secrets.token_hex(4)}",
        "-D",
        str(root),
    ]
    cmd += [f"--bind-ro={b}" for b in binds]
    proc = subprocess.run(
        [*cmd, "/bin/sh", "-ec", script],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"in {root}: {script!r} failed ({proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def install_layer(root: Path, work: Path) -> Path:
    """An overlay upper dir holding this checkout, installed by the root's own meson."""
    with overlay([root], work) as merged:
        nspawn_run(
            merged,
            "meson setup --prefix=/usr /var/tmp/ihal-build /src >/dev/null\n"
            "meson install -C /var/tmp/ihal-build >/dev/null\n"
            "rm -rf /var/tmp/ihal-build",
            binds=(f"{REPO}:/src",),
        )
    return work / "upper"


@dataclass
class Veth:
    inside: str
    outside: str
    mac: str
    addresses: tuple[str, ...]


# What the LAN's "switch" announces over LLDP (Lan.lldp_on), as networkd will show it.
LLDP_SWITCH = {
    "name": "ihal-switch",
    "chassis_id": "02:00:00:99:00:01",
    "port_id": "swp7",
    "port": "uplink to ihal-node",
}
# One LLDPDU (IEEE 802.1AB): chassis ID (a MAC), port ID (an interface name), TTL, port
# description, system name, end; sent from a raw socket, as a switch port would.
_LLDP_SENDER = f"""
import socket, struct, sys, time
def tlv(kind, value):
    return struct.pack("!H", kind << 9 | len(value)) + value
mac = bytes.fromhex({LLDP_SWITCH["chassis_id"]!r}.replace(":", ""))
body = (tlv(1, b"\\x04" + mac) + tlv(2, b"\\x05" + {LLDP_SWITCH["port_id"]!r}.encode())
        + tlv(3, struct.pack("!H", 120)) + tlv(4, {LLDP_SWITCH["port"]!r}.encode())
        + tlv(5, {LLDP_SWITCH["name"]!r}.encode()) + tlv(0, b""))
frame = bytes.fromhex("0180c200000e") + mac + b"\\x88\\xcc" + body
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
while True:
    s.send(frame)
    time.sleep(1)
"""


@dataclass
class Lan:
    """The far side of the container's NICs, in a network namespace of its own."""

    veths: list[Veth]
    dhcp_on: str = ""
    # "veth": pairs whose inside ends go to a container; "tap": tap devices (named by
    # `outside`) that a qemu running in the namespace attaches its NICs to.
    kind: str = "veth"
    syslog_port: int = 0
    # A switch's LLDP announcements on this outside end, every second (LLDP_SWITCH).
    lldp_on: str = ""
    name: str = field(default_factory=lambda: f"ihal-{secrets.token_hex(3)}")
    work: Path = Path("/tmp")
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ip(self, *args: str) -> None:
        run(["ip", "-n", self.name, *args])

    def up(self) -> None:
        run(["ip", "netns", "add", self.name])
        self.ip("link", "set", "lo", "up")
        for v in self.veths:
            if self.kind == "tap":
                self.ip("tuntap", "add", "dev", v.outside, "mode", "tap")
            else:
                self.ip(
                    "link",
                    "add",
                    v.inside,
                    "address",
                    v.mac,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    v.outside,
                )
            for a in v.addresses:
                self.ip("addr", "add", a, "dev", v.outside, *(["nodad"] if ":" in a else []))
            self.ip("link", "set", v.outside, "up")
        if self.dhcp_on:
            v = next(v for v in self.veths if v.outside == self.dhcp_on)
            v4 = next(a for a in v.addresses if ":" not in a).split("/")[0]
            net = v4.rsplit(".", 1)[0]
            v6 = next(a for a in v.addresses if ":" in a).split("/")[0]
            prefix6 = v6.rsplit("::", 1)[0] + "::"
            self._spawn(
                [
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    f"--interface={v.outside}",
                    "--bind-interfaces",
                    "--port=0",
                    f"--dhcp-range={net}.100,{net}.150,255.255.255.0,1h",
                    f"--dhcp-range={prefix6},ra-only,64",
                    "--enable-ra",
                    f"--dhcp-leasefile={self.work / 'leases'}",
                    f"--pid-file={self.work / 'dnsmasq.pid'}",
                    "--log-facility=-",
                ],
                self.work / "dnsmasq.log",
            )
        if self.syslog_port:
            v4 = next(a for a in self.veths[0].addresses if ":" not in a).split("/")[0]
            listener = (
                "import socket,sys\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                f"s.bind(({v4!r},{self.syslog_port}))\n"
                "out=open(sys.argv[1],'ab',buffering=0)\n"
                "while True:\n"
                "    out.write(s.recv(65536)+b'\\n')\n"
            )
            self._spawn(
                [sys.executable, "-c", listener, str(self.work / "syslog.txt")],
                self.work / "syslog.log",
            )

        if self.lldp_on:
            self._spawn([sys.executable, "-c", _LLDP_SENDER, self.lldp_on], self.work / "lldp.log")

    def _spawn(self, cmd: list[str], log: Path) -> None:
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            self._procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", self.name, *cmd],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )

    def syslog(self) -> str:
        path = self.work / "syslog.txt"
        return path.read_text(errors="replace") if path.exists() else ""

    def down(self) -> None:
        for p in self._procs:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                p.kill()
        self._procs.clear()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


@contextlib.contextmanager
def lan(lan: Lan) -> Iterator[Lan]:
    lan.work.mkdir(parents=True, exist_ok=True)
    lan.up()
    try:
        yield lan
    finally:
        lan.down()


PROBE_UNIT = """[Unit]
Description=Test probe: record the booted state, then power off
After=multi-user.target network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /probe/probe.py
# Unless the probe had the API power the machine off (and it accepted).
ExecStopPost=/bin/sh -c 'test -e /probe/poweroff-accepted || systemctl poweroff --no-block'
StandardOutput=journal+console
"""


@dataclass
class Boot:
    # Read through probe_result: a step that failed in the container raises with the
    # container's own account when read.
    result: probe_result.Reading
    console: str


def run_logged(
    cmd: list[str],
    console_path: Path,
    timeout: float,
    *,
    env: dict[str, str] | None = None,
    stop_on: re.Pattern[str] | None = None,
) -> tuple[int, str]:
    """Run a machine (nspawn, qemu) with its console in `console_path`; kill its whole
    session after `timeout`, or as soon as its console matches `stop_on` (a machine that
    can no longer get anywhere). Returns its exit status and the console text."""
    deadline = time.monotonic() + timeout
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(
            cmd,
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        while True:
            try:
                proc.wait(min(5.0, max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                stuck = stop_on is not None and stop_on.search(
                    console_path.read_text(errors="replace")
                )
                if stuck or time.monotonic() >= deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    break
    return proc.returncode, console_path.read_text(errors="replace")


def install_probe(root: Path, unit: str, probe_dir: Path, probe: str) -> None:
    """Enable the probe unit in `root`; put the probe and its helpers in `probe_dir`."""
    units = root / "etc/systemd/system"
    (units / "ihal-probe.service").write_text(unit)
    wants = units / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "ihal-probe.service"
    if not link.is_symlink():
        link.symlink_to("/etc/systemd/system/ihal-probe.service")
    probe_dir.mkdir(parents=True, exist_ok=True)
    (probe_dir / "probe.py").write_text(probe)
    shutil.copy(Path(__file__).parent / "guest_lib.py", probe_dir / "guest_lib.py")


def boot(
    root: Path,
    lan_: Lan,
    probe_dir: Path,
    expect: dict[str, Any],
    *,
    timeout: int = 240,
    more: dict[str, Any] | None = None,
    poweroff_by_api: bool = False,
) -> Boot:
    """Boot `root` with the LAN's inner veth ends as its NICs; the probe part "system"
    (tests/guest_system.py) runs with `expect`, then the parts named in `more` (part ->
    its expect); return what "system" recorded, with each further part's result under
    its name."""
    tests = Path(__file__).parent
    install_probe(root, PROBE_UNIT, probe_dir, (tests / "guest_probe.py").read_text())
    parts = ["system", *(more or {})]
    for part in parts:
        shutil.copy(tests / f"guest_{part}.py", probe_dir / f"guest_{part}.py")
    extra = {"poweroff_by_api": True} if poweroff_by_api else {}
    (probe_dir / "expect.json").write_text(
        json.dumps({"system": expect, **(more or {}), "parts": parts, **extra})
    )
    for marker in ("poweroff-by-api", "poweroff-accepted"):
        (probe_dir / marker).unlink(missing_ok=True)
    result_file = probe_dir / "result.json"
    result_file.unlink(missing_ok=True)
    nspawn = [
        "systemd-nspawn",
        "-q",
        "--register=no",
        "--keep-unit",
        "--boot",
        "--timezone=off",
        "--resolv-conf=off",
        f"--machine=ihal-{secrets.token_hex(3)}",
        "-D",
        str(root),
        f"--bind={probe_dir}:/probe",
    ]
    nspawn += [f"--network-interface={v.inside}" for v in lan_.veths]
    # nspawn only hands over interfaces udev has initialised, unless /sys is read-only
    # (its sign that no udev runs, as in a container). No udevd runs on this host, so
    # /sys is remounted read-only in a mount namespace of nspawn's own, and the cgroup2
    # hierarchy (hidden by the sysfs `ip netns exec` mounts) is mounted back on it.
    script = 'mount -o remount,ro /sys && mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@"'
    cmd = [
        "ip",
        "netns",
        "exec",
        lan_.name,
        "unshare",
        "-m",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        script,
        "sh",
        *nspawn,
    ]
    env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
    returncode, console_text = run_logged(cmd, probe_dir / "console.log", timeout, env=env)
    if not result_file.exists():
        raise AssertionError(
            f"the probe wrote no result (nspawn exit {returncode});"
            f" console:\n{console_text[-6000:]}"
        )
    recorded = json.loads(result_file.read_text())
    system = recorded["system"]
    if probe_result.is_failure(system):
        raise probe_result.GuestStepFailed(
            f"the container's probe part system failed: {probe_result.describe(system)}"
        )
    for part in parts[1:]:
        system[part] = recorded.get(part, failed(f"probe part {part}", note="it never ran"))
    system["machine_exit"] = returncode  # -9: killed at the timeout, it never went down
    if poweroff_by_api:
        marker = probe_dir / "poweroff-by-api"
        system["poweroff_by_api"] = json.loads(marker.read_text()) if marker.exists() else None
    return Boot(probe_result.Reading(system, "container"), console_text)
