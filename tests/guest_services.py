"""Probe part (stdlib only): /1.0/services against real targets on the guest's loopback.

Debian's kernel has what the host's lacks: an NVMe/TCP target (nvmet-tcp, set up through
configfs) and an iSCSI target (LIO, set up with targetcli), each backed by a file, both
on 127.0.0.1; the guest's multipath disk (two paths to one WWN) for multipath. The
guest's own incusos-hal.service (live, under systemd) is driven through its socket, as
an operator would; each step records the API's answer and what the kernel shows.
"""

import glob
import json
import os
import time
from pathlib import Path

from guest_api import call

from guest_lib import crashed, journal, must, sh

NVME_NQN = "nqn.2026-11.org.incusos-hal:loop1"
ISCSI_IQN = "iqn.2026-11.org.incusos-hal:loop1"
NVMET = Path("/sys/kernel/config/nvmet")


def _wait(check, seconds: float = 30.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.5)
    return False


def nvme_target() -> None:
    must("modprobe", "nvmet-tcp")
    if not NVMET.exists():
        must("mount", "-t", "configfs", "none", "/sys/kernel/config")
    must("truncate", "-s", "64M", "/var/tmp/nvme-loop1.img")
    loop = must("losetup", "-f", "--show", "/var/tmp/nvme-loop1.img").strip()
    sub = NVMET / "subsystems" / NVME_NQN
    sub.mkdir()
    (sub / "attr_allow_any_host").write_text("1")
    ns = sub / "namespaces" / "1"
    ns.mkdir()
    (ns / "device_path").write_text(loop)
    (ns / "enable").write_text("1")
    port = NVMET / "ports" / "1"
    port.mkdir()
    for name, value in (("trtype", "tcp"), ("adrfam", "ipv4"), ("traddr", "127.0.0.1"),
                        ("trsvcid", "4420")):  # fmt: skip
        (port / f"addr_{name}").write_text(value)
    os.symlink(sub, port / "subsystems" / NVME_NQN)


def iscsi_target() -> None:
    must("modprobe", "iscsi_target_mod")
    must("targetcli", "/backstores/fileio", "create", "loop1", "/var/tmp/iscsi-loop1.img", "64M")
    must("targetcli", "/iscsi", "create", ISCSI_IQN)
    tpg = f"/iscsi/{ISCSI_IQN}/tpg1"
    must("targetcli", f"{tpg}/luns", "create", "/backstores/fileio/loop1")
    must("targetcli", tpg, "set", "attribute", "authentication=0", "demo_mode_write_protect=0",
         "generate_node_acls=1", "cache_dynamic_acls=1")  # fmt: skip


def _connected_nvme() -> list:
    out = []
    for sub in sorted(glob.glob("/sys/class/nvme-subsystem/*")):
        out.append(Path(sub, "subsysnqn").read_text().strip())
    return out


def nvme(result: dict) -> None:
    nvme_target()
    # Through discovery (no NQN): discovery.conf, then `nvme connect-all`.
    discover = {"enabled": True, "targets": [{"transport": "tcp", "address": "127.0.0.1",
                                              "port": 4420}]}  # fmt: skip
    result["put_discovery"] = call("PUT", "/1.0/services/nvme", {"config": discover})
    _wait(lambda: NVME_NQN in _connected_nvme())
    result["get_discovery"] = call("GET", "/1.0/services/nvme")
    result["discovery_conf"] = sh("cat", "/etc/nvme/discovery.conf")
    result["reset"] = call("POST", "/1.0/services/nvme/:reset")
    # Disabled: `nvme disconnect-all`.
    result["put_disabled"] = call("PUT", "/1.0/services/nvme", {"config": {"enabled": False}})
    _wait(lambda: NVME_NQN not in _connected_nvme())
    result["after_disable"] = _connected_nvme()
    # By name (an NQN): `nvme connect --nqn=...`.
    direct = {"enabled": True, "targets": [{**discover["targets"][0], "nqn": NVME_NQN}]}
    result["put_direct"] = call("PUT", "/1.0/services/nvme", {"config": direct})
    _wait(lambda: NVME_NQN in _connected_nvme())
    result["get_direct"] = call("GET", "/1.0/services/nvme")
    # A subsystem nobody serves: the PUT fails, nothing stored, the previous one back.
    wrong = {"enabled": True, "targets": [{**discover["targets"][0], "nqn": NVME_NQN + "x"}]}
    result["put_wrong"] = call("PUT", "/1.0/services/nvme", {"config": wrong})
    _wait(lambda: NVME_NQN in _connected_nvme())
    result["get_after_wrong"] = call("GET", "/1.0/services/nvme")
    result["nvme_list"] = sh("nvme", "list", "-o", "json")


def iscsi(result: dict) -> None:
    iscsi_target()
    config = {"enabled": True, "targets": [{"target": ISCSI_IQN, "address": "127.0.0.1",
                                            "port": 3260}]}  # fmt: skip
    result["put"] = call("PUT", "/1.0/services/iscsi", {"config": config})
    result["get"] = call("GET", "/1.0/services/iscsi")
    result["initiatorname"] = sh("cat", "/etc/iscsi/initiatorname.iscsi")
    result["sessions"] = sh("iscsiadm", "-m", "session")
    sh("udevadm", "settle")
    result["by_path"] = sorted(os.path.basename(p) for p in glob.glob("/dev/disk/by-path/*iscsi*"))
    result["put_disabled"] = call("PUT", "/1.0/services/iscsi", {"config": {"enabled": False}})
    result["sessions_after"] = sh("iscsiadm", "-m", "session")


def multipath(result: dict, wwn: str) -> None:
    config = {"enabled": True, "wwns": [wwn]}
    result["put"] = call("PUT", "/1.0/services/multipath", {"config": config})
    sh("udevadm", "settle")
    _wait(lambda: bool(glob.glob("/dev/mapper/3*")), 30)
    result["get"] = call("GET", "/1.0/services/multipath")
    result["conf"] = sh("cat", "/etc/multipath.conf")
    # The tool's own views, recorded as fixtures for the state's readers.
    result["multipath_ll"] = sh("multipath", "-ll")
    result["show_maps_json"] = sh("multipathd", "show", "maps", "json")


def run(expect: dict) -> dict:
    result: dict = {"list": call("GET", "/1.0/services")}
    for name, step, args in (
        ("nvme", nvme, ()),
        ("iscsi", iscsi, ()),
        ("multipath", multipath, (expect["services"]["wwn"],)),
    ):
        part: dict = {}
        try:
            step(part, *args)
        except Exception:
            part["crashed"] = crashed(f"services: {name}")
        result[name] = part
    result["journal"] = journal("-u", "incusos-hal.service")[-20000:]
    result["stored"] = sh("cat", "/var/lib/incusos-hal/config.toml")
    return json.loads(json.dumps(result))
