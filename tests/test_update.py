"""Updates, without the API: the index (parsed, selected, planned; downgrades refused),
maintenance windows with the clock as an input, the S/MIME index signature with a CA made
here, verified downloads against a real HTTPS server on loopback (resumed after a cut,
bounded when it hangs, through a CONNECT proxy), and Secure Boot certificate updates
planned against the recorded efivarfs of the OVMF guest."""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import struct
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from incusos_hal.config.model import MaintenanceWindow
from incusos_hal.hal import secureboot as sb
from incusos_hal.update import fetch, index, providers, smime, windows
from incusos_hal.update import secureboot as sbupdate
from updateserver import PKI, ConnectProxy, UpdateServer, make_pki, os_files, release, sign

from conftest import REPO, require_root, require_tool

# -- maintenance windows: the clock is an argument ------------------------------------------

# 2026-11-27 is a Friday.
FRI = datetime.datetime(2026, 11, 27, 12, 0)


def at(day_offset: int, hour: int, minute: int = 0) -> datetime.datetime:
    return (FRI + datetime.timedelta(days=day_offset)).replace(hour=hour, minute=minute)


def test_daily_window() -> None:
    w = MaintenanceWindow(start_hour=2, end_hour=4)
    assert windows.minutes_until_active(w, at(0, 3)) == 0
    assert windows.minutes_until_active(w, at(0, 4, 0)) == 0  # the end minute is inside
    assert windows.minutes_until_active(w, at(0, 4, 1)) == 22 * 60 - 1
    assert windows.minutes_until_active(w, at(0, 1)) == 60
    assert windows.next_start([w], at(0, 12)) == at(1, 2)


def test_daily_window_past_midnight() -> None:
    w = MaintenanceWindow(start_hour=23, end_hour=1)
    assert windows.inside([w], at(0, 23, 30))
    assert windows.inside([w], at(0, 0, 30))
    assert not windows.inside([w], at(0, 12))
    assert windows.next_start([w], at(0, 12)) == at(0, 23)


def test_weekly_window_wrapping_past_saturday() -> None:
    # Saturday 22:00 to Monday 02:00.
    w = MaintenanceWindow(
        start_hour=22, end_hour=2, start_day_of_week="Saturday", end_day_of_week="Monday"
    )
    assert not windows.inside([w], FRI)
    assert windows.inside([w], at(1, 23))  # Saturday night
    assert windows.inside([w], at(2, 12))  # Sunday
    assert windows.inside([w], at(3, 1, 59))  # Monday early
    assert not windows.inside([w], at(3, 3))
    # After it ended on Monday, the next one is Saturday 22:00 (5 days 19 hours later).
    assert windows.next_start([w], at(3, 3)) == at(8, 22)
    assert windows.next_start([w], FRI) == at(1, 22)


def test_no_windows_means_any_time_and_calendar() -> None:
    assert windows.inside([], FRI)
    assert windows.next_start([], FRI) is None
    w = MaintenanceWindow(start_hour=2, start_minute=5, start_day_of_week="Sunday",
                          end_day_of_week="Sunday", end_hour=3)  # fmt: skip
    assert windows.calendar(w) == "Sun *-*-* 02:05:00"
    assert windows.calendar(MaintenanceWindow(start_hour=23)) == "*-*-* 23:00:00"


# -- the index ------------------------------------------------------------------------------


def doc(*updates: dict[str, object]) -> bytes:
    return json.dumps({"format": "1.0", "updates": list(updates)}).encode()


def test_latest_follows_the_channel_and_architecture() -> None:
    testing = release("300", ["testing"], os_files("300"))
    stable = release("200", ["stable", "testing"], os_files("200"))
    releases = index.parse_index(doc(testing, stable))
    assert index.latest(releases, "stable", "x86_64").version == "200"  # type: ignore[union-attr]
    assert index.latest(releases, "testing", "x86_64").version == "300"  # type: ignore[union-attr]
    assert index.latest(releases, "stable", "aarch64") is None
    assert index.latest(releases, "nightly", "x86_64") is None


