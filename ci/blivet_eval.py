"""blivet against incusos-hal's storage discovery and IncusOS's one sgdisk, measured.

docs/dependencies.md ("blivet") cites this script's output. Not a test: nothing asserts on
the figures, which vary with the machine. As root, on a host with systemd-nspawn,
debootstrap, cryptsetup, sfdisk, partx and losetup; it starts no VM.

    .venv/bin/python ci/blivet_eval.py [--runs N]

- A Debian 13 root (tests/nspawn.py's `rootfs`, flavor "container-blivet"): the default
  packages, udev, e2fsprogs, gdisk, strace and blivet's dependencies as Debian ships them
  (libblockdev 3.3 with every plugin, pyparted, libbytesize, pyudev, PyGObject, dasbus).
  Debian 13 has no python3-blivet (nor does sid), so blivet itself comes from PyPI:
  3.12.1, the last release that takes trixie's libblockdev 3.3 (3.13 needs 3.4),
  unpacked into an overlay layer. This checkout is installed on top, as the tests do.
- Loop devices on the host: a GPT with two partitions, a LUKS2 volume, an ext4
  filesystem, two blank 40 GiB (sparse) disks. The container gets their nodes, /sys
  read-write and a udevd of its own, triggered for those loops only, so udev's database
  and /dev/disk links exist for them and for nothing else.
- Discovery: a fresh `python3` doing `import blivet; Blivet(); reset()` and listing every
  device, against `incusos-hal inventory storage` and `scan_storage("/")`; import times
  (`-X importtime`); reset() under strace and `udevadm monitor`; the images' checksums
  before and after; blivet again with a system bus and lvmdbusd (libblockdev's lvm-dbus
  plugin, which Debian's plugin set selects), as on a booted machine.
- Partitioning: blivet making a partition from sector 69826560 to the end of a blank disk
  and committing it, against `sgdisk -n 11:69826560: DISK` (sections/storage.py's
  "partition-local") and the same table written by util-linux's sfdisk; the three tables
  printed with `sfdisk -d`.

blivet makes every loopN a LoopDevice: not partitionable, partitions ignored. Disks on the
appliance are sd/nvme/vd, so the runs marked "as disks" make blivet take the loops for
disks (`blivet.udev.device_is_loop` returns False), which is what it does with real disks.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import nspawn  # noqa: E402

BLIVET_VERSION = "3.12.1"
# What blivet's spec file requires and recommends, by Debian's names (no python3-libmount
# in Debian: blivet imports it only for fstab editing, under a try).
BLIVET_DEBS = (
    "python3-blockdev",
    "gir1.2-blockdev-3.0",
    "libblockdev-plugins-all",
    "python3-parted",
    "parted",
    "python3-bytesize",
    "python3-pyudev",
    "python3-gi",
    "python3-dasbus",
    "python3-selinux",
    "lsof",
)
# udev, e2fsprogs and fdisk (sfdisk) are the appliance's (mkosi/mkosi.conf); Blivet()
# refuses to start without the tools of one default filesystem (ext4, xfs, ext3, ext2).
# gdisk for IncusOS's sgdisk, strace for the side effects.
PACKAGES = (*nspawn.PACKAGES, "udev", "e2fsprogs", "fdisk", "gdisk", "strace", *BLIVET_DEBS)
START = 69826560  # sgdisk -n 11:69826560: (sections/storage.py, "partition-local")

INSIDE = r'''
import json, os, re, statistics, subprocess, sys, time
RUNS = int(os.environ["RUNS"])
GPT = os.environ["GPT"]

BLIVET = r"""
import json, os, time
t0 = time.perf_counter()
import blivet, blivet.udev
t1 = time.perf_counter()
if os.environ.get("AS_DISKS"):
    blivet.udev.device_is_loop = lambda info: False
b = blivet.Blivet()
t2 = time.perf_counter()
b.reset()
t3 = time.perf_counter()
devices = []
for d in sorted(b.devices, key=lambda d: d.name):
    if d.type != "file" and not os.path.exists(d.path):
        continue  # vda, zram0, unattached loops: sysfs only, no node in this /dev
    f = d.format
    devices.append({k: v for k, v in {
        "name": d.name, "type": d.type, "size": int(d.size),
        "parents": [p.name for p in d.parents],
        "serial": getattr(d, "serial", None), "wwn": getattr(d, "wwn", None),
        "model": getattr(d, "model", None), "uuid": d.uuid,
        "links": sorted(getattr(d, "device_links", None) or []),
        "format": f.type, "format_uuid": getattr(f, "uuid", None),
        "label": getattr(f, "label", None), "luks_version": getattr(f, "luks_version", None),
        "disklabel": getattr(f, "label_type", None),
        "number": d.parted_partition.number if d.type == "partition" else None,
    }.items() if v not in (None, "", [])})
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "Blivet()": t2 - t1, "reset": t3 - t2, "list": t4 - t3,
                  "total": t4 - t0, "all": sorted(d.name for d in b.devices),
                  "devices": devices}))
