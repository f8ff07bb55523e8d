"""The TPM's fast path through cffi in ABI mode: the TCTI loader (libtss2-tctildr) to send
command bytes to the TPM, and the two primitives of a salted session libcrypto has and the
standard library has not (AES-128-CFB, ECDH on P-256). hal.tpmwire builds the commands and
the sessions; hal.tpm uses it for sealing and unsealing, tpm2-pytss for everything else.

Why not the ESAPI (libtss2-esys) here: with tpm2-tss 3.2 on OpenSSL 3 every command in a
session costs it ~5 ms of its own crypto (a fresh OpenSSL library context per nonce), three
quarters of a seal and unseal; the session arithmetic itself is a few HMACs.

ABI mode (dlopen of the stable sonames) as _native.cryptsetup, but out of line: no headers
at install, and a machine without the libraries imports everything else; `available()`
says whether this path can be used, and hal.tpm falls back to tpm2-pytss when it cannot
(or when cffi's backend is missing: the import fails). The declarations (tss_cdef.py) are
the documented, versioned ones (tss2_tcti.h's common context, v1; libcrypto 3's EVP and
EC_KEY calls, the latter deprecated but exported for the life of OpenSSL 3).

Buffers that held a secret (a session's symmetric key, the plaintext of a parameter) are
zeroed before they are released.
"""

from __future__ import annotations

import threading

# Out-of-line ABI mode: the declarations (tss_cdef.py) parsed once, at development time,
# into _tss_ffi.py; importing it needs cffi's C backend only, not cffi and its C parser
# (which would be most of a fresh seal's time).
from ._tss_ffi import ffi

TYPE_CHECKING = False  # not typing's: a fresh seal does not import typing for this
if TYPE_CHECKING:
    from typing import Any

TCTILDR_SONAME = "libtss2-tctildr.so.0"
CRYPTO_SONAME = "libcrypto.so.3"
TIMEOUT_BLOCK = -1
MAX_RESPONSE = 4096  # TPM2_MAX_COMMAND_SIZE: no response is longer
NID_P256 = 415  # NID_X9_62_prime256v1
POINT_UNCOMPRESSED = 4

_libs: tuple[Any, Any] | None = None
_lock = threading.Lock()


def _load() -> tuple[Any, Any]:
    global _libs
    with _lock:
        if _libs is None:
            try:
                _libs = (ffi.dlopen(TCTILDR_SONAME), ffi.dlopen(CRYPTO_SONAME))
            except OSError as e:
                raise OSError(f"the TPM fast path is not usable: {e}") from None
        return _libs


def available() -> bool:
    """Whether the libraries load (else hal.tpm uses tpm2-pytss for everything)."""
    try:
        _load()
    except OSError:
        return False
    return True


class TctiError(OSError):
    """The TCTI failed (not the TPM: a TPM's refusal is a response code)."""


class Tcti:
    """A TCTI opened by the loader from a tpm2-tools style string ("swtpm:host=...",
    "device:/dev/tpmrm0"); `transact` sends one command and returns its response."""

    def __init__(self, spec: str) -> None:
        tctildr, _ = _load()
        self._tctildr = tctildr
        self._pp = ffi.new("TSS2_TCTI_CONTEXT **")
        rc = tctildr.Tss2_TctiLdr_Initialize(spec.encode(), self._pp)
        if rc != 0:
            raise TctiError(f"cannot open TPM {spec}: TCTI error 0x{rc:x}")
        self._common = ffi.cast("TSS2_TCTI_CONTEXT_COMMON_V1 *", self._pp[0])
        self._response = ffi.new("uint8_t[]", MAX_RESPONSE)
        self._size = ffi.new("size_t *")

    @property
    def address(self) -> int:
        """The TSS2_TCTI_CONTEXT's address, for tpm2-pytss to share this connection."""
        return int(ffi.cast("uintptr_t", self._pp[0]))

    def transact(self, command: bytes | bytearray) -> bytes:
        if self._pp is None or self._pp[0] == ffi.NULL:
            raise TctiError("the TPM is closed")
        ctx = self._pp[0]
        rc = self._common.transmit(ctx, len(command), ffi.from_buffer(command))
        if rc != 0:
            raise TctiError(f"TCTI transmit: error 0x{rc:x}")
        self._size[0] = MAX_RESPONSE
        rc = self._common.receive(ctx, self._size, self._response, TIMEOUT_BLOCK)
        if rc != 0:
            raise TctiError(f"TCTI receive: error 0x{rc:x}")
        size = int(self._size[0])
        out = bytes(ffi.buffer(self._response, size))
        ffi.memmove(self._response, bytes(size), size)  # it may have held a secret
        return out

    def close(self) -> None:
        if self._pp is not None and self._pp[0] != ffi.NULL:
            self._tctildr.Tss2_TctiLdr_Finalize(self._pp)