def test_plan_order_and_downgrade_refused() -> None:
    rel = release("200", ["stable"], os_files("200"))
    app = {"filename": "incus.raw.gz", "sha256": "a" * 64, "size": 5,
           "component": "incus", "type": "application"}  # fmt: skip
    sbfile = {"filename": "SecureBootKeys_200.tar", "sha256": "b" * 64, "size": 9,
              "component": "os", "type": "update-secureboot"}  # fmt: skip
    rel["files"] = [*rel["files"], app, sbfile]  # type: ignore[list-item]
    (r,) = index.parse_index(doc(rel))
    made = index.plan(r, os_version="100", applications={"incus": "150"})
    assert [s.kind for s in made.steps] == ["secureboot", "application", "os"]
    assert made.refused == ()
    down = index.plan(r, os_version="300", applications={"incus": "250"}, secureboot=False)
    assert down.steps == ()
    assert any("downgrade the OS from 300 to 200" in why for why in down.refused)
    assert any("downgrade incus from 250 to 200" in why for why in down.refused)
    same = index.plan(r, os_version="200", os_only=True)
    assert same.steps == () and same.refused == ()
    staged = index.plan(r, os_version="100", staged_os="200", os_only=True)
    assert staged.steps == ()


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"version": "../1", "files": []}, "is not a version"),
        (
            {
                "version": "1",
                "files": [{"filename": "../etc/passwd", "sha256": "a" * 64, "size": 1}],
            },
            "not a relative path",
        ),
        (
            {"version": "1", "files": [{"filename": "/abs", "sha256": "a" * 64, "size": 1}]},
            "not a relative path",
        ),
        (
            {"version": "1", "files": [{"filename": "a", "sha256": "xyz", "size": 1}]},
            "not 64 hex digits",
        ),
        (
            {"version": "1", "files": [{"filename": "a", "sha256": "a" * 64, "size": -1}]},
            "not a size",
        ),
        (
            {"version": "1", "files": [{"filename": "a", "sha256": "a" * 64, "size": True}]},
            "not a size",
        ),
        ({"version": 5}, "expected a string"),
    ],
)
def test_bad_index_refused(update: dict[str, object], message: str) -> None:
    with pytest.raises(index.BadIndex, match=message):
        index.parse_index(doc(update))


def test_not_an_index() -> None:
    for data in (b"\xff\xfe", b"[]", b'{"updates": 3}', b"x" * (index.MAX_INDEX_BYTES + 1)):
        with pytest.raises(index.BadIndex):
            index.parse_index(data)


# -- the signature --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    require_tool("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_signed_index_verifies(pki: PKI) -> None:
    content = doc(release("200", ["stable"], os_files("200")))
    assert json.loads(smime.verify(sign(pki, content), pki.ca)) == json.loads(content)


def test_tampered_or_foreign_index_refused(pki: PKI) -> None:
    content = doc(release("200", ["stable"], os_files("200")))
    signed = sign(pki, content)
    tampered = signed.replace(b'"200"', b'"900"', 1)
    assert tampered != signed
    with pytest.raises(smime.BadSignature, match="does not verify"):
        smime.verify(tampered, pki.ca)
    # Signed by a certificate of another CA (a valid signature, an untrusted signer).
    with pytest.raises(smime.BadSignature, match="does not verify"):
        smime.verify(sign(pki, content, "forger"), pki.ca)
    with pytest.raises(smime.BadSignature, match="not S/MIME"):
        smime.verify(content, pki.ca)


# -- downloads from a real HTTPS server ------------------------------------------------------


@pytest.fixture
def server(pki: PKI) -> object:
    s = UpdateServer(pki)
    yield s
    s.close()


def transport(pki: PKI, **kw: object) -> fetch.Transport:
    return fetch.Transport(extra_cas=(pki.ca,), use_system_store=False, **kw)  # type: ignore[arg-type]


