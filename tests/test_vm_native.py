"""VM rung, the inventory HAL on real devices: its ioctl fast paths (cffi extension built
by the guest's own meson install, and the pure-Python fallback) give what nvme-cli,
sg3-utils, udev and ethtool give on the same NVMe controller, SCSI disk and NIC; and
`incusos-hal record` of the guest replays as the guest itself scans.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

import vm
from appliance import MULTIPATH, MULTIPATH_WWID, NVME, TPM_HANDLE

pytestmark = pytest.mark.vm
BACKENDS = ("cffi", "python")


@pytest.fixture(scope="module")
def native(secure_boot: vm.Result) -> dict[str, Any]:
    part: dict[str, Any] = secure_boot.result["native"]
    return part


@pytest.fixture(scope="module")
def native_off(setup_mode: vm.Result) -> dict[str, Any]:
    part: dict[str, Any] = setup_mode.result["native"]
    return part


def ours(native: dict[str, Any], backend: str, name: str) -> Any:
    # A call that raised in the guest raises here, with its traceback (probe_result).
    return native[backend][name]


def test_the_extension_was_built_at_install(native: dict[str, Any]) -> None:
    assert native["compiled_backend"] == "cffi"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nvme_identify_equals_nvme_cli(native: dict[str, Any], backend: str) -> None:
    ctrl, tool = ours(native, backend, "id_ctrl"), native["tools"]["id_ctrl"]
    for key in ("vid", "ssvid", "cntlid", "ver", "nn", "mdts", "cmic", "oacs", "tnvmcap"):
        assert ctrl[key] == tool[key], (key, ctrl[key], tool[key])
    for key in ("sn", "mn", "fr", "subnqn"):
        assert ctrl[key] == tool[key].strip(), (key, ctrl[key], tool[key])
    assert ctrl["sn"] in {c.serial for c in NVME}
    ns, tool_ns = ours(native, backend, "id_ns"), native["tools"]["id_ns"]
    for key in ("nsze", "ncap", "nuse", "nlbaf", "flbas"):
        assert ns[key] == tool_ns[key], (key, ns[key], tool_ns[key])
    assert [f["ds"] for f in ns["lbafs"]] == [f["ds"] for f in tool_ns["lbafs"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nvme_smart_equals_nvme_cli(native: dict[str, Any], backend: str) -> None:
    smart, tool = ours(native, backend, "smart"), native["tools"]["smart"]
    # Counters of I/O move between two reads; these do not.
    for key in (
        "critical_warning",
        "avail_spare",
        "spare_thresh",
        "percent_used",
        "power_cycles",
        "power_on_hours",
        "unsafe_shutdowns",
        "media_errors",
        "num_err_log_entries",
    ):
        assert smart[key] == tool[key], (key, smart[key], tool[key])
    assert tool["temperature"] in (smart["temperature"], smart["temperature"] - 273)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scsi_vpd_equals_sg3_utils_and_udev(native: dict[str, Any], backend: str) -> None:
    inquiry = ours(native, backend, "inquiry")
    sg_inq = native["tools"]["sg_inq"]
    assert f"Vendor identification: {inquiry['vendor']}" in sg_inq, sg_inq
    assert f"Product identification: {inquiry['product']}" in sg_inq, sg_inq
    serial = ours(native, backend, "serial")
    assert serial == MULTIPATH.serial
    assert f"serial number: {serial}" in native["tools"]["sg_vpd_80"]
    wwid = ours(native, backend, "wwid")
    assert wwid == f"naa.{MULTIPATH.wwn:016x}"
    udev = dict(line.split("=", 1) for line in native["tools"]["udev"].splitlines() if "=" in line)
    assert udev["ID_SERIAL"] == MULTIPATH_WWID == "3" + wwid.removeprefix("naa.")
    assert udev["ID_WWN"] == f"0x{MULTIPATH.wwn:016x}"


def _ethtool(text: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^\s+([A-Za-z -]+):\s*(.*)$", text, re.M))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ethtool_equals_ethtool(native: dict[str, Any], backend: str) -> None:
    info, link = ours(native, backend, "drvinfo"), ours(native, backend, "link")
    tool_i = native["tools"]["ethtool_i"]
    assert f"driver: {info['driver']}" in tool_i and info["driver"] == "virtio_net"
    assert f"bus-info: {info['bus_info']}" in tool_i
    tool = _ethtool(native["tools"]["ethtool"])
    speed = tool["Speed"]
    assert (f"{link['speed']}Mb/s" if link["speed"] else "Unknown!") == speed, (link, speed)
    duplex = tool["Duplex"]
    assert (link["duplex"].capitalize() or "Unknown!") == duplex.split(" ")[0], (link, duplex)
    assert {"Twisted Pair": "twisted pair", "Other": "other", "FIBRE": "fibre"}.get(
        tool["Port"], tool["Port"]
    ) == link["port_type"]
    assert tool["Transceiver"] == link["transceiver_type"]
    assert tool["Auto-negotiation"] == ("on" if link["auto_negotiation"] else "off")


def test_backends_agree(native: dict[str, Any]) -> None:
    stable = ("id_ctrl", "id_ns", "inquiry", "serial", "wwid", "drvinfo", "link")
    assert {k: native["cffi"][k] for k in stable} == {k: native["python"][k] for k in stable}


def test_guest_inventory(native: dict[str, Any], native_off: dict[str, Any]) -> None:
    live = native["inventory_live"]
    controllers = [c for s in live["nvme"]["subsystems"] for c in s["controllers"]]
    assert sorted(c["serial"] for c in controllers) == sorted(c.serial for c in NVME)
    assert all(c["transport"] == "pcie" and c["smart"]["passed"] for c in controllers)
    (mp,) = live["multipath"]["maps"]
    assert mp["wwid"] == MULTIPATH_WWID and len(mp["paths"]) == 2
    assert all(p["state"] == "running" for p in mp["paths"])
    (tpm,) = live["tpm"]["devices"]
    assert (tpm["version"], tpm["resource_manager"], tpm["event_log"]) == ("2.0", "tpmrm0", True)
    assert live["secure_boot"] == {
        "firmware": "uefi",
        "enabled": True,
        "setup_mode": False,
        "audit_mode": False,
        "deployed_mode": False,
    }
    assert native_off["inventory_live"]["secure_boot"]["setup_mode"] is True
    assert live["system"]["type"] == "virtual-machine"
    assert live["system"]["vendor"] == "QEMU"
    disks = {d["id"]: d for d in live["storage"]["disks"]}
    assert disks["sda"]["wwn"] and disks["sda"]["serial"] == MULTIPATH.serial
    assert TPM_HANDLE  # the TPM state itself is test_vm_hardware's


def test_recorded_guest_replays(native: dict[str, Any]) -> None:
    assert native["record"]["seconds"] > 0
    live, tree = native["inventory_live"], native["inventory_tree"]
    for section in tree:
        assert tree[section] == live[section], section
