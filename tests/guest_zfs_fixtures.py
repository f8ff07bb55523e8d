"""Records real OpenZFS, SMART and block-device output in the VM guest (stdlib only), for
tests/fixtures/zfs/. Run by `ci/vm run --zfs` (see tests/fixtures/zfs/NOTE.md for the
exact command line and disks):

    python3 /probe/guest_zfs_fixtures.py /probe/zfs

Each pool case creates a pool the way IncusOS does (lxc/incus-os
incus-osd/internal/zfs/zfs.go: ashift=12, mountpoint=none, aes-256-gcm with a raw key in a
file; devices by /dev/disk/by-id), writes some data, records the commands IncusOS runs to
read it (incus-osd/internal/storage/storage.go) and the broader `-j` forms, and destroys
it. Scans are held in progress with OpenZFS's own test tunable zfs_scan_suspend_progress,
so "during a scrub/resilver" is recorded for certain, not by luck of timing. A command that
fails is recorded too (its exit status and stderr in a .err file): that is a fact to keep.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "/probe/zfs")
KEYS = Path("/var/lib/zfs-fixtures")
SUSPEND = Path("/sys/module/zfs/parameters/zfs_scan_suspend_progress")
POOL = "mypool"
# `rest`: only the cases from the encrypted pool on (a run that stopped there goes on)
REST = sys.argv[2:3] == ["rest"]
LOG: list[str] = []


def sh(*cmd: str, timeout: int = 300, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    LOG.append(f"$ {' '.join(cmd)}  -> {proc.returncode}")
    if proc.returncode and proc.stderr:
        LOG.append("  " + proc.stderr.strip().replace("\n", "\n  "))
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def record(name: str, *cmd: str) -> subprocess.CompletedProcess:
    """Run `cmd`; keep stdout in OUT/name (pretty JSON stays as the tool printed it),
    stderr and a non-zero exit status in OUT/name.err."""
    proc = sh(*cmd)
    path = OUT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(proc.stdout)
    if proc.returncode or proc.stderr:
        path.with_name(path.name + ".err").write_text(
            f"$ {' '.join(cmd)}\nexit status {proc.returncode}\n{proc.stderr}"
        )
    return proc


def by_id(serial: str, bus: str = "scsi") -> str:
    prefix = {
        "scsi": "scsi-0QEMU_QEMU_HARDDISK_",
        "virtio": "virtio-",
        "sata": "ata-QEMU_HARDDISK_",
    }[bus]
    return f"/dev/disk/by-id/{prefix}{serial}"


D = [by_id(f"incus_disk{i}") for i in range(1, 8)]  # d1..d6 256 MiB, d7 512 MiB


def id_of(kname: str) -> str:
    """A device's /dev/disk/by-id name, as IncusOS picks one (the model-and-serial kind,
    not the WWN/EUI one)."""
    links = sorted(
        str(p)
        for p in Path("/dev/disk/by-id").iterdir()
        if os.path.realpath(p) == kname and not p.name.startswith(("wwn-", "nvme-eui."))
    )
    return links[0] if links else kname


def pool_state(case: str, pool: str = POOL) -> None:
    """The pool as IncusOS reads it, and the broader JSON forms."""
    record(f"{case}/zpool-status.json", "zpool", "status", "-jp", "--json-int")
    record(f"{case}/zpool-status-pool.json", "zpool", "status", pool, "-jp", "--json-int")
    record(f"{case}/zpool-list.json", "zpool", "list", "-j", "--json-int")
    record(f"{case}/zfs-list.json", "zfs", "list", "-j", "--json-int")
    record(
        f"{case}/zfs-list-volumes.json",
        *("zfs", "list", "-r", "-d1", pool, "-o", "name,quota,used,incusos:use"),
        *("-j", "--json-int"),
    )
    record(f"{case}/zfs-get-keystatus.json", "zfs", "get", "keystatus", pool, "-j")
    record(f"{case}/zfs-get-all.json", "zfs", "get", "-j", "--json-int", "all")


def create(*vdevs: str, pool: str = POOL, encrypted: bool = True, force: bool = False) -> None:
    args = ["zpool", "create", "-o", "ashift=12", "-O", "mountpoint=none"]
    if encrypted:
        key = KEYS / f"zpool.{pool}.key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        args += ["-O", "encryption=aes-256-gcm", "-O", "keyformat=raw"]
        args += ["-O", f"keylocation=file://{key}"]
    if force:
        args.append("-f")
    sh("udevadm", "settle")
    if sh(*args, pool, *vdevs).returncode:
        # zpool partitions a whole disk and opens its part1 at once; right after a
        # destroy and wipefs udev may not have made that node yet (seen: "failed to
        # detect device partitions on '/dev/sda1': 19"). Settled, the same call works.
        sh("udevadm", "settle")
        time.sleep(2)
        sh(*args, pool, *vdevs, check=True)


def write_data(mib: int, pool: str = POOL) -> None:
    """A dataset as IncusOS tags an application's, mounted, with `mib` MiB of random data."""
    mnt = f"/mnt/{pool}"
    sh("zfs", "create", "-o", f"mountpoint={mnt}", "-o", "incusos:use=incus", f"{pool}/incus")
    sh("zfs", "set", "quota=1G", f"{pool}/incus")
    sh("dd", "if=/dev/urandom", f"of={mnt}/data", "bs=1M", f"count={mib}", "conv=fsync")
    sh("zpool", "sync", pool)


