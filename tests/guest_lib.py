"""Helpers for the probes that run inside booted containers and VM guests (stdlib only).
Copied to /probe beside the probe, which imports it from there."""

import json
import subprocess
from pathlib import Path


def sh(*cmd: str, timeout: int = 60) -> dict:
    """Run a command; its exit status and output, never an exception."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"rc": -1, "out": "", "err": str(e)}
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr}


def addresses() -> dict:
    """Interface name -> its addresses with prefix lengths."""
    out = {}
    for link in json.loads(sh("ip", "-j", "addr")["out"] or "[]"):
        out[link["ifname"]] = [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])]
    return out


def networkd_links() -> list:
    data = json.loads(sh("networkctl", "--json=short", "list")["out"] or "{}")
    return data.get("Interfaces", [])


def journal(*selector: str) -> str:
    return sh("journalctl", "-b", "-o", "cat", "--no-pager", *selector)["out"]


def nvme_namespace(serial: str, nsid: int) -> str:
    """The block device of namespace `nsid` of the NVMe controller with this serial. Not
    /dev/nvme<controller>n<nsid>: with native multipath the name follows the subsystem's
    instance, which probing in parallel may number differently on every boot."""
    ctrl = next(
        p.name
        for p in Path("/sys/class/nvme").glob("nvme*")
        if (p / "serial").read_text().strip() == serial
    )
    for block in sorted(Path("/sys/block").glob("nvme*n*")):
        # The namespace's parent is the controller, or (multipath) its subsystem holding it.
        ours = (block / "device").resolve().name == ctrl or (block / "device" / ctrl).exists()
        if ours and (block / "nsid").read_text().strip() == str(nsid):
            return f"/dev/{block.name}"
    raise RuntimeError(f"no namespace {nsid} on the NVMe controller {serial}")
