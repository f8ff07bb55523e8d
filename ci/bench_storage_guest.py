"""Runs inside the ZFS VM guest for `ci/bench --storage`: GET /1.0/system/storage through
incusos-hal's unix socket against the commands IncusOS runs for the same answer
(lxc/incus-os incus-osd/internal/storage/storage.go GetStorageInfo): `lsblk -JMpdb`,
`smartctl -aj` per drive, `zpool status -jp --json-int`, and per pool `zfs get keystatus
-j` and `zfs list -r -d1 ... -j --json-int`. A pool on two disks is made first, as
IncusOS makes one. Prints one JSON line: seconds per answer, and what each side saw."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time

SOCKET = "/run/incusos-hal/unix.socket"
RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 10


class Unix(http.client.HTTPConnection):
    def __init__(self):
        super().__init__("ihal", timeout=300)

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(SOCKET)


def get_storage():
    conn = Unix()
    conn.request("GET", "/1.0/system/storage")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def reference():
    drives = json.loads(
        run(
            "lsblk",
            "-JMpdb",
            "-e",
            "1,2,7,43,147,230,251",
            "-o",
            "KNAME,ID_LINK,SIZE,SUBSYSTEMS,RM,WWN",
        )
    )["blockdevices"]
    smart = {d["kname"]: run("smartctl", "-aj", d["kname"]) for d in drives if d.get("id-link")}
    pools = json.loads(run("zpool", "status", "-jp", "--json-int") or "{}").get("pools", {})
    for name in pools:
        run("zfs", "get", "keystatus", name, "-j")
        run(
            "zfs",
            "list",
            "-r",
            "-d1",
            name,
            "-o",
            "name,quota,used,incusos:use",
            "-j",
            "--json-int",
        )
    return len(smart), len(pools)


COLD = """
import sys, time
from pathlib import Path
from incusos_hal.hal import smart
from incusos_hal.sections import storage
state = Path("/var/lib/incusos-hal")
def answer():
    smart._answers.clear()  # every drive asked afresh, as on the first GET of a minute
    pools, _ = storage.read_pools(state)
    storage.read_drives("/", state, pools)
    [storage.pool_api(p, state) for p in pools.values()]
answer()
started = time.perf_counter()
for _ in range(int(sys.argv[1])):
    answer()
print((time.perf_counter() - started) / int(sys.argv[1]))
if sys.argv[2:] == ["profile"]:  # where a GET's time goes, smartctl's answers reused
    import cProfile, io, pstats
    pools, _ = storage.read_pools(state)
    storage.read_drives("/", state, pools)  # fills the reuse
    prof = cProfile.Profile()
    prof.enable()
    pools, _ = storage.read_pools(state)
    storage.read_drives("/", state, pools)
    [storage.pool_api(p, state) for p in pools.values()]
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(18)
    print(text.getvalue(), file=sys.stderr)
"""


def cold(n):
    """The state GET computes, in the service's own interpreter, with no smartctl answer
    to reuse: what the first GET of a minute costs, less the HTTP round trip."""
    with open(shutil.which("incusos-hal")) as f:
        interpreter = f.readline()[2:].strip()
    done = subprocess.run(
        [interpreter, "-c", COLD, str(n), "profile"], capture_output=True, text=True
    )
    # The profile of one GET with smartctl's answers reused, for where its time goes.
    print(done.stderr[-6000:], file=sys.stderr)
    return float(done.stdout.strip()) if done.returncode == 0 else -1.0


def per_call(fn, n):
    fn()  # warm: imports, caches, the socket-activated service started
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def main():
    subprocess.run(["modprobe", "zfs"], check=True)
    subprocess.run(["systemctl", "start", "incusos-hal.socket"], check=True)
    disks = sorted(
        p for p in os.listdir("/dev/disk/by-id") if p.startswith("scsi-0QEMU_QEMU_HARDDISK_")
    )
    with open("/root/bench.key", "wb") as f:
        f.write(os.urandom(32))
    subprocess.run(
        [
            "zpool",
            "create",
            "-o",
            "ashift=12",
            "-O",
            "mountpoint=none",
            "-O",
            "encryption=aes-256-gcm",
            "-O",
            "keyformat=raw",
            "-O",
            "keylocation=file:///root/bench.key",
            "bench",
            "mirror",
            *(f"/dev/disk/by-id/{d}" for d in disks[:2]),
        ],
        check=True,
    )
    status, body = get_storage()
    state = (body.get("metadata") or {}).get("state") or {}
    out = {
        "get_status": status,
        "api_drives": len(state.get("drives") or []),
        "api_pools": len(state.get("pools") or []),
    }
    out["drives"], out["pools"] = reference()
    out["api"] = per_call(get_storage, RUNS)
    out["reference"] = per_call(reference, RUNS)
    out["cold"] = cold(RUNS)
    print(json.dumps(out))


main()
