"""VM rung, hardware: firmware, TPM, NVMe, multipath and LUKS on a real kernel.

The machine is tests/appliance.py's, booted with Secure Boot on (snakeoil keys enrolled,
kernel signed with them) and again with the firmware in setup mode, on the same disks
and swtpm state. Checks: the TPM is the kernel's (/dev/tpmrm0) and PCR 7 (Secure Boot
policy) differs between the boots; a key made
persistent in the TPM on boot 1 is there on boot 2; both NVMe controllers and their
namespaces are listed by `nvme list -o json` with their serials; multipath-tools builds
one map of two paths for the SCSI disk's WWN; a LUKS2 volume formatted on boot 1 opens
with `cryptsetup open` on both boots, keeps its data (only as ciphertext on the
namespace), and refuses a wrong key.
"""

from __future__ import annotations

from typing import Any

import pytest

import vm
from appliance import LUKS, MULTIPATH, MULTIPATH_WWID, NVME, TPM_HANDLE

pytestmark = pytest.mark.vm


def hardware(boot: vm.Result) -> dict[str, Any]:
    part: dict[str, Any] = boot.result["hardware"]
    return part


@pytest.fixture(scope="module")
def on(secure_boot: vm.Result) -> dict[str, Any]:
    return hardware(secure_boot)


@pytest.fixture(scope="module")
def off(setup_mode: vm.Result) -> dict[str, Any]:
    return hardware(setup_mode)


def test_firmware_reports_secure_boot_state(on: dict[str, Any], off: dict[str, Any]) -> None:
    assert on["firmware"]["efi"] and off["firmware"]["efi"]
    assert (on["firmware"]["SecureBoot"], on["firmware"]["SetupMode"]) == (1, 0), on["firmware"]
    assert (off["firmware"]["SecureBoot"], off["firmware"]["SetupMode"]) == (0, 1), off["firmware"]
    assert "SecureBoot enabled" in on["firmware"]["mokutil"]["out"]
    # The enrolled keys are what the fixtures for the security HAL are recorded from.
    assert {"PK", "KEK", "db"} <= {n.split("-")[0] for n in on["firmware"]["efivars_copied"]}


def test_tpm_is_the_kernels_and_pcr7_tracks_secure_boot(
    on: dict[str, Any], off: dict[str, Any]
) -> None:
    for boot in (on, off):
        assert {"tpm0", "tpmrm0"} <= set(boot["tpm"]["devices"]), boot["tpm"]["devices"]
        assert boot["tpm"]["eventlog_bytes"] > 0
    pcr_on, pcr_off = on["tpm"]["pcr_sha256"], off["tpm"]["pcr_sha256"]
    zero = "0" * 64
    assert pcr_on["7"] not in (zero, pcr_off["7"]), (pcr_on["7"], pcr_off["7"])
    assert pcr_off["7"] != zero
    # tpm2-tools reads the same PCR 7 through the resource manager as sysfs shows.
    assert pcr_on["7"].lower() in on["tpm"]["pcrread"]["out"].replace("0x", "").lower()


def test_tpm_state_survives_a_reboot(on: dict[str, Any], off: dict[str, Any]) -> None:
    assert TPM_HANDLE not in on["tpm"]["persistent_before"], "the TPM was not fresh"
    assert TPM_HANDLE in on["tpm"]["persistent_after"], on["tpm"]
    assert TPM_HANDLE in off["tpm"]["persistent_before"], off["tpm"]


def test_nvme_controllers_and_namespaces(on: dict[str, Any]) -> None:
    nvme = on["nvme"]
    assert nvme["list_rc"] == 0, nvme["list_err"]
    serials = {c["serial"]: c["namespaces"] for c in nvme["sysfs"].values()}
    assert {c.serial: len(c.namespaces_mib) for c in NVME} == {
        s: len(ns) for s, ns in serials.items()
    }, nvme["sysfs"]
    # nvme-cli 2.x's plain listing: one entry per namespace, with its controller's serial.
    listed = nvme["list"]["Devices"]
    assert {d["SerialNumber"].strip() for d in listed} == {c.serial for c in NVME}, listed
    assert sorted(
        (d["SerialNumber"].strip(), d["NameSpace"], d["PhysicalSize"]) for d in listed
    ) == sorted(
        (c.serial, nsid, mib << 20)
        for c in NVME
        for nsid, mib in enumerate(c.namespaces_mib, start=1)
    ), listed


def test_multipath_sees_two_paths_to_one_wwn(on: dict[str, Any]) -> None:
    mp = on["multipath"]
    wwids = {d["wwid"] for d in mp["scsi"].values()}
    assert len(mp["scsi"]) == 2, mp["scsi"]
    # The kernel's VPD page 0x83 designator, and udev's name for it.
    assert wwids == {f"naa.{MULTIPATH.wwn:016x}"}, wwids
    for disk in mp["scsi"].values():
        assert f"ID_SERIAL={MULTIPATH_WWID}" in disk["udev"], disk["udev"]
    assert mp["maps_rc"] == 0, mp["maps_err"]
    maps = [m for m in mp["maps_json"]["maps"] if m["uuid"] == MULTIPATH_WWID]
    assert len(maps) == 1, mp["maps_json"]
    paths = [p for group in maps[0]["path_groups"] for p in group["paths"]]
    assert sorted(p["dev"] for p in paths) == sorted(mp["scsi"]), paths
    assert all(p["chk_st"] == "ready" for p in paths), paths


def test_luks_volume_opens_and_keeps_its_data(on: dict[str, Any], off: dict[str, Any]) -> None:
    first, second = on["luks"], off["luks"]
    assert not first["was_luks"], "the NVMe namespace was not blank on the first boot"
    assert first["steps"]["format"]["rc"] == 0, first["steps"]
    for boot in (first, second):
        assert boot["steps"]["open"]["rc"] == 0, boot["steps"]
        assert boot["mapper"]
        assert "type:    LUKS2" in boot["status"], boot["status"]
        assert boot["steps"]["close"]["rc"] == 0, boot["steps"]
        assert boot["wrong_key_refused"], boot["steps"]
        assert not boot["plaintext_on_disk"], "the marker is readable without the key"
    assert first["marker_before"] is None
    assert second["was_luks"]
    assert second["marker_before"] == LUKS["marker"]


def test_no_unit_failed(on: dict[str, Any], off: dict[str, Any]) -> None:
    assert on["failed_units"] == "", on["failed_units"]
    assert vm.failed_units(off["failed_units"]) == vm.LOCKED_IN_SETUP_MODE, off["failed_units"]
