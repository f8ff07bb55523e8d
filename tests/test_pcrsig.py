"""Signed PCR policies (hal.pcrsig, Tpm.seal/unseal with a signer, the luks token) on swtpm,
against this host's systemd 252: systemd-measure signs, systemd-cryptenroll enrolls, and
each side's output is used by the other.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from incusos_hal.hal import luks, pcrsig, tpm

from conftest import LUKS_KEY, opens, require_tool

MEASURE = Path("/usr/lib/systemd/systemd-measure")
FAST = luks.Pbkdf(type="pbkdf2", hash="sha256", iterations=1000)
KEY = LUKS_KEY
SECTIONS = {".linux": b"a kernel image\n", ".osrel": b"ID=debian\nVERSION_ID=13\n"}


def rsa_key(tmp_path: Path, name: str = "pcr") -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return write_key(tmp_path, name, key)


def write_key(
    tmp_path: Path, name: str, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def section_files(tmp_path: Path) -> list[str]:
    """systemd-measure's options for SECTIONS, written to files."""
    out = []
    for name, data in SECTIONS.items():
        path = tmp_path / name.lstrip(".")
        path.write_bytes(data)
        out.append(f"--{name.lstrip('.')}={path}")
    return out


def measure_sign(tmp_path: Path, swtpm: str, private: Path, public: Path) -> str:
    """systemd-measure's signature document for SECTIONS, phase enter-initrd."""
    require_tool(str(MEASURE))
    out = subprocess.run(
        [
            str(MEASURE), "sign", f"--tpm2-device={swtpm}", "--bank=sha256",
            "--phase=enter-initrd", f"--private-key={private}", f"--public-key={public}",
            *section_files(tmp_path),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def cryptenroll_signed(swtpm: str, volume: Path, public: Path, pcrs: str) -> None:
    """systemd-cryptenroll: PCR 11 through `public`'s signatures, `pcrs` by value."""
    require_tool("systemd-cryptenroll")
    enrolled = subprocess.run(
        [
            "systemd-cryptenroll", f"--tpm2-device={swtpm}", f"--tpm2-pcrs={pcrs}",
            f"--tpm2-public-key={public}", "--tpm2-public-key-pcrs=11", str(volume),
        ],
        env=dict(os.environ, PASSWORD=KEY.decode()),
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr


def sign_now(t: tpm.Tpm, private: Path, pcrs: tuple[int, ...] = (11,)) -> pcrsig.PCRSignature:
    """What the update builder does, for the PCR values this TPM has now."""
    policy = t.current_policy("sha256", list(pcrs))
    return pcrsig.sign(private.read_bytes(), "sha256", pcrs, tpm.policy_pcr_digest(policy))


def measure_uki(t: tpm.Tpm, sections: dict[str, bytes], phases: tuple[str, ...]) -> None:
    """Extend PCR 11 as systemd-stub and systemd-pcrphase would on this boot."""
    import hashlib

    for name in pcrsig.UKI_SECTIONS:
        if name in sections:
            for data in (name.encode() + b"\0", sections[name]):
                t.extend(11, {"sha256": hashlib.sha256(data).digest()})
    for phase in phases:
        t.extend(11, {"sha256": hashlib.sha256(phase.encode()).digest()})


# -- the key's TPM form -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "rsa3", "p256", "p384"])
def test_signer_public_is_what_the_tss_marshals(kind: str) -> None:
    tss = tpm._tss()
    if kind.startswith("rsa"):
        key = rsa.generate_private_key(
            public_exponent=3 if kind == "rsa3" else 65537, key_size=2048
        )
        n = key.public_key().public_numbers().n.to_bytes(256, "big")
        params = tss.TPMU_PUBLIC_PARMS(
            rsaDetail=tss.TPMS_RSA_PARMS(
                symmetric=tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.NULL),
                scheme=tss.TPMT_RSA_SCHEME(scheme=tss.TPM2_ALG.NULL),
                keyBits=2048,
                exponent=3 if kind == "rsa3" else 65537,
            )
        )
        unique = tss.TPMU_PUBLIC_ID(rsa=n)
        alg = tss.TPM2_ALG.RSA
    else:
        curve = ec.SECP256R1() if kind == "p256" else ec.SECP384R1()
        key = ec.generate_private_key(curve)
        nums = key.public_key().public_numbers()
        size = (curve.key_size + 7) // 8
        params = tss.TPMU_PUBLIC_PARMS(
            eccDetail=tss.TPMS_ECC_PARMS(
                symmetric=tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.NULL),
                scheme=tss.TPMT_ECC_SCHEME(scheme=tss.TPM2_ALG.NULL),
                curveID=tss.TPM2_ECC.NIST_P256 if kind == "p256" else tss.TPM2_ECC.NIST_P384,
                kdf=tss.TPMT_KDF_SCHEME(scheme=tss.TPM2_ALG.NULL),
            )
        )
        unique = tss.TPMU_PUBLIC_ID(
            ecc=tss.TPMS_ECC_POINT(x=nums.x.to_bytes(size, "big"), y=nums.y.to_bytes(size, "big"))
        )
        alg = tss.TPM2_ALG.ECC

    def marshalled() -> bytes:
        return bytes(
            tss.TPMT_PUBLIC(
                type=alg,
                nameAlg=tss.TPM2_ALG.SHA256,
                objectAttributes=tss.TPMA_OBJECT.DECRYPT
                | tss.TPMA_OBJECT.SIGN_ENCRYPT
                | tss.TPMA_OBJECT.USERWITHAUTH,
                parameters=params,
                unique=unique,
            ).marshal()
        )

    theirs = marshalled()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ours = pcrsig.signer(pem)
    assert ours.publics[0] == theirs
    if kind == "rsa":  # the default exponent written as 0: the other name the TPM allows
        params.rsaDetail.exponent = 0
        assert ours.publics == (theirs, marshalled())
    else:
        assert ours.publics == (theirs,)


def test_signer_rejects_what_cannot_sign_a_policy() -> None:
    with pytest.raises(pcrsig.SignatureError, match="public key: not a PEM"):
        pcrsig.signer(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    # Bigger than a TPM holds (TPM2B_PUBLIC_KEY_RSA is 512 bytes at most).
    huge = rsa.RSAPublicNumbers(65537, (1 << 8191) | 1).public_key()
    with pytest.raises(pcrsig.SignatureError, match="1024 to 4096"):
        pcrsig.signer(
            huge.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
    k1 = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(pcrsig.SignatureError, match="curve secp256k1"):
        pcrsig.signer(
            k1.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


# -- against systemd-measure ----------------------------------------------------------------


def test_pcr11_prediction_is_what_systemd_measure_calculates(tmp_path: Path) -> None:
    require_tool(str(MEASURE))
    files = section_files(tmp_path)
    for phases in ((), ("enter-initrd",), ("enter-initrd", "leave-initrd", "sysinit", "ready")):
        out = subprocess.run(
            [str(MEASURE), "calculate", "--bank=sha256", f"--phase={':'.join(phases)}", *files],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        theirs = out.split("sha256=")[1].split()[0]
        assert pcrsig.uki_pcr11(SECTIONS, phases).hex() == theirs, phases


def test_systemd_measure_signature_is_ours(tmp_path: Path, swtpm: str) -> None:
    """Same key, same PCR 11: systemd-measure's document and ours carry the same policy
    digest and fingerprint, and (PKCS#1 v1.5 being deterministic) the same signature."""
    private, public = rsa_key(tmp_path)
    out = measure_sign(tmp_path, swtpm, private, public)
    (theirs,) = pcrsig.parse_signatures(out)
    pcr11 = pcrsig.uki_pcr11(SECTIONS, ("enter-initrd",))
    policy = tpm.policy_pcr_digest(tpm.PCRPolicy("sha256", {11: pcr11}))
    ours = pcrsig.sign(private.read_bytes(), "sha256", [11], policy)
    assert ours == theirs
    assert ours.fingerprint == pcrsig.signer(public.read_bytes()).fingerprint


# -- sealing and unsealing on swtpm -----------------------------------------------------------


def test_signed_secret_follows_the_signatures_not_the_values(tmp_path: Path, swtpm: str) -> None:
    """Sealed to a key: unseals for a signed PCR 11, not after PCR 11 moves on, and again
    once the new value is signed (an update), but never with another key's signature."""
    private, public = rsa_key(tmp_path)
    other, _ = rsa_key(tmp_path, "other")
    key = pcrsig.signer(public.read_bytes())
    with tpm.open_tpm(swtpm) as t:
        sealed = t.seal(b"s" * 32, tpm.PCRPolicy("sha256", {}), key)
        first = sign_now(t, private)

        def unseal(*sigs: pcrsig.PCRSignature) -> bytes:
            return t.unseal_sealed(sealed, tpm.SignedPolicy(key, (11,), sigs))

        assert unseal(first) == b"s" * 32
        measure_uki(t, SECTIONS, ("enter-initrd",))
        with pytest.raises(tpm.PolicyError, match="no signature by this key for the current"):
            unseal(first)
        second = sign_now(t, private)
        assert unseal(first, second) == b"s" * 32
        forged = sign_now(t, other)
        with pytest.raises(tpm.PolicyError):
            unseal(pcrsig.PCRSignature(**{**_fields(forged), "fingerprint": b""}))
        tampered = pcrsig.PCRSignature(**{**_fields(second), "signature": bytes(256)})
        with pytest.raises(tpm.PolicyError, match="rejects the PCR signature"):
            unseal(tampered)


def _fields(s: pcrsig.PCRSignature) -> dict[str, object]:
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


def test_signed_and_literal_pcrs_together(tmp_path: Path, swtpm: str) -> None:
    """PCR 11 by signature and PCR 7 by value (IncusOS's pair): both must hold."""
    private, public = rsa_key(tmp_path)
    key = pcrsig.signer(public.read_bytes())
    with tpm.open_tpm(swtpm) as t:
        sealed = t.seal(b"x" * 32, t.current_policy("sha256", [7]), key)
        signed = tpm.SignedPolicy(key, (11,), (sign_now(t, private),))
        assert t.unseal_sealed(sealed, signed) == b"x" * 32
        t.extend(7, {"sha256": bytes(range(32))})
        with pytest.raises(tpm.PolicyError):
            t.unseal_sealed(sealed, signed)


def test_ecdsa_signer(tmp_path: Path, swtpm: str) -> None:
    private, public = write_key(tmp_path, "ec", ec.generate_private_key(ec.SECP256R1()))
    key = pcrsig.signer(public.read_bytes())
    with tpm.open_tpm(swtpm) as t:
        sealed = t.seal(b"e" * 32, tpm.PCRPolicy("sha256", {}), key)
        signed = tpm.SignedPolicy(key, (11,), (sign_now(t, private),))
        assert t.unseal_sealed(sealed, signed) == b"e" * 32


# -- LUKS tokens: ours and systemd-cryptenroll's ---------------------------------------------


def test_systemd_cryptenroll_signed_token_opens_with_systemd_measure_signature(
    tmp_path: Path, volume: Path, swtpm: str
) -> None:
    """systemd 252 enrolls with --tpm2-public-key (PCR 11 signed, PCR 7 by value);
    systemd-measure signs the UKI's PCR 11; with PCR 11 measured as systemd-stub would,
    the HAL opens the volume. Its policy hash is ours for systemd 252's key name."""
    private, public = rsa_key(tmp_path)
    cryptenroll_signed(swtpm, volume, public, "7")
    header = luks.header(volume)
    (token_id,) = [i for i, t in header.tokens.items() if t["type"] == "systemd-tpm2"]
    token = luks.parse_tpm2_token(token_id, header.tokens[token_id])
    assert token.signer is not None and token.signer_pcrs == (11,)
    key = pcrsig.signer(public.read_bytes())
    literal = tpm.PCRPolicy("sha256", {7: bytes(32)})
    authorized = pcrsig.policy_authorize_digest(key.names[0])
    assert tpm.policy_pcr_digest(literal, authorized) == token.policy_hash

    signed = measure_sign(tmp_path, swtpm, private, public)
    signatures = pcrsig.parse_signatures(signed)
    with tpm.open_tpm(swtpm) as t:
        with pytest.raises(luks.WrongKeyError):
            luks.unlock_tpm2(volume, t, signatures)  # PCR 11 is not the signed value yet
        measure_uki(t, SECTIONS, ("enter-initrd",))
        with pytest.raises(luks.WrongKeyError):
            luks.unlock_tpm2(volume, t)  # no signature document: a signed token is skipped
        slot, passphrase = luks.unlock_tpm2(volume, t, signatures)
    assert slot == int(header.tokens[token_id]["keyslots"][0])
    assert opens(volume, passphrase)


def test_our_signed_token_is_systemd_cryptenrolls(tmp_path: Path, volume: Path, swtpm: str) -> None:
    """The HAL's signed token has systemd's fields and types, and opens the volume."""
    private, public = rsa_key(tmp_path)
    key = pcrsig.signer(public.read_bytes())
    theirs_volume = tmp_path / "theirs.img"
    with open(theirs_volume, "wb") as f:
        f.truncate(32 << 20)
    luks.format_volume(theirs_volume, KEY, pbkdf=FAST)
    cryptenroll_signed(swtpm, theirs_volume, public, "")
    with tpm.open_tpm(swtpm) as t:
        slot, token_id = luks.enroll_tpm2(volume, KEY, t, tpm.PCRPolicy("sha256", {}), signer=key)
        ours = luks.header(volume).tokens[token_id]
        theirs = next(iter(luks.header(theirs_volume).tokens.values()))
        for field, value in theirs.items():
            if field != "tpm2_srk":  # systemd 252 seals under a transient primary
                assert type(ours[field]) is type(value), field
        assert base64.b64decode(ours["tpm2_pubkey"]) == public.read_bytes()
        assert ours["tpm2_pubkey_pcrs"] == theirs["tpm2_pubkey_pcrs"] == [11]
        assert ours["tpm2-pcrs"] == theirs["tpm2-pcrs"] == []
        signatures = [sign_now(t, private)]
        got_slot, passphrase = luks.unlock_tpm2(volume, t, signatures)
        assert got_slot == slot
        assert opens(volume, passphrase)
        # And systemd's, with our signature document.
        _, their_pass = luks.unlock_tpm2(theirs_volume, t, signatures)
        assert opens(theirs_volume, their_pass)


# -- the signature document: bad input ------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (b"[]", "signature: expected a JSON object of banks"),
        (b"{", "signature: not JSON"),
        (b'{"md5": []}', "signature.md5: unknown PCR bank"),
        (b'{"sha256": {}}', "signature.sha256: expected a list"),
        (b'{"sha256": [1]}', r"signature.sha256\[0\]: expected an object"),
        (b'{"sha256": [{"pcrs": [24], "pol": "00", "sig": ""}]}', r"\[0\].pcrs: expected"),
        (b'{"sha256": [{"pcrs": [true], "pol": "00", "sig": ""}]}', r"\[0\].pcrs: expected"),
        (b'{"sha256": [{"pcrs": [11], "sig": "AA=="}]}', r"\[0\].pol: expected a string"),
        (b'{"sha256": [{"pcrs": [11], "pol": "zz", "sig": "AA=="}]}', "must be hex"),
        (b'{"sha256": [{"pcrs": [11], "pol": "00", "sig": "AA=="}]}', "SHA-256 policy"),
        (b'{"sha256": [{"pcrs": [11], "pol": "' + b"00" * 32 + b'", "sig": "!"}]}', "base64"),
        (b"{" + b" " * (1 << 20) + b"}", "larger than 1 MiB"),
    ],
)
def test_bad_signature_documents_are_refused_by_field(doc: bytes, message: str) -> None:
    with pytest.raises(pcrsig.SignatureError, match=message):
        pcrsig.parse_signatures(doc)


def test_signature_document_round_trips(tmp_path: Path) -> None:
    private, _ = rsa_key(tmp_path)
    sigs = [pcrsig.sign(private.read_bytes(), "sha256", [11], bytes(range(32)))]
    assert pcrsig.parse_signatures(pcrsig.render_signatures(sigs)) == sigs
    assert json.loads(pcrsig.render_signatures(sigs))["sha256"][0]["pcrs"] == [11]


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
))  # fmt: skip
def test_any_json_is_parsed_or_refused_cleanly(doc: object) -> None:
    data = json.dumps({"sha256": [doc] if not isinstance(doc, list) else doc})
    try:
        for s in pcrsig.parse_signatures(data):
            assert len(s.policy) == 32 and s.pcrs
    except pcrsig.SignatureError as e:
        assert str(e).startswith("signature")
