"""X.509 certificates as TLS trust anchors: DER from PEM, fingerprints, and whether
OpenSSL will take one. Pure (no file or socket): the API's listener and the listener
section's checks share it, so what a PUT accepts is what the listener can load."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
from collections.abc import Iterable

_PEM_BODY = re.compile(
    r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----", re.ASCII
)


def fingerprint_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


class CertificateError(ValueError):
    """A PEM text that is not one loadable certificate; the message never quotes it."""


def pem_to_der(pem: str) -> bytes:
    """The DER bytes of one PEM certificate. Whitespace around and inside the base64
    is harmless and ignored (ssl.PEM_cert_to_DER_cert refuses a leading newline, which
    is how a certificate pasted into JSON often arrives)."""
    m = _PEM_BODY.fullmatch(pem.strip())
    if m is None:
        raise CertificateError("not one PEM certificate (-----BEGIN CERTIFICATE----- ...)")
    try:
        return base64.b64decode("".join(m.group(1).split()), validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("the PEM body is not base64") from None


def fingerprint_pem(pem: str) -> str:
    return fingerprint_der(pem_to_der(pem))


def anchor(ctx: ssl.SSLContext, pem: str) -> str:
    """Add one trusted certificate to `ctx`; its fingerprint. Raises CertificateError."""
    der = pem_to_der(pem)
    try:
        ctx.load_verify_locations(cadata=der)
    except ssl.SSLError as e:
        # OpenSSL's reason ("not enough data"), never the certificate itself.
        raise CertificateError(f"OpenSSL cannot load it ({e.reason or 'invalid'})") from None
    return fingerprint_der(der)


def trust_problems(trusted: Iterable[str]) -> list[tuple[int, str]]:
    """(index, why) for each certificate that could not become a TLS trust anchor: what
    a PUT is refused for, so that what is stored is what the listener will use."""
    out = []
    for i, pem in enumerate(trusted):
        try:
            anchor(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), pem)
        except CertificateError as e:
            out.append((i, f"cannot be used as a TLS client certificate: {e}"))
    return out
