"""VM rung, network: what this host's kernel cannot run, under real systemd in a guest.

A Debian 13 guest with Debian's kernel and four NICs, cabled back to back in pairs
(qemu socket netdevs). The stored config makes an 802.3ad bond of the first two under a
VLAN-filtering bridge, with host VLANs 10 and 20 and VLAN 100 trunked for instances.
The other two play the switch: the guest probe moves them into a namespace with an
802.3ad bond and VLAN devices of its own, and listens for LLDP there. Checks: LACP
aggregates with the partner, the bridge filters VLANs with the right memberships, the
host VLANs reach the partner's addresses, and LLDP from both members arrives at the
partner. A second boot of the same disk with config.toml corrupted comes up from the
last good copy, and this time the generator's own kmsg log is in the journal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import vm
from conftest import require_root, require_tool

pytestmark = pytest.mark.system

MEMBERS = ("52:54:00:12:00:01", "52:54:00:12:00:02")
PARTNER = ("52:54:00:12:00:03", "52:54:00:12:00:04")
CONFIG = f"""version = 1

[[network.bonds]]
name = "uplink"
mode = "802.3ad"
members = ["{MEMBERS[0]}", "{MEMBERS[1]}"]
lldp = true
vlan_tags = [100]

[[network.vlans]]
name = "mgmt"
parent = "uplink"
id = 10
addresses = ["10.10.0.2/24"]

