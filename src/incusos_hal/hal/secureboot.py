"""UEFI Secure Boot: its state and its key databases, from efivarfs under a root path.

efivarfs files are the variable's 4-byte attributes then its data. The mode variables are
one byte; PK, KEK, db and dbx are EFI_SIGNATURE_LISTs (UEFI 2.10, 32.4.1): a GUID naming the
entry type, the list's sizes, then fixed-size entries, each an owner GUID and either an
X.509 certificate (DER) or a hash. Certificates are read with `cryptography` (which
tpm2-pytss already brings); one that does not parse is reported, not fatal, because firmware
ships such entries and the machine still boots.

`check_binary` answers the question an update must ask before it writes a new UKI: will this
firmware run it? The PE's Authenticode hash is computed (the PE/COFF specification's
algorithm, over the file minus its checksum, the certificate table entry and the
signatures), the signature's embedded digest must match it, its signer must chain to a
certificate in db (each link's signature verified), and neither the hash, the signer nor
any certificate of the chain may be in dbx.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EFIVARS = "sys/firmware/efi/efivars"
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
VARIABLE_GUIDS: Mapping[str, uuid.UUID] = {
    "SecureBoot": EFI_GLOBAL_VARIABLE,
    "SetupMode": EFI_GLOBAL_VARIABLE,
    "AuditMode": EFI_GLOBAL_VARIABLE,
    "DeployedMode": EFI_GLOBAL_VARIABLE,
    "PK": EFI_GLOBAL_VARIABLE,
    "KEK": EFI_GLOBAL_VARIABLE,
    "db": EFI_IMAGE_SECURITY_DATABASE,
    "dbx": EFI_IMAGE_SECURITY_DATABASE,
}
DATABASES = ("PK", "KEK", "db", "dbx")

# EFI_SIGNATURE_LIST types (UEFI 2.10, 32.4.1) → (name, entry data size or 0 if variable).
SIGNATURE_TYPES: Mapping[uuid.UUID, tuple[str, int]] = {
    uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072"): ("x509", 0),
    uuid.UUID("c1c41626-504c-4092-aca9-41f936934328"): ("sha256", 32),
    uuid.UUID("826ca512-cf10-4ac9-b187-be01496631bd"): ("sha1", 20),
    uuid.UUID("0b6e5233-a65c-44c9-9407-d9ab83bfc8bd"): ("sha224", 28),
    uuid.UUID("ff3e5307-9fd0-48c9-85f1-8ad56c701e01"): ("sha384", 48),
    uuid.UUID("093e0fae-a6c4-4f50-9f1b-d41e2b89c19a"): ("sha512", 64),
    # Hashes of a certificate's TBSCertificate, then an EFI_TIME of revocation (dbx only).
    uuid.UUID("3bd2a492-96c0-4079-b420-fcf98ef103ed"): ("x509_sha256", 48),
    uuid.UUID("7076876e-80c2-4ee6-aad2-28b349a6865b"): ("x509_sha384", 64),
    uuid.UUID("446dbf63-2502-4cda-bcfa-2465d2b0fe9d"): ("x509_sha512", 80),
    uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7"): ("rsa2048", 256),
}
MAX_VARIABLE_SIZE = 1 << 20


class SignatureListError(ValueError):
    """A signature database that is not a well-formed EFI_SIGNATURE_LIST sequence."""


@dataclass(frozen=True, slots=True)
class SignatureEntry:
    type: str  # a SIGNATURE_TYPES name, or the GUID of an unknown type
    owner: uuid.UUID
    data: bytes


@dataclass(frozen=True, slots=True)
class Certificate:
    variable: str
    fingerprint: str  # SHA-256 of the DER, hex
    subject: str
    issuer: str
    der: bytes = field(repr=False)

    def api(self) -> dict[str, str]:
        """IncusOS's SystemSecuritySecureBootCertificate."""
        return {
            "type": self.variable,
            "fingerprint": self.fingerprint,
            "subject": self.subject,
            "issuer": self.issuer,
        }


@dataclass(frozen=True, slots=True)
class Database:
    name: str
    entries: tuple[SignatureEntry, ...]
    certificates: tuple[Certificate, ...]
    errors: tuple[str, ...] = ()  # entries that did not parse (the firmware has them anyway)

    def hashes(self, kind: str) -> frozenset[bytes]:
        return frozenset(e.data for e in self.entries if e.type == kind)


@dataclass(frozen=True, slots=True)
class State:
    efi: bool
    secure_boot: bool
    setup_mode: bool
    audit_mode: bool
    deployed_mode: bool

    @property
    def mode(self) -> str:
        """UEFI 2.10, 32.3: the four modes the variables combine into."""
        if not self.efi:
            return "legacy"
        if self.audit_mode:
            return "audit"
        if self.setup_mode:
            return "setup"
        return "deployed" if self.deployed_mode else "user"


