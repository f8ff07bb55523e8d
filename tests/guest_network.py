"""Probe part, in the VM guest (stdlib only). Plays the switch on the far end of the
cables: the partner NICs go into a network namespace `sw` holding an 802.3ad bond with
VLAN devices, while a raw socket records the LLDP frames arriving from the machine under
test. Then waits for LACP to aggregate and records what the tests assert on; last,
starts lldpd on the switch's ports (named LLDPD_NAME), for later parts to see.

expect["network"]: {"partner_macs": [...], "partner_vlans": {"10": "10.10.0.1/24"},
"ping": [...], "wait_addresses": {...}, "bond": "_buplink", "bridge": "uplink"}
"""

import json
import os
import socket
import struct
import time
from pathlib import Path

from guest_lib import data, journal, must, networkd_links, sh

ETH_P_LLDP = 0x88CC
LLDPD_SOCKET = "/run/lldpd-sw.socket"
LLDPD_NAME = "ihal-sw"


def lldp_tlvs(frame: bytes) -> dict:
    """Chassis ID (type 1), port ID (2) and system name (5) of an LLDPDU."""
    out, pos = {}, 14
    while pos + 2 <= len(frame):
        (head,) = struct.unpack("!H", frame[pos : pos + 2])
        kind, length = head >> 9, head & 0x1FF
        value = frame[pos + 2 : pos + 2 + length]
        if kind == 0:
            break
        if kind in (1, 2) and value:
            sub, data = value[0], value[1:]
            out[{1: "chassis", 2: "port"}[kind]] = (
                data.hex(":") if sub in (3, 4) and len(data) == 6 else data.decode(errors="replace")
            )
        elif kind == 5:
            out["system_name"] = value.decode(errors="replace")
        pos += 2 + length
    return out


