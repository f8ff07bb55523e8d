"""Signed PCR policies, as systemd does them (systemd-measure, ukify, systemd-cryptenroll
--tpm2-public-key): a secret is sealed not to PCR values but to a public key, and unseals on
any machine state for which the key's owner signed a PCR policy. An OS update ships a new
signature with its new kernel image (PCR 11), instead of every disk being re-enrolled.

The sealing policy is TPM2_PolicyAuthorize(key name, empty policyRef), then PolicyPCR for any
PCRs bound by value. To unseal, a policy session runs PolicyPCR over the signed PCRs as they
are now, asks the TPM to verify a signature of that session digest, and hands the ticket to
PolicyAuthorize (TPM 2.0 part 3, 23.16).

Formats, as systemd's (checked against systemd 252's systemd-measure and systemd-cryptenroll
in tests/test_pcrsig.py):
- the signature document, `/run/systemd/tpm2-pcr-signature.json` at boot:
  {"sha256": [{"pcrs": [11], "pkfp": hex, "pol": hex, "sig": base64}]}
  where pol is the PolicyPCR digest, sig is RSASSA-PKCS1-v1_5/SHA-256 (or ECDSA/SHA-256) over
  pol, and pkfp the SHA-256 of the key in its raw form (PKCS#1 RSAPublicKey, or the
  uncompressed EC point: OpenSSL's i2d_PublicKey);
- the key's TPM name: SHA-256 over a TPMT_PUBLIC with decrypt|sign|userWithAuth, no scheme.
  systemd (252 on the host, 257 in the Debian 13 guest, both tested) writes the RSA exponent
  out; TPM 2.0 also allows 0 for the default 65537, which gives another name, so a key that
  a tool named that way is the second candidate when unsealing.

Pure: no TPM here. Signing (the build side, what `systemd-measure sign` does) is here too,
for the update tooling and the tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from incusos_hal.hal.eventlog import ALGORITHM_IDS

SIGNATURE_PATH = "/run/systemd/tpm2-pcr-signature.json"
PUBLIC_KEY_PATH = "/run/systemd/tpm2-pcr-public-key.pem"
TPM_CC_POLICY_AUTHORIZE = 0x0000016A

TPM_ALG_RSA = 0x0001
TPM_ALG_SHA256 = 0x000B
TPM_ALG_NULL = 0x0010
TPM_ALG_RSASSA = 0x0014
TPM_ALG_ECDSA = 0x0018
TPM_ALG_ECC = 0x0023
RSA_DEFAULT_EXPONENT = 65537
# TPMA_OBJECT decrypt | sign | userWithAuth: systemd's attributes for an external key.
SIGNER_ATTRIBUTES = 0x00020000 | 0x00040000 | 0x00000040
# TPM_ECC_CURVE ids for the curves OpenSSL names.
ECC_CURVES = {"secp256r1": 0x0003, "secp384r1": 0x0004, "secp521r1": 0x0005}
MAX_SIGNATURE_DOCUMENT = 1 << 20


class SignatureError(ValueError):
    """A signature document or key that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class Signer:
    """The public key of a signed policy and the TPM's view of it."""

    pem: bytes
    kind: str  # "rsa" | "ecc"
    fingerprint: bytes  # systemd's pkfp
    publics: tuple[bytes, ...]  # marshalled TPMT_PUBLIC candidates, systemd's first

    @property
    def names(self) -> tuple[bytes, ...]:
        return tuple(tpm_name(p) for p in self.publics)


def _load_public(pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"public key: not a PEM public key ({e})") from None


