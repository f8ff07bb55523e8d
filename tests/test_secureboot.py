"""hal.secureboot: the Secure Boot variables the VM rung's OVMF really had (Secure Boot on
with Debian's snakeoil keys; setup mode), crafted malformed signature lists, and the
Authenticode check on EFI binaries signed by sbsign."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incusos_hal.hal import secureboot as sb

from conftest import REPO, require_tool

FIXTURES = REPO / "tests/fixtures/security"
SNAKEOIL_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
SNAKEOIL_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
OWNER = uuid.UUID("00000000-0000-4000-8000-000000000001")


def efi_root(tmp_path: Path, firmware: str) -> Path:
    """A root whose efivarfs holds the guest's recorded variables."""
    root = tmp_path / firmware
    shutil.copytree(FIXTURES / firmware / "efivars", root / sb.EFIVARS)
    return root


def openssl_der(pem: Path) -> bytes:
    return subprocess.run(
        ["openssl", "x509", "-in", str(pem), "-outform", "der"], capture_output=True, check=True
    ).stdout


def test_secure_boot_on(tmp_path: Path) -> None:
    root = efi_root(tmp_path, "secureboot")
    state = sb.state(root)
    assert (state.secure_boot, state.setup_mode, state.mode) == (True, False, "user")
    certs = sb.certificates(root)
    assert {c.variable for c in certs} == {"PK", "KEK", "db"}
    require_tool("openssl")
    snakeoil = hashlib.sha256(openssl_der(SNAKEOIL_CERT)).hexdigest()
    db = [c for c in certs if c.variable == "db"]
    assert snakeoil in {c.fingerprint for c in db}
    assert all("O=SnakeOil" in c.subject for c in certs if c.fingerprint == snakeoil)
    api = certs[0].api()
    assert set(api) == {"type", "fingerprint", "subject", "issuer"}


def test_setup_mode(tmp_path: Path) -> None:
    root = efi_root(tmp_path, "uefi")
    state = sb.state(root)
    assert (state.secure_boot, state.setup_mode, state.mode) == (False, True, "setup")
    assert sb.certificates(root) == []


def test_no_uefi(tmp_path: Path) -> None:
    assert sb.state(tmp_path).mode == "legacy"
    assert sb.certificates(tmp_path) == []


def test_signature_lists_round_trip() -> None:
    der = openssl_der(SNAKEOIL_CERT)
    hashes = [(OWNER, hashlib.sha256(bytes([i])).digest()) for i in range(3)]
    data = sb.signature_list("x509", [(OWNER, der)]) + sb.signature_list("sha256", hashes)
    entries = sb.parse_signature_lists(data)
    assert [e.type for e in entries] == ["x509", "sha256", "sha256", "sha256"]
    assert entries[0].data == der and entries[0].owner == OWNER
    db = sb.database("db", data)
    assert len(db.certificates) == 1
    assert db.hashes("sha256") == {h for _, h in hashes}


def header(kind: str, list_size: int, header_size: int, entry_size: int) -> bytes:
    guid = next(g for g, (n, _) in sb.SIGNATURE_TYPES.items() if n == kind)
    return guid.bytes_le + struct.pack("<III", list_size, header_size, entry_size)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01" * 20, "a list header is 28"),
        (header("sha256", 100, 0, 48), "overruns"),
        (header("sha256", 28 + 40, 0, 40) + bytes(40), "sha256 entries are 48"),
        (header("sha256", 28 + 40, 0, 48) + bytes(40), "does not divide"),
        (header("x509", 28 + 10, 20, 16) + bytes(10), "header size 20"),
        (header("x509", 28 + 32, 0, 8) + bytes(32), "entry size 8"),
        (header("sha256", 10, 0, 48), "list size 10"),
    ],
    ids=["short", "overrun", "entry-size", "indivisible", "header", "tiny-entry", "tiny-list"],
)
def test_malformed_signature_lists(data: bytes, message: str) -> None:
    with pytest.raises(sb.SignatureListError, match=message):
        sb.parse_signature_lists(data)


def test_a_certificate_that_does_not_parse_is_reported_not_fatal() -> None:
    data = sb.signature_list("x509", [(OWNER, b"\x30\x03\x02\x01\x00")])
    db = sb.database("db", data)
    assert db.certificates == ()
    assert len(db.errors) == 1 and "db entry 0" in db.errors[0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_signature_lists(data: bytes) -> None:
    with contextlib.suppress(sb.SignatureListError):
        sb.database("dbx", data)


def test_short_variable_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / sb.EFIVARS / f"db-{sb.EFI_IMAGE_SECURITY_DATABASE}"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x07\x00")
    with pytest.raises(sb.SignatureListError, match="shorter than the attributes"):
        sb.read_database(tmp_path, "db")


# -- Authenticode ---------------------------------------------------------------------------


def make_pe(code: bytes) -> bytes:
    """A minimal PE32+ EFI application: headers and one .text section."""
    dos = bytearray(0x40)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, 0x40)
    coff = struct.pack("<HHIIIHH", 0x8664, 1, 0, 0, 0, 240, 0x0022)
    opt = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        0x20B,
        0,
        0,
        0x200,
        0,
        0,
        0x1000,
        0x1000,
        0,
        0x1000,
        0x200,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0x2000,
        0x200,
        0,
        10,
        0,
        0,
        0,
        0,
        0,
        0,
        16,
    ) + bytes(128)
    section = struct.pack(
        "<8sIIIIIIHHI", b".text", 0x200, 0x1000, 0x200, 0x200, 0, 0, 0, 0, 0x60000020
    )
    headers = bytes(dos) + b"PE\0\0" + coff + opt + section
    return headers.ljust(0x200, b"\0") + code.ljust(0x200, b"\0")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The snakeoil key (what the recorded db trusts), a CA with a leaf it issued, and a
    stranger's self-signed key."""
    require_tool("openssl", "sbsign")
    d = tmp_path_factory.mktemp("keys")

    def run(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, cwd=d)

    run(
        "openssl",
        "rsa",
        "-in",
        str(SNAKEOIL_KEY),
        "-passin",
        "pass:snakeoil",
        "-out",
        "snakeoil.key",
    )
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "30",
        "-subj",
        "/CN=Test Secure Boot CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    )
    run(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=Test Signer 2026",
    )
    run(
        "openssl",
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "30",
    )
    run(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "stranger.key",
        "-out",
        "stranger.pem",
        "-days",
        "30",
        "-subj",
        "/CN=Stranger",
    )
    (d / "app.efi").write_bytes(make_pe(b"\xc3" + bytes(range(64))))
    for name, key, cert in (
        ("snakeoil", "snakeoil.key", str(SNAKEOIL_CERT)),
        ("leaf", "leaf.key", "leaf.pem"),
        ("stranger", "stranger.key", "stranger.pem"),
    ):
        run("sbsign", "--key", key, "--cert", cert, "--output", f"app.{name}.efi", "app.efi")
    return d