"""

OURS = r"""
import dataclasses, json, sys, time
t0 = time.perf_counter()
from incusos_hal.inventory.storage import scan_storage
t1 = time.perf_counter()
s = scan_storage("/")
t2 = time.perf_counter()
warm = []
for _ in range(int(sys.argv[1])):
    a = time.perf_counter(); scan_storage("/"); warm.append(time.perf_counter() - a)
print(json.dumps({"import": t1 - t0, "scan": t2 - t1, "total": t2 - t0,
                  "warm": sorted(warm)[len(warm) // 2] if warm else None,
                  "storage": dataclasses.asdict(s)}))
"""


def ms(xs):
    return round(statistics.median(xs) * 1000, 1)


def parts_back():
    """udev's watch re-reads a disk's table when a writer closes it; this kernel has no
    GPT parser, so the re-read drops the partitions partx added: add them back."""
    if os.path.exists(f"/sys/class/block/{GPT}/{GPT}p1"):
        return 0
    subprocess.run(["partx", "-a", f"/dev/{GPT}"], capture_output=True)
    subprocess.run(["udevadm", "settle"], capture_output=True)
    return 1


def runs(argv, env=None, n=RUNS, after=None):
    walls, inner, dropped, p = [], [], 0, None
    for _ in range(n):
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
        walls.append(time.perf_counter() - t)
        if p.returncode:
            return {"error": p.stderr[-2500:]}
        inner.append(json.loads(p.stdout.splitlines()[-1]))
        dropped += parts_back()
    keys = [k for k, v in inner[0].items() if isinstance(v, float)]
    return {"process_ms": ms(walls), **{k + "_ms": ms([i[k] for i in inner]) for k in keys},
            "partition_table_rereads_that_dropped_partitions": dropped,
            "stderr": sorted({l for l in p.stderr.splitlines() if "Deprecation" not in l}),
            "last": inner[-1]}


def importtime(module):
    totals = []
    for _ in range(RUNS):
        p = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                           capture_output=True, text=True)
        lines = [l for l in p.stderr.splitlines() if l.startswith("import time:")][1:]
        top = [l for l in lines if l.split("|")[-1].strip() == module][-1]
        totals.append(int(top.split("|")[1]) / 1e6)
    return {"ms": ms(totals), "modules": len(lines)}


def strace(tag, env=None):
    mon = subprocess.Popen(["udevadm", "monitor", "--kernel", "--udev",
                            "--subsystem-match=block"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    out = f"/eval/strace-{tag}.txt"
    subprocess.run(["strace", "-f", "-qq", "-s", "300", "-e", "trace=execve,openat,ioctl",
                    "-e", "signal=none", "-o", out, sys.executable, "-c", BLIVET],
                   capture_output=True, env={**os.environ, **(env or {})})
    time.sleep(2)
    mon.terminate()
    mine = tuple(os.environ["MINE"].split())
    events = []
    for line in mon.communicate()[0].splitlines():
        m = re.match(r"(KERNEL|UDEV)\s*\[[^]]*\]\s+(\S+)\s+\S*/(\S+) ", line)
        if m and m.group(3).startswith(mine):  # other loops on this host are not ours
            events.append(" ".join(m.groups()))
    text = open(out).read().splitlines()
    arg = re.compile(r'"((?:[^"\\]|\\.)*)"')
    execs = {}
    for l in text:
        if "execve(" in l and " = 0" in l:
            a = " ".join(arg.findall(l.split("[", 1)[1].split("], ", 1)[0]))[:120]
            execs[a] = execs.get(a, 0) + 1
    writes = sorted({l.split('"')[1] + " " + l.split(", ")[2].split(")")[0]
                     for l in text if "openat(" in l and "/dev/" in l
                     and ("O_RDWR" in l or "O_WRONLY" in l) and " = -1" not in l})
    ioctls = sorted({l.split("(", 1)[1].split(",")[1].strip() for l in text if "ioctl(" in l
                     and re.search(r"BLKRRPART|BLKPG|BLKFLSBUF|LOOP_SET|LOOP_CLR|DM_", l)})
    parts_back()
    return {"executed": execs, "device_opens_for_writing": writes, "ioctls": ioctls,
            "uevents": events}


def wall(argv, n=RUNS):
    walls = []
    for _ in range(n):
        t = time.perf_counter()
        p = subprocess.run(argv, capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
    return ms(walls), p


res = {"runs": RUNS}
res["versions"] = subprocess.run(
    ["dpkg-query", "-W", "-f", "${Package} ${Version}\n", "python3", "udev", "libblockdev3",
     "python3-blockdev", "python3-parted", "python3-pyudev", "python3-bytesize", "lvm2",
     "gdisk", "parted"], capture_output=True, text=True).stdout.splitlines()
res["versions"].append("blivet " + subprocess.run(
    [sys.executable, "-c", "import blivet; print(blivet.__version__)"],
    capture_output=True, text=True).stdout.strip())
res["python_startup_ms"] = wall([sys.executable, "-c", "pass"])[0]

# No udev yet: what each sees from sysfs and the nodes alone.
res["no_udev"] = {
    "blivet_as_disks": runs([sys.executable, "-c", BLIVET], {"AS_DISKS": "1"}, n=1),
    "ours": runs([sys.executable, "-c", OURS, "0"], n=1),
}
subprocess.run(["sh", "/eval/udev-up.sh"], check=True)

res["importtime"] = {"blivet": importtime("blivet"), "blivet.blivet": importtime("blivet.blivet"),
                     "incusos_hal.inventory.storage": importtime("incusos_hal.inventory.storage")}
res["blivet"] = runs([sys.executable, "-c", BLIVET])
res["blivet_as_disks"] = runs([sys.executable, "-c", BLIVET], {"AS_DISKS": "1"})
t, p = wall(["incusos-hal", "inventory", "--format", "json", "storage"])
res["ours_cli"] = {"process_ms": t, "rc": p.returncode, "stderr": p.stderr[-500:],
                   "out": json.loads(p.stdout) if p.returncode == 0 else None}
res["ours_in_process"] = runs([sys.executable, "-c", OURS, "0"])
warm = runs([sys.executable, "-c", OURS, "50"], n=1)["last"]["warm"]
res["ours_warm_scan_ms"] = round(warm * 1000, 2)
res["trace_stock"] = strace("stock")
res["trace_as_disks"] = strace("disks", {"AS_DISKS": "1"})
nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         sys.executable, "-c", BLIVET], capture_output=True, text=True,
                        env={**os.environ, "AS_DISKS": "1"})
res["as_nobody"] = {"rc": nobody.returncode, "stderr": nobody.stderr[-600:],
                    "devices": json.loads(nobody.stdout.splitlines()[-1])["devices"]
                    if nobody.returncode == 0 else None}

# A system bus and lvmdbusd, as on a booted machine: Debian's libblockdev-lvm-dbus3
# (10-lvm-dbus.cfg) makes libblockdev's lvm plugin a D-Bus client of lvmdbusd.
os.makedirs("/run/dbus", exist_ok=True)
os.makedirs("/run/lock/lvm", exist_ok=True)
subprocess.run(["dbus-daemon", "--system", "--fork"], check=True)
def lvmdbusd_running():
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"lvmdbusd" in open(f"/proc/{pid}/cmdline", "rb").read():
                return True
        except OSError:
            pass
    return False


# The first blivet after the bus is up: does its lvm plugin have the bus start lvmdbusd?
res["blivet_bus_first"] = runs([sys.executable, "-c", BLIVET], {"AS_DISKS": "1"}, n=1)
res["lvmdbusd_started_by_bus_activation"] = lvmdbusd_running()
t = time.perf_counter()
lvmd = subprocess.Popen(["true"] if lvmdbusd_running() else ["/usr/sbin/lvmdbusd"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while subprocess.run(["busctl", "--system", "call", "com.redhat.lvmdbus1",
                      "/com/redhat/lvmdbus1/Manager", "org.freedesktop.DBus.Peer", "Ping"],
                     capture_output=True).returncode:
    if time.perf_counter() - t > 120:
        break
    time.sleep(0.05)
res["lvmdbusd_to_bus_ms"] = round((time.perf_counter() - t) * 1000)
res["blivet_bus_as_disks"] = runs([sys.executable, "-c", BLIVET], {"AS_DISKS": "1"})
res["blivet_bus"] = runs([sys.executable, "-c", BLIVET])
lvmd.terminate()
print(json.dumps(res))
'''

UDEV_UP = """
/usr/lib/systemd/systemd-udevd --daemon
udevadm trigger --action=add --subsystem-match=block {matches}
udevadm settle -t 60
"""

# blivet's equivalent of `sgdisk -n 11:69826560: DISK` on a blank disk, in a fresh process.
PART = r"""
import json, sys, time
t0 = time.perf_counter()
import blivet, blivet.udev
from blivet.formats import get_format
from blivet.partitioning import do_partitioning
t1 = time.perf_counter()
blivet.udev.device_is_loop = lambda info: False
b = blivet.Blivet()
b.reset()
t2 = time.perf_counter()
disk = b.devicetree.get_device_by_name(sys.argv[1])
b.format_device(disk, get_format("disklabel", device=disk.path, label_type="gpt"))
# A start with no end is only a hint (the partition began at 2048 when grown): both given.
end = max(r.end for r in disk.format.parted_disk.getFreeSpaceRegions())
part = b.new_partition(parents=[disk], start=int(sys.argv[2]), end=end)
b.create_device(part)
do_partitioning(b)
t3 = time.perf_counter()
b.do_it()
t4 = time.perf_counter()
p = part.parted_partition
print(json.dumps({"import": t1 - t0, "reset": t2 - t1, "plan": t3 - t2, "do_it": t4 - t3,
                  "total": t4 - t0, "name": part.name, "number": p.number,
                  "start": p.geometry.start, "end": p.geometry.end}))
"""

# devtmpfs's job in the container's /dev (a tmpfs) for the named disks' new partitions.
NODES = r"""
while :; do
  for s in "$@"; do
    for d in /sys/class/block/$s*; do
      n=/dev/${d##*/}
      [ -e "$n" ] || { [ -r "$d/dev" ] && IFS=: read ma mi < "$d/dev" && mknod "$n" b "$ma" "$mi"; }
    done
  done
  sleep 0.01
done
"""

PARTITIONING = r"""
import json, os, statistics, subprocess, sys, time
RUNS, START = int(os.environ["RUNS"]), int(os.environ["START"])
A, B, C = os.environ["A"], os.environ["B"], os.environ["C"]
def ms(xs):
    return round(statistics.median(xs) * 1000, 1)
def blank(d):
    size = int(open(f"/sys/class/block/{d}/size").read())
    subprocess.run(["partx", "-d", f"/dev/{d}"], capture_output=True)
    for n in os.listdir("/dev"):
        if n.startswith(d + "p"):
            os.unlink("/dev/" + n)
    for seek in (0, size // 2048 - 1):
        subprocess.run(["dd", "if=/dev/zero", f"of=/dev/{d}", "bs=1M", "count=1", f"seek={seek}",
                        "conv=notrunc,fsync", "status=none"], check=True)
    subprocess.run(["udevadm", "settle"])
res, blv, walls, sg, sf = {}, [], [], [], []
for i in range(RUNS):
    blank(A)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "/eval/part.py", A, str(START)],
                       capture_output=True, text=True)
    walls.append(time.perf_counter() - t)
    if p.returncode:
        res["blivet_error"] = p.stderr[-2500:]
        break
    blv.append(json.loads(p.stdout.splitlines()[-1]))
    blank(B)
    t = time.perf_counter()
    q = subprocess.run(["sgdisk", "-n", f"11:{START}:", f"/dev/{B}"],
                       capture_output=True, text=True)
    sg.append(time.perf_counter() - t)
    subprocess.run(["udevadm", "settle"])
    res["sgdisk_output"] = (q.returncode, q.stdout.strip(), q.stderr.strip())
    # The same table with util-linux's sfdisk: partition 11 from its name, the end as
    # sgdisk puts it (the last usable sector; sfdisk's "+" would round it down to 1 MiB).
    blank(C)
    size = int(open(f"/sys/class/block/{C}/size").read())
    script = f"label: gpt\nfirst-lba: 34\n/dev/{C}p11 : start={START}, size={size - 33 - START}\n"
    t = time.perf_counter()
    q = subprocess.run(["sfdisk", "-q", f"/dev/{C}"], input=script, capture_output=True, text=True)
    sf.append(time.perf_counter() - t)
    subprocess.run(["udevadm", "settle"])
    res["sfdisk_output"] = (q.returncode, q.stdout.strip(), q.stderr.strip())
if blv:
    res["blivet"] = {"process_ms": ms(walls), **{k + "_ms": ms([b[k] for b in blv])
                     for k in ("import", "reset", "plan", "do_it", "total")}, "last": blv[-1]}
res["sgdisk_ms"] = ms(sg)
res["sfdisk_ms"] = ms(sf)
res["sgdisk_p"] = {d: subprocess.run(["sgdisk", "-p", f"/dev/{d}"], capture_output=True,
                                     text=True).stdout.splitlines()[-2:] for d in (A, B, C)}
print(json.dumps(res))
"""


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def blivet_layer(work: Path) -> Path:
    """blivet from PyPI (pip's download, the sdist: pure Python) as an overlay layer."""
    dl = work / "dl"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"blivet=={BLIVET_VERSION}",
            "-d",
            str(dl),
        ],
        check=True,
    )
    site = work / "blivet/usr/local/lib/python3.13/dist-packages"
    site.mkdir(parents=True)
    top = f"blivet-{BLIVET_VERSION}/"
    with tarfile.open(dl / f"blivet-{BLIVET_VERSION}.tar.gz") as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith(top + "blivet/") and ".." not in m.name:
                dest = site / m.name[len(top) :]
                dest.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(m)
                assert source is not None
                dest.write_bytes(source.read())
    return work / "blivet"


