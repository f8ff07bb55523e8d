"""The system test's machine, booted as a container (test_system.py) and inside the VM
guest (tests/appliance.py): two NICs on a LAN (a network namespace with addresses, a
DHCP/RA server and a syslog listener) and a config using most of what the renderer knows.
"""

from __future__ import annotations

from pathlib import Path

import nspawn

LAN0_MAC, LAN1_MAC = "52:54:00:99:00:02", "52:54:00:99:01:02"
CONFIG_TEMPLATE = """version = 1

[network.dns]
hostname = "ihal-node"
nameservers = ["10.99.0.1"]
search_domains = ["test.example"]

[network.time]
ntp_servers = ["10.99.0.1"]
timezone = "Europe/Berlin"

[network.proxy.servers.corp]
host = "10.99.0.1:3128"
auth = "basic"
username = "svc"
password = "pa:ss"

[[network.proxy.rules]]
destination = "*.test.example"
target = "direct"

[[network.proxy.rules]]
destination = "*"
target = "corp"

[[network.interfaces]]
name = "lan0"
hwaddr = "{LAN0_MAC}"
addresses = ["10.99.0.2/24", "fd00:99::2/64"]
routes = [{{ to = "10.98.0.0/16", via = "10.99.0.1" }}]
lldp = true
roles = ["management"]

[[network.interfaces]]
name = "lan1"
hwaddr = "{lan1}"
addresses = ["dhcp4", "slaac"]
mtu = 1400
required_for_online = "ipv4"

[logging.syslog]
address = "10.99.0.1:5514"
protocol = "udp"
"""


def config(lan1: str) -> str:
    """The config, with lan1 matched by `lan1`: a NIC name (the container's, to test
    name resolution) or a MAC."""
    return CONFIG_TEMPLATE.format(LAN0_MAC=LAN0_MAC, lan1=lan1)


MARKER = "ihal-syslog-marker-5c1f"
EXPECT = {
    # DHCPv4 and SLAAC (from dnsmasq's router advertisements) on lan1.
    "wait_addresses": {"lan0": "10.99.0.2/", "lan1": ["10.99.1.1", "fd00:99:1:0:"]},
    "ping": ["10.99.0.1"],
    "syslog_marker": MARKER,
    "active_units": [
        "incusos-hal-configure.service",
        "systemd-networkd.service",
        "systemd-resolved.service",
        "systemd-netlogd.service",
    ],
    "verify_units": [
        "incusos-hal-configure.service",
        "systemd-networkd.service",
        "systemd-resolved.service",
        "systemd-netlogd.service",
        "systemd-timesyncd.service",
    ],
}


def new_lan(work: Path, kind: str = "veth") -> nspawn.Lan:
    return nspawn.Lan(
        veths=[
            nspawn.Veth("vc0", "vh0", LAN0_MAC, ("10.99.0.1/24", "fd00:99::1/64")),
            nspawn.Veth("vc1", "vh1", LAN1_MAC, ("10.99.1.1/24", "fd00:99:1::1/64")),
        ],
        dhcp_on="vh1",
        syslog_port=5514,
        work=work,
        kind=kind,
    )
