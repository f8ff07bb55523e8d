"""The TPM commands of a seal and an unseal, built and checked here byte by byte (TPM 2.0
Part 3) and sent through _native.tss: the fast path hal.tpm takes when it can. tpm2-pytss
stays the path for everything else (and for these when the libraries are missing).

Sessions are as hal.tpm's: salted with the SRK (ECDH on its P-256 key, KDFe), AES-128-CFB
parameter encryption both ways, SHA-256; started once and reused (a policy session
restarted before each unseal). Every response of a session is checked against its HMAC
before a byte of it is used (Part 1, 19.6); a session whose command failed is flushed.

Also the pure pieces both paths share: the SRK template (marshalled) and the check that a
persistent key is the template's, the sealed object's template, systemd's serialized SRK.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

ST_NO_SESSIONS = 0x8001
ST_SESSIONS = 0x8002
CC_CREATE = 0x153
CC_LOAD = 0x157
CC_UNSEAL = 0x15E
CC_FLUSH_CONTEXT = 0x165
CC_READ_PUBLIC = 0x173
CC_START_AUTH_SESSION = 0x176
CC_PCR_READ = 0x17E
CC_POLICY_PCR = 0x17F
CC_POLICY_RESTART = 0x180
RC_SESSION_MEMORY = 0x903  # a warning: no room for another loaded session
RS_PW = 0x40000009
RH_NULL = 0x40000007
SE_HMAC, SE_POLICY = 0x00, 0x01
CONTINUE_SESSION, DECRYPT, ENCRYPT = 0x01, 0x20, 0x40
ALG_SHA256, ALG_AES, ALG_CFB, ALG_NULL = 0x000B, 0x0006, 0x0043, 0x0010
ALG_ECC, ALG_KEYEDHASH = 0x0023, 0x0008
ECC_NIST_P256 = 0x0003
RESOURCE_KEY = 1  # ESYS's IESYSC_KEY_RSRC, in a serialized ESYS_TR

# TPMA_OBJECT bits (TPM 2.0 part 2, 8.3).
FIXED_TPM = 0x00000002
FIXED_PARENT = 0x00000010
SENSITIVE_DATA_ORIGIN = 0x00000020
USER_WITH_AUTH = 0x00000040
NO_DA = 0x00000400
RESTRICTED = 0x00010000
DECRYPT_KEY = 0x00020000
SEALED_OBJECT_ATTRIBUTES = FIXED_TPM | FIXED_PARENT
# The SRK template's attributes (TCG Provisioning Guidance 7.5.1, EK Credential Profile L-2).
SRK_ATTRIBUTES = (
    FIXED_TPM
    | FIXED_PARENT
    | SENSITIVE_DATA_ORIGIN
    | USER_WITH_AUTH
    | NO_DA
    | RESTRICTED
    | DECRYPT_KEY
)
# An ECC P-256 key's TPMS_ECC_POINT unique field as the TPM fills it: two 32-byte sizes.
ECC_P256_UNIQUE_SIZE = 2 + 32 + 2 + 32


class ResponseError(Exception):
    """The TPM answered with a response code other than success."""

    def __init__(self, what: str, rc: int) -> None:
        super().__init__(f"{what}: TPM response 0x{rc:x}")
        self.rc = rc


def is_no_object(rc: int) -> bool:
    """TPM_RC_HANDLE (format one, any handle number): nothing at that handle."""
    return bool(rc & 0x80) and rc & 0xBF == 0x8B


class WireError(Exception):
    """A response that does not parse or whose HMAC is wrong."""


def tpm2b(data: bytes | bytearray) -> bytes:
    return struct.pack(">H", len(data)) + bytes(data)


def storage_template(attributes: int) -> bytes:
    """The marshalled TPMT_PUBLIC of an ECC P-256 storage key, AES-128-CFB, empty unique:
    the EK Credential Profile's template L-2 (hal.tpm builds tpm2-pytss's from these bytes)."""
    return (
        struct.pack(">HHI", ALG_ECC, ALG_SHA256, attributes)
        + tpm2b(b"")  # authPolicy
        + struct.pack(">HHH", ALG_AES, 128, ALG_CFB)  # symmetric
        + struct.pack(">HHH", ALG_NULL, ECC_NIST_P256, ALG_NULL)  # scheme, curve, kdf
        + tpm2b(b"")
        + tpm2b(b"")  # unique: an empty point
    )


def is_srk_public(public: bytes, template: bytes) -> bool:
    """Whether a marshalled TPMT_PUBLIC is a key made from the marshalled ECC `template`:
    every field the same up to the unique one, which holds a P-256 point (the template's is
    empty: two zero sizes)."""
    head = template[:-4]
    return (
        template.endswith(bytes(4))
        and public.startswith(head)
        and len(public) == len(head) + ECC_P256_UNIQUE_SIZE
        and public[len(head) : len(head) + 2] == b"\x00\x20"
        and public[len(head) + 34 : len(head) + 36] == b"\x00\x20"
    )


def sealed_template(policy_digest: bytes) -> bytes:
    """The marshalled TPMT_PUBLIC of a sealed object: keyed hash, SHA-256, only fixedTPM
    and fixedParent, released by `policy_digest` alone."""
    return (
        struct.pack(">HHI", ALG_KEYEDHASH, ALG_SHA256, SEALED_OBJECT_ATTRIBUTES)
        + tpm2b(policy_digest)
        + struct.pack(">H", ALG_NULL)  # scheme
        + tpm2b(b"")  # unique
    )


def object_name(public_area: bytes) -> bytes:
    """A SHA-256 object's TPM name: its name algorithm, then the hash of its public area."""
    return struct.pack(">H", ALG_SHA256) + hashlib.sha256(public_area).digest()