def image_packages() -> list[str]:
    text = (HERE.parent / "mkosi/mkosi.conf").read_text()
    block = text.split("\nPackages=\n", 1)[1]
    names = []
    for line in block.splitlines():
        if not line.startswith("    "):
            break
        if not line.strip().startswith("#"):
            names.append(line.strip())
    return names


def footprint(work: Path) -> dict[str, Any]:
    """What blivet's Debian packages add to the appliance image's package set: apt's own
    simulation in the default container root, with and without them."""
    base = nspawn.rootfs()
    image = image_packages()
    script = (
        "apt-get update -q >/dev/null\n"
        f"apt-get install -s -q --no-install-recommends {' '.join(image)} > /tmp/a\n"
        f"apt-get install -s -q --no-install-recommends {' '.join(image + list(BLIVET_DEBS))}"
        " > /tmp/b\n"
        "sed -n 's/^Inst \\([^ ]*\\) .*/\\1/p' /tmp/a | sort > /tmp/a.l\n"
        "sed -n 's/^Inst \\([^ ]*\\) .*/\\1/p' /tmp/b | sort > /tmp/b.l\n"
        "for p in $(comm -13 /tmp/a.l /tmp/b.l); do\n"
        "  echo \"$p $(apt-cache show --no-all-versions $p | sed -n 's/^Installed-Size: //p')\"\n"
        "done\n"
    )
    with nspawn.overlay([base], work / "apt") as merged:
        out = nspawn.nspawn_run(merged, script, network=True)
    rows = [line.split() for line in out.splitlines() if line.strip()]
    return {
        "packages": len(rows),
        "installed_kib": sum(int(r[1]) for r in rows),
        "list": sorted(f"{r[0]} {r[1]}" for r in rows),
    }


