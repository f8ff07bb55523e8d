"""The VM rung's machine: one Debian 13 guest with everything the HAL drives, booted twice.

Devices: OVMF (Secure Boot capable), a TPM 2.0 from swtpm, two NVMe controllers (three
namespaces), one SCSI disk behind two HBAs (two paths to one WWN), two NICs on the system
test's LAN (tests/system_case.py: taps in a namespace with DHCP/RA and syslog), and four
NICs cabled back to back in pairs. The stored config is the system test's plus an 802.3ad
bond of the first two cabled NICs under a VLAN-filtering bridge, with host VLANs 10 and
20 and VLAN 100 trunked for instances; the other two play the switch
(tests/guest_network.py).

Boot 1: snakeoil keys enrolled, Secure Boot on; a LUKS2 volume is formatted on an NVMe
namespace and a persistent key made in the TPM; three more LUKS2 volumes get TPM tokens
(the HAL's and systemd-cryptenroll's) and a crypttab (tests/guest_security.py). Boot 2, the
same disks and TPM state: firmware in setup mode (Secure Boot off, so PCR 7 changes),
config.toml corrupted behind the store's back.
Each boot runs the system, network, hardware, native and security probe parts (boot 2 then
the API part: a VLAN on the bond added through the API, a change rolled back); every check
reads their results: test_system.py's against the container and this guest alike.
Software emulation makes a boot cost minutes, so the suite boots this machine twice and
checks everything on those two boots.
"""

from __future__ import annotations

from pathlib import Path

import probe_result
import system_case
import vm