[[network.vlans]]
name = "storage"
parent = "uplink"
id = 20
addresses = ["10.20.0.2/24"]
"""
EXPECT = {
    "partner_macs": list(PARTNER),
    "member_macs": list(MEMBERS),
    "partner_vlans": {"10": "10.10.0.1/24", "20": "10.20.0.1/24"},
    "ping": ["10.10.0.1", "10.20.0.1"],
    "wait_addresses": {"mgmt": "10.10.0.2", "storage": "10.20.0.2"},
    "bond": "_buplink",
    "bridge": "uplink",
}
PROBE = (Path(__file__).parent / "guest_network_probe.py").read_text()


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> vm.Guest:
    require_root()
    require_tool("qemu-system-x86_64", "debootstrap", "systemd-nspawn", "mkfs.ext4", "mount")
    work = tmp_path_factory.mktemp("vm-network")

    def customize(root: Path) -> None:
        (root / "var/tmp/config.toml").write_text(CONFIG)
        vm.nspawn.nspawn_run(root, "incusos-hal save --config /var/tmp/config.toml")

    g = vm.build(work, PROBE, customize)
    g.nics = vm.cables([(MEMBERS[0], PARTNER[0]), (MEMBERS[1], PARTNER[1])])
    return g


@pytest.fixture(scope="module")
def first_boot(guest: vm.Guest) -> vm.Result:
    return guest.boot(EXPECT)


def test_boot_is_clean(first_boot: vm.Result) -> None:
    r = first_boot.result
    print(
        f"guest: {first_boot.accel}, {first_boot.seconds:.0f}s to power-off, "
        f"probe ran at {r['uptime']:.0f}s uptime"
    )
    assert r["failed_units"] == "", r["failed_units"]
    assert r["active"] == {
        "incusos-hal-configure.service": "active",
        "systemd-networkd.service": "active",
    }, r["journal_configure"]


def _sections(bonding: str) -> dict[str, str]:
    parts = bonding.split("Slave Interface: ")
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


def test_lacp_aggregates_with_the_partner(first_boot: vm.Result) -> None:
    r = first_boot.result
    bonding = r["bonding"]
    assert "Bonding Mode: IEEE 802.3ad Dynamic link aggregation" in bonding, bonding
    assert "Transmit Hash Policy: layer3+4" in bonding
    assert "LACP rate: fast" in bonding
    assert "MII Polling Interval (ms): 100" in bonding
    assert f"Partner Mac Address: {r['partner_bond_mac']}" in bonding, bonding
    slaves = _sections(bonding)
    ports = {"_p" + m.replace(":", "") for m in MEMBERS}
    assert set(slaves) == ports
    active = bonding.split("Active Aggregator Info:")[1].split("Aggregator ID: ")[1].split()[0]
    for name, section in slaves.items():
        assert f"Aggregator ID: {active}" in section, f"{name} is not in the active aggregator"
        assert "MII Status: up" in section
    bond = next(x for x in r["links"] if x["ifname"] == "_buplink")
    assert bond["address"] == MEMBERS[0], "the bond's MAC is not its first member's"


def test_bridge_filters_vlans(first_boot: vm.Result) -> None:
    r = first_boot.result
    assert r["vlan_filtering"] == "1"
    vlans: dict[str, set[int]] = {
        x["ifname"]: {v["vlan"] for v in x["vlans"]} for x in r["bridge_vlans"]
    }
    assert {10, 20, 100} <= vlans["_buplink"], vlans
    assert {10, 20} <= vlans["uplink"], vlans  # the bridge itself, for the host VLANs
    assert 100 not in vlans["uplink"], "an instance-only VLAN reached the host"


def test_host_vlans_reach_the_partner(first_boot: vm.Result) -> None:
    r = first_boot.result
    assert "10.10.0.2/24" in r["addresses"]["mgmt"]
    assert "10.20.0.2/24" in r["addresses"]["storage"]
    for ip, ping in r["ping"].items():
        assert ping["rc"] == 0, f"{ip}: {ping}"
    networkd = {x["Name"]: x["AdministrativeState"] for x in r["networkd"]}
    for name in (
        "uplink",
        "_buplink",
        "mgmt",
        "storage",
        *("_p" + m.replace(":", "") for m in MEMBERS),
    ):
        assert networkd.get(name) == "configured", networkd


def test_lldp_from_both_members_reaches_the_partner(first_boot: vm.Result) -> None:
    r = first_boot.result
    lldp: dict[str, list[dict[str, Any]]] = r["lldp"]
    assert len(lldp) == 2 and all(lldp.values()), (
        lldp,
        r["lldp_sent"],
        r["ethertypes"],
        r["networkctl_status"],
    )
    seen_ports = {frame.get("port") for frames in lldp.values() for frame in frames}
    assert seen_ports == {"_p" + m.replace(":", "") for m in MEMBERS}, lldp


@pytest.fixture(scope="module")
def broken_boot(guest: vm.Guest, first_boot: vm.Result) -> vm.Result:
    """The same disk again, config.toml corrupted behind the store's back."""
    # The image is plain ext4: edit it offline with debugfs, as a failed write would.
    garbage = guest.probe_dir / "garbage.toml"
    garbage.write_text("version = 1\n[[network.bonds]\nbroken")
    vm.nspawn.run(
        ["debugfs", "-w", "-R", "rm /var/lib/incusos-hal/config.toml", str(guest.image)],
        capture_output=True,
    )
    vm.nspawn.run(
        [
            "debugfs",
            "-w",
            "-R",
            f"write {garbage} /var/lib/incusos-hal/config.toml",
            str(guest.image),
        ],
        capture_output=True,
    )
    return guest.boot(EXPECT)


def test_second_boot_survives_a_corrupted_config(broken_boot: vm.Result) -> None:
    r = broken_boot.result
    assert r["failed_units"] == "", r["failed_units"]
    for ping in r["ping"].values():
        assert ping["rc"] == 0, ping
    assert "Partner Mac Address: 00:00:00:00:00:00" not in r["bonding"]
    # Real /dev/kmsg here: the generator's warnings reach the journal.
    assert "config.toml: not valid TOML" in r["journal_generator"], r["journal_generator"]
    assert "using /var/lib/incusos-hal/config.last-good.toml" in r["journal_generator"]
    assert "using /var/lib/incusos-hal/config.last-good.toml" in r["journal_configure"]
