"""Probe part, in a booted container (stdlib only): the API service under real systemd.

Runs after the "system" part (the network has settled). Starts incusos-hal.socket; the
first request socket-activates the hardened incusos-hal.service. Then, through the unix
socket:
  1. PUT a network change (a second address on lan0): stored, and networkd applies it
     (the service's D-Bus calls: daemon-reload, networkd Reload);
  2. PUT a change that drops lan0's addresses, with confirmation_timeout, and never
     confirm: the addresses go, then come back when the service rolls back;
  3. `:backup`, a change, then `:restore` of that backup under the unit's own sandbox
     (the state dir a mount point, /var/lib read-only): the operation succeeds, the
     stored document and networkd's addresses are the backup's, the service still
     answers without a restart; a damaged archive is refused and changes no file;
  4. IncusOS's rollback test's last steps (a bad change refused, a confirmed one kept);
  5. tools that mount, started through core/tools.run from a process with the service's
     own sandbox (its installed unit's [Service] lines): with mounts=True the mount is
     the machine's; without it the sandbox cannot mount at all;
  6. a non-root peer is refused by its credentials.

expect["api"]: {"iface": "lan0", "added": "10.99.0.3/24", "kept": "10.99.0.2/24",
"timeout": "6s"}, optionally "lldp_on" (a port networkd hears an LLDP neighbour on: the
state is read once it has),  "idle_seconds" (a wait before the first change, past
dbus-daemon's authentication timeout), "restore_added" (an address added after the
backup, gone once it is restored: runs step 3), and "vlan": a VLAN to add with the first change
({"name", "parent", "id", "addresses"}; the VM guest adds one on its LACP bond).
"""

import hashlib
import http.client
import io
import json
import socket
import subprocess
import tarfile
import time
from pathlib import Path

from guest_lib import addresses, journal, sh

SOCKET = "/run/incusos-hal/unix.socket"
STATE = Path("/var/lib/incusos-hal/config.toml")


# How long a request may take; a probe whose requests run tools on many disks under TCG
# (guest_storage.py) raises it.
TIMEOUT_S = 120.0


class Unix(http.client.HTTPConnection):
    def __init__(self) -> None:
        super().__init__("ihal", timeout=TIMEOUT_S)

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