MEMBERS = ("52:54:00:12:00:01", "52:54:00:12:00:02")
PARTNER = ("52:54:00:12:00:03", "52:54:00:12:00:04")
CONFIG = (
    system_case.config(system_case.LAN1_MAC)
    + f"""
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
)
NVME = [
    vm.NvmeController("IHALNVME0001", (64, 32)),
    vm.NvmeController("IHALNVME0002", (96,)),
    # Four blank namespaces for the security part's LUKS2 volumes.
    vm.NvmeController("IHALNVME0003", (32, 32, 32, 32)),
]
MULTIPATH = vm.MultipathDisk("IHALMPATH01", 0x5000C50015EA71AC)
# What udev and multipath-tools call the disk: NAA designator type 3, then the WWN.
MULTIPATH_WWID = f"3{MULTIPATH.wwn:016x}"
TPM_HANDLE = "0x81010010"
LUKS = {
    "serial": "IHALNVME0002",
    "nsid": 1,
    "key": "ihal-test-luks-key",  # a throwaway volume in a test guest
    "marker": "written on the first boot",
}
# multipath-tools multipaths a WWID once it has two paths: what a SAN host sets.
MULTIPATH_CONF = """defaults {
    user_friendly_names no
    find_multipaths yes
}
"""
NETWORK_EXPECT = {
    "partner_macs": list(PARTNER),
    "member_macs": list(MEMBERS),
    "partner_vlans": {"10": "10.10.0.1/24", "20": "10.20.0.1/24"},
    "ping": ["10.10.0.1", "10.20.0.1"],
    "wait_addresses": {"mgmt": "10.10.0.2", "storage": "10.20.0.2"},
    "bond": "_buplink",
    "bridge": "uplink",
}
PARTS = ("system", "network", "hardware", "native", "security")
# Boot 1 ends with the kernel part (tests/guest_kernel.py): sysctls and zram swap through
# the API, and the bond's LACP in the network state. No passthrough: the next boot would
# hand the device to vfio-pci.
FIRST_BOOT_PARTS = (*PARTS, "kernel")
KERNEL = {
    "algorithms": ["reno", "cubic"],
    "zram": ["96MiB", "128MiB"],
    "zram_bytes": [96 << 20, 128 << 20],
    "passthrough": False,
    "bond": "uplink",
    "lldp_name": "ihal-sw",  # tests/guest_network.py's lldpd
}
# Boot 2 ends with the API part (tests/guest_api.py): a VLAN added on the bond and an
# address on a host VLAN through the API, then an unconfirmed change rolled back.
API = {
    "iface": "mgmt",
    "added": "10.10.0.3/24",
    "kept": "10.10.0.2/24",
    "timeout": "30s",
    "vlan": {"name": "api30", "parent": "uplink", "id": 30, "addresses": ["10.30.0.2/24"]},
}
SECURITY = {
    "serial": "IHALNVME0003",
    "key": "ihal-security-test-key",  # throwaway volumes in a test guest
}


def expect(label: str, *, syslog_marker: bool) -> dict[str, object]:
    return {
        "system": dict(
            system_case.EXPECT, syslog_marker=system_case.MARKER if syslog_marker else None
        ),
        "network": NETWORK_EXPECT,
        "native": {
            "label": label,
            "nvme": "/dev/nvme0",
            "scsi": "/dev/sda",
            # A virtio NIC on the LAN: its port keeps the kernel's link settings.
            "nic": "_p" + system_case.LAN0_MAC.replace(":", ""),
            "time": True,
        },
        "security": {**SECURITY, "label": label},
        "api": API,
        "kernel": KERNEL,
        "hardware": {
            "label": label,
            "tpm_handle": TPM_HANDLE,
            "luks": LUKS,
            "multipath_wwid": MULTIPATH_WWID,
        },
    }


def build(work: Path) -> vm.Guest:
    def customize(root: Path) -> None:
        (root / "var/tmp/config.toml").write_text(CONFIG)
        vm.nspawn.nspawn_run(root, "incusos-hal save --config /var/tmp/config.toml")
        (root / "etc/multipath.conf").write_text(MULTIPATH_CONF)
        # networkd is the LLDP agent here (the config's `lldp`); lldpd, installed for the
        # inventory's comparisons, would send frames of its own on every port.
        (root / "etc/systemd/system/lldpd.service").symlink_to("/dev/null")

    guest = vm.build(work, customize)
    guest.nics = vm.cables([(MEMBERS[0], PARTNER[0]), (MEMBERS[1], PARTNER[1])])
    guest.taps = [(v.mac, v.outside) for v in system_case.new_lan(work).veths]
    guest.tpm = True
    guest.nvme = NVME
    guest.multipath = MULTIPATH
    return guest


def corrupt_config(guest: vm.Guest) -> None:
    """Replace config.toml with garbage, offline (debugfs on the ext4 image), as a torn
    write by something other than the store would leave it."""
    garbage = guest.work / "garbage.toml"
    garbage.write_text("version = 1\n[[network.bonds]\nbroken")
    for request in (
        "rm /var/lib/incusos-hal/config.toml",
        f"write {garbage} /var/lib/incusos-hal/config.toml",
    ):
        vm.nspawn.run(["debugfs", "-w", "-R", request, str(guest.image)], capture_output=True)


def boot(
    guest: vm.Guest,
    firmware: str,
    label: str,
    *,
    syslog_marker: bool,
    parts: tuple[str, ...] = PARTS,
) -> vm.Result:
    """Boot with the system test's LAN up around it; its syslog listener's capture goes
    into the system part's result, as the container test does."""
    guest.firmware = firmware
    with vm.nspawn.lan(system_case.new_lan(guest.work / f"lan-{label}", kind="tap")) as lan:
        guest.netns = lan.name
        # A time limit for a hung guest, never for a slow one. Seen under TCG: boot 1
        # (kernel part last) 520 s in CI; boot 2 (security part re-opens four LUKS
        # volumes, then the API part's daemon-reloads) 720 s alone here, and still in its
        # security part at 870 s in CI with the other rungs' guest beside it.
        timeout = 1800
        result = guest.boot(parts, expect(label, syslog_marker=syslog_marker), timeout=timeout)
    system = result.result.raw("system")
    if not probe_result.is_failure(system):
        system["syslog_received"] = lan.syslog()
    return result