def parse_signature_lists(data: bytes) -> list[SignatureEntry]:
    """Every entry of a sequence of EFI_SIGNATURE_LISTs (the variable's data, attributes
    already removed)."""
    if len(data) > MAX_VARIABLE_SIZE:
        raise SignatureListError(f"{len(data)} bytes: larger than any signature database")
    entries: list[SignatureEntry] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 28:
            raise SignatureListError(
                f"offset {pos}: {len(data) - pos} bytes left, a list header is 28"
            )
        kind = uuid.UUID(bytes_le=data[pos : pos + 16])
        list_size, header_size, entry_size = struct.unpack_from("<III", data, pos + 16)
        if list_size < 28 or list_size > len(data) - pos:
            raise SignatureListError(f"offset {pos}: list size {list_size} overruns the data")
        if header_size > list_size - 28:
            raise SignatureListError(f"offset {pos}: header size {header_size} overruns the list")
        body = list_size - 28 - header_size
        if entry_size <= 16 or body % entry_size:
            raise SignatureListError(
                f"offset {pos}: entry size {entry_size} does not divide the list body of {body}"
            )
        name, fixed = SIGNATURE_TYPES.get(kind, (str(kind), 0))
        if fixed and entry_size != 16 + fixed:
            raise SignatureListError(
                f"offset {pos}: {name} entries are {16 + fixed} bytes, not {entry_size}"
            )
        start = pos + 28 + header_size
        for at in range(start, start + body, entry_size):
            owner = uuid.UUID(bytes_le=data[at : at + 16])
            entries.append(SignatureEntry(name, owner, data[at + 16 : at + entry_size]))
        pos += list_size
    return entries


def signature_list(kind: str, entries: Sequence[tuple[uuid.UUID, bytes]]) -> bytes:
    """One EFI_SIGNATURE_LIST of entries of one type (all the same size), the inverse of
    parse_signature_lists: how a db or dbx update is built, and how tests craft them."""
    guid = next((g for g, (n, _) in SIGNATURE_TYPES.items() if n == kind), None)
    if guid is None:
        raise ValueError(f"kind: unknown signature type {kind!r}")
    sizes = {len(d) for _, d in entries}
    if len(sizes) != 1:
        raise ValueError("entries: one or more entries, all of the same size")
    entry_size = 16 + sizes.pop()
    body = b"".join(owner.bytes_le + d for owner, d in entries)
    return guid.bytes_le + struct.pack("<III", 28 + len(body), 0, entry_size) + body


def _x509() -> Any:
    from cryptography import x509

    return x509


def certificate(variable: str, der: bytes) -> Certificate:
    cert = _x509().load_der_x509_certificate(der)
    return Certificate(
        variable=variable,
        fingerprint=hashlib.sha256(der).hexdigest(),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        der=der,
    )


def database(name: str, data: bytes) -> Database:
    entries = tuple(parse_signature_lists(data))
    certs: list[Certificate] = []
    errors: list[str] = []
    for i, entry in enumerate(entries):
        if entry.type != "x509":
            continue
        try:
            certs.append(certificate(name, entry.data))
        except ValueError as e:
            errors.append(f"{name} entry {i}: not an X.509 certificate ({e})")
    return Database(name, entries, tuple(certs), tuple(errors))


def read_variable(root: Path | str, name: str) -> bytes | None:
    """A variable's data (without its attributes), None if the firmware has no such
    variable (or no UEFI at all)."""
    guid = VARIABLE_GUIDS[name]
    path = Path(root) / EFIVARS / f"{name}-{guid}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_VARIABLE_SIZE + 5)
    except FileNotFoundError:
        return None
    if len(raw) < 4:
        raise SignatureListError(f"{name}: {len(raw)} bytes, shorter than the attributes")
    if len(raw) > MAX_VARIABLE_SIZE + 4:
        raise SignatureListError(f"{name}: larger than any signature database")
    return raw[4:]


def _flag(root: Path | str, name: str) -> bool:
    value = read_variable(root, name)
    return value is not None and value[:1] == b"\x01"


def state(root: Path | str = "/") -> State:
    efi = (Path(root) / "sys/firmware/efi").is_dir()
    if not efi:
        return State(False, False, False, False, False)
    return State(
        efi=True,
        secure_boot=_flag(root, "SecureBoot"),
        setup_mode=_flag(root, "SetupMode"),
        audit_mode=_flag(root, "AuditMode"),
        deployed_mode=_flag(root, "DeployedMode"),
    )


def read_database(root: Path | str, name: str) -> Database:
    if name not in DATABASES:
        raise ValueError(f"name: one of {', '.join(DATABASES)}")
    data = read_variable(root, name)
    return database(name, data or b"")