def destroy(pool: str = POOL) -> None:
    sh("zpool", "destroy", "-f", pool)
    sh("udevadm", "settle")
    sh("wipefs", "-a", *[d for d in D if Path(d).exists()])
    sh("udevadm", "settle")


def suspend(on: bool) -> None:
    SUSPEND.write_text("1" if on else "0")


def case(name: str, *vdevs: str, data: int = 8, **kw) -> None:
    create(*vdevs, **kw)
    write_data(data)
    pool_state(name)
    destroy()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    KEYS.mkdir(mode=0o700, exist_ok=True)
    env = {
        "uname": sh("uname", "-a").stdout,
        "os_release": Path("/etc/os-release").read_text(),
        "dkms_status": sh("dkms", "status").stdout,
        "modprobe_zfs": vars(sh("modprobe", "zfs")) | {"args": None},
        "zfs_version": sh("zfs", "version", "-j").stdout or sh("zfs", "version").stdout,
        "smartctl_version": sh("smartctl", "--version").stdout.splitlines()[:1],
        "lsblk_version": sh("lsblk", "--version").stdout.strip(),
        "pyzfs": sh("dpkg-query", "-W", "python3-pyzfs", "zfsutils-linux", "zfs-dkms").stdout,
    }
    (OUT / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    record("zfs-version.txt", "zfs", "version")
    record("zfs-version.json", "zfs", "version", "-j")

    # Drives, before any pool.
    sh("udevadm", "settle")
    record("lsblk-JMpdb.json", "lsblk", "-JMpdb")
    record(
        "lsblk-incusos.json",
        *("lsblk", "-JMpdb", "-e", "1,2,7,43,147,230,251"),
        *("-o", "KNAME,ID_LINK,SIZE,SUBSYSTEMS,RM,WWN"),
    )
    record("ls-l-dev-disk-by-id.txt", "ls", "-l", "/dev/disk/by-id")
    devices = {
        "nvme-controller": "/dev/nvme0",
        "nvme-namespace": "/dev/nvme0n1",
        "scsi": D[0],
        "sata": by_id("sdisk1", "sata"),
        "virtio-blk": by_id("vdisk1", "virtio"),
        "root-virtio-blk": "/dev/vda",
    }
    for what, dev in devices.items():
        real = os.path.realpath(dev)
        record(f"smartctl-aj-{what}.json", "smartctl", "-aj", real)
    record("smartctl-scan-j.json", "smartctl", "--scan", "-j")

    if env["modprobe_zfs"]["returncode"]:
        return  # recorded why in environment.json; nothing more can be done

    if REST:  # the drives were recorded by an earlier run: go on with the pools after
        return rest()
    # libzfs_core (python3-pyzfs), on a real encrypted pool.
    create(D[0])
    lzc = lzc_check()
    (OUT / "libzfs_core.json").write_text(json.dumps(lzc, indent=1) + "\n")
    destroy()

    case("raid0-1", D[0])
    case("raid0-2", D[0], D[1])
    case("raid1", "mirror", D[0], D[1])
    case("raid10", "mirror", D[0], D[1], "mirror", D[2], D[3])
    case("raidz1", "raidz1", D[0], D[1], D[2])
    case("raidz2", "raidz2", D[0], D[1], D[2], D[3])
    case("raidz3", "raidz3", D[0], D[1], D[2], D[3], D[4])
    case("raid0-1-unencrypted", D[0], encrypted=False)
    record(
        "mixed-sizes-refused.txt", "zpool", "create", "-o", "ashift=12", "mixed", "raidz1", *D[4:7]
    )
    destroy("mixed")

    # log (mirrored), cache and special (mirrored, special_small_blocks), as IncusOS orders them
    nvme = [id_of("/dev/nvme0n1"), id_of("/dev/nvme1n1")]  # both 256 MiB
    create("mirror", D[0], D[1], "cache", D[2], "log", "mirror", D[3], D[4])
    sh("zpool", "add", POOL, "special", "mirror", *nvme)
    sh("zfs", "set", "special_small_blocks=16K", POOL)
    write_data(8)
    pool_state("log-cache-special")
    record(
        "log-cache-special/zfs-get-special_small_blocks.txt",
        *("zfs", "get", "special_small_blocks", "-H", "-o", "value", POOL),
    )
    destroy()
    sh("wipefs", "-a", *nvme)
    # the same at create time, special in the one command (IncusOS's argument order)
    record(
        "log-cache-special-create.txt",
        *("zpool", "create", "-o", "ashift=12", "-O", "mountpoint=none", POOL),
        *("mirror", D[0], D[1], "cache", D[2], "log", "mirror", D[3], D[4]),
        *("special", "mirror", *nvme),
    )
    pool_state("log-cache-special-create")
    destroy()
    sh("wipefs", "-a", *nvme)

    rest()


def rest() -> None:
    """The encryption, degraded, resilver and scrub cases."""
    # encryption key loaded, unloaded, and after export + import without the key
    create("mirror", D[0], D[1])
    pool_state("encrypted-key-loaded")
    sh("zfs", "unload-key", POOL)
    pool_state("encrypted-key-unloaded")
    sh("zpool", "export", POOL)
    record("encrypted-import-list.txt", "zpool", "import", "-d", "/dev/disk/by-id")
    sh("zpool", "import", "-d", "/dev/disk/by-id", POOL)
    pool_state("encrypted-imported-no-key")
    record("encrypted-load-key.txt", "zfs", "load-key", POOL)
    pool_state("encrypted-imported-key-loaded")
    bad = KEYS / "wrong.key"
    bad.write_bytes(os.urandom(32))
    sh("zfs", "unload-key", POOL)
    record("encrypted-load-wrong-key.txt", "zfs", "load-key", "-L", f"file://{bad}", POOL)
    sh("zfs", "load-key", POOL)
    destroy()

    # degraded (offlined), resilver during and after, then a device the kernel lost
    create("mirror", D[0], D[1], D[2])
    write_data(64)
    sh("zpool", "offline", POOL, D[0])
    pool_state("degraded-offline")
    suspend(True)
    sh("zpool", "replace", POOL, D[0], D[3])
    time.sleep(2)
    pool_state("resilver-in-progress")
    suspend(False)
    sh("zpool", "wait", "-t", "resilver,replace", POOL)
    pool_state("resilver-done")

    suspend(True)
    sh("zpool", "scrub", POOL)
    time.sleep(2)
    pool_state("scrub-in-progress")
    record("scrub-again-while-running.txt", "zpool", "scrub", POOL)
    sh("zpool", "scrub", "-p", POOL)
    pool_state("scrub-paused")
    suspend(False)
    sh("zpool", "scrub", POOL)
    sh("zpool", "wait", "-t", "scrub", POOL)
    pool_state("scrub-done")

    # a member the kernel lost (as a disk pulled from the machine)
    real = os.path.realpath(D[1])
    host = Path(f"/sys/class/block/{Path(real).name}/device")
    scsi_host = next(p for p in host.resolve().parents if p.name.startswith("host"))
    Path(host, "delete").write_text("1")
    time.sleep(2)
    sh("zpool", "scrub", POOL)
    sh("zpool", "wait", "-t", "scrub", POOL)
    pool_state("degraded-removed")
    Path(f"/sys/class/scsi_host/{scsi_host.name}/scan").write_text("- - -")
    sh("udevadm", "settle")
    sh("zpool", "online", POOL, D[1])
    sh("zpool", "wait", "-t", "resilver", POOL)
    sh("zpool", "clear", POOL)
    pool_state("removed-returned")
    sh("zpool", "export", POOL)
    record("export-import-list.txt", "zpool", "import", "-d", "/dev/disk/by-id")
    sh("zpool", "import", "-d", "/dev/disk/by-id", POOL)
    destroy()
    record("lsblk-JMpdb-after.json", "lsblk", "-JMpdb")


def keystatus() -> str:
    return sh("zfs", "get", "-H", "-o", "value", "keystatus", POOL).stdout.strip()


def lzc_check() -> dict:
    out: dict = {}
    try:
        import libzfs_core as lzc
    except Exception as e:
        return {"import": repr(e)}
    out["dir"] = dir(lzc)
    steps = [
        ("lzc_exists(mypool)", lambda: lzc.lzc_exists(b"mypool")),
        ("lzc_create(mypool/lzc)", lambda: lzc.lzc_create(b"mypool/lzc")),
        ("lzc_exists(mypool/lzc)", lambda: lzc.lzc_exists(b"mypool/lzc")),
        ("lzc_destroy(mypool/lzc)", lambda: lzc.lzc_destroy(b"mypool/lzc")),
        ("lzc_exists(mypool/lzc) after", lambda: lzc.lzc_exists(b"mypool/lzc")),
        ("lzc_unload_key(mypool)", lambda: lzc.lzc_unload_key(b"mypool")),
        (
            "lzc_load_key(mypool, noop=True, wrong key)",
            lambda: lzc.lzc_load_key(b"mypool", True, os.urandom(32)),
        ),
        (
            "lzc_load_key(mypool, noop=False, its key)",
            lambda: lzc.lzc_load_key(b"mypool", False, (KEYS / "zpool.mypool.key").read_bytes()),
        ),
        ("lzc_get_props(mypool)", lambda: lzc.lzc_get_props(b"mypool")),
    ]
    results = []
    for what, step in steps:
        try:
            value = step()
            results.append([what, "ok", repr(value)[:2000]])
        except Exception as e:
            results.append([what, "raised", f"{type(e).__module__}.{type(e).__name__}: {e}"])
        if what.startswith("lzc_unload_key"):
            results.append(["zfs get keystatus", "ok", keystatus()])
    results.append(["zfs get keystatus", "ok", keystatus()])
    out["steps"] = results
    return out


if __name__ == "__main__":
    try:
        main()
    finally:
        (OUT / "commands.log").write_text("\n".join(LOG) + "\n")
