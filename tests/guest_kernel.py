"""Probe part, in a booted container or VM guest (stdlib only): the kernel section under
real systemd and a real kernel, through the API's unix socket.

  1. PUT /1.0/system/kernel with network sysctls, huge pages, zram swap (when
     expect["zram"]) and a vfio-pci passthrough of one of this machine's PCI devices
     (when expect["passthrough"]: not in the VM, whose next boot would hand the device
     to vfio-pci);
  2. what systemd reads: the rendered files, `systemd-analyze cat-config` of each, the
     sysctls' values in /proc/sys (or why they are not there), zram0's size, algorithm
     and swap (GET's state too);
  3. a second PUT (another zram size, another congestion algorithm): the running swap
     and sysctl follow;
  4. the configure step restarted, then systemd-sysctl: the files and the values stay;
  5. in the VM, no size (the swap off, the device reset), then a size again;
     in the container, a PUT asking for zram swap, which it cannot have;
  6. in the VM (expect["bond"]): GET /1.0/system/network's bond, with its members'
     `lacp` read from the bonding driver, beside /proc/net/bonding, and their `lldp`:
     the switch's lldpd (named expect["lldp_name"]), as networkd heard it.

expect["kernel"]: {"algorithms": [two TCP congestion algorithms], "zram": ["96MiB",
"128MiB"] or [], "zram_bytes": [their bytes],
"passthrough": bool, "bond": "" or the bond's configured name, "zram_refused": "" or a
size to ask for on a machine that has no zram (the container)}.
"""

import hashlib
import http.client
import json
import os
import socket
import time
from pathlib import Path

from guest_lib import journal, sh

SOCKET = "/run/incusos-hal/unix.socket"
FILES = {
    "sysctl": "/etc/sysctl.d/99-local-sysctl.conf",
    "passthrough": "/etc/modprobe.d/99-local-device-passthrough.conf",
    "modules_load": "/etc/modules-load.d/99-local-device-passthrough.conf",
    "zram": "/etc/systemd/zram-generator.conf",
}
# What `systemd-analyze cat-config` is asked for each file (its path under a conf dir).
CAT_CONFIG = {
    "sysctl": "sysctl.d",
    "passthrough": "modprobe.d",
    "modules_load": "modules-load.d",
    "zram": "systemd/zram-generator.conf",
}


class Unix(http.client.HTTPConnection):
    def __init__(self) -> None:
        super().__init__("ihal", timeout=180)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(SOCKET)


def call(method: str, path: str, body: object = None) -> dict:
    conn = Unix()
    data = None if body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = {"status": resp.status, "body": json.loads(resp.read() or b"null")}
    conn.close()
    return out


