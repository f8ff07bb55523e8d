"""The security section's custom CAs as files Debian's trust store takes in.

Each CA is written to `/etc/incusos-hal/ca-certificates/incusos-hal-<sha256>.crt`, a
directory of our own under /etc (the appliance's /usr, where Debian's
/usr/local/share/ca-certificates lives, is read-only). `incusos-hal-trust.service` runs
`update-ca-certificates --fresh --localcertsdir` on that directory: the certificates'
links and hashes in /etc/ssl/certs and the bundle /etc/ssl/certs/ca-certificates.crt
(what OpenSSL, GnuTLS, curl, Python and Go read) then hold the distribution's CAs plus
exactly these. A CA dropped from the config loses its file here, and the next run of
the unit its link, its hash and its place in the bundle.

Pure: the PEM is re-armoured from its DER, so the file holds one certificate and nothing
else, whatever line endings or text the document carried.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from ..core.tree import File, Tree

CUSTOM_CA_DIR = "/etc/incusos-hal/ca-certificates"
CUSTOM_CA_PREFIX = "incusos-hal-"
TRUST_UNIT = "incusos-hal-trust.service"
BEGIN = "-----BEGIN CERTIFICATE-----"
END = "-----END CERTIFICATE-----"


class UnsafeCertificateError(ValueError):
    """A PEM that is not exactly one base64 certificate (validation lets none through)."""


def certificate_der(pem: str) -> bytes:
    body = pem.strip()
    if not body.startswith(BEGIN) or not body.endswith(END):
        raise UnsafeCertificateError("not one PEM certificate")
    text = "".join(body[len(BEGIN) : -len(END)].split())
    try:
        der = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UnsafeCertificateError("the PEM body is not base64") from None
    if not der:
        raise UnsafeCertificateError("the PEM body is empty")
    return der


def armour(der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "\n".join([BEGIN, *lines, END, ""]).encode()


def ca_file_name(der: bytes) -> str:
    """Named by the certificate's SHA-256: the same CA is the same file whatever its
    place in the list, and update-ca-certificates' link is `incusos-hal-<hash>.pem`."""
    return f"{CUSTOM_CA_PREFIX}{hashlib.sha256(der).hexdigest()}.crt"


def render_custom_cas(custom_ca_certs: tuple[str, ...]) -> Tree:
    tree: Tree = {}
    for pem in custom_ca_certs:
        der = certificate_der(pem)
        tree[f"{CUSTOM_CA_DIR}/{ca_file_name(der)}"] = File(armour(der), 0o644)
    return tree


def is_custom_ca_file(name: str) -> bool:
    return name.startswith(CUSTOM_CA_PREFIX) and name.endswith(".crt")