def signer(pem: bytes | str) -> Signer:
    """The signer of a policy from its PEM public key (RSA, or ECC on a NIST curve)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    raw = pem.encode() if isinstance(pem, str) else bytes(pem)
    key = _load_public(raw)
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        n = numbers.n.to_bytes((key.key_size + 7) // 8, "big")
        if not 1024 <= key.key_size <= 4096 or numbers.e >= 1 << 32:
            raise SignatureError("public key: RSA keys of 1024 to 4096 bits only")
        fingerprint = hashlib.sha256(
            key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        ).digest()
        exponents = [numbers.e]
        if numbers.e == RSA_DEFAULT_EXPONENT:
            exponents.append(0)
        publics = tuple(_rsa_public(n, e) for e in exponents)
        return Signer(raw, "rsa", fingerprint, publics)
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = ECC_CURVES.get(key.curve.name)
        if curve is None:
            raise SignatureError(f"public key: curve {key.curve.name} is not supported")
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        size = (len(point) - 1) // 2
        x, y = point[1 : 1 + size], point[1 + size :]
        fingerprint = hashlib.sha256(point).digest()
        return Signer(raw, "ecc", fingerprint, (_ecc_public(curve, x, y),))
    raise SignatureError("public key: only RSA and ECC keys sign PCR policies")


def _public_header(alg: int) -> bytes:
    # type, nameAlg, objectAttributes, authPolicy (empty TPM2B)
    return struct.pack(">HHIH", alg, TPM_ALG_SHA256, SIGNER_ATTRIBUTES, 0)


def _rsa_public(n: bytes, exponent: int) -> bytes:
    """TPMT_PUBLIC (RSA) marshalled: symmetric NULL, scheme NULL, keyBits, exponent, n."""
    return (
        _public_header(TPM_ALG_RSA)
        + struct.pack(">HHHI", TPM_ALG_NULL, TPM_ALG_NULL, 8 * len(n), exponent)
        + struct.pack(">H", len(n))
        + n
    )


def _ecc_public(curve: int, x: bytes, y: bytes) -> bytes:
    """TPMT_PUBLIC (ECC) marshalled: symmetric NULL, scheme NULL, curve, kdf NULL, x, y."""
    return (
        _public_header(TPM_ALG_ECC)
        + struct.pack(">HHHH", TPM_ALG_NULL, TPM_ALG_NULL, curve, TPM_ALG_NULL)
        + struct.pack(">H", len(x))
        + x
        + struct.pack(">H", len(y))
        + y
    )


def tpm_name(public: bytes) -> bytes:
    """An object's name: its name algorithm, then that hash of its TPMT_PUBLIC."""
    return struct.pack(">H", TPM_ALG_SHA256) + hashlib.sha256(public).digest()


def policy_authorize_digest(name: bytes) -> bytes:
    """The session digest after TPM2_PolicyAuthorize with an empty policyRef. The command
    resets the digest first, so it is the same whatever came before."""
    digest = hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_AUTHORIZE) + name).digest()
    return hashlib.sha256(digest).digest()  # then policyRef, empty


# -- PCR 11 of a unified kernel image ------------------------------------------------------

# The sections systemd-stub measures, in the order it measures them (its own order, not the
# image's); .pcrsig is never measured, since it holds the signatures of the result.
UKI_SECTIONS = (
    ".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname",
    ".sbat", ".pcrpkey", ".profile",
)  # fmt: skip


def uki_pcr11(sections: dict[str, bytes], phases: Sequence[str] = ()) -> bytes:
    """PCR 11 (SHA-256) after systemd-stub measured a UKI with these sections (each: the
    name with its NUL, then the contents) and systemd-pcrphase the boot `phases` (each
    string as is): the value systemd-measure calculates and signs."""
    unknown = set(sections) - set(UKI_SECTIONS)
    if unknown:
        raise SignatureError(f"sections: {', '.join(sorted(unknown))} not measured into PCR 11")
    pcr = bytes(32)
    events = [
        m
        for name in UKI_SECTIONS
        if name in sections
        for m in (name.encode() + b"\0", sections[name])
    ]
    for data in (*events, *(p.encode() for p in phases)):
        pcr = hashlib.sha256(pcr + hashlib.sha256(data).digest()).digest()
    return pcr


# -- the signature document ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PCRSignature:
    bank: str
    pcrs: tuple[int, ...]
    fingerprint: bytes  # of the signing key (pkfp); empty if the document omits it
    policy: bytes  # the PolicyPCR digest that was signed
    signature: bytes