def wait_for(check, seconds: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return round(time.monotonic() - start, 2)
        time.sleep(0.25)
    return None


def files() -> dict:
    out = {}
    for name, path in FILES.items():
        p = Path(path)
        out[name] = p.read_text() if p.exists() else None
    return out


def sysctl_values(sysctl_file: str | None) -> dict:
    """Each key the rendered file sets -> what /proc/sys holds now (whitespace as
    sysctl.d compares it), or why it cannot be read."""
    out = {}
    for line in (sysctl_file or "").splitlines():
        if not line or line.startswith("#"):
            continue
        key = line.split("=", 1)[0].strip()
        path = Path("/proc/sys") / key.replace(".", "/")
        try:
            out[key] = " ".join(path.read_text().split())
        except OSError as e:
            out[key] = f"error: {e.strerror}"
    return out


def zram() -> dict:
    block = Path("/sys/block/zram0")
    out: dict = {"exists": block.exists(), "swaps": Path("/proc/swaps").read_text()}
    if block.exists():
        for name in ("disksize", "comp_algorithm"):
            try:
                out[name] = (block / name).read_text().strip()
            except OSError as e:
                out[name] = f"error: {e.strerror}"
    out["units"] = sh(
        "systemctl", "show", "-p", "Id", "-p", "ActiveState", "-p", "Result",
        "systemd-zram-setup@zram0.service", "dev-zram0.swap",
    )["out"]  # fmt: skip
    return out


def pci_device() -> dict | None:
    """One of this machine's PCI functions with its IDs, as the PUT names it."""
    for dev in sorted(Path("/sys/bus/pci/devices").glob("*")):
        try:
            vendor = (dev / "vendor").read_text().strip().removeprefix("0x")
            product = (dev / "device").read_text().strip().removeprefix("0x")
        except OSError:
            continue
        return {"vendor_id": vendor, "product_id": product, "pci_address": dev.name}
    return None


def seen() -> dict:
    """Everything systemd and the kernel say about the section's files now."""
    text = files()
    return {
        "files": text,
        "hashes": {
            k: hashlib.sha256(v.encode()).hexdigest() if v is not None else None
            for k, v in text.items()
        },
        "cat_config": {
            k: sh("systemd-analyze", "cat-config", "--no-pager", CAT_CONFIG[k])
            for k, v in text.items()
            if v is not None
        },
        "sysctl": sysctl_values(text["sysctl"]),
        "zram": zram(),
        "get": call("GET", "/1.0/system/kernel"),
    }


def config(spec: dict, step: int, device: dict | None) -> dict:
    doc: dict = {
        "network": {
            "buffer_size": 8388608 if step == 0 else 4194304,
            "netdev_max_backlog": 2000,
            "queuing_discipline": "fq",
            "tcp_congestion_algorithm": spec["algorithms"][step],
            "tcp_mtu_probing": True,
        },
        "memory": {"persistent_hugepages": 0, "zram_swap_size": ""},
    }
    if spec["zram"]:
        doc["memory"]["zram_swap_size"] = spec["zram"][step]
    if device is not None:
        doc["pci"] = {"passthrough": [device]}
    return doc


def run(expect_all: dict) -> dict:
    spec = expect_all["kernel"]
    out: dict = {}
    out["socket_start"] = sh("systemctl", "start", "incusos-hal.socket")
    out["before"] = {"zram": zram(), "get": call("GET", "/1.0/system/kernel")}
    if spec["zram"] and out["before"]["zram"]["exists"]:
        # Debian's zram-generator ships an /etc/systemd/zram-generator.conf of its own
        # (zram0, half the RAM), which its generator read at this boot before the
        # configure step took the file over: that device goes, so the PUT starts a
        # swap from nothing.
        out["stop_default"] = sh(
            "systemctl", "stop", "dev-zram0.swap", "systemd-zram-setup@zram0.service"
        )
    device = pci_device() if spec["passthrough"] else None
    out["device"] = device
    put = call("PUT", "/1.0/system/kernel", {"config": config(spec, 0, device)})
    out["put"] = put
    if put["status"] != 200:
        out["journal"] = journal("-u", "incusos-hal.service")[-4000:]
        return out
    if spec["zram"]:
        out["swap_after_s"] = wait_for(lambda: "/dev/zram0" in Path("/proc/swaps").read_text(), 60)
    out["first"] = seen()

    put = call("PUT", "/1.0/system/kernel", {"config": config(spec, 1, device)})
    out["put_again"] = put
    if spec["zram"]:
        size = spec["zram_bytes"][1]
        out["resized_after_s"] = wait_for(
            lambda: (
                Path("/sys/block/zram0/disksize").exists()
                and Path("/sys/block/zram0/disksize").read_text().strip() == str(size)
                and "/dev/zram0" in Path("/proc/swaps").read_text()
            ),
            60,
        )
    out["second"] = seen()

    out["configure_restart"] = sh("systemctl", "restart", "incusos-hal-configure.service")
    out["after_configure"] = seen()
    out["sysctl_restart"] = sh("systemctl", "restart", "systemd-sysctl.service")
    out["after_sysctl"] = seen()
    out["sysctl_journal"] = journal("-u", "systemd-sysctl.service")[-6000:]
    out["verify"] = sh(
        "systemd-analyze", "verify", "--no-pager", "--man=no",
        "systemd-sysctl.service", "systemd-modules-load.service",
        # The swap unit is the generator's (systemd-analyze finds units by name only on
        # the unit path, which has no generator directory): checked by its file.
        *(["systemd-zram-setup@zram0.service", "/run/systemd/generator/dev-zram0.swap"]
          if spec["zram"] else []),
    )  # fmt: skip
    if spec["zram"]:
        # No size: the swap goes off and the device is reset; then the size once more,
        # from a reset device.
        doc = config(spec, 1, device)
        doc["memory"]["zram_swap_size"] = ""
        out["put_no_zram"] = call("PUT", "/1.0/system/kernel", {"config": doc})
        out["swap_off_after_s"] = wait_for(
            lambda: "/dev/zram0" not in Path("/proc/swaps").read_text(), 60
        )
        out["no_zram"] = seen()
        out["no_zram_journal"] = journal("-u", "systemd-zram-setup@zram0.service")[-3000:]
        # Who holds the device, when it could not be reset (EBUSY).
        out["no_zram_holders"] = sorted(
            f"{fd.parent.parent.name}:{(fd.parent.parent / 'comm').read_text().strip()}"
            for fd in Path("/proc").glob("[0-9]*/fd/*")
            if _points_to(fd, "/dev/zram0")
        )
        out["put_zram_again"] = call(
            "PUT", "/1.0/system/kernel", {"config": config(spec, 1, device)}
        )
        out["swap_again_after_s"] = wait_for(
            lambda: "/dev/zram0" in Path("/proc/swaps").read_text(), 60
        )
        out["zram_again"] = zram()
        out["zram_journal"] = journal("-u", "systemd-zram-setup@zram0.service")[-3000:]
    if spec.get("zram_refused"):
        # A machine without zram (a container: no /dev/zram0, sysfs read-only): the PUT
        # that asks for it, and every file as it was.
        before = seen()
        doc = config(spec, 1, device)
        doc["memory"]["zram_swap_size"] = spec["zram_refused"]
        out["zram_put"] = call("PUT", "/1.0/system/kernel", {"config": doc})
        out["zram_after"] = seen()
        out["zram_unchanged"] = out["zram_after"]["hashes"] == before["hashes"]
        out["zram_stored"] = call("GET", "/1.0/system/kernel")
    if spec.get("bond"):
        # The switch's lldpd (tests/guest_network.py) announces itself on both members.
        out["lldp_after_s"] = wait_for(
            lambda: sh("networkctl", "lldp", "--json=short")["out"].count(spec["lldp_name"]) >= 2,
            60,
        )
        out["networkctl_lldp"] = sh("networkctl", "lldp", "--json=short")
        got = call("GET", "/1.0/system/network")
        out["network_status"] = got["status"]
        out["network_state"] = (got["body"] or {}).get("metadata", {}).get("state")
        out["bonding"] = {p.name: p.read_text() for p in Path("/proc/net/bonding").glob("*")}
    out["journal"] = journal("-u", "incusos-hal.service")[-4000:]
    return out


def _points_to(link: Path, target: str) -> bool:
    try:
        return os.readlink(link) == target
    except OSError:
        return False