def certificates(root: Path | str = "/") -> list[Certificate]:
    """Every certificate of PK, KEK, db and dbx, in that order (IncusOS's
    secure_boot_certificates). Databases that do not parse are left out, as IncusOS does."""
    out: list[Certificate] = []
    for name in DATABASES:
        try:
            out.extend(read_database(root, name).certificates)
        except SignatureListError:
            continue
    return out


# -- PE/COFF Authenticode ---------------------------------------------------------------


class PEError(ValueError):
    """Not a PE image this module can hash."""


@dataclass(frozen=True, slots=True)
class PEImage:
    authenticode_sha256: bytes
    signatures: tuple[bytes, ...]  # PKCS#7 SignedData of each WIN_CERTIFICATE


def parse_pe(data: bytes) -> PEImage:
    """The Authenticode SHA-256 of a PE image and its embedded signatures."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise PEError("no MZ header")
    (pe_off,) = struct.unpack_from("<I", data, 0x3C)
    if pe_off + 24 > len(data) or data[pe_off : pe_off + 4] != b"PE\0\0":
        raise PEError("no PE signature")
    (opt_size,) = struct.unpack_from("<H", data, pe_off + 20)
    opt = pe_off + 24
    if opt + opt_size > len(data) or opt_size < 2:
        raise PEError("optional header overruns the file")
    (magic,) = struct.unpack_from("<H", data, opt)
    if magic == 0x10B:
        dirs = opt + 96
    elif magic == 0x20B:
        dirs = opt + 112
    else:
        raise PEError(f"optional header magic 0x{magic:x}")
    checksum = opt + 64
    (ndirs,) = struct.unpack_from("<I", data, dirs - 4)
    if ndirs < 5 or dirs + 8 * 5 > opt + opt_size:
        raise PEError("no certificate table directory")
    cert_dir = dirs + 8 * 4
    cert_off, cert_size = struct.unpack_from("<II", data, cert_dir)
    (headers_size,) = struct.unpack_from("<I", data, opt + 60)
    if cert_size and (cert_off + cert_size > len(data) or cert_off < headers_size):
        raise PEError("certificate table overruns the file")
    end = cert_off if cert_size else len(data)
    # PE/COFF spec, "Calculating the PE Image Hash": skip the checksum and the certificate
    # table's directory entry, and the table itself. Hashing the file in that order equals
    # hashing the headers then the sections sorted by file offset, for images whose
    # sections are laid out in order, which is what linkers and sbsign produce.
    h = hashlib.sha256()
    h.update(data[:checksum])
    h.update(data[checksum + 4 : cert_dir])
    h.update(data[cert_dir + 8 : end])
    signatures: list[bytes] = []
    pos = cert_off
    while cert_size and pos + 8 <= cert_off + cert_size:
        length, _revision, kind = struct.unpack_from("<IHH", data, pos)
        if length < 8 or pos + length > cert_off + cert_size:
            raise PEError("WIN_CERTIFICATE overruns the table")
        if kind == 0x0002:  # WIN_CERT_TYPE_PKCS_SIGNED_DATA
            signatures.append(data[pos + 8 : pos + length])
        pos += (length + 7) & ~7
    return PEImage(h.digest(), tuple(signatures))


def _der_items(data: bytes, pos: int, end: int) -> Iterable[tuple[int, int, int]]:
    """(tag, content start, content end) of each DER item in data[pos:end]."""
    while pos < end:
        if pos + 2 > end:
            raise PEError("truncated DER")
        tag, length = data[pos], data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4 or pos + n > end:
                raise PEError("bad DER length")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > end:
            raise PEError("DER item overruns its parent")
        yield tag, pos, pos + length
        pos += length


MESSAGE_DIGEST_OID = bytes.fromhex("2a864886f70d010904")  # 1.2.840.113549.1.9.4


def _children(data: bytes, item: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    return list(_der_items(data, item[1], item[2]))


@dataclass(frozen=True, slots=True)
class _SignedData:
    file_digest: bytes  # the Authenticode hash the signature claims
    content_digest: bytes  # SHA-256 of SpcIndirectDataContent, which the signature covers
    attributes: bytes  # authenticated attributes, re-tagged as the SET that was signed
    message_digest: bytes  # the messageDigest attribute
    signature: bytes


def _parse_signed_data(pkcs7: bytes) -> _SignedData:
    """The parts of an Authenticode SignedData a verifier needs: ContentInfo → SignedData
    {version, digestAlgorithms, contentInfo{type, [0] SpcIndirectDataContent{data,
    DigestInfo{alg, digest}}}, [0] certificates, signerInfos{SignerInfo{version, issuer,
    digestAlg, [0] authenticatedAttributes, encryptionAlg, encryptedDigest}}}."""
    try:
        top = _children(pkcs7, next(iter(_der_items(pkcs7, 0, len(pkcs7)))))
        signed = _children(pkcs7, _children(pkcs7, top[1])[0])
        content = _children(pkcs7, signed[2])
        spc = _children(pkcs7, content[1])[0]
        digest_info = _children(pkcs7, _children(pkcs7, spc)[1])
        tag, s, e = digest_info[1]
        if tag != 0x04:
            raise PEError("signature digest is not an OCTET STRING")
        signer = _children(pkcs7, _children(pkcs7, signed[-1])[0])
        attrs = next(i for i in signer if i[0] == 0xA0)
        encrypted = next(i for i in signer[signer.index(attrs) + 1 :] if i[0] == 0x04)
        message_digest = b""
        for attr in _children(pkcs7, attrs):
            oid, values = _children(pkcs7, attr)
            if pkcs7[oid[1] : oid[2]] == MESSAGE_DIGEST_OID:
                value = _children(pkcs7, values)[0]
                message_digest = pkcs7[value[1] : value[2]]
        # What was signed is the attributes' DER with the SET tag, not the [0] one.
        attributes = b"\x31" + pkcs7[_item_start(attrs) + 1 : attrs[2]]
    except (StopIteration, IndexError, ValueError) as err:
        raise PEError("signature is not Authenticode SignedData") from err
    return _SignedData(
        file_digest=pkcs7[s:e],
        content_digest=hashlib.sha256(pkcs7[spc[1] : spc[2]]).digest(),
        attributes=attributes,
        message_digest=message_digest,
        signature=pkcs7[encrypted[1] : encrypted[2]],
    )


def _item_start(item: tuple[int, int, int]) -> int:
    """Where a DER item starts (its tag byte), from its content's bounds: DER lengths are
    minimal, so the header's size follows from the length."""
    length = item[2] - item[1]
    header = 2 if length < 0x80 else 2 + (length.bit_length() + 7) // 8
    return item[1] - header


