"""Who is calling: peer credentials on the unix socket, client certificates over TLS.

- Unix socket: the kernel's SO_PEERCRED says which process connected (pid, uid, gid at
  connect time); root is always admitted, other uids only when the config lists them.
- HTTPS: TLS 1.3 only. The server asks for a client certificate (optional at the TLS
  layer, so that a client without one gets a 403 it can read rather than a bare reset);
  the certificates it verifies against are exactly the trusted client certificates, so a
  certificate that is not one of them (or signed by one) fails the handshake. The
  request is then admitted only if the certificate's SHA-256 fingerprint is in the trust
  store: a trusted certificate that happens to be a CA does not vouch for others.
- The trust store can change while serving: each handshake picks the current context
  (through the SNI callback), so a PUT of the listener config takes effect for the next
  connection without a restart.
- The server certificate is generated on first start (ECDSA P-384, self-signed, ten
  years), key written 0600 atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.files import atomic_write

SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> Peer:
    """The credentials of the process at the other end of a unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid)


def uid_allowed(uid: int, extra_uids: Iterable[int]) -> bool:
    return uid == 0 or uid in set(extra_uids)


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def fingerprint_pem(pem: str) -> str:
    return fingerprint_der(ssl.PEM_cert_to_DER_cert(pem))


def ensure_server_certificate(state_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The server's certificate and key in the state dir, generated if absent."""
    cert_path, key_path = Path(state_dir, SERVER_CERT), Path(state_dir, SERVER_KEY)
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname() or "ihal")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic_write(key_path, key_pem, 0o600)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def tls_context(cert: Path, key: Path, trusted: Iterable[str]) -> ssl.SSLContext:
    """A server context: TLS 1.3 only, client certificates verified against `trusted`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    pems = "".join(trusted)
    if pems:
        ctx.load_verify_locations(cadata=pems)
    # Self-signed client certificates are the common case (incus remote add does this):
    # verify them as their own anchors, and never let one stand in for another by name.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.check_hostname = False
    return ctx


class TrustStore:
    """The trusted fingerprints and the TLS context made from them, swapped as one."""

    def __init__(self, cert: Path, key: Path, trusted: Iterable[str]) -> None:
        self.cert, self.key = cert, key
        self.update(trusted)
        # The listener's own context: each handshake switches to the current one.
        self.listener = tls_context(cert, key, ())
        self.listener.sni_callback = self._pick

    def update(self, trusted: Iterable[str]) -> None:
        pems = tuple(trusted)
        self.fingerprints = frozenset(fingerprint_pem(p) for p in pems)
        self.current = tls_context(self.cert, self.key, pems)

    def _pick(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        conn.context = self.current

    def allows(self, der: bytes | None) -> bool:
        return der is not None and fingerprint_der(der) in self.fingerprints