def test_download_verified_and_resumed(pki: PKI, server: UpdateServer, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4000
    server.files["/1/blob"] = data
    server.behaviour.cut_once.add("/1/blob")
    dest = tmp_path / "blob"
    seen: list[int] = []
    fetch.download(
        transport(pki), f"{server.url}/1/blob", dest,
        sha256=hashlib.sha256(data).hexdigest(), size=len(data),
        progress=lambda have, size: seen.append(have),
    )  # fmt: skip
    assert dest.read_bytes() == data
    ranges = [r for m, p, r in server.log if p == "/1/blob"]
    assert ranges[0] == "" and ranges[1] == f"bytes={len(data) // 2}-", ranges
    assert seen[-1] == len(data)
    assert not (tmp_path / "blob.part").exists()


def test_download_wrong_hash_or_size_leaves_nothing(
    pki: PKI, server: UpdateServer, tmp_path: Path
) -> None:
    data = b"x" * 5000
    server.files["/1/blob"] = data
    dest = tmp_path / "blob"
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.download(transport(pki), f"{server.url}/1/blob", dest,
                       sha256="0" * 64, size=len(data))  # fmt: skip
    assert not dest.exists() and not (tmp_path / "blob.part").exists()
    with pytest.raises(fetch.FetchError, match="larger than"):
        fetch.download(transport(pki), f"{server.url}/1/blob", dest,
                       sha256=hashlib.sha256(data[:100]).hexdigest(), size=100)  # fmt: skip
    assert not dest.exists() and not (tmp_path / "blob.part").exists()


def test_untrusted_server_refused(pki: PKI, server: UpdateServer) -> None:
    server.files["/x"] = b"x"
    with pytest.raises(fetch.FetchError, match="not trusted"):
        fetch.get(fetch.Transport(use_system_store=True), f"{server.url}/x", 10)


def test_hanging_server_bounded(pki: PKI, server: UpdateServer) -> None:
    server.behaviour.hang = True
    started = time.monotonic()
    with pytest.raises(fetch.FetchError, match="no answer in time"):
        fetch.get(transport(pki, read_timeout=1.0), f"{server.url}/index.sjson", 1000)
    assert time.monotonic() - started < 30  # generous: the bound is 1 s per read


def test_through_the_connect_proxy(pki: PKI, server: UpdateServer) -> None:
    proxy = ConnectProxy()
    try:
        server.files["/x"] = b"hello"
        t = transport(pki, proxy=f"http://127.0.0.1:{proxy.port}")
        assert fetch.get(t, f"{server.url}/x", 10) == (200, b"hello")
        assert proxy.targets == [f"127.0.0.2:{server.port}"]
        # A no_proxy destination goes direct.
        t = transport(pki, proxy=f"http://127.0.0.1:{proxy.port}", no_proxy=("127.0.0.2",))
        assert fetch.get(t, f"{server.url}/x", 10) == (200, b"hello")
        assert len(proxy.targets) == 1
    finally:
        proxy.close()


# -- Secure Boot certificate updates, against the recorded OVMF variables --------------------

FIXTURE = REPO / "tests/fixtures/security/secureboot/efivars"
OWNER = uuid.UUID("00000000-0000-4000-8000-000000000002")


def recorded() -> dict[str, bytes]:
    out = {}
    for name in sbupdate.ORDER:
        guid = sb.VARIABLE_GUIDS[name]
        path = FIXTURE / f"{name}-{guid}"
        out[name] = path.read_bytes()[4:] if path.exists() else b""
    return out


def auth(lists: bytes) -> bytes:
    """An EFI_VARIABLE_AUTHENTICATION_2 around `lists` (the PKCS#7 is a placeholder:
    the firmware checks it, the planner does not)."""
    pkcs7 = b"\x30\x03\x02\x01\x00"
    cert = struct.pack("<IHH", 24 + len(pkcs7), 0x0200, 0x0EF1)
    cert += uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7").bytes_le + pkcs7
    return bytes(16) + cert + lists


def archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def signed_image(tmp_path: Path) -> tuple[bytes, bytes]:
    """An EFI binary signed by the snakeoil key (what the recorded db trusts), and the
    snakeoil certificate's DER."""
    require_tool("sbsign", "openssl")
    from test_secureboot import SNAKEOIL_CERT, SNAKEOIL_KEY, make_pe, openssl_der

    (tmp_path / "app.efi").write_bytes(make_pe(b"\xc3" + bytes(range(64))))
    import subprocess

    subprocess.run(["openssl", "rsa", "-in", str(SNAKEOIL_KEY), "-passin", "pass:snakeoil",
                    "-out", str(tmp_path / "k.pem")], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["sbsign", "--key", str(tmp_path / "k.pem"), "--cert", str(SNAKEOIL_CERT),
                    "--output", str(tmp_path / "signed.efi"), str(tmp_path / "app.efi")],
                   check=True, capture_output=True)  # fmt: skip
    return (tmp_path / "signed.efi").read_bytes(), openssl_der(SNAKEOIL_CERT)


def test_secureboot_plan_orders_and_skips_what_is_there(tmp_path: Path) -> None:
    image, snakeoil = signed_image(tmp_path)
    variables = recorded()
    new_cert = sb.signature_list("sha256", [(OWNER, hashlib.sha256(b"new db").digest())])
    present = sb.signature_list("x509", [(OWNER, snakeoil)])
    harmless = sb.signature_list("sha256", [(OWNER, hashlib.sha256(b"old").digest())])
    fp = hashlib.sha256(snakeoil).hexdigest()
    data = archive({
        f"dbx_{'1' * 64}.auth": auth(harmless),
        f"db_{'2' * 64}.auth": auth(new_cert),
        f"db_{fp}.auth": auth(present),
    })  # fmt: skip
    updates = sbupdate.read_archive(data)
    made = sbupdate.plan(updates, variables, [("running image", image)])
    assert [u.variable for u in made.steps] == ["db", "dbx"]
    assert made.present == 1 and made.refused == ()


def test_secureboot_dbx_revoking_the_running_image_refused(tmp_path: Path) -> None:
    image, snakeoil = signed_image(tmp_path)
    variables = recorded()
    fp = hashlib.sha256(snakeoil).hexdigest()
    by_cert = sb.signature_list("x509", [(OWNER, snakeoil)])
    by_hash = sb.signature_list("sha256", [(OWNER, sb.parse_pe(image).authenticode_sha256)])
    for name, lists in ((f"dbx_{fp}.auth", by_cert), (f"dbx_{'3' * 64}.auth", by_hash)):
        made = sbupdate.plan(
            sbupdate.read_archive(archive({name: auth(lists)})),
            variables,
            [("running image", image), ("fallback image", image)],
        )
        assert made.steps == ()
        assert "would revoke the running image" in made.refused[0], made.refused


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("PK_" + "0" * 64 + ".auth", auth(b""), "not <KEK|db|dbx>"),
        ("db_" + "0" * 64 + ".auth", b"short", "too short"),
        ("db_" + "0" * 64 + ".auth", b"\0" * 9000, "at most 8192"),
        ("db_" + "0" * 64 + ".auth", auth(b"\1" * 30), "runs past|offset"),
    ],
)
def test_secureboot_bad_archives(name: str, data: bytes, message: str) -> None:
    with pytest.raises(sbupdate.BadUpdate, match=message):
        sbupdate.read_archive(archive({name: data}))