def aes128_cfb(
    key: bytes, iv: bytes, data: bytes | bytearray | memoryview, encrypt: bool
) -> bytearray:
    """AES-128 in CFB mode (the TPM's parameter encryption); the output is a bytearray the
    caller can zero."""
    if len(key) != 16 or len(iv) != 16:
        raise ValueError("AES-128-CFB: a 16-byte key and IV")
    _, crypto = _load()
    n = len(data)
    src = ffi.new("unsigned char[]", max(n, 1))
    dst = ffi.new("unsigned char[]", max(n, 1))
    keybuf = ffi.new("unsigned char[]", key)
    ffi.memmove(src, data, n)
    outl = ffi.new("int *")
    ctx = crypto.EVP_CIPHER_CTX_new()
    if ctx == ffi.NULL:
        raise MemoryError("EVP_CIPHER_CTX_new")
    try:
        if (
            crypto.EVP_CipherInit_ex(
                ctx, crypto.EVP_aes_128_cfb128(), ffi.NULL, keybuf, iv, int(encrypt)
            )
            != 1
            or crypto.EVP_CipherUpdate(ctx, dst, outl, src, n) != 1
            or outl[0] != n
        ):
            raise ValueError("AES-128-CFB failed")
        return bytearray(ffi.buffer(dst, n))
    finally:
        crypto.EVP_CIPHER_CTX_free(ctx)  # clears the key schedule
        for buf, size in ((src, n), (dst, n), (keybuf, len(key))):
            ffi.memmove(buf, bytes(size), size)


def ecdh_p256(peer_x: bytes, peer_y: bytes) -> tuple[bytes, bytes, bytes]:
    """An ephemeral P-256 key agreed with the peer's public point: (Z's x coordinate, the
    ephemeral public x, y). ValueError if the point is not on the curve."""
    if len(peer_x) != 32 or len(peer_y) != 32:
        raise ValueError("ECDH: a P-256 point has 32-byte coordinates")
    _, crypto = _load()
    key = crypto.EC_KEY_new_by_curve_name(NID_P256)
    if key == ffi.NULL:
        raise MemoryError("EC_KEY_new_by_curve_name")
    peer = ffi.NULL
    z = ffi.new("unsigned char[32]")
    try:
        if crypto.EC_KEY_generate_key(key) != 1:
            raise ValueError("ECDH: cannot generate a key")
        group = crypto.EC_KEY_get0_group(key)
        peer = crypto.EC_POINT_new(group)
        octets = b"\x04" + peer_x + peer_y
        if peer == ffi.NULL or crypto.EC_POINT_oct2point(group, peer, octets, 65, ffi.NULL) != 1:
            raise ValueError("ECDH: the TPM's key is not a P-256 point")
        if crypto.ECDH_compute_key(z, 32, peer, key, ffi.NULL) != 32:
            raise ValueError("ECDH failed")
        ours = ffi.new("unsigned char[65]")
        got = crypto.EC_POINT_point2oct(
            group, crypto.EC_KEY_get0_public_key(key), POINT_UNCOMPRESSED, ours, 65, ffi.NULL
        )
        if got != 65:
            raise ValueError("ECDH: cannot encode the ephemeral key")
        point = bytes(ffi.buffer(ours, 65))
        return bytes(ffi.buffer(z, 32)), point[1:33], point[33:]
    finally:
        ffi.memmove(z, bytes(32), 32)
        if peer != ffi.NULL:
            crypto.EC_POINT_free(peer)
        crypto.EC_KEY_free(key)  # clears the ephemeral private key
