"""VM rung, security: the HAL's TPM tokens against systemd's own unlocking, on the
appliance's two boots (tests/guest_security.py does the work in the guest).

Boot 1, Secure Boot on: three LUKS2 volumes on NVMe, TPM-enrolled by the HAL (PCR 7 now,
and PCR 7 predicted for the firmware's keys cleared) and by systemd-cryptenroll; systemd
unlocks the HAL's through crypttab, the HAL unlocks systemd's. Boot 2, setup mode: systemd
unlocked the volume bound to the predicted PCR 7 at boot, with no passphrase; the others
stayed locked, and the recovery key opens them.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from incusos_hal.hal import eventlog

import vm

pytestmark = pytest.mark.system


def security(boot: vm.Result) -> dict[str, Any]:
    part: dict[str, Any] = boot.result["security"]
    assert "error" not in part, part["error"]
    return part


@pytest.fixture(scope="module")
def on(secure_boot: vm.Result) -> dict[str, Any]:
    return security(secure_boot)


@pytest.fixture(scope="module")
def off(setup_mode: vm.Result) -> dict[str, Any]:
    return security(setup_mode)


def test_event_log_replays_to_the_tpm_on_both_boots(
    on: dict[str, Any], off: dict[str, Any]
) -> None:
    for boot in (on, off):
        assert boot["replay"] == {"sha1": [], "sha256": []}
        assert boot["state"]["tpm_status"] == "ok"


def test_security_state_follows_the_firmware(on: dict[str, Any], off: dict[str, Any]) -> None:
    assert on["state"]["secure_boot_enabled"] is True
    assert on["state"]["system_state_is_trusted"] is True
    assert {c["type"] for c in on["state"]["secure_boot_certificates"]} == {"PK", "KEK", "db"}
    assert off["state"]["secure_boot_enabled"] is False
    assert off["state"]["secure_boot_certificates"] == []
    assert off["state"]["system_state_status"] == "Secure Boot is disabled"
    assert on["state"]["tpm_public_key"] == off["state"]["tpm_public_key"]


def test_predicted_pcr7_is_what_the_next_boot_measured(
    on: dict[str, Any], off: dict[str, Any]
) -> None:
    """Predicted on boot 1 from its own event log; measured by the firmware on boot 2."""
    assert on["predicted_setup_mode_pcr7"] != on["pcr7"]
    assert on["predicted_setup_mode_pcr7"] == off["pcr7"]
    log = eventlog.parse(base64.b64decode(off["eventlog_b64"]))
    assert eventlog.replay(log, "sha256")[7].hex() == off["pcr7"]


def test_hal_and_systemd_cryptenroll_write_the_same_token(on: dict[str, Any]) -> None:
    assert on["cryptenroll"]["rc"] == 0, on["cryptenroll"]["err"]
    ours, theirs = on["tokens"]["seca"], on["tokens"]["secb"]
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for key, value in theirs.items():
        assert type(ours[key]) is type(value), key
    assert ours["tpm2-pcrs"] == [7, 15] and theirs["tpm2-pcrs"] == [7]
    assert ours["tpm2_srk"] == theirs["tpm2_srk"]  # the same shared SRK
    for name in ("seca", "secb", "secc"):
        assert on["recovery_tokens"][name]["type"] == "systemd-recovery"
    assert on["recovery_key_mode"] == "0o600"


def test_each_unlocks_the_others_token(on: dict[str, Any]) -> None:
    assert on["hal_unlocks_systemd_token"]["ok"], on["hal_unlocks_systemd_token"]
    assert on["token_plugin_opens_ours"], on["token_plugin"]
    for name in ("seca", "secb"):
        started = on[f"start_{name}"]
        assert started["rc"] == 0 and started["active"] == "active", (started, on["journal_seca"])
        assert started["mapped"]
    assert on["predicted_unlocks_now"] is False


def test_reboot_unlocks_with_no_passphrase_and_falls_back_to_recovery(
    off: dict[str, Any],
) -> None:
    at_boot = off["at_boot"]
    assert at_boot["secc"]["active"] == "active" and at_boot["secc"]["mapped"], (
        at_boot,
        off["journal"]["secc"],
    )
    for name in ("seca", "secb"):
        assert not at_boot[name]["mapped"], (at_boot, off["journal"][name])
        assert at_boot[name]["active"] == "failed", at_boot[name]
    assert off["seca_tpm_unlocks"] is False
    assert off["recovery_mapped"] is True
    volumes = {v["volume"]: v["state"] for v in off["state"]["encrypted_volumes"]}
    assert volumes == {"seca": "locked", "secb": "locked", "secc": "unlocked (TPM)"}
