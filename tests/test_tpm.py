"""hal.tpm against a real TPM 2.0 (swtpm over TCP, a fresh one per test), checked against
tpm2-tools and systemd-cryptenroll where they overlap. Every test runs on both paths: the
fast one (hal.tpmwire over _native.tss) and the tpm2-pytss fallback."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

from incusos_hal.hal import eventlog, tpm

from conftest import REPO, force_tpm_fallback, require_tool

FIXTURES = REPO / "tests/fixtures"


@pytest.fixture(autouse=True, params=["wire", "pytss"])
def tpm_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from incusos_hal._native import tss

    if request.param == "pytss":
        force_tpm_fallback(monkeypatch)
    else:
        assert tss.available(), "libtss2-tctildr.so.0 / libcrypto.so.3 do not load"
    path: str = request.param
    return path


def tools_env(tcti: str) -> dict[str, str]:
    return dict(os.environ, TPM2TOOLS_TCTI=tcti)


def test_pcr_read_matches_tpm2_pcrread(swtpm: str) -> None:
    require_tool("tpm2_pcrread", "tpm2_pcrextend")
    # Make the PCRs differ from one another first: a fresh TPM's are all zero.
    for pcr in (0, 7, 16):
        subprocess.run(
            ["tpm2_pcrextend", f"{pcr}:sha256={hashlib.sha256(bytes([pcr])).hexdigest()}"],
            env=tools_env(swtpm),
            check=True,
        )
    out = subprocess.run(
        ["tpm2_pcrread", "sha256"],
        env=tools_env(swtpm),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    theirs = {int(m[1]): bytes.fromhex(m[2]) for m in re.finditer(r"(\d+)\s*: 0x([0-9A-F]+)", out)}
    with tpm.open_tpm(swtpm) as t:
        ours = t.pcr_read("sha256")
    assert len(ours) == 24
    assert ours == theirs
    assert ours[7] != bytes(32) and ours[7] != ours[0]


def test_info_names_swtpm(swtpm: str) -> None:
    with tpm.open_tpm(swtpm) as t:
        info = t.info()
    assert info.is_swtpm
    assert "sha256" in info.banks
    assert info.spec_revision.startswith("1.")


def test_get_random_gives_fresh_bytes(swtpm: str) -> None:
    with tpm.open_tpm(swtpm) as t:
        a, b = t.get_random(48), t.get_random(48)
    assert len(a) == len(b) == 48
    assert a != b


def replay_into(t: tpm.Tpm, log: eventlog.EventLog, banks: tuple[str, ...]) -> None:
    for event in log.events:
        if event.type == eventlog.EV_NO_ACTION:
            continue
        t.extend(event.pcr, {b: event.digests[b] for b in banks})


@pytest.mark.parametrize("firmware", ["secureboot", "uefi"])
def test_recorded_log_extended_into_a_fresh_tpm_replays_to_its_pcrs(
    swtpm: str, firmware: str
) -> None:
    """The guest's real event log, extended digest by digest into a fresh TPM: the TPM ends
    where the replay says, and where the guest's own TPM ended."""
    root = FIXTURES / "security" / firmware
    log = eventlog.parse((root / "binary_bios_measurements").read_bytes())
    with tpm.open_tpm(swtpm) as t:
        replay_into(t, log, ("sha1", "sha256"))
        for bank in ("sha1", "sha256"):
            replayed = eventlog.replay(log, bank)
            in_tpm = t.pcr_read(bank, sorted(replayed))
            assert in_tpm == replayed
            assert eventlog.compare(log, bank, in_tpm) == []
    recorded = read_pcrs(root / "pcr-sha256.txt")
    assert {p: recorded[p] for p in replayed} == eventlog.replay(log, "sha256")


def read_pcrs(path: Path) -> dict[int, bytes]:
    return {
        int(a): bytes.fromhex(b)
        for a, b in (line.split() for line in path.read_text().splitlines())
    }


def test_seal_unseal_follows_the_pcrs(swtpm: str) -> None:
    secret = b"a secret that only PCR 7 releases"
    with tpm.open_tpm(swtpm) as t:
        t.extend(7, {"sha256": hashlib.sha256(b"firmware").digest()})
        sealed = t.seal(secret, t.current_policy("sha256", [7]))
        assert t.unseal_sealed(sealed) == secret
        assert t.unseal_sealed(sealed) == secret  # objects and sessions were flushed
        t.extend(7, {"sha256": hashlib.sha256(b"another db").digest()})
        with pytest.raises(tpm.PolicyError) as err:
            t.unseal_sealed(sealed)
    assert secret.decode() not in str(err.value)


