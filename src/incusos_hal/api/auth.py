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
- Whatever is stored, the service starts: a trusted certificate that cannot be loaded
  is left out of the trust store with a warning (its index and why, never its text),
  the others keep working. A PUT is refused before storing such a certificate
  (`trust_problems`), so this covers files written by something else: an older version,
  a restore, a damaged disk.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..core.files import atomic_write
from ..core.tls import (
    CertificateError,
    anchor,
    fingerprint_der,
    fingerprint_pem,
)
from ..state.paths import DAMAGED_SUFFIX, SERVER_CERT, SERVER_KEY

log = logging.getLogger("incusos_hal.api")


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


def server_pair_problem(cert: Path, key: Path) -> str | None:
    """Why the server's certificate and key cannot serve TLS (None: they can): missing,
    unreadable, not PEM, or a key that does not match the certificate. OpenSSL's own
    check, the same one the listener makes."""
    if not cert.exists() or not key.exists():
        return "missing"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as e:
        return f"unusable ({e.reason or 'OpenSSL refused it'})"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def ensure_server_certificate(
    state_dir: str | os.PathLike[str], warn: Callable[[str], None] = log.error
) -> tuple[Path, Path]:
    """The server's certificate and key in the state dir: checked, and made anew when
    missing or unusable.

    Incus makes a missing server certificate on start, as this does. A damaged one (a
    key that no longer matches, a truncated file) stops incusd from starting; here it
    must not: this API is the only way into the machine, and a service that refuses to
    start answers nobody, root included. So a pair that OpenSSL cannot load is moved
    aside (`server.crt.damaged`, `server.key.damaged`, 0600, for a post-mortem) and a
    new pair is made. The server's identity changes, loudly: `warn` gets the new
    fingerprint, and clients that pinned the old one refuse it (incusos-hal remote add
    says "pinned") rather than talking to an unknown server. A restore of a backup puts
    the old identity back. If even a new pair cannot be written (a read-only state
    directory), this raises, and the caller serves the unix socket without HTTPS."""
    cert_path, key_path = Path(state_dir, SERVER_CERT), Path(state_dir, SERVER_KEY)
    problem = server_pair_problem(cert_path, key_path)
    if problem is None:
        return cert_path, key_path
    if problem != "missing" or cert_path.exists() or key_path.exists():
        for path in (cert_path, key_path):
            if path.exists():
                os.chmod(path, 0o600)
                os.replace(path, path.with_name(path.name + DAMAGED_SUFFIX))
    _generate_server_certificate(cert_path, key_path)
    if problem != "missing":
        fingerprint = fingerprint_pem(cert_path.read_text())
        warn(
            f"the server certificate and key were {problem}: kept as *{DAMAGED_SUFFIX}, "
            f"a new pair was made (fingerprint {fingerprint}); clients must trust it again"
        )
    return cert_path, key_path


def _generate_server_certificate(cert_path: Path, key_path: Path) -> None:
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


def tls_context(
    cert: Path,
    key: Path,
    trusted: Iterable[str],
    warn: Callable[[str], None] = log.warning,
) -> tuple[ssl.SSLContext, frozenset[str]]:
    """A server context: TLS 1.3 only, client certificates verified against `trusted`;
    and the fingerprints of those it trusts. Each certificate is loaded on its own (one
    that cannot be is skipped and `warn` told which and why), never as one concatenated
    text, where a certificate without a final newline spoils the next."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    fingerprints = set()
    for i, pem in enumerate(trusted):
        try:
            fingerprints.add(anchor(ctx, pem))
        except CertificateError as e:
            warn(f"listener.trusted_client_certificates[{i}]: skipped, {e}")
    # Self-signed client certificates are the common case (incus remote add does this):
    # verify them as their own anchors, and never let one stand in for another by name.
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.check_hostname = False
    return ctx, frozenset(fingerprints)


class TrustStore:
    """The trusted fingerprints and the TLS context made from them, swapped as one."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        trusted: Iterable[str],
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self.cert, self.key, self.warn = cert, key, warn
        self.update(trusted)
        # The listener's own context: each handshake switches to the current one.
        self.listener = tls_context(cert, key, ())[0]
        self.listener.sni_callback = self._pick

    def update(self, trusted: Iterable[str]) -> None:
        """Never raises for a certificate: one that cannot be loaded is skipped."""
        self.current, self.fingerprints = tls_context(self.cert, self.key, trusted, self.warn)

    def _pick(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        conn.context = self.current

    def allows(self, der: bytes | None) -> bool:
        return der is not None and self.trusts(fingerprint_der(der))

    def trusts(self, fingerprint: str | None) -> bool:
        """Whether a certificate of this SHA-256 fingerprint is trusted now."""
        return fingerprint is not None and fingerprint in self.fingerprints