def make_loops(img: Path) -> dict[str, str]:
    img.mkdir(parents=True)
    (img / "gpt.img").write_bytes(b"")
    os.truncate(img / "gpt.img", 1 << 30)
    subprocess.run(
        ["sfdisk", "-q", str(img / "gpt.img")],
        input="label: gpt\nsize=256MiB, name=ihal-one\nname=ihal-two\n",
        text=True,
        check=True,
    )
    (img / "key").write_bytes(secrets.token_bytes(32))
    for name, size in (
        ("luks", 64 << 20),
        ("ext4", 256 << 20),
        ("big-a", 40 << 30),
        ("big-b", 40 << 30),
        ("big-c", 40 << 30),
    ):
        (img / f"{name}.img").write_bytes(b"")
        os.truncate(img / f"{name}.img", size)  # sparse
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "-q",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            str(img / "key"),
            str(img / "luks.img"),
        ],
        check=True,
    )
    subprocess.run(["mkfs.ext4", "-q", "-L", "ihal-ext4", str(img / "ext4.img")], check=True)
    loops = {}
    for name in ("gpt", "luks", "ext4", "big-a", "big-b", "big-c"):
        loops[name] = sh("losetup", "-f", "--show", "-P", str(img / f"{name}.img"))
    # This build host's kernel has no GPT parser (CONFIG_EFI_PARTITION unset): partx adds
    # the partitions from the table itself.
    subprocess.run(["partx", "-a", loops["gpt"]], capture_output=True, check=False)
    return loops


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:16]


