"""Probe part, in a booted container or VM guest (stdlib only): waits for the network to
settle, then records everything the system tests assert on.

expect["system"] may hold {"wait_addresses": {"ifname": "prefix" or [prefixes], ...},
"syslog_marker": "text", "verify_units": [...], "active_units": [...], "ping": [...]}.
"""

import os
import socket
import time
from pathlib import Path

from guest_lib import addresses, data, journal, networkd_links, sh


def run(expect_all: dict) -> dict:
    expect = expect_all["system"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        links = networkd_links()
        busy = [
            x["Name"]
            for x in links
            if x.get("AdministrativeState") in ("pending", "initialized", "configuring")
        ]
        addrs = addresses()
        # Each interface: one address prefix, or a list of them that must all be there.
        missing = [
            f"{name}:{prefix}"
            for name, wanted in expect.get("wait_addresses", {}).items()
            for prefix in ([wanted] if isinstance(wanted, str) else wanted)
            if not any(a.startswith(prefix) for a in addrs.get(name, []))
        ]
        if links and not busy and not missing:
            break
        time.sleep(0.5)

    marker = expect.get("syslog_marker")
    if marker:
        sh("logger", "-t", "ihal-probe", marker)

    result = {
        "waited_for": {"busy": busy, "missing": missing},
        "hostname": socket.gethostname(),
        "environ": {k: os.environ.get(k) for k in ("http_proxy", "https_proxy", "no_proxy")},
        "addresses": addresses(),
        "links": data("ip", "-j", "-d", "link"),
        "networkd": networkd_links(),
        "routes": data("ip", "-j", "route", "show", "table", "main"),
        "ping": sh("ping", "-c", "1", "-W", "3", *expect.get("ping", ["127.0.0.1"])),
        "active": {
            u: sh("systemctl", "is-active", u)["out"].strip()
            for u in expect.get("active_units", [])
        },
        "localtime": os.readlink("/etc/localtime") if os.path.islink("/etc/localtime") else None,
        "verify": sh("systemd-analyze", "verify", "--man=no", *expect.get("verify_units", [])),
        "generator_files": sorted(
            str(p) for p in Path("/run/systemd/generator").rglob("*") if not p.is_dir()
        ),
        "network_files": {
            p.name: p.read_text() for p in sorted(Path("/run/systemd/network").glob("*"))
        },
        "journal_generator": journal("-t", "incusos-hal-generator"),
        "journal_configure": journal("-u", "incusos-hal-configure.service"),
        "journal_networkd": journal("-u", "systemd-networkd.service"),
        "failed_units": sh("systemctl", "list-units", "--failed", "--plain", "--no-legend")["out"],
    }
    # Run the installed generator again, as systemd does on daemon-reload: directly, through
    # its #! line, for its output; and under -X importtime for what it imports (with the
    # cache current, nothing of the slow path).
    generator = "/usr/lib/systemd/system-generators/incusos-hal-generator"
    direct = sh(generator, "/tmp/g/normal", "/tmp/g/early", "/tmp/g/late")
    traced = sh("python3", "-IS", "-X", "importtime", generator, "/tmp/t/n", "/tmp/t/e", "/tmp/t/l")
    result["generator_rerun"] = {
        "rc": direct["rc"],
        "err": direct["err"],
        "imports": [
            line.rsplit("|", 1)[-1].strip()
            for line in traced["err"].splitlines()
            if line.startswith("import time:") and "|" in line
        ],
        "files": sorted(
            str(p.relative_to("/tmp/g/normal"))
            for p in Path("/tmp/g/normal").rglob("*")
            if not p.is_dir()
        ),
    }

    if marker:
        time.sleep(3)  # let systemd-netlogd forward the marker before the power goes
    rendered = sh("incusos-hal", "render", "--out", "/tmp/ihal-render")
    result["render_here"] = {
        "rc": rendered["rc"],
        "err": rendered["err"],
        "files": {
            p.name: p.read_text()
            for p in sorted(Path("/tmp/ihal-render/run/systemd/network").glob("*"))
        },
    }
    return result
