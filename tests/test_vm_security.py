"""VM rung, security: the HAL's TPM tokens against systemd's own unlocking, on the
appliance's two boots (tests/guest_security.py does the work in the guest).

Boot 1, Secure Boot on: four LUKS2 volumes on NVMe, TPM-enrolled by the HAL (PCR 7 now,
PCR 7 predicted for the firmware's keys cleared, PCR 11 through a signed policy) and by
systemd-cryptenroll; systemd unlocks the HAL's through crypttab, the HAL unlocks systemd's.
Boot 2, setup mode: systemd unlocked at boot, with no passphrase, the volume bound to the
predicted PCR 7 and the one bound to the signed PCR 11; the others stayed locked, and the
recovery key opens them; tpm-rebind seals those again, and systemd then opens them.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from incusos_hal.hal import eventlog

import vm

pytestmark = pytest.mark.vm


def security(boot: vm.Result) -> dict[str, Any]:
    part: dict[str, Any] = boot.result["security"]
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


def test_signed_policy_tokens_of_the_hal_and_systemd(on: dict[str, Any]) -> None:
    """secd, bound to a signing key over PCR 11: the guest's systemd-cryptenroll writes the
    policy hash the HAL seals with (systemd 257, as 252, names an RSA key with its exponent
    written out), the HAL unseals both tokens given the signature document and neither
    without, systemd's token plugin opens the HAL's, and crypttab's unit maps the volume."""
    assert on["cryptenroll_signed"]["rc"] == 0, on["cryptenroll_signed"]["err"]
    tokens = on["signed_tokens"]
    ours = str(on["our_signed_token"])
    assert len(tokens) == 2 and ours in tokens, tokens
    systemd_name = on["signed_policy_candidates"][0]
    for token in tokens.values():
        assert token["tpm2-policy-hash"] == systemd_name, (token, on["signed_policy_candidates"])
        assert token["tpm2_pubkey_pcrs"] == [11] and token["tpm2-pcrs"] == []
    assert sorted(on["hal_unseals_signed"]) == sorted(int(k) for k in tokens), on[
        "signed_unseal_errors"
    ]
    assert on["hal_unseals_signed_unsigned"] == []
    assert on["token_plugin_opens_our_signed"]["rc"] == 0, on["token_plugin_opens_our_signed"]
    started = on["start_secd"]
    assert started["rc"] == 0 and started["active"] == "active" and started["mapped"], started


def test_reboot_unlocks_with_no_passphrase_and_falls_back_to_recovery(
    off: dict[str, Any],
) -> None:
    at_boot = off["at_boot"]
    for name in ("secc", "secd"):  # predicted PCR 7; signed PCR 11 (Secure Boot-agnostic)
        assert at_boot[name]["active"] == "active" and at_boot[name]["mapped"], (
            at_boot,
            off["journal"][name],
        )
    for name in ("seca", "secb"):
        assert not at_boot[name]["mapped"], (at_boot, off["journal"][name])
        assert at_boot[name]["active"] == "failed", at_boot[name]
    assert off["seca_tpm_unlocks"] is False
    assert off["recovery_mapped"] is True
    volumes = {v["volume"]: v["state"] for v in off["state"]["encrypted_volumes"]}
    assert volumes == {
        "seca": "locked",
        "secb": "locked",
        "secc": "unlocked (TPM)",
        "secd": "unlocked (TPM)",
    }


def test_tpm_rebind_after_the_recovery_boot_lets_systemd_unlock(off: dict[str, Any]) -> None:
    """The recovery-key boot's way back: tpm-rebind seals the two volumes bound to the old
    PCR 7 again (the HAL's token over PCRs 7+15, systemd-cryptenroll's over 7, each keeping
    its selection), leaves the two the TPM unsealed at boot alone, and systemd-cryptsetup
    then opens both through their crypttab units with no passphrase."""
    assert off["rebind"] == {"rebound": [["seca", [7, 15]], ["secb", [7]]], "skipped": {}}
    assert off["rebind_untouched"] is True
    assert off["rebind_tokens"] == {"seca": [7, 15], "secb": [7], "secc": [7, 15], "secd": []}
    for name in ("seca", "secb"):
        started = off[f"rebind_start_{name}"]
        assert started["rc"] == 0 and started["active"] == "active" and started["mapped"], (
            started,
            off[f"rebind_journal_{name}"],
        )
    assert "unseals every TPM-bound volume" in off["rebind_again"]