def parse_signatures(data: bytes | str) -> list[PCRSignature]:
    """The entries of a signature document, each field checked (the document is outside
    input: it comes from the boot partition)."""
    if len(data) > MAX_SIGNATURE_DOCUMENT:
        raise SignatureError("signature: document larger than 1 MiB")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SignatureError(f"signature: not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise SignatureError("signature: expected a JSON object of banks")
    out = []
    for bank, entries in doc.items():
        if bank not in ALGORITHM_IDS:
            raise SignatureError(f"signature.{bank}: unknown PCR bank")
        if not isinstance(entries, list):
            raise SignatureError(f"signature.{bank}: expected a list")
        for i, entry in enumerate(entries):
            where = f"signature.{bank}[{i}]"
            if not isinstance(entry, dict):
                raise SignatureError(f"{where}: expected an object")
            pcrs = entry.get("pcrs")
            if (
                not isinstance(pcrs, list)
                or not pcrs
                or not all(type(p) is int and 0 <= p < 24 for p in pcrs)
            ):
                raise SignatureError(f"{where}.pcrs: expected a list of PCR numbers 0-23")
            texts = [_str(entry, k, where, k == "pkfp") for k in ("pkfp", "pol", "sig")]
            try:
                fingerprint, policy = bytes.fromhex(texts[0]), bytes.fromhex(texts[1])
                signature = base64.b64decode(texts[2], validate=True)
            except (ValueError, binascii.Error):
                raise SignatureError(f"{where}: pkfp/pol must be hex, sig base64") from None
            if len(policy) != 32 or not signature:
                raise SignatureError(f"{where}.pol: expected a SHA-256 policy digest")
            out.append(PCRSignature(bank, tuple(sorted(set(pcrs))), fingerprint, policy, signature))
    return out


def _str(entry: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    value = entry.get(key, "" if optional else None)
    if not isinstance(value, str):
        raise SignatureError(f"{where}.{key}: expected a string")
    return value


def load_signatures(root: Path | str = "/", path: str = SIGNATURE_PATH) -> list[PCRSignature]:
    """The signature document at `path` under `root`; none if there is no such file."""
    try:
        with open(Path(root) / path.lstrip("/"), "rb") as f:
            data = f.read(MAX_SIGNATURE_DOCUMENT + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise SignatureError(f"signature: cannot read {path}: {e.strerror}") from None
    return parse_signatures(data)


def render_signatures(signatures: Sequence[PCRSignature]) -> str:
    doc: dict[str, list[dict[str, Any]]] = {}
    for s in signatures:
        doc.setdefault(s.bank, []).append(
            {
                "pcrs": list(s.pcrs),
                "pkfp": s.fingerprint.hex(),
                "pol": s.policy.hex(),
                "sig": base64.b64encode(s.signature).decode(),
            }
        )
    return json.dumps(doc, separators=(",", ":")) + "\n"


def find_signature(
    signatures: Sequence[PCRSignature],
    key: Signer,
    bank: str,
    pcrs: Sequence[int],
    policy: bytes,
) -> PCRSignature | None:
    """The signature by `key` of exactly this policy, if the document has one."""
    wanted = tuple(sorted(set(pcrs)))
    for s in signatures:
        if (
            s.bank == bank
            and s.pcrs == wanted
            and s.policy == policy
            and (not s.fingerprint or s.fingerprint == key.fingerprint)
        ):
            return s
    return None


def tpmt_signature(key: Signer, signature: bytes) -> bytes:
    """A signature as the TPM takes it, marshalled TPMT_SIGNATURE: RSASSA/SHA-256 with the
    signature, or ECDSA/SHA-256 with r and s at the curve's size."""
    if key.kind == "rsa":
        return struct.pack(">HHH", TPM_ALG_RSASSA, TPM_ALG_SHA256, len(signature)) + signature
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    try:
        r, s = decode_dss_signature(signature)
    except ValueError:
        raise SignatureError("signature: not a DER ECDSA signature") from None
    size = (_load_public(key.pem).key_size + 7) // 8
    if r >= 1 << (8 * size) or s >= 1 << (8 * size):
        raise SignatureError("signature: ECDSA value larger than the curve")
    return struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA256) + b"".join(
        struct.pack(">H", size) + v.to_bytes(size, "big") for v in (r, s)
    )


# -- signing (the build side) ---------------------------------------------------------------


def sign(private_pem: bytes, bank: str, pcrs: Sequence[int], policy: bytes) -> PCRSignature:
    """Sign a PolicyPCR digest as systemd-measure does: SHA-256 over the digest, PKCS#1 v1.5
    for RSA, ECDSA otherwise."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"private key: not a PEM private key ({e})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(policy, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(policy, ec.ECDSA(hashes.SHA256()))
    else:
        raise SignatureError("private key: only RSA and ECC keys sign PCR policies")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PCRSignature(
        bank, tuple(sorted(set(pcrs))), signer(public).fingerprint, policy, signature
    )
