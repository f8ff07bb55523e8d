"""Probe part, in a booted container (stdlib only): the API service under real systemd.

Runs after the "system" part (the network has settled). Starts incusos-hal.socket; the
first request socket-activates the hardened incusos-hal.service. Then, through the unix
socket:
  1. PUT a network change (a second address on lan0): stored, and networkd applies it
     (the service's D-Bus calls: daemon-reload, networkd Reload);
  2. PUT a change that drops lan0's addresses, with confirmation_timeout, and never
     confirm: the addresses go, then come back when the service rolls back;
  3. a non-root peer is refused by its credentials.

expect["api"]: {"iface": "lan0", "added": "10.99.0.3/24", "kept": "10.99.0.2/24",
"timeout": "6s"}, optionally "idle_seconds" (a wait before the first change, past
dbus-daemon's authentication timeout), and "vlan": a VLAN to add with the first change
({"name", "parent", "id", "addresses"}; the VM guest adds one on its LACP bond).
"""

import http.client
import json
import socket
import subprocess
import time
from pathlib import Path

from guest_lib import addresses, journal, sh

SOCKET = "/run/incusos-hal/unix.socket"
STATE = Path("/var/lib/incusos-hal/config.toml")


class Unix(http.client.HTTPConnection):
    def __init__(self) -> None:
        super().__init__("ihal", timeout=120)

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
    """Seconds until `check()` held, or None."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return round(time.monotonic() - start, 2)
        time.sleep(0.25)
    return None


def run(expect_all: dict) -> dict:
    spec = expect_all["api"]
    iface = spec["iface"]
    out: dict = {}
    out["socket_start"] = sh("systemctl", "start", "incusos-hal.socket")
    got = call("GET", "/1.0/system/network")
    out["get_status"] = got["status"]
    config = got["body"]["metadata"]["config"]
    out["service"] = sh(
        "systemctl", "show", "incusos-hal.service", "-p", "ActiveState", "-p", "TriggeredBy"
    )["out"]
    out["security_exposure"] = sh(
        "systemd-analyze", "security", "--no-pager", "incusos-hal.service"
    )["out"][-400:]

    if spec.get("idle_seconds"):
        # dbus-daemon drops a connection that has not authenticated within 30 s: the
        # service's must have, however long it sat idle before its first change.
        time.sleep(spec["idle_seconds"])

    # 1. a change that networkd applies
    changed = json.loads(json.dumps(config))
    for nic in changed.get("interfaces", []) + changed.get("vlans", []):
        if nic["name"] == iface:
            nic["addresses"] = [*nic.get("addresses", []), spec["added"]]
    vlan = spec.get("vlan")
    if vlan:
        changed.setdefault("vlans", []).append(vlan)
    put = call("PUT", "/1.0/system/network", {"config": changed})
    out["put"] = put
    if put["status"] != 200:  # nothing to wait for: say why, within the boot's time
        out["journal"] = journal("-u", "incusos-hal.service")[-4000:]
        return out
    out["added_after_s"] = wait_for(lambda: spec["added"] in addresses().get(iface, []), 60)
    if vlan:
        out["vlan_after_s"] = wait_for(
            lambda: vlan["addresses"][0] in addresses().get(vlan["name"], []), 60
        )
        out["vlan_link"] = sh("ip", "-d", "-j", "link", "show", vlan["name"])["out"]
    stored_after_put = STATE.read_bytes()

    # 2. a change that cuts the interface off, never confirmed
    cut = json.loads(json.dumps(changed))
    for nic in cut.get("interfaces", []) + cut.get("vlans", []):
        if nic["name"] == iface:
            nic["addresses"] = []
            nic.pop("routes", None)  # a route needs an address of its family on the link
    cut["confirmation_timeout"] = spec["timeout"]
    out["put_cut"] = call("PUT", "/1.0/system/network", {"config": cut})
    if out["put_cut"]["status"] != 200:
        out["journal"] = journal("-u", "incusos-hal.service")[-4000:]
        return out
    out["cut_after_s"] = wait_for(lambda: spec["kept"] not in addresses().get(iface, []), 60)
    out["pending"] = call("GET", "/1.0/system/network")["body"]["metadata"]["state"]
    out["second_put"] = call("PUT", "/1.0/system/network", {"config": changed})["status"]
    out["restored_after_s"] = wait_for(
        lambda: (
            spec["kept"] in addresses().get(iface, [])
            and spec["added"] in addresses().get(iface, [])
        ),
        180,
    )
    out["stored_restored"] = STATE.read_bytes() == stored_after_put
    out["addresses_end"] = addresses().get(iface, [])

    # The journal through the API, with journalctl's filters.
    log = call("GET", "/1.0/debug/log?unit=incusos-hal.service&entries=20")
    out["debug_log"] = {
        "status": log["status"],
        "messages": [e.get("MESSAGE") for e in (log["body"] or {}).get("metadata") or []],
    }

    # 3. peer credentials
    Path(SOCKET).chmod(0o666)
    nobody = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "python3", "-c",
         "import sys; sys.path.insert(0, '/probe'); import guest_api, json; "
         "print(json.dumps(guest_api.call('GET', '/1.0')))"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    Path(SOCKET).chmod(0o600)
    out["nobody"] = nobody.stdout.strip() or nobody.stderr[-500:]
    out["journal"] = journal("-u", "incusos-hal.service")[-4000:]
    return out
