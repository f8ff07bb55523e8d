"""Helpers for the probes that run inside booted containers and VM guests (stdlib only).
Copied to /probe beside the probe, which imports it from there."""

import json
import subprocess


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