def serialized_key(handle: int, public_area: bytes) -> bytes:
    """A key's ESYS_TR as Esys_TR_Serialize writes it (systemd's tpm2_srk): handle, name,
    resource type, TPM2B_PUBLIC."""
    return (
        struct.pack(">I", handle)
        + tpm2b(object_name(public_area))
        + struct.pack(">I", RESOURCE_KEY)
        + tpm2b(public_area)
    )


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with SHA-256 (Part 1, 11.4.10.2): HMAC in counter mode; the label with its NUL."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.digest(
            key,
            struct.pack(">I", counter)
            + label
            + b"\0"
            + context_u
            + context_v
            + struct.pack(">I", bits),
            "sha256",
        )
    return out[: bits // 8]


def kdfe(z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe with SHA-256 (Part 1, 11.4.10.3): the ECDH secret to a salt."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.sha256(
            struct.pack(">I", counter) + z + label + b"\0" + party_u + party_v
        ).digest()
    return out[: bits // 8]


class Reader:
    """Reads a response, refusing to run past its end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise WireError("the TPM's response is truncated")
        out = self.data[self.at : self.at + n]
        self.at += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def sized(self) -> bytes:
        """A TPM2B's contents."""
        return self.take(self.u16())


class Record:
    """A frozen record with __slots__, as @dataclass(frozen=True, slots=True) makes them,
    without importing dataclasses: with inspect, that was most of the imports of a seal
    in a fresh interpreter. Each subclass lists its fields in __slots__ and sets them in
    its __init__ through _init, every one of them."""

    __slots__: tuple[str, ...] = ()

    def _init(self, **values: object) -> None:
        if set(values) != set(self.__slots__):
            raise TypeError(f"{type(self).__name__}: fields {sorted(self.__slots__)}")
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot assign to {name}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen: cannot delete {name}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Session:
    """A salted session: its TPM handle, its key and the TPM's last nonce (which every
    response changes)."""

    __slots__ = ("handle", "key", "nonce_tpm")

    def __init__(self, handle: int, key: bytes, nonce_tpm: bytes) -> None:
        self.handle, self.key, self.nonce_tpm = handle, key, nonce_tpm

    def __repr__(self) -> str:
        return f"Session(0x{self.handle:08x})"  # never the key


class SRK(Record):
    """The persistent SRK as read from the TPM and checked against the template."""

    __slots__ = ("handle", "name", "public_area")
    handle: int
    public_area: bytes  # marshalled TPMT_PUBLIC
    name: bytes

    def __init__(self, handle: int, public_area: bytes, name: bytes) -> None:
        self._init(handle=handle, public_area=public_area, name=name)

    @property
    def point(self) -> tuple[bytes, bytes]:
        """Its P-256 public point (x, y): the last field, checked by is_srk_public."""
        tail = self.public_area[-ECC_P256_UNIQUE_SIZE:]
        return tail[2:34], tail[36:]


Transact = Callable[[bytes], bytes]
AES = Callable[[bytes, bytes, bytes | bytearray | memoryview, bool], bytearray]
ECDH = Callable[[bytes, bytes], tuple[bytes, bytes, bytes]]


class Wire:
    """Commands over one TCTI. The crypto primitives are _native.tss's."""

    def __init__(self, transact: Transact, aes: AES, ecdh: ECDH) -> None:
        self.transact, self.aes, self.ecdh = transact, aes, ecdh

    def _send(
        self,
        what: str,
        cc: int,
        handles: tuple[int, ...],
        params: bytes | bytearray,
        handles_out: int = 0,
        session: Session | None = None,
        names: tuple[bytes, ...] = (),
        attributes: int = 0,
        password: bool = False,
    ) -> tuple[tuple[int, ...], bytes]:
        """One command: (the response's handles, its parameters, decrypted)."""
        head = struct.pack(">I", cc) + b"".join(struct.pack(">I", h) for h in handles)
        nonce_caller = b""
        if session is not None:
            nonce_caller = os.urandom(32)
            if attributes & DECRYPT:
                params = self._crypt_first(
                    session.key, nonce_caller, session.nonce_tpm, params, encrypt=True
                )
            cp_hash = hashlib.sha256(struct.pack(">I", cc) + b"".join(names) + params).digest()
            mac = hmac.digest(
                session.key,
                cp_hash + nonce_caller + session.nonce_tpm + bytes([attributes]),
                "sha256",
            )
            auth = (
                struct.pack(">I", session.handle)
                + tpm2b(nonce_caller)
                + bytes([attributes])
                + tpm2b(mac)
            )
        elif password:
            auth = struct.pack(">IHBH", RS_PW, 0, 0, 0)
        tagged = session is not None or password
        body = head + (struct.pack(">I", len(auth)) + auth if tagged else b"") + bytes(params)
        tag = ST_SESSIONS if tagged else ST_NO_SESSIONS
        response = self.transact(struct.pack(">HI", tag, 6 + len(body)) + body)
        r = Reader(response)
        rtag, size, rc = r.u16(), r.u32(), r.u32()
        if size != len(response):
            raise WireError(f"{what}: the TPM's response size is wrong")
        if rc != 0:
            raise ResponseError(what, rc)
        out_handles = tuple(r.u32() for _ in range(handles_out))
        if rtag != ST_SESSIONS:
            return out_handles, r.take(len(response) - r.at)
        out = r.take(r.u32())
        if session is None:
            return out_handles, out
        nonce_tpm, rattributes, rmac = r.sized(), r.u8(), r.sized()
        rp_hash = hashlib.sha256(struct.pack(">II", 0, cc) + out).digest()
        want = hmac.digest(
            session.key, rp_hash + nonce_tpm + nonce_caller + bytes([rattributes]), "sha256"
        )
        if not hmac.compare_digest(want, rmac):
            raise WireError(f"{what}: the TPM's response fails its HMAC")
        session.nonce_tpm = nonce_tpm
        if attributes & ENCRYPT:
            return out_handles, self._crypt_first(
                session.key, nonce_tpm, nonce_caller, out, encrypt=False
            )
        return out_handles, out

    def _crypt_first(
        self, key: bytes, newer: bytes, older: bytes, params: bytes | bytearray, encrypt: bool
    ) -> bytes:
        """The parameters with the first one's contents (a TPM2B) through AES-128-CFB
        (Part 1, 21.3): the key and IV from the session key and the nonces, newer first."""
        size = struct.unpack_from(">H", params)[0] if len(params) >= 2 else -1
        if not 0 <= size <= len(params) - 2:
            raise WireError("a parameter to encrypt is truncated")
        material = kdfa(key, b"CFB", newer, older, 128 + 128)
        # A view, not a slice: no copy of a plaintext is left behind.
        middle = self.aes(material[:16], material[16:], memoryview(params)[2 : 2 + size], encrypt)
        try:
            return bytes(params[:2]) + bytes(middle) + bytes(params[2 + size :])
        finally:
            middle[:] = bytes(len(middle))

    # -- commands ------------------------------------------------------------------------

    def read_public(self, handle: int) -> tuple[bytes, bytes]:
        """(marshalled TPMT_PUBLIC, name) of a loaded or persistent object."""
        _, out = self._send("ReadPublic", CC_READ_PUBLIC, (handle,), b"")
        r = Reader(out)
        return r.sized(), r.sized()

    def srk(self, handle: int, template: bytes) -> SRK | None:
        """The persistent key at `handle` if it is the template's, None if it is another
        key; ResponseError (is_no_object) if there is none."""
        public, name = self.read_public(handle)
        if not is_srk_public(public, template):
            return None
        if name != object_name(public):
            raise WireError("ReadPublic: the TPM's name for the SRK is not its public area's")
        return SRK(handle, public, name)

    def start_session(self, srk: SRK, kind: int) -> Session:
        """A session salted with the SRK (ECDH, KDFe "SECRET"), AES-128-CFB, SHA-256."""
        x, y = srk.point
        z, ex, ey = self.ecdh(x, y)
        salt = kdfe(z, b"SECRET", ex, x, 256)
        nonce_caller = os.urandom(32)
        params = (
            tpm2b(nonce_caller)
            + tpm2b(tpm2b(ex) + tpm2b(ey))
            + struct.pack(">BHHHH", kind, ALG_AES, 128, ALG_CFB, ALG_SHA256)
        )
        (handle,), out = self._send(
            "StartAuthSession", CC_START_AUTH_SESSION, (srk.handle, RH_NULL), params, 1
        )
        nonce_tpm = Reader(out).sized()
        return Session(handle, kdfa(salt, b"ATH", nonce_tpm, nonce_caller, 256), nonce_tpm)

    def flush(self, handle: int) -> None:
        self._send("FlushContext", CC_FLUSH_CONTEXT, (), struct.pack(">I", handle))

    def pcr_read(self, selection: bytes) -> tuple[bytes, list[bytes]]:
        """(the selection the TPM answered for, marshalled; its digests in order)."""
        _, out = self._send("PCR read", CC_PCR_READ, (), selection)
        r = Reader(out)
        r.u32()  # pcrUpdateCounter
        start = r.at
        for _ in range(r.u32()):
            r.u16()
            r.take(r.u8())
        got = out[start : r.at]
        return got, [r.sized() for _ in range(r.u32())]

    def create(
        self, session: Session, srk: SRK, secret: bytes, public: bytes
    ) -> tuple[bytes, bytes]:
        """TPM2_Create of a sealed object under the SRK: (TPM2B_PRIVATE, TPM2B_PUBLIC)."""
        sensitive = bytearray(tpm2b(b"") + tpm2b(secret))
        params = bytearray(tpm2b(sensitive)) + tpm2b(public) + tpm2b(b"") + bytes(4)
        sensitive[:] = bytes(len(sensitive))
        try:
            _, out = self._send(
                "seal",
                CC_CREATE,
                (srk.handle,),
                params,
                session=session,
                names=(srk.name,),
                attributes=CONTINUE_SESSION | DECRYPT | ENCRYPT,
            )
        finally:
            params[:] = bytes(len(params))
        r = Reader(out)
        private = tpm2b(r.sized())
        return private, tpm2b(r.sized())

    def load(self, srk: SRK, private: bytes, public: bytes) -> tuple[int, bytes]:
        """TPM2_Load under the SRK (no auth: an empty password): (handle, name). The name
        is the one the public area gives, not the TPM's answer: the unseal's HMAC then
        covers that the TPM loaded this object."""
        (handle,), _ = self._send(
            "unseal: load", CC_LOAD, (srk.handle,), private + public, 1, password=True
        )
        return handle, object_name(public[2:])

    def policy_restart(self, session: Session) -> None:
        self._send("PolicyRestart", CC_POLICY_RESTART, (session.handle,), b"")

    def policy_pcr(self, session: Session, selection: bytes) -> None:
        self._send("unseal", CC_POLICY_PCR, (session.handle,), tpm2b(b"") + selection)

    def unseal(self, session: Session, handle: int, name: bytes) -> bytes:
        _, out = self._send(
            "unseal",
            CC_UNSEAL,
            (handle,),
            b"",
            session=session,
            names=(name,),
            attributes=CONTINUE_SESSION | ENCRYPT,
        )
        return Reader(out).sized()
