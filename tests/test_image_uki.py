"""The built appliance image's UKI and /usr, read on the host (no boot): what the security
HAL predicts for a UKI (PCR 11, the signed policy, the Authenticode verdict against a db)
equals what systemd's own tools (ukify, systemd-measure, systemd-sbsign, systemd-repart)
put into this real image.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest

from incusos_hal.hal import pcrsig, secureboot, tpm

import image

pytestmark = [pytest.mark.image]

# systemd-measure's default phase paths (systemd-measure(1)): what PCR 11 holds from the
# initrd's start to the booted system.
PHASES = (
    ("enter-initrd",),
    ("enter-initrd", "leave-initrd"),
    ("enter-initrd", "leave-initrd", "sysinit"),
    ("enter-initrd", "leave-initrd", "sysinit", "ready"),
)


@pytest.fixture(scope="module")
def built() -> image.Image:
    return image.build()


@pytest.fixture(scope="module")
def sections(built: image.Image) -> dict[str, bytes]:
    return image.pe_sections(built.uki.read_bytes())


def test_uki_carries_what_boot_needs(sections: dict[str, bytes]) -> None:
    for name in (".linux", ".initrd", ".cmdline", ".osrel", ".uname", ".pcrpkey", ".pcrsig"):
        assert name in sections, f"{name} missing from the UKI: {sorted(sections)}"
    cmdline = sections[".cmdline"].decode().rstrip("\0")
    # /usr is pinned by the signed command line: its verity root hash.
    assert re.search(r"\busrhash=[0-9a-f]{64}\b", cmdline), cmdline
    assert "systemd.image_policy=" in cmdline and "root=encrypted+absent" in cmdline
    assert "console=ttyS0" in cmdline


def test_signed_pcr11_policy_is_the_hals_prediction(sections: dict[str, bytes]) -> None:
    """Each phase's PCR 11 that hal.pcrsig.uki_pcr11 computes from the UKI's sections, as a
    PolicyPCR digest, is one systemd-measure signed into .pcrsig (sha256 bank), and every
    signed one is predicted: the HAL and systemd agree on this UKI."""
    measured = {n: d for n, d in sections.items() if n in pcrsig.UKI_SECTIONS}
    predicted = {
        tpm.policy_pcr_digest(
            tpm.PCRPolicy("sha256", {11: pcrsig.uki_pcr11(measured, [*phases])})
        ).hex()
        for phases in PHASES
    }
    signed = pcrsig.parse_signatures(sections[".pcrsig"].rstrip(b"\0"))
    sha256 = {s.policy.hex() for s in signed if s.bank == "sha256"}
    assert all(s.pcrs == (11,) for s in signed), signed
    assert sha256 == predicted
    # And signed by the key the UKI names for it (.pcrpkey): the fingerprint matches.
    key = pcrsig.signer(sections[".pcrpkey"].decode())
    assert all(not s.fingerprint or s.fingerprint == key.fingerprint for s in signed)


def test_uki_signature_verdict(built: image.Image) -> None:
    """hal.secureboot's Authenticode check passes the UKI against a db holding the test
    certificate, and fails it against a db without it."""
    der = (image.test_keys() / "db.der").read_bytes()
    db = secureboot.database(
        "db", secureboot.signature_list("x509", [(uuid.UUID(image.OWNER_GUID), der)])
    )
    empty = secureboot.database("dbx", b"")
    uki = built.uki.read_bytes()
    assert secureboot.check_binary(uki, db, empty).allowed
    assert not secureboot.check_binary(uki, empty, empty).allowed


def test_manifest_and_usr_partition(built: image.Image) -> None:
    usr = built.usr_partition()
    assert usr.stat().st_size > 0
    # erofs's superblock magic at offset 1024.
    with open(usr, "rb") as f:
        f.seek(1024)
        assert f.read(4) == bytes.fromhex("e2e1f5e0")
    manifest = next(built.directory.glob("*.manifest"), None)
    assert manifest is not None, sorted(p.name for p in built.directory.iterdir())
    packages = {p["name"] for p in json.loads(manifest.read_text())["packages"]}
    assert {"systemd", "python3-aiohttp", "linux-image-amd64"} <= packages