def test_secureboot_fingerprint_must_match_certificate(tmp_path: Path) -> None:
    _image, snakeoil = signed_image(tmp_path)
    lists = sb.signature_list("x509", [(OWNER, snakeoil)])
    with pytest.raises(sbupdate.BadUpdate, match="fingerprint"):
        sbupdate.read_archive(archive({f"db_{'4' * 64}.auth": auth(lists)}))


def test_secureboot_write_appends_through_efivarfs_layout(tmp_path: Path) -> None:
    """The edge against a plain directory laid out as efivarfs (the firmware's own
    check of the signature needs the OVMF guest): one write, APPEND_WRITE set."""
    root = tmp_path / "root"
    (root / sb.EFIVARS).mkdir(parents=True)
    lists = sb.signature_list("sha256", [(OWNER, hashlib.sha256(b"x").digest())])
    (update,) = sbupdate.read_archive(archive({f"dbx_{'5' * 64}.auth": auth(lists)}))
    sbupdate.write(root, update)
    written = (root / sb.EFIVARS / f"dbx-{sb.VARIABLE_GUIDS['dbx']}").read_bytes()
    assert struct.unpack("<I", written[:4])[0] & 0x40  # EFI_VARIABLE_APPEND_WRITE
    assert written[4:] == update.auth