def call_raw(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    conn = Unix()
    conn.request(method, path, body=body, headers={"Content-Type": "application/gzip"})
    resp = conn.getresponse()
    out = (resp.status, resp.read())
    conn.close()
    return out


def state_files() -> dict:
    """Every file of the state dir: SHA-256 and mode (read as root, from outside the
    service's namespace: the same files)."""
    return {
        str(p.relative_to(STATE.parent)): [
            hashlib.sha256(p.read_bytes()).hexdigest(),
            oct(p.stat().st_mode),
        ]
        for p in sorted(STATE.parent.rglob("*"))
        if p.is_file()
    }


def main_pid() -> str:
    return sh("systemctl", "show", "-P", "MainPID", "incusos-hal.service")["out"].strip()


def backup_and_restore(spec: dict, changed: dict) -> dict:
    iface, extra = spec["iface"], spec["restore_added"]
    out: dict = {}
    pid = main_pid()
    # What the sandbox makes of the state dir, seen from the service's own namespace.
    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    out["state_mount"] = [m for m in mounts if m.split()[4] == str(STATE.parent)]
    out["root_mount"] = [m for m in mounts if m.split()[4] in ("/", "/var", "/var/lib")]
    status, archive = call_raw("POST", "/1.0/system/:backup")
    out["backup_status"] = status
    stored = STATE.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        out["backup_members"] = sorted(tar.getnames())
    more = json.loads(json.dumps(changed))
    for nic in more.get("interfaces", []) + more.get("vlans", []):
        if nic["name"] == iface:
            nic["addresses"] = [*nic.get("addresses", []), extra]
    out["put_more"] = call("PUT", "/1.0/system/network", {"config": more})["status"]
    out["more_after_s"] = wait_for(lambda: extra in addresses().get(iface, []), 60)

    # A damaged archive: refused at once, not one file changed.
    before = state_files()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("config.toml", stored), ("server.key", b"not a key")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    status, body = call_raw("POST", "/1.0/system/:restore", buf.getvalue())
    out["damaged"] = {"status": status, "body": body.decode(errors="replace")[:400]}
    out["damaged_unchanged"] = state_files() == before

    status, body = call_raw("POST", "/1.0/system/:restore", archive)
    out["restore_status"] = status
    answer = json.loads(body or b"null") or {}
    location = (answer.get("operation") or "").strip()
    if status != 202 or not location:
        out["restore_body"] = body.decode(errors="replace")[:400]
        return out
    waited = call("GET", f"{location}/wait?timeout=120")["body"] or {}
    op = waited.get("metadata") or {}
    out["restore_op"] = {"status": op.get("status"), "err": op.get("err")}
    out["stored_is_backup"] = STATE.read_bytes() == stored
    out["staging_left"] = [p.name for p in STATE.parent.iterdir() if p.name.startswith(".")]
    out["extra_gone_after_s"] = wait_for(lambda: extra not in addresses().get(iface, []), 60)
    out["get_after"] = call("GET", "/1.0")["status"]
    out["pid_before"], out["pid_after"] = pid, main_pid()
    return out


def network_state() -> dict:
    """GET /1.0/system/network's state, then what networkd and the kernel say right
    after (the counters only grow, so the API's are at most these), the raw outputs the
    host keeps as fixtures, and `:flush-dns` with resolved's own word for it."""
    out: dict = {}
    got = call("GET", "/1.0/system/network")
    out["state"] = got["body"]["metadata"]["state"]
    out["networkctl_status"] = sh("networkctl", "status", "--json=short")
    out["networkctl_lldp"] = sh("networkctl", "lldp", "--json=short")
    out["networkctl_list"] = sh("networkctl", "list", "--json=short")
    out["ip_route"] = sh("ip", "-j", "route", "show", "table", "main")["out"]
    sys_net = Path("/sys/class/net")
    out["counters"] = {
        link.name: {
            name: int((link / "statistics" / name).read_text())
            for name in ("rx_bytes", "rx_errors", "tx_bytes", "tx_errors")
        }
        for link in sys_net.iterdir()
        if link.is_dir()  # not bonding_masters, a control file beside the links
    }
    out["speeds"] = {}
    for link in (link for link in sys_net.iterdir() if link.is_dir()):
        try:
            out["speeds"][link.name] = (link / "speed").read_text().strip()
        except OSError as e:
            out["speeds"][link.name] = f"error: {e.strerror}"
    # No bonding module in a container: only the VM guest has bonds to record.
    out["bonding"] = {p.name: p.read_text() for p in Path("/proc/net/bonding").glob("*")}
    before = journal("-u", "systemd-resolved.service").count("Flushed all caches")
    out["flush_dns"] = call("POST", "/1.0/system/network/:flush-dns")
    out["flushed_after_s"] = wait_for(
        lambda: journal("-u", "systemd-resolved.service").count("Flushed all caches") > before,
        30,
    )
    return out


def global_addresses(iface: str) -> list:
    """The kernel's addresses of `iface` without prefix lengths, link-local left out."""
    return sorted(a.split("/")[0] for a in addresses().get(iface, []) if not a.startswith("fe80:"))


def state_addresses(iface: str) -> dict:
    """The API state's addresses of `iface` and the kernel's global ones, read before
    and after it (IncusOS's tests count the state's addresses after each network PUT)."""
    before = global_addresses(iface)
    got = call("GET", "/1.0/system/network")["body"]["metadata"]["state"]["interfaces"]
    after = global_addresses(iface)
    return {"api": sorted(got.get(iface, {}).get("addresses", [])), "kernel": [before, after]}


def with_addresses(config: dict, iface: str, change) -> dict:
    """A copy of the network `config` whose `iface` has `change(its addresses)`."""
    copy = json.loads(json.dumps(config))
    for nic in copy.get("interfaces", []) + copy.get("vlans", []):
        if nic["name"] == iface:
            nic["addresses"] = change(nic.get("addresses", []))
    return copy


CONFIRM_TIMEOUT = "20s"


def confirm_in_time(spec: dict) -> dict:
    iface, added = spec["iface"], spec["added"]
    out: dict = {}
    config = call("GET", "/1.0/system/network")["body"]["metadata"]["config"]
    out["state_before"] = state_addresses(iface)
    # A bad address: refused before anything applies (IncusOS applies it, then rolls back).
    bad = with_addresses(config, iface, lambda had: [*had, "bizbaz"])
    out["bad_put"] = call("PUT", "/1.0/system/network", {"config": bad})["status"]
    out["state_after_bad"] = state_addresses(iface)
    nics = config.get("interfaces", []) + config.get("vlans", [])
    had = next((n.get("addresses", []) for n in nics if n["name"] == iface), [])
    out["added_now"] = added not in had
    toggled = with_addresses(
        config,
        iface,
        lambda had: [a for a in had if a != added] if added in had else [*had, added],
    )
    # Long enough for the steps before `:confirm` under TCG too.
    toggled["confirmation_timeout"] = CONFIRM_TIMEOUT
    out["put"] = call("PUT", "/1.0/system/network", {"config": toggled})["status"]
    out["applied_after_s"] = wait_for(
        lambda: (added in addresses().get(iface, [])) == out["added_now"], 60
    )
    out["state_held"] = state_addresses(iface)
    out["confirmed"] = call("POST", "/1.0/system/network/:confirm", {})["status"]
    out["confirm_again"] = call("POST", "/1.0/system/network/:confirm", {})
    time.sleep(float(CONFIRM_TIMEOUT.rstrip("s")) + 3)
    after = call("GET", "/1.0/system/network")["body"]["metadata"]
    out["pending_after"] = after["state"].get("configuration_in_process")
    out["state_after"] = state_addresses(iface)
    out["kept"] = (added in addresses().get(iface, [])) == out["added_now"]
    return out


# core/tools.run from a process sandboxed as incusos-hal.service is: a tmpfs mounted with
# mounts=True (through the system manager), one without it (refused: the unit's system
# call filter has no mount(2)), and a tool's output and exit status through the same path.
_NAMESPACE_CHILD = """
import json
from incusos_hal.core import tools
def run(argv, mounts):
    d = tools.run(argv, timeout=60, error=RuntimeError, mounts=mounts)
    return {"rc": d.returncode, "out": d.stdout, "err": d.stderr}
print(json.dumps({
    "private": tools.private_mount_namespace(),
    "machine": run(["mount", "-t", "tmpfs", "ihal-machine", "/run/ihal-ns/machine"], True),
    "own": run(["mount", "-t", "tmpfs", "ihal-own", "/run/ihal-ns/own"], False),
    "status": run(["sh", "-c", "echo out; echo err >&2; exit 3"], True),
}))
"""
_NOT_SANDBOX = ("ExecStart", "Type", "Restart", "RestartSec", "LimitNOFILE")


def machine_namespace() -> dict:
    """The service's sandbox, read from its installed unit, given to a transient unit that
    runs _NAMESPACE_CHILD; then which of its mounts the machine sees."""
    try:
        unit = Path("/usr/lib/systemd/system/incusos-hal.service").read_text()
    except OSError as e:
        return {"props": [], "child": {"rc": -1, "out": "", "err": str(e)}}
    service = unit.split("[Service]", 1)[1].split("\n[", 1)[0]
    props = [
        line.strip()
        for line in service.splitlines()
        if "=" in line
        and not line.lstrip().startswith("#")
        and line.split("=", 1)[0].strip() not in _NOT_SANDBOX
    ]
    for sub in ("machine", "own"):
        Path("/run/ihal-ns", sub).mkdir(parents=True, exist_ok=True)
    argv = ["systemd-run", "--quiet", "--pipe", "--wait", "--collect"]
    for prop in props:
        argv += ["--property", prop]
    child = sh(*argv, "python3", "-c", _NAMESPACE_CHILD, timeout=120)
    out = {"props": props, "child": child}
    out["machine_mounted"] = sh("findmnt", "-n", "-o", "SOURCE", "/run/ihal-ns/machine")["out"]
    out["own_mounted"] = sh("findmnt", "-n", "-o", "SOURCE", "/run/ihal-ns/own")["out"]
    sh("umount", "/run/ihal-ns/machine")
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
    if spec.get("lldp_on"):
        # The LAN's switch announces itself every second; networkd hears it once the
        # port is configured. Wait for that before the first read of the state.
        out["lldp_after_s"] = wait_for(
            lambda: spec["lldp_on"] in sh("networkctl", "lldp", "--json=short")["out"], 60
        )
    got = call("GET", "/1.0/system/network")
    out["get_status"] = got["status"]
    if got["status"] != 200:  # nothing else can work: say why
        out["get"] = got
        out["journal"] = journal("-u", "incusos-hal.service")[-4000:]
        return out
    config = got["body"]["metadata"]["config"]
    out["network"] = network_state()
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
    changed = with_addresses(config, iface, lambda had: [*had, spec["added"]])
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
    out["cut_state"] = state_addresses(iface)
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
    out["restored_state"] = state_addresses(iface)

    # The journal through the API, with journalctl's filters.
    log = call("GET", "/1.0/debug/log?unit=incusos-hal.service&entries=20")
    out["debug_log"] = {
        "status": log["status"],
        "messages": [e.get("MESSAGE") for e in (log["body"] or {}).get("metadata") or []],
    }

    # 3. backup and restore under the unit's sandbox
    if spec.get("restore_added"):
        out["restore"] = backup_and_restore(spec, changed)

    # 4. IncusOS's rollback test, last steps: a bad change refused (nothing applied);
    # `added` toggled on the interface with a timeout and confirmed in time: past the
    # timeout the change is still there.
    out["confirm"] = confirm_in_time(spec)

    # 5. tools that mount, run from the service's sandbox, act in the machine's namespace
    out["machine_namespace"] = machine_namespace()

    # 6. peer credentials
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