def container(merged: Path, loops: dict[str, str], eval_dir: Path, script: str) -> str:
    nodes = [
        *loops.values(),
        *sorted(str(p) for p in Path("/dev").glob(f"{Path(loops['gpt']).name}p*")),
    ]
    cmd = [
        "systemd-nspawn",
        "-q",
        "--register=no",
        "--keep-unit",
        "--private-network",
        "--timezone=off",
        "--resolv-conf=off",
        f"--machine=ihal-blivet-{secrets.token_hex(3)}",
        "-D",
        str(merged),
        "--bind=/sys",
        f"--bind={eval_dir}:/eval",
        *[f"--bind={n}" for n in nodes],
        "/bin/sh",
        "-ec",
        script,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=3600)
    if p.returncode:
        raise RuntimeError(f"container: {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=11)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ihal-blivet-", dir="/var/tmp"))
    loops: dict[str, str] = {}
    modes: dict[str, tuple[int, int, int]] = {}
    result: dict[str, Any] = {}
    try:
        root = nspawn.rootfs("container-blivet", PACKAGES)
        result["root"] = root.name
        result["footprint"] = footprint(work)
        package = nspawn.install_layer(root, work / "package")
        layer = blivet_layer(work)
        loops = make_loops(work / "img")
        result["loops"] = loops
        for n in loops.values():
            st = os.stat(n)
            modes[n] = (st.st_mode & 0o7777, st.st_uid, st.st_gid)
        eval_dir = work / "eval"
        eval_dir.mkdir()
        names = {k: Path(v).name for k, v in loops.items()}
        matches = " ".join(f"--sysname-match={n}*" for n in names.values())
        (eval_dir / "udev-up.sh").write_text(UDEV_UP.format(matches=matches))
        (eval_dir / "inside.py").write_text(INSIDE)
        (eval_dir / "part.py").write_text(PART)
        (eval_dir / "nodes.sh").write_text(NODES)
        (eval_dir / "partitioning.py").write_text(PARTITIONING)
        small = ("gpt", "luks", "ext4")
        before = {k: digest(work / "img" / f"{k}.img") for k in small}
        with nspawn.overlay([layer, package, root], work / "machine") as merged:
            result["discovery"] = json.loads(
                container(
                    merged,
                    loops,
                    eval_dir,
                    f"RUNS={args.runs} GPT={names['gpt']} MINE='{' '.join(names.values())}'"
                    " python3 /eval/inside.py",
                )
            )
            after = {k: digest(work / "img" / f"{k}.img") for k in small}
            result["images_unchanged_by_discovery"] = before == after
            a, b, c = names["big-a"], names["big-b"], names["big-c"]
            nowatch = f'SUBSYSTEM=="block", KERNEL=="{a}*|{b}*|{c}*", OPTIONS+="nowatch"'
            result["partitioning"] = json.loads(
                container(
                    merged,
                    loops,
                    eval_dir,
                    "mkdir -p /run/udev/rules.d\n"
                    f"echo '{nowatch}' > /run/udev/rules.d/99-ihal-nowatch.rules\n"
                    "sh /eval/udev-up.sh\n"
                    f"sh /eval/nodes.sh {a} {b} {c} &\n"
                    f"RUNS={args.runs} A={a} B={b} C={c} START={START}"
                    " python3 /eval/partitioning.py\n"
                    "kill $!\n",
                )
            )
        result["partitioning"]["sfdisk_d"] = {
            k: sh("sfdisk", "-d", loops[k]) for k in ("big-a", "big-b", "big-c")
        }
        print(json.dumps(result, indent=1))
    finally:
        for n in loops.values():
            subprocess.run(["partx", "-d", n], capture_output=True, check=False)
            subprocess.run(["losetup", "-d", n], check=False)
            # the container's udevd set udev's owner and mode on the shared nodes: undo
            if n in modes:
                mode, uid, gid = modes[n]
                with contextlib.suppress(OSError):
                    os.chown(n, uid, gid)
                    os.chmod(n, mode)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