# -- the timer ------------------------------------------------------------------------------


def test_timer_rendered_and_accepted_by_systemd(tmp_path: Path) -> None:
    """The installed timer and service with the generator's drop-in (frequency 90m and a
    Sunday window) pass `systemd-analyze verify`; the calendar expression is systemd's;
    "never" wants no timer."""
    import re
    import subprocess
    import sys

    from incusos_hal.config import from_dict
    from incusos_hal.core.tree import File
    from incusos_hal.sections import render_units

    require_tool("systemd-analyze")
    window = {"start_hour": 2, "start_minute": 30, "end_hour": 4, "end_minute": 0,
              "start_day_of_week": "Sunday", "end_day_of_week": "Sunday"}  # fmt: skip
    config = from_dict({"update": {"check_frequency": "90m", "maintenance_windows": [window]}})
    tree = render_units(config, source="/var/lib/incusos-hal/config.toml", unit_dir=str(tmp_path))
    dropin = tree["incusos-hal-update-check.timer.d/50-incusos-hal.conf"]
    assert isinstance(dropin, File)
    text = dropin.content.decode()
    assert "OnUnitActiveSec=5400s" in text and "OnCalendar=Sun *-*-* 02:30:00" in text
    assert "timers.target.wants/incusos-hal-update-check.timer" in tree
    never = from_dict({"update": {"check_frequency": "never"}})
    assert not any("update-check" in k for k in render_units(never, source="x", unit_dir="/u"))
    bindir = Path(sys.executable).parent
    service = (REPO / "units/incusos-hal-update-check.service.in").read_text()
    service = service.replace("@BINDIR@", str(bindir)).replace("@DOCDIR@", str(REPO / "docs"))
    (tmp_path / "incusos-hal-update-check.service").write_text(service)
    timer = tmp_path / "incusos-hal-update-check.timer"
    timer.write_text((REPO / "units/incusos-hal-update-check.timer").read_text())
    (tmp_path / "incusos-hal-update-check.timer.d").mkdir()
    (tmp_path / "incusos-hal-update-check.timer.d/50-incusos-hal.conf").write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(timer)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    lines = [x for x in done.stderr.splitlines() if "update-check" in x]
    assert done.returncode == 0 and not lines, done.stderr
    calendar = subprocess.run(["systemd-analyze", "calendar", "Sun *-*-* 02:30:00"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert re.search(r"Next elapse: Sun \S+ 02:30:00", calendar), calendar


# -- the images provider: cache and registration -------------------------------------------


def images_provider(pki: PKI, server: UpdateServer, tmp_path: Path, clock: list[float],
                    **settings: str) -> providers.Images:  # fmt: skip
    from incusos_hal.config.model import Provider

    inputs = providers.Inputs(
        config=Provider("images", {"server_url": server.url, "update_ca": pki.ca, **settings}),
        transport=transport(pki),
        cache_dir=tmp_path / "cache",
        now=lambda: datetime.datetime.fromtimestamp(clock[0], datetime.UTC),
    )
    return providers.Images(inputs)


def test_images_index_cached_for_scheduled_checks(
    pki: PKI, server: UpdateServer, tmp_path: Path
) -> None:
    server.publish(pki, [(release("200", ["stable"], os_files("200")), os_files("200"))])
    clock = [1_800_000_000.0]
    source = images_provider(pki, server, tmp_path, clock)

    def fetched() -> int:
        return sum(1 for _m, p, _r in server.log if p == "/index.sjson")

    first = source.latest("stable", "x86_64", "", fresh=False)
    assert first is not None and first.version == "200"
    assert fetched() == 1
    clock[0] += 1800  # within the hour: the verified index is reused
    assert source.latest("stable", "x86_64", "", fresh=False) == first
    assert fetched() == 1
    source.latest("stable", "x86_64", "", fresh=True)  # an operator's check: always fetched
    assert fetched() == 2
    clock[0] += 7200
    source.latest("stable", "x86_64", "", fresh=False)
    assert fetched() == 3
    # A tampered index is never cached: the next check fetches (and refuses) again.
    server.behaviour.overrides["/index.sjson"] = server.files["/index.sjson"].replace(
        b'"200"', b'"201"', 1
    )
    with pytest.raises(providers.ProviderError, match="does not verify"):
        source.latest("stable", "x86_64", "", fresh=True)
    clock[0] += 10
    cached = source.latest("stable", "x86_64", "", fresh=False)
    assert cached == first and fetched() == 4  # the good one, from before


def test_images_registration_with_a_token(pki: PKI, server: UpdateServer, tmp_path: Path) -> None:
    machine = providers.Machine("host", "0123456789abcdef")
    clock = [1_800_000_000.0]
    with pytest.raises(providers.Unsupported, match="registration unsupported"):
        images_provider(pki, server, tmp_path, clock).register(machine)
    bad = images_provider(pki, server, tmp_path, clock, token="wrong")
    with pytest.raises(providers.ProviderError, match="unknown registration token"):
        bad.register(machine)
    good = images_provider(pki, server, tmp_path, clock, token="good-token")
    good.register(machine)
    assert server.registrations[-1] == {"token": "good-token", "machine_id": "0123456789abcdef"}


def test_needs_reboot_is_for_the_boot_that_set_it(tmp_path: Path) -> None:
    from incusos_hal.update import checker

    root = tmp_path / "root"
    (root / "proc/sys/kernel/random").mkdir(parents=True)
    (root / "proc/sys/kernel/random/boot_id").write_text("boot-one\n")
    state = checker.UpdateState(status="x", needs_reboot=True, boot_id="boot-one")
    checker.write_state(tmp_path, state)
    assert checker.read_state(tmp_path, root).needs_reboot is True
    (root / "proc/sys/kernel/random/boot_id").write_text("boot-two\n")  # rebooted
    assert checker.read_state(tmp_path, root).needs_reboot is False


def test_a_bug_in_a_check_ends_the_check_in_its_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception no step expects (a bug) still ends the check: the state says it
    failed, never "Running update check", and the next check may run."""
    import datetime

    from incusos_hal.config.model import Config
    from incusos_hal.update import checker

    def broken(_: object) -> object:
        raise KeyError("a bug")

    monkeypatch.setattr(checker.providers, "load", broken)
    inputs = checker.Inputs(
        Config(),
        tmp_path,
        str(tmp_path),
        lambda: datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
    )
    with pytest.raises(KeyError):
        checker.check(inputs, "user")
    state = checker.read_state(tmp_path, str(tmp_path))
    assert state.status == "Failed to check for updates: internal error (KeyError)"
    assert checker.reserve(), "the failed check kept the one check slot"
    checker._RUNNING.release()


def test_an_expanded_file_carries_the_hash_of_what_was_expanded(tmp_path: Path) -> None:
    """The checker hands an installer the SHA-256 of the bytes it expanded from the
    verified `.gz` (the installer holds the file to it); a file that is not gzip, or
    that would expand past the bound, leaves nothing behind."""
    import gzip

    from incusos_hal.update import checker

    payload = b"hsqs" + bytes(range(256)) * 4096
    source = tmp_path / "hello.raw.gz"
    source.write_bytes(gzip.compress(payload))
    digest = checker._gunzip(source, tmp_path / "hello.raw")
    assert digest == hashlib.sha256(payload).hexdigest()
    assert (tmp_path / "hello.raw").read_bytes() == payload
    source.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a gzip file"):
        checker._gunzip(source, tmp_path / "other.raw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hello.raw", "hello.raw.gz"]


@pytest.mark.root
def test_an_expansion_keeps_free_space_on_the_state_file_system(tmp_path: Path) -> None:
    """On a small file system (a 64 MiB tmpfs: less than the reserve is free), a `.gz`
    is not expanded at all, the message says why, and no partial file is left."""
    import gzip
    import subprocess

    from incusos_hal.update import checker

    require_root()
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        source = small / "hello.raw.gz"
        source.write_bytes(gzip.compress(bytes(8 << 20)))
        with pytest.raises(ValueError, match="less 512 MiB kept free"):
            checker._gunzip(source, small / "hello.raw")
        assert sorted(p.name for p in small.iterdir()) == ["hello.raw.gz"]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_the_image_tests_signed_append_is_what_the_firmware_checks(tmp_path: Path) -> None:
    """tests/image.signed_append (the booted image's db update, which OVMF verifies): it
    reads back as an update of db with its lists, and its PKCS#7 verifies (openssl)
    over VariableName, VendorGuid, the append attributes, the timestamp and the lists."""
    import subprocess

    import image

    require_tool("openssl")
    key, cert = tmp_path / "kek.key", tmp_path / "kek.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=test KEK", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    lists = sb.signature_list("sha256", [(OWNER, hashlib.sha256(b"new db entry").digest())])
    auth = image.signed_append("db", sb.EFI_IMAGE_SECURITY_DATABASE, lists, key, cert)
    fp = hashlib.sha256(b"x").hexdigest()
    (update,) = sbupdate.read_archive(archive({f"db_{fp}.auth": auth}))
    assert (update.variable, update.lists, update.auth) == ("db", lists, auth)
    length = struct.unpack_from("<I", auth, 16)[0]
    assert uuid.UUID(bytes_le=auth[24:40]) == image.EFI_CERT_TYPE_PKCS7
    bare = auth[40 : 16 + length]
    # What EDK2 checks before anything else: a bare SignedData (SEQUENCE, two length
    # bytes) whose digest algorithm, at offset 13, is SHA-256.
    sha256_oid = bytes.fromhex("608648016503040201")
    assert bare[:2] == b"\x30\x82" and bare[13:22] == sha256_oid, bare[:24].hex()
    # openssl verifies a ContentInfo: the bare SignedData wrapped back.
    oid = bytes.fromhex("06092a864886f70d010702")
    inner = b"\xa0\x82" + len(bare).to_bytes(2, "big") + bare
    body = oid + inner
    (tmp_path / "sig.der").write_bytes(b"\x30\x82" + len(body).to_bytes(2, "big") + body)
    signed = "db".encode("utf-16-le") + sb.EFI_IMAGE_SECURITY_DATABASE.bytes_le
    signed += struct.pack("<I", image.APPEND_ATTRIBUTES) + auth[:16] + lists
    (tmp_path / "signed").write_bytes(signed)
    verify = ["openssl", "smime", "-verify", "-binary", "-inform", "DER", "-in",
              str(tmp_path / "sig.der"), "-content", str(tmp_path / "signed"), "-noverify",
              "-certfile", str(cert), "-out", "/dev/null"]  # fmt: skip
    assert subprocess.run(verify, capture_output=True).returncode == 0
    (tmp_path / "signed").write_bytes(signed[:-1] + bytes([signed[-1] ^ 1]))
    assert subprocess.run(verify, capture_output=True).returncode != 0
