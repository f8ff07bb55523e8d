"""VM rung, network: what this host's kernel cannot run, under real systemd in a guest.

The machine is tests/appliance.py's: four NICs cabled back to back in pairs; the stored
config makes an 802.3ad bond of the first two under a VLAN-filtering bridge, with host
VLANs 10 and 20 and VLAN 100 trunked for instances. The other two play the switch
(tests/guest_network.py): an 802.3ad bond and VLAN devices in a namespace, listening for
LLDP. Checks: LACP aggregates with the partner, the bridge filters VLANs with the right
memberships, the host VLANs reach the partner's addresses, and LLDP from both members
arrives at the partner. The second boot of the same disk, config.toml corrupted, comes
up from the last good copy, and the generator's own kmsg log is in the journal.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import appliance
import vm
from appliance import MEMBERS, PARTNER

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def first_boot(secure_boot: vm.Result) -> dict[str, Any]:
    network: dict[str, Any] = secure_boot.result["network"]
    return network


@pytest.fixture(scope="module")
def broken_boot(setup_mode: vm.Result) -> dict[str, Any]:
    network: dict[str, Any] = setup_mode.result["network"]
    return network


def test_boot_is_clean(secure_boot: vm.Result, first_boot: dict[str, Any]) -> None:
    r = first_boot
    print(
        f"guest: {secure_boot.accel}, first command at {secure_boot.first_command or 0:.0f}s, "
        f"power-off at {secure_boot.seconds:.0f}s, probe started at "
        f"{secure_boot.result['uptime_at_start']:.0f}s uptime"
    )
    assert r["failed_units"] == "", r["failed_units"]
    assert r["active"] == {
        "incusos-hal-configure.service": "active",
        "systemd-networkd.service": "active",
    }, r["journal_configure"]


def _sections(bonding: str) -> dict[str, str]:
    parts = bonding.split("Slave Interface: ")
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


def test_lacp_aggregates_with_the_partner(first_boot: dict[str, Any]) -> None:
    r = first_boot
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


def test_network_state_shows_each_members_lacp_partner(
    secure_boot: vm.Result, first_boot: dict[str, Any]
) -> None:
    """GET /1.0/system/network at the end of boot 1 (tests/guest_kernel.py): the bond's
    members, under their `_p<mac>` names, carry `lacp` from the bonding driver, whose
    partner is the switch namespace's own 802.3ad bond (its MAC, not zeros)."""
    part = secure_boot.result["kernel"]
    assert part["network_status"] == 200, part
    uplink = part["network_state"]["interfaces"]["uplink"]
    assert uplink["type"] == "bond", uplink
    members = uplink["members"]
    ports = {"_p" + m.replace(":", ""): m for m in MEMBERS}
    assert set(members) == set(ports), members
    for name, member in members.items():
        assert member["type"] == "bond_member", member
        assert member["lacp"] == {
            "local_mac": MEMBERS[0],  # the bond's MAC, its first member's
            "remote_mac": first_boot["partner_bond_mac"],
        }, (name, member, part["bonding"])


def test_network_state_shows_the_switchs_lldpd_on_each_member(
    secure_boot: vm.Result, first_boot: dict[str, Any]
) -> None:
    """A real LLDP agent on the far end: lldpd in the switch namespace (started by
    tests/guest_network.py), heard by networkd on each member and shown by GET in
    IncusOS's shape: the system name, a chassis ID, and the port ID lldpd sends (the
    switch port's MAC, or its name)."""
    part = secure_boot.result["kernel"]
    assert part["lldp_after_s"] is not None, (part["networkctl_lldp"], first_boot["lldpd"])
    members = part["network_state"]["interfaces"]["uplink"]["members"]
    by_port = {"_p" + m.replace(":", ""): p for m, p in zip(MEMBERS, PARTNER, strict=True)}
    switch_ports = first_boot["partner_ports"]  # its NIC name -> MAC
    for name, member in members.items():
        (neighbour,) = member["lldp"]
        assert neighbour["name"] == appliance.KERNEL["lldp_name"], member
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", neighbour["chassis_id"]), member
        cabled = next(nic for nic, mac in switch_ports.items() if mac == by_port[name])
        assert neighbour["port_id"] in (cabled, by_port[name]), (member, switch_ports)


def test_bridge_filters_vlans(first_boot: dict[str, Any]) -> None:
    r = first_boot
    assert r["vlan_filtering"] == "1"
    vlans: dict[str, set[int]] = {
        x["ifname"]: {v["vlan"] for v in x["vlans"]} for x in r["bridge_vlans"]
    }
    assert {10, 20, 100} <= vlans["_buplink"], vlans
    assert {10, 20} <= vlans["uplink"], vlans  # the bridge itself, for the host VLANs
    assert 100 not in vlans["uplink"], "an instance-only VLAN reached the host"


def test_host_vlans_reach_the_partner(first_boot: dict[str, Any]) -> None:
    r = first_boot
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


def test_lldp_from_both_members_reaches_the_partner(first_boot: dict[str, Any]) -> None:
    r = first_boot
    lldp: dict[str, list[dict[str, Any]]] = r["lldp"]
    assert len(lldp) == 2 and all(lldp.values()), (
        lldp,
        r["lldp_sent"],
        r["ethertypes"],
        r["networkctl_status"],
    )
    seen_ports = {frame.get("port") for frames in lldp.values() for frame in frames}
    assert seen_ports == {"_p" + m.replace(":", "") for m in MEMBERS}, lldp


def test_second_boot_survives_a_corrupted_config(broken_boot: dict[str, Any]) -> None:
    r = broken_boot
    assert vm.failed_units(r["failed_units"]) == vm.LOCKED_IN_SETUP_MODE, r["failed_units"]
    for ping in r["ping"].values():
        assert ping["rc"] == 0, ping
    assert "Partner Mac Address: 00:00:00:00:00:00" not in r["bonding"]
    # Real /dev/kmsg here: the generator's warnings reach the journal.
    assert "config.toml: not valid TOML" in r["journal_generator"], r["journal_generator"]
    assert "using /var/lib/incusos-hal/config.last-good.toml" in r["journal_generator"]
    assert "using /var/lib/incusos-hal/config.last-good.toml" in r["journal_configure"]