def _signature_valid(cert: Any, signed: _SignedData) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    key = cert.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signed.signature, signed.attributes, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signed.signature, signed.attributes, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    reason: str
    signer: str = ""


def _issued_by(cert: Any, issuer: Any) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, Exception):  # InvalidSignature is not a ValueError
        return False
    return True


def check_binary(pe: bytes, db: Database, dbx: Database) -> Verdict:
    """Will firmware with these db and dbx run this EFI binary?"""
    from cryptography.hazmat.primitives.serialization import pkcs7

    x509 = _x509()
    image = parse_pe(pe)
    if image.authenticode_sha256 in dbx.hashes("sha256"):
        return Verdict(False, "the binary's hash is in dbx")
    if image.authenticode_sha256 in db.hashes("sha256"):
        return Verdict(True, "the binary's hash is in db")
    revoked_fps = {c.fingerprint for c in dbx.certificates}
    revoked_tbs = {e.data[:32] for e in dbx.entries if e.type == "x509_sha256"}
    trusted = [x509.load_der_x509_certificate(c.der) for c in db.certificates]
    if not image.signatures:
        return Verdict(False, "the binary is not signed")
    reasons = []
    for sig in image.signatures:
        try:
            signed = _parse_signed_data(sig)
            chain = pkcs7.load_der_pkcs7_certificates(sig)
        except (PEError, ValueError):
            reasons.append("a signature does not parse")
            continue
        if signed.file_digest != image.authenticode_sha256:
            reasons.append("a signature is for other contents")
            continue
        if signed.message_digest != signed.content_digest:
            reasons.append("a signature's attributes do not match its content")
            continue
        signers = [c for c in chain if _signature_valid(c, signed)]
        if not signers:
            reasons.append("no certificate of a signature verifies it")
            continue

        def revoked(c: Any) -> bool:
            from cryptography.hazmat.primitives.serialization import Encoding

            der = c.public_bytes(Encoding.DER)
            return (
                hashlib.sha256(der).hexdigest() in revoked_fps
                or hashlib.sha256(c.tbs_certificate_bytes).digest() in revoked_tbs
            )

        for leaf in signers:
            path = [leaf]
            # Walk up through the signature's own certificates until a db one issues it.
            for _ in range(len(chain) + 1):
                anchor = next(
                    (t for t in trusted if t == path[-1] or _issued_by(path[-1], t)), None
                )
                if anchor is not None:
                    subject = leaf.subject.rfc4514_string()
                    if any(revoked(c) for c in [*path, anchor]):
                        return Verdict(
                            False, "a certificate of the signing chain is in dbx", subject
                        )
                    return Verdict(True, f"signed by {subject}, trusted through db", subject)
                parent = next((c for c in chain if c not in path and _issued_by(path[-1], c)), None)
                if parent is None:
                    break
                path.append(parent)
        reasons.append("no signer chains to a db certificate")
    return Verdict(False, "; ".join(dict.fromkeys(reasons)))