def test_seal_to_predicted_values(swtpm: str) -> None:
    """Bound to values the PCRs do not have yet (PCR 7 after an extend, PCR 15 still
    zero): unseals only once the TPM gets there."""
    change = hashlib.sha256(b"next db").digest()
    with tpm.open_tpm(swtpm) as t:
        now = t.pcr_read("sha256", [7])[7]
        predicted = hashlib.sha256(now + change).digest()
        policy = tpm.PCRPolicy("sha256", {7: predicted, 15: bytes(32)})
        sealed = t.seal(b"later", policy)
        with pytest.raises(tpm.PolicyError):
            t.unseal_sealed(sealed)
        t.extend(7, {"sha256": change})
        assert t.unseal_sealed(sealed) == b"later"
        t.extend(15, {"sha256": hashlib.sha256(b"volume key").digest()})
        with pytest.raises(tpm.PolicyError):
            t.unseal_sealed(sealed)


def test_policy_digest_matches_tpm2_createpolicy(swtpm: str, tmp_path: Path) -> None:
    """The policy hash computed here (no TPM involved) equals the one the TPM computes in a
    trial session."""
    require_tool("tpm2_createpolicy", "tpm2_pcrextend")
    subprocess.run(["tpm2_pcrextend", f"7:sha256={'ab' * 32}"], env=tools_env(swtpm), check=True)
    out = tmp_path / "policy"
    subprocess.run(
        ["tpm2_createpolicy", "--policy-pcr", "-l", "sha256:4,7,15", "-L", str(out)],
        env=tools_env(swtpm),
        check=True,
        capture_output=True,
    )
    with tpm.open_tpm(swtpm) as t:
        policy = t.current_policy("sha256", [4, 7, 15])
    assert tpm.policy_pcr_digest(policy) == out.read_bytes()


