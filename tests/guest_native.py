"""Probe part, in the VM guest: the HAL's ioctl fast paths (installed package, cffi
extension built at install) against the tools a user would run, on real NVMe, SCSI and
NIC devices; both backends; a recorded tree of the guest; and timings for ci/bench.

expect["native"]: {"nvme": "/dev/nvme0", "scsi": "/dev/sda", "nic": "enp0s2",
"label": "secureboot", "time": true}
"""

import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from guest_lib import crashed, data, failed, sh


def run(expect_all: dict) -> dict:
    from incusos_hal import _native
    from incusos_hal.hal import ethtool, nvme, scsi

    spec = expect_all.get("native", {})
    out: dict = {"compiled_backend": _native.backend}
    for backend in ("cffi", "python"):
        try:
            _native.use(backend)
        except ImportError:
            out[backend] = crashed(f"_native.use({backend!r})")
            continue
        ours: dict = {}
        for name, call in (
            ("id_ctrl", lambda: asdict(nvme.identify_controller(spec["nvme"]))),
            ("id_ns", lambda: asdict(nvme.identify_namespace(spec["nvme"] + "n1", 1))),
            ("smart", lambda: asdict(nvme.smart_log(spec["nvme"]))),
            ("inquiry", lambda: asdict(scsi.inquiry(spec["scsi"]))),
            ("serial", lambda: scsi.serial_number(spec["scsi"])),
            ("wwid", lambda: scsi.device_identification(spec["scsi"]).wwid),
            ("drvinfo", lambda: asdict(ethtool.driver_info(spec["nic"]))),
            ("link", lambda: asdict(ethtool.link_settings(spec["nic"]))),
        ):
            try:
                ours[name] = call()
            except Exception:
                ours[name] = crashed(f"{name} through the {backend} backend")
        out[backend] = ours
    out["tools"] = {
        "id_ctrl": data("nvme", "id-ctrl", spec["nvme"], "-o", "json"),
        "id_ns": data("nvme", "id-ns", spec["nvme"] + "n1", "-n", "1", "-o", "json"),
        "smart": data("nvme", "smart-log", spec["nvme"], "-o", "json"),
        "sg_inq": sh("sg_inq", spec["scsi"])["out"],
        "sg_vpd_80": sh("sg_vpd", "--page=0x80", spec["scsi"])["out"],
        "udev": sh("udevadm", "info", "--query=property", f"--name={spec['scsi']}")["out"],
        "ethtool": sh("ethtool", spec["nic"])["out"],
        "ethtool_i": sh("ethtool", "-i", spec["nic"])["out"],
    }
    tree = Path("/probe/artifacts") / spec.get("label", "boot") / "tree"
    started = time.monotonic()
    try:
        proc = subprocess.run(
            ["incusos-hal", "record", str(tree)], capture_output=True, text=True, timeout=600
        )
        ran = {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr}
    except subprocess.TimeoutExpired as e:
        ran = {"rc": -1, "out": "", "err": f"timed out: {e}"}
    seconds = time.monotonic() - started
    out["record"] = (
        {"seconds": seconds}
        if ran["rc"] == 0
        else failed(f"incusos-hal record {tree} (after {seconds:.0f}s)", ran)
    )
    # Every section but those that move between two reads (memory, load).
    from incusos_hal.inventory import SCANNERS

    sections = [name for name in SCANNERS if name not in ("memory", "load")]
    out["inventory_live"] = data("incusos-hal", "inventory", "--format", "json", *sections)
    out["inventory_tree"] = data(
        "incusos-hal", "inventory", "--root", str(tree), "--format", "json", *sections
    )
    if spec.get("time"):
        _native.use("cffi")
        n = 200
        started = time.perf_counter()
        for _ in range(n):
            nvme.identify_controller(spec["nvme"])
        ours_s = (time.perf_counter() - started) / n
        runs = 20
        started = time.perf_counter()
        for _ in range(runs):
            subprocess.run(
                ["nvme", "id-ctrl", spec["nvme"], "-o", "json"], capture_output=True, check=True
            )
        tool_s = (time.perf_counter() - started) / runs
        out["timing"] = {"cffi_identify_s": ours_s, "nvme_id_ctrl_s": tool_s}
    return out