def run(expect_all: dict) -> dict:
    expect = expect_all["network"]
    by_mac = {link["address"]: link["ifname"] for link in json.loads(must("ip", "-j", "link"))}
    partner = [by_mac[m] for m in expect["partner_macs"]]

    # The switch: its own namespace, so its addresses and the machine's do not mix.
    must("ip", "netns", "add", "sw")
    for nic in partner:
        must("ip", "link", "set", nic, "netns", "sw")
    # Listen for LLDP on the switch ports before the bond takes them.
    os.setns(os.open("/run/netns/sw", os.O_RDONLY), os.CLONE_NEWNET)
    ETH_P_ALL = 3
    SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_MULTICAST = 263, 1, 0
    LLDP_GROUP = bytes.fromhex("0180c200000e")
    listeners = {}
    for nic in partner:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((nic, 0))
        # Join the LLDP group as an LLDP agent does: the NIC's filter drops it otherwise.
        mreq = struct.pack("iHH8s", socket.if_nametoindex(nic), PACKET_MR_MULTICAST, 6, LLDP_GROUP)
        s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        s.setblocking(False)
        listeners[nic] = s
    must(
        "ip",
        "link",
        "add",
        "swbond",
        "type",
        "bond",
        "mode",
        "802.3ad",
        "miimon",
        "100",
        "lacp_rate",
        "fast",
        "xmit_hash_policy",
        "layer3+4",
    )
    for nic in partner:
        must("ip", "link", "set", nic, "master", "swbond")
    must("ip", "link", "set", "swbond", "up")
    for vid, address in expect["partner_vlans"].items():
        must(
            "ip",
            "link",
            "add",
            "link",
            "swbond",
            "name",
            f"swbond.{vid}",
            "type",
            "vlan",
            "id",
            vid,
        )
        must("ip", "addr", "add", address, "dev", f"swbond.{vid}")
        must("ip", "link", "set", f"swbond.{vid}", "up")
    os.setns(os.open("/proc/1/ns/net", os.O_RDONLY), os.CLONE_NEWNET)
    # And on the machine's own members: what leaves them (pkttype 4 is PACKET_OUTGOING).
    for mac in expect.get("member_macs", []):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind(("_p" + mac.replace(":", ""), 0))
        s.setblocking(False)
        listeners["_p" + mac.replace(":", "")] = s

    lldp: dict = {nic: [] for nic in listeners}
    ethertypes: dict = {nic: {} for nic in listeners}
    deadline = time.monotonic() + 90
    bonding = ""
    while time.monotonic() < deadline:
        for nic, s in listeners.items():
            try:
                while True:
                    frame, address = s.recvfrom(2048)
                    kind = struct.unpack("!H", frame[12:14])[0] if len(frame) >= 14 else 0
                    key = f"{kind:04x}/{address[2]}"
                    ethertypes[nic][key] = ethertypes[nic].get(key, 0) + 1
                    if kind == ETH_P_LLDP:
                        lldp[nic].append(lldp_tlvs(frame))
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass  # ENETDOWN while the bond takes the port: read again next round
        bonding = (
            Path(f"/proc/net/bonding/{expect['bond']}").read_text()
            if Path(f"/proc/net/bonding/{expect['bond']}").exists()
            else ""
        )
        aggregated = (
            "Partner Mac Address" in bonding
            and "Partner Mac Address: 00:00:00:00:00:00" not in bonding
        )
        addrs = {
            x["ifname"]: [a["local"] for a in x.get("addr_info", [])]
            for x in json.loads(must("ip", "-j", "addr"))
        }
        have = all(
            any(a.startswith(p) for a in addrs.get(n, []))
            for n, p in expect["wait_addresses"].items()
        )
        pings = [sh("ping", "-c", "1", "-W", "1", ip)["rc"] == 0 for ip in expect["ping"]]
        if aggregated and have and all(pings) and all(lldp[n] for n in partner):
            break
        time.sleep(1)

    # Then a real LLDP agent on the switch's ports (the listeners above are done: its
    # own frames would count as the machine's): lldpd, whose neighbour networkd records
    # on the machine's bond members for the API's state (tests/guest_kernel.py).
    Path("/run/lldpd").mkdir(exist_ok=True)  # its chroot, which its masked unit would make
    lldpd = [sh("ip", "netns", "exec", "sw", "lldpd", "-u", LLDPD_SOCKET, "-I", ",".join(partner))]
    for command in (f"configure system hostname {LLDPD_NAME}", "configure lldp tx-interval 5"):
        time.sleep(1)  # its control socket is there once it has started
        lldpd.append(
            sh("ip", "netns", "exec", "sw", "lldpcli", "-u", LLDPD_SOCKET, *command.split())
        )

    result = {
        "lldpd": lldpd,
        "partner_ports": {
            # A bond member's address is its bond's; lldpd names the port by the NIC's own
            # (permanent) address.
            nic: (lambda link: link.get("permaddr", link["address"]))(
                json.loads(must("ip", "-n", "sw", "-j", "link", "show", nic))[0]
            )
            for nic in partner
        },
        "bonding": bonding,
        "partner_bonding": sh("ip", "netns", "exec", "sw", "cat", "/proc/net/bonding/swbond")[
            "out"
        ],
        "partner_bond_mac": json.loads(must("ip", "-n", "sw", "-j", "link", "show", "swbond"))[0][
            "address"
        ],
        "lldp": {n: lldp[n] for n in partner},
        "lldp_sent": {n: frames for n, frames in lldp.items() if n not in partner},
        "ethertypes": ethertypes,
        "networkctl_status": {
            m: sh("networkctl", "status", "--no-pager", "_p" + m.replace(":", ""))["out"]
            for m in expect.get("member_macs", [])
        },
        "ping": {ip: sh("ping", "-c", "2", "-W", "2", ip) for ip in expect["ping"]},
        "addresses": {
            x["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in x.get("addr_info", [])]
            for x in json.loads(must("ip", "-j", "addr"))
        },
        "links": json.loads(must("ip", "-j", "-d", "link")),
        "bridge_vlans": data("bridge", "-j", "vlan", "show"),
        "vlan_filtering": Path(f"/sys/class/net/{expect['bridge']}/bridge/vlan_filtering")
        .read_text()
        .strip(),
        "networkd": networkd_links(),
        "failed_units": sh("systemctl", "list-units", "--failed", "--plain", "--no-legend")["out"],
        "active": {
            u: sh("systemctl", "is-active", u)["out"].strip()
            for u in ("incusos-hal-configure.service", "systemd-networkd.service")
        },
        "journal_generator": journal("-t", "incusos-hal-generator"),
        "journal_configure": journal("-u", "incusos-hal-configure.service"),
    }
    # The two ends of a real 802.3ad bond, as the kernel shows them, for
    # tests/fixtures/bonding (the LACP parser's fixtures).
    kept = Path("/probe/artifacts/bonding")
    kept.mkdir(parents=True, exist_ok=True)
    (kept / f"{expect['bond']}.txt").write_text(bonding)
    (kept / "swbond.txt").write_text(result["partner_bonding"])
    return result