def test_srk_is_shared_and_persistent(swtpm: str) -> None:
    require_tool("tpm2_getcap")
    with tpm.open_tpm(swtpm) as t:
        first = t.seal(b"x", t.current_policy("sha256", [7]))
    with tpm.open_tpm(swtpm) as t:
        second = t.seal(b"y", t.current_policy("sha256", [7]))
        assert t.unseal_sealed(first) == b"x"
    assert first.srk == second.srk
    handles = subprocess.run(
        ["tpm2_getcap", "handles-persistent"],
        env=tools_env(swtpm),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "0x81000001" in handles


def test_identity_key_is_stable(swtpm: str) -> None:
    with tpm.open_tpm(swtpm) as t:
        pem = t.identity_public_key_pem()
    with tpm.open_tpm(swtpm) as t:
        assert t.identity_public_key_pem() == pem
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key = load_pem_public_key(pem.encode())
    assert key.curve.name == "secp256r1"  # type: ignore[attr-defined]


def test_unseal_rejects_malformed_objects(swtpm: str) -> None:
    with tpm.open_tpm(swtpm) as t, pytest.raises(tpm.TPMError):
        t.unseal(b"\x00\x05abc", b"\x00\x01", "sha256", [7])
    with pytest.raises(ValueError):
        tpm.split_blob(b"\x00\x10abc")


def test_policy_values_are_checked() -> None:
    with pytest.raises(ValueError, match="PCR 24"):
        tpm.PCRPolicy("sha256", {24: bytes(32)})
    with pytest.raises(ValueError, match="bytes"):
        tpm.PCRPolicy("sha256", {7: bytes(20)})
    with pytest.raises(ValueError, match="bank"):
        tpm.PCRPolicy("md5", {7: bytes(16)})


def test_open_names_the_tpm_it_could_not_open() -> None:
    with (
        pytest.raises(tpm.TPMError, match="device:/nonexistent/tpm"),
        tpm.open_tpm("device:/nonexistent/tpm"),
    ):
        pass


def test_unseal_trusts_the_tpm_not_the_tokens_srk(swtpm: str) -> None:
    """A token's serialized SRK is outside input: only its handle is used, the public key
    in it is not (a forged one would salt the session to the forger's key)."""
    with tpm.open_tpm(swtpm) as t:
        sealed = t.seal(b"bound", t.current_policy("sha256", [7]))
        forged = sealed.srk[:4] + bytes(len(sealed.srk) - 4)
        assert t.unseal(sealed.private, sealed.public, "sha256", [7], forged) == b"bound"
        other = (0x81000002).to_bytes(4, "big") + sealed.srk[4:]
        with pytest.raises(tpm.TPMError, match="not the SRK"):
            t.unseal(sealed.private, sealed.public, "sha256", [7], other)


SRK_TEMPLATE_ARGS = [
    "-C",
    "o",
    "-G",
    "ecc256:aes128cfb",
    "-g",
    "sha256",
    "-a",
    "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda",
]


def _tool(tcti: str, *argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        argv, env=tools_env(tcti), cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def _key(output: str) -> tuple[str, ...]:
    """The public key tpm2-tools printed: the ECC point, or the RSA modulus."""
    found = re.findall(r"^(?:x|y|rsa): ([0-9a-f]+)$", output, re.M)
    assert found, output
    return tuple(found)


def test_persistent_srk_is_the_template_primary(swtpm: str, tmp_path: Path) -> None:
    """The key at 0x81000001 is the one tpm2-tools derives from the Provisioning Guidance's
    ECC template, so a freshly created primary is the same parent: what was sealed under the
    persistent SRK loads and unseals under it."""
    require_tool("tpm2_createprimary", "tpm2_load", "tpm2_unseal", "tpm2_readpublic")
    with tpm.open_tpm(swtpm) as t:
        sealed = t.seal(b"same parent", t.current_policy("sha256", [7]))
    primary = _tool(swtpm, "tpm2_createprimary", *SRK_TEMPLATE_ARGS, "-c", "p.ctx", cwd=tmp_path)
    _tool(swtpm, "tpm2_flushcontext", "-t")
    assert _key(primary) == _key(_tool(swtpm, "tpm2_readpublic", "-c", "0x81000001"))
    (tmp_path / "s.priv").write_bytes(sealed.private)
    (tmp_path / "s.pub").write_bytes(sealed.public)
    _tool(
        swtpm,
        "tpm2_load",
        "-C",
        "p.ctx",
        "-u",
        "s.pub",
        "-r",
        "s.priv",
        "-c",
        "s.ctx",
        cwd=tmp_path,
    )
    _tool(swtpm, "tpm2_flushcontext", "-t")
    out = subprocess.run(
        ["tpm2_unseal", "-c", "s.ctx", "-p", "pcr:sha256:7"],
        env=tools_env(swtpm),
        cwd=tmp_path,
        capture_output=True,
        check=True,
    ).stdout
    assert out == b"same parent"


def test_a_foreign_key_at_the_srk_handle_is_not_trusted(swtpm: str, tmp_path: Path) -> None:
    """Another key persisted at 0x81000001 (an RSA key here) is left alone: sealing and
    unsealing use the SRK created transiently from the template, the same key, so a token
    sealed under the persistent SRK before still unseals; nothing stays loaded."""
    require_tool("tpm2_createprimary", "tpm2_evictcontrol", "tpm2_getcap")
    with tpm.open_tpm(swtpm) as t:
        policy = t.current_policy("sha256", [7])
        before = t.seal(b"sealed before", policy)
    _tool(swtpm, "tpm2_evictcontrol", "-C", "o", "-c", "0x81000001")
    foreign = _tool(
        swtpm, "tpm2_createprimary", "-C", "o", "-G", "rsa2048", "-c", "f.ctx", cwd=tmp_path
    )
    _tool(swtpm, "tpm2_evictcontrol", "-C", "o", "-c", "f.ctx", "0x81000001", cwd=tmp_path)
    _tool(swtpm, "tpm2_flushcontext", "-t")
    with tpm.open_tpm(swtpm) as t:
        assert t.unseal_sealed(before) == b"sealed before"
        after = t.seal(b"sealed after", policy)
        assert after.srk[:1] == b"\x80"  # the transient SRK's handle, not the foreign key's
        assert t.unseal_sealed(after) == b"sealed after"
    with tpm.open_tpm(swtpm) as t:
        assert t.unseal_sealed(after) == b"sealed after"
    assert _key(foreign) == _key(_tool(swtpm, "tpm2_readpublic", "-c", "0x81000001"))
    assert "0x80" not in _tool(swtpm, "tpm2_getcap", "handles-transient")


def test_sessions_are_reused_and_flushed(swtpm: str) -> None:
    """Many seals and unseals on one open TPM, a refused unseal among them, fit in swtpm's
    three session and object slots (sessions kept and reused, a failed one replaced), and
    closing leaves nothing loaded."""
    require_tool("tpm2_getcap")
    with tpm.open_tpm(swtpm) as t:
        policy = t.current_policy("sha256", [7])
        wrong = tpm.PCRPolicy("sha256", {7: b"\x01" * 32})  # a fresh swtpm: PCR 7 is zeros
        for i in range(8):
            secret = bytes([i + 1]) * 16
            assert t.unseal_sealed(t.seal(secret, policy)) == secret
            with pytest.raises(tpm.PolicyError):
                t.unseal_sealed(t.seal(secret, wrong))
    for kind in ("handles-transient", "handles-loaded-session", "handles-saved-session"):
        assert "0x" not in _tool(swtpm, "tpm2_getcap", kind), kind
