"""`POST /1.0/debug/:run-script`: run a script only when a key the firmware trusts signed it.

IncusOS takes an S/MIME-signed script (multipart/signed, a detached PKCS#7 signature)
and verifies it against its own embedded Support CA. This machine has no vendor CA; what
it trusts is what its firmware trusts: the X.509 certificates of the UEFI db (from
efivarfs, hal.secureboot), less anything dbx revokes. So a script runs only when signed by
a key that could also sign this machine's boot loader. The signature is checked by the
openssl command (`openssl smime -verify`, as `openssl smime -sign` makes it); the script
that runs is the verified content openssl hands back, never the request's bytes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import Refusal
from ..hal import secureboot

MAX_SCRIPT_BYTES = 1 << 20  # IncusOS's limit on the request body
# IncusOS's quick check that the input is S/MIME-signed at all.
SMIME_MARKER = b'Content-Type: multipart/signed; protocol="application/x-pkcs7-signature";'
VERIFY_SECONDS = 30


class ScriptRefused(Refusal):
    """Not run: `status` is 400 for input that is not a signed script, 403 for a signature
    the firmware's db does not vouch for."""


@dataclass(frozen=True, slots=True)
class Verified:
    script: bytes
    signer: str  # the signing certificate's subject


def _pem(der: bytes) -> str:
    import base64
    import textwrap

    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


def verify(signed: bytes, root: Path | str = "/") -> Verified:
    """The script inside `signed` once its signature chains to a certificate of the
    firmware's db and no certificate of the signature is in dbx; ScriptRefused otherwise."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if len(signed) > MAX_SCRIPT_BYTES:
        raise ScriptRefused(400, f"the script is larger than {MAX_SCRIPT_BYTES} bytes")
    if SMIME_MARKER not in signed:
        raise ScriptRefused(400, "doesn't look like S/MIME-signed input")
    try:
        db = secureboot.read_database(root, "db")
        dbx = secureboot.read_database(root, "dbx")
    except secureboot.SignatureListError as e:
        raise ScriptRefused(403, f"the firmware's signature databases do not parse: {e}") from None
    if not db.certificates:
        raise ScriptRefused(403, "the firmware's db holds no certificate: no signature is trusted")
    with tempfile.TemporaryDirectory(prefix="ihal-script-") as tmp:
        work = Path(tmp)
        (work / "db.pem").write_text("".join(_pem(c.der) for c in db.certificates))
        (work / "signed").write_bytes(signed)
        done = subprocess.run(
            [
                "openssl", "smime", "-verify", "-in", str(work / "signed"),
                "-CAfile", str(work / "db.pem"),
                # db certificates sign boot loaders, not mail: any purpose; a db entry that is
                # not self-signed is a trust anchor all the same, as it is to the firmware.
                "-purpose", "any", "-partial_chain",
                "-signer", str(work / "signer.pem"), "-out", str(work / "script"),
            ],
            capture_output=True,
            timeout=VERIFY_SECONDS,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            reason = _openssl_reason(done.stderr)
            raise ScriptRefused(
                403, f"the script's signature is not trusted by the firmware's db: {reason}"
            )
        script = (work / "script").read_bytes()
        signers = x509.load_pem_x509_certificates((work / "signer.pem").read_bytes())
    revoked_fps = {c.fingerprint for c in dbx.certificates}
    revoked_tbs = {e.data[:32] for e in dbx.entries if e.type == "x509_sha256"}
    for cert in signers:
        der = cert.public_bytes(Encoding.DER)
        if (
            hashlib.sha256(der).hexdigest() in revoked_fps
            or hashlib.sha256(cert.tbs_certificate_bytes).digest() in revoked_tbs
        ):
            raise ScriptRefused(403, "the script's signing certificate is revoked by dbx")
    subject = signers[0].subject.rfc4514_string() if signers else ""
    return Verified(script.replace(b"\r\n", b"\n"), subject)


def _openssl_reason(stderr: bytes) -> str:
    """openssl's error lines, without its process id and source locations."""
    lines = []
    for line in stderr.decode(errors="replace").splitlines():
        parts = line.split(":")
        # "<pid>:error:<code>:<lib>:<func>:<reason>:<file>:<line>:<detail>" (OpenSSL 3)
        if len(parts) > 7 and parts[1] == "error":
            detail = ":".join(parts[8:]).strip()
            lines.append(f"{parts[5]} ({detail})" if detail else parts[5])
        else:
            lines.append(line.strip())
    return "; ".join(dict.fromkeys(x for x in lines if x))[:500] or "verification failed"


def run(script: bytes, timeout: float) -> tuple[int, str]:
    """Run a verified script as IncusOS does: written to a private file, executed (its
    #! line says by what), its output returned. (exit status, stdout and stderr)."""
    with tempfile.TemporaryDirectory(prefix="ihal-script-") as tmp:
        path = Path(tmp, "script")
        path.write_bytes(script)
        os.chmod(path, 0o700)
        try:
            done = subprocess.run(
                [str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout or b""
            return -1, out.decode(errors="replace") + f"\n(stopped after {timeout:g}s)"
        except OSError as e:  # no #! line, an interpreter that is not there
            return -1, f"cannot execute the script: {e.strerror}"
        return done.returncode, done.stdout.decode(errors="replace")
