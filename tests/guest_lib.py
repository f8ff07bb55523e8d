"""Helpers for the probes that run inside booted containers and VM guests (stdlib only).
Copied to /probe beside the probe, which imports it from there.

A step the guest could not do is recorded as a failure record, {FAILED: {what, rc, err,
out} or {what, traceback}}, never as a stand-in for its data: the host reads results
through tests/probe_result.py, which fails a test reading such a record with the guest's
own words.
"""

import json
import subprocess
import traceback
from pathlib import Path

FAILED = "guest_failed"


def sh(*cmd: str, timeout: int = 60) -> dict:
    """Run a command; its exit status and output, never an exception."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"rc": -1, "out": "", "err": str(e)}
    return {"rc": r.returncode, "out": r.stdout, "err": r.stderr}


def failed(what: str, ran: dict | None = None, note: str = "") -> dict:
    """A failure record: `what` was tried; `ran` is its sh() result, if a command."""
    failure: dict = {"what": what}
    if ran is not None:
        failure.update(rc=ran["rc"], err=ran["err"][-8000:], out=ran["out"][-4000:])
    if note:
        failure["note"] = note
    return {FAILED: failure}


def crashed(what: str) -> dict:
    """A failure record for the exception being handled."""
    return {FAILED: {"what": what, "traceback": traceback.format_exc()}}


def data(*cmd: str, timeout: int = 60) -> object:
    """A command's JSON output, or a failure record saying how it ended."""
    r = sh(*cmd, timeout=timeout)
    what = " ".join(cmd)
    if r["rc"] != 0:
        return failed(what, r)
    try:
        return json.loads(r["out"])
    except ValueError as e:
        return failed(what, r, note=f"its output is not JSON: {e}")


def must(*cmd: str, timeout: int = 60) -> str:
    """A command's output; it failing raises, with its exit status and stderr."""
    r = sh(*cmd, timeout=timeout)
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r['rc']}: {r['err'].strip()}")
    return r["out"]


def addresses() -> dict:
    """Interface name -> its addresses with prefix lengths."""
    out = {}
    for link in json.loads(must("ip", "-j", "addr")):
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
