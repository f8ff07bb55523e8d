"""The TPM's fast path (hal.tpmwire over _native.tss) against tpm2-pytss's, on a real TPM
(swtpm): what one seals the other unseals, both ways; the same policies, templates and
serialized SRK; the same refusal when PCR 7 moves; the fallback when the libraries do not
load; and the wire itself: no secret in the clear, a tampered response refused."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from incusos_hal._native import tss
from incusos_hal.hal import tpm, tpmwire

from conftest import force_tpm_fallback, require_tool


def tools_env(tcti: str) -> dict[str, str]:
    return dict(os.environ, TPM2TOOLS_TCTI=tcti)


@contextmanager
def opened(swtpm: str, path: str) -> Iterator[tpm.Tpm]:
    with pytest.MonkeyPatch.context() as mp:
        if path == "pytss":
            force_tpm_fallback(mp)
        with tpm.open_tpm(swtpm) as t:
            assert (t._wire is not None) == (path == "wire"), path
            yield t


def _area(public: bytes) -> bytes:
    return public[2:]  # a TPM2B_PUBLIC's TPMT_PUBLIC


@pytest.mark.parametrize(("sealer", "unsealer"), [("wire", "pytss"), ("pytss", "wire")])
def test_what_one_path_seals_the_other_unseals(swtpm: str, sealer: str, unsealer: str) -> None:
    secret = b"crosses from one path to the other"
    with opened(swtpm, "pytss") as t:
        t.srk()  # persisted, so both paths use the same SRK from the start
        t.extend(7, {"sha256": hashlib.sha256(b"db").digest()})
    with opened(swtpm, sealer) as t:
        sealed = t.seal(secret, t.current_policy("sha256", [7]))
    with opened(swtpm, unsealer) as t:
        assert t.unseal_sealed(sealed) == secret
        t.extend(7, {"sha256": hashlib.sha256(b"another db").digest()})
        with pytest.raises(tpm.PolicyError) as err:
            t.unseal_sealed(sealed)
    assert secret.decode() not in str(err.value)
    with opened(swtpm, sealer) as t, pytest.raises(tpm.PolicyError):
        t.unseal_sealed(sealed)


def test_both_paths_seal_the_same_object_under_the_same_srk(swtpm: str, tmp_path: Path) -> None:
    """Same template, same policy digest (the one tpm2_createpolicy computes), same
    serialized SRK (systemd's tpm2_srk, as Esys_TR_Serialize writes it); only the unique
    field (the hash of a fresh seed) differs."""
    require_tool("tpm2_createpolicy")
    out = tmp_path / "policy"
    subprocess.run(
        ["tpm2_createpolicy", "--policy-pcr", "-l", "sha256:7", "-L", str(out)],
        env=tools_env(swtpm),
        check=True,
        capture_output=True,
    )
    sealed = {}
    for path in ("pytss", "wire"):
        with opened(swtpm, path) as t:
            sealed[path] = t.seal(b"x" * 32, t.current_policy("sha256", [7]))
    wire, pytss = sealed["wire"], sealed["pytss"]
    assert wire.policy_hash == pytss.policy_hash == out.read_bytes()
    assert wire.srk == pytss.srk
    assert wire.srk[:4] == tpm.SRK_HANDLE.to_bytes(4, "big")
    template = tpmwire.sealed_template(out.read_bytes())
    for s in (wire, pytss):
        assert _area(s.public)[: len(template) - 2] == template[:-2]
        assert len(s.public) == len(pytss.public)
    assert _area(wire.public) != _area(pytss.public)  # each its own seed


def test_templates_are_tpm2_pytss_s(swtpm: str) -> None:
    """The pure templates marshal to what tpm2-pytss builds field by field."""
    tss2 = pytest.importorskip("tpm2_pytss")
    digest = bytes(range(32))
    built = tss2.TPM2B_PUBLIC(
        tss2.TPMT_PUBLIC(
            type=tss2.TPM2_ALG.KEYEDHASH,
            nameAlg=tss2.TPM2_ALG.SHA256,
            objectAttributes=tpm.SEALED_OBJECT_ATTRIBUTES,
            authPolicy=digest,
            parameters=tss2.TPMU_PUBLIC_PARMS(
                keyedHashDetail=tss2.TPMS_KEYEDHASH_PARMS(
                    scheme=tss2.TPMT_KEYEDHASH_SCHEME(scheme=tss2.TPM2_ALG.NULL)
                )
            ),
        )
    )
    assert built.publicArea.marshal() == tpmwire.sealed_template(digest)
    srk = tss2.TPMT_PUBLIC(
        type=tss2.TPM2_ALG.ECC,
        nameAlg=tss2.TPM2_ALG.SHA256,
        objectAttributes=tpm.SRK_ATTRIBUTES,
        parameters=tss2.TPMU_PUBLIC_PARMS(
            eccDetail=tss2.TPMS_ECC_PARMS(
                symmetric=tss2.TPMT_SYM_DEF_OBJECT(
                    algorithm=tss2.TPM2_ALG.AES,
                    keyBits=tss2.TPMU_SYM_KEY_BITS(aes=128),
                    mode=tss2.TPMU_SYM_MODE(aes=tss2.TPM2_ALG.CFB),
                ),
                scheme=tss2.TPMT_ECC_SCHEME(scheme=tss2.TPM2_ALG.NULL),
                curveID=tss2.TPM2_ECC.NIST_P256,
                kdf=tss2.TPMT_KDF_SCHEME(scheme=tss2.TPM2_ALG.NULL),
            )
        ),
    )
    assert srk.marshal() == tpmwire.storage_template(tpm.SRK_ATTRIBUTES)


def test_a_fresh_tpm_gets_its_srk_then_takes_the_wire(swtpm: str, tmp_path: Path) -> None:
    """No SRK yet: the first seal creates and persists it (tpm2-pytss's way); from the
    next one on, the wire is used, and tpm2-pytss's session is let go: with a session
    tpm2_createpolicy leaves loaded (swtpm has no resource manager), the three slots would
    not hold it and the wire's two."""
    require_tool("tpm2_createpolicy")
    subprocess.run(
        ["tpm2_createpolicy", "--policy-pcr", "-l", "sha256:7", "-L", str(tmp_path / "p")],
        env=tools_env(swtpm),
        check=True,
        capture_output=True,
    )
    with opened(swtpm, "wire") as t:
        policy = t.current_policy("sha256", [7])
        first = t.seal(b"first", policy)
        assert t._wire_srk is None
        assert t.unseal_sealed(first) == b"first"
        assert t._wire_srk is not None
        for i in range(3):
            secret = bytes([i + 1]) * 8
            again = t.seal(secret, policy)
            assert again.srk == first.srk
            assert t.unseal_sealed(again) == secret


class Recorder:
    """A TCTI in the middle: records every command and response, and can change a byte."""

    def __init__(self, inner: tpmwire.Transact) -> None:
        self.inner = inner
        self.seen: list[bytes] = []
        self.flip_response_of: int | None = None

    def __call__(self, command: bytes) -> bytes:
        response = self.inner(command)
        self.seen += [bytes(command), response]
        if int.from_bytes(command[6:10], "big") == self.flip_response_of and len(response) > 20:
            # a byte of the parameters, inside the response's first TPM2B
            response = response[:16] + bytes([response[16] ^ 1]) + response[17:]
        return response


def test_secrets_never_cross_the_wire_in_the_clear(swtpm: str) -> None:
    with opened(swtpm, "pytss") as t:
        t.srk()
    secret = b"S3CRET-" * 9
    with opened(swtpm, "wire") as t:
        assert t._wire is not None
        recorder = Recorder(t._wire.transact)
        t._wire.transact = recorder
        sealed = t.seal(secret, t.current_policy("sha256", [7]))
        assert t.unseal_sealed(sealed) == secret
    assert len(recorder.seen) >= 8
    assert not any(secret[:16] in part for part in recorder.seen)


def test_a_tampered_response_is_refused(swtpm: str) -> None:
    """Unseal's response with one bit changed fails its HMAC: a TPMError, not a wrong
    secret; the session is replaced and the next unseal works."""
    with opened(swtpm, "pytss") as t:
        t.srk()
    with opened(swtpm, "wire") as t:
        assert t._wire is not None
        recorder = Recorder(t._wire.transact)
        t._wire.transact = recorder
        sealed = t.seal(b"untouched", t.current_policy("sha256", [7]))
        recorder.flip_response_of = tpmwire.CC_UNSEAL
        with pytest.raises(tpm.TPMError, match="HMAC"):
            t.unseal_sealed(sealed)
        recorder.flip_response_of = None
        assert t.unseal_sealed(sealed) == b"untouched"


def test_kdfa_matches_the_specs_construction() -> None:
    """KDFa is HMAC over counter, label, NUL, contexts and the length in bits, in counter
    mode, truncated (the TPM checks the rest: each session's HMAC depends on it)."""
    key, u, v = b"k" * 32, b"u" * 16, b"v" * 16

    def block(i: int, bits: int) -> bytes:
        msg = i.to_bytes(4, "big") + b"CFB\0" + u + v + bits.to_bytes(4, "big")
        return hmac.new(key, msg, "sha256").digest()

    assert tpmwire.kdfa(key, b"CFB", u, v, 256) == block(1, 256)
    assert tpmwire.kdfa(key, b"CFB", u, v, 384) == (block(1, 384) + block(2, 384))[:48]


def test_fallback_when_the_libraries_do_not_load(
    swtpm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    force_tpm_fallback(monkeypatch)
    with tpm.open_tpm(swtpm) as t:
        assert t._wire is None
        sealed = t.seal(b"by tpm2-pytss", t.current_policy("sha256", [7]))
        assert t.unseal_sealed(sealed) == b"by tpm2-pytss"


def test_aes_cfb_roundtrip_and_ecdh_point_check() -> None:
    key, iv = b"\1" * 16, b"\2" * 16
    data = bytearray(b"plaintext of odd length!!")
    enc = tss.aes128_cfb(key, iv, data, True)
    assert bytes(enc) != bytes(data) and len(enc) == len(data)
    assert tss.aes128_cfb(key, iv, enc, False) == data
    with pytest.raises(ValueError, match="not a P-256 point"):
        tss.ecdh_p256(b"\1" * 32, b"\2" * 32)


def test_the_generated_ffi_module_is_current() -> None:
    """_tss_ffi.py is what tss_cdef.py generates (regenerate: python -m
    incusos_hal._native.tss_cdef > src/incusos_hal/_native/_tss_ffi.py)."""
    from incusos_hal._native import tss_cdef

    committed = (Path(tss.__file__).parent / "_tss_ffi.py").read_text()
    assert committed == tss_cdef.generate()


def test_sessions_give_way_when_the_tpm_has_no_room(swtpm: str, tmp_path: Path) -> None:
    """Two sessions left loaded by a tool (tpm2_createpolicy's trial sessions; swtpm has no
    resource manager and three slots): the wire lets its kept session go and still seals
    and unseals, again and again."""
    require_tool("tpm2_createpolicy")
    with opened(swtpm, "pytss") as t:
        t.srk()
    for _ in range(2):
        subprocess.run(
            ["tpm2_createpolicy", "--policy-pcr", "-l", "sha256:7", "-L", str(tmp_path / "p")],
            env=tools_env(swtpm),
            check=True,
            capture_output=True,
        )
    with opened(swtpm, "wire") as t:
        policy = t.current_policy("sha256", [7])
        for i in range(3):
            secret = bytes([i + 1]) * 8
            assert t.unseal_sealed(t.seal(secret, policy)) == secret


def test_records_are_frozen_values() -> None:
    """hal.tpm's records (tpmwire.Record, not dataclasses): equal by value, frozen, and
    every field given."""
    policy = tpm.PCRPolicy("sha256", {7: bytes(32)})
    assert policy == tpm.PCRPolicy("sha256", {7: bytes(32)})
    assert policy != tpm.PCRPolicy("sha256", {7: b"\1" * 32})
    with pytest.raises(AttributeError, match="frozen"):
        policy.bank = "sha1"  # type: ignore[misc]
    with pytest.raises(ValueError, match="PCR 24"):
        tpm.PCRPolicy("sha256", {24: bytes(32)})
    sealed = tpm.Sealed(b"\0\0", b"\0\0", policy, b"h", b"srk")
    assert sealed.signer is None and sealed.blob == bytes(4)
    assert "Sealed(" in repr(sealed) and hash(tpmwire.SRK(1, b"a", b"n")) == hash(
        tpmwire.SRK(1, b"a", b"n")
    )