def db_of(*pems: Path) -> sb.Database:
    entries = [sb.signature_list("x509", [(OWNER, openssl_der(p))]) for p in pems]
    return sb.database("db", b"".join(entries))


EMPTY = sb.database("dbx", b"")


def test_recorded_db_allows_what_snakeoil_signed(keys: Path, tmp_path: Path) -> None:
    root = efi_root(tmp_path, "secureboot")
    db, dbx = sb.read_database(root, "db"), sb.read_database(root, "dbx")
    verdict = sb.check_binary((keys / "app.snakeoil.efi").read_bytes(), db, dbx)
    assert verdict.allowed, verdict.reason
    assert "SnakeOil" in verdict.signer
    refused = sb.check_binary((keys / "app.stranger.efi").read_bytes(), db, dbx)
    assert not refused.allowed and "no signer chains" in refused.reason
    unsigned = sb.check_binary((keys / "app.efi").read_bytes(), db, dbx)
    assert not unsigned.allowed and unsigned.reason == "the binary is not signed"


def test_chain_to_a_db_ca(keys: Path) -> None:
    verdict = sb.check_binary((keys / "app.leaf.efi").read_bytes(), db_of(keys / "ca.pem"), EMPTY)
    assert verdict.allowed, verdict.reason
    assert verdict.signer == "CN=Test Signer 2026"


def test_dbx_revokes(keys: Path) -> None:
    pe = (keys / "app.leaf.efi").read_bytes()
    db = db_of(keys / "ca.pem")
    by_hash = sb.database(
        "dbx", sb.signature_list("sha256", [(OWNER, sb.parse_pe(pe).authenticode_sha256)])
    )
    assert sb.check_binary(pe, db, by_hash).reason == "the binary's hash is in dbx"
    by_cert = sb.database(
        "dbx", sb.signature_list("x509", [(OWNER, openssl_der(keys / "leaf.pem"))])
    )
    assert not sb.check_binary(pe, db, by_cert).allowed
    from cryptography import x509

    tbs = x509.load_der_x509_certificate(openssl_der(keys / "ca.pem")).tbs_certificate_bytes
    by_tbs = sb.database(
        "dbx", sb.signature_list("x509_sha256", [(OWNER, hashlib.sha256(tbs).digest() + bytes(16))])
    )
    verdict = sb.check_binary(pe, db, by_tbs)
    assert not verdict.allowed and "dbx" in verdict.reason


def test_db_hash_allows_an_unsigned_binary(keys: Path) -> None:
    pe = (keys / "app.efi").read_bytes()
    db = sb.database(
        "db", sb.signature_list("sha256", [(OWNER, sb.parse_pe(pe).authenticode_sha256)])
    )
    assert sb.check_binary(pe, db, EMPTY).allowed


def test_tampered_binary_is_refused(keys: Path) -> None:
    pe = bytearray((keys / "app.snakeoil.efi").read_bytes())
    pe[0x200 + 5] ^= 0xFF  # in .text, which the signature covers
    verdict = sb.check_binary(bytes(pe), db_of(SNAKEOIL_CERT), EMPTY)
    assert not verdict.allowed and "other contents" in verdict.reason


def test_forged_signature_is_refused(keys: Path) -> None:
    """The right certificate and digest, but the signature bytes altered: the signature
    itself is verified, not only who claims to have made it."""
    pe = bytearray((keys / "app.snakeoil.efi").read_bytes())
    image = sb.parse_pe(bytes(pe))
    signed = sb._parse_signed_data(image.signatures[0])
    at = bytes(pe).index(signed.signature)
    pe[at + 10] ^= 0x01
    verdict = sb.check_binary(bytes(pe), db_of(SNAKEOIL_CERT), EMPTY)
    assert not verdict.allowed and "verifies" in verdict.reason


@pytest.mark.parametrize(
    "data", [b"", b"MZ" + bytes(62), make_pe(b"")[:0x90], b"ZM" + bytes(0x300)]
)
def test_not_a_pe(data: bytes) -> None:
    with pytest.raises(sb.PEError):
        sb.parse_pe(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_fuzz_signed_pe(data: st.DataObject) -> None:
    base = bytearray(make_pe(b"\xc3"))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, 0x1FF))
        base[at] = data.draw(st.integers(0, 255))
    with contextlib.suppress(sb.PEError):
        sb.check_binary(bytes(base), EMPTY, EMPTY)
