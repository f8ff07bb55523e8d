"""The signed index (`index.sjson`): S/MIME, verified against the update CA alone.

`openssl cms -verify` does the work (docs/dependencies.md, "the update index signature":
`cryptography` has no PKCS#7/CMS verification, and one verification per check, every few
hours, does not justify a cffi binding to CMS_verify). The CA is the only trust anchor:
the system's store is switched off (-no-CApath -no-CAstore, and -CAfile replaces the
default file), so a certificate any public CA issued cannot sign an index.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

from .index import MAX_INDEX_BYTES

OPENSSL_TIMEOUT_S = 30.0


class BadSignature(ValueError):
    """The index is not signed by a certificate the update CA issued."""


def verify(signed: bytes, ca_pem: str) -> bytes:
    """The signed content of an S/MIME message, or BadSignature saying why not."""
    if len(signed) > 2 * MAX_INDEX_BYTES:
        raise BadSignature("the signed index is too large")
    if b"application/pkcs7-signature" not in signed and (
        b"application/x-pkcs7-signature" not in signed
    ):
        raise BadSignature("the index is not S/MIME-signed")
    with tempfile.TemporaryDirectory(prefix="incusos-hal-smime-") as tmp:
        ca = os.path.join(tmp, "ca.pem")
        with open(ca, "w", encoding="ascii") as f:
            f.write(ca_pem)
        try:
            result = subprocess.run(
                [
                    "openssl", "cms", "-verify", "-inform", "SMIME", "-binary",
                    "-CAfile", ca, "-no-CApath", "-no-CAstore",
                ],
                input=signed,
                capture_output=True,
                timeout=OPENSSL_TIMEOUT_S,
                check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BadSignature("verifying the signature took too long") from None
    if result.returncode != 0:
        detail = _reason(result.stderr.decode(errors="replace"))
        raise BadSignature(f"the index signature does not verify against the update CA: {detail}")
    return result.stdout


def _reason(stderr: str) -> str:
    """openssl's one useful line (`Verify error:...` or the library's reason)."""
    for line in stderr.splitlines():
        if "Verify error" in line or "verify error" in line:
            return line.split(":", 1)[-1].strip()[:200]
    for line in stderr.splitlines():
        if ":error:" in line:
            return line.rsplit(":", 1)[-1].strip()[:200] or "verification failed"
    return "verification failed"
