"""hal.eventlog on real logs: the VM rung's OVMF (Secure Boot on and off, with the PCRs
its TPM ended with) and public samples (tests/fixtures/eventlogs/NOTE.md); compared with
tpm2-tools' tpm2_eventlog; and fuzzed: a malformed log is an EventLogError, nothing else."""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incusos_hal.hal import eventlog

from conftest import REPO, require_tool

FIXTURES = REPO / "tests/fixtures"
GUEST = {name: FIXTURES / "security" / name for name in ("secureboot", "uefi")}
PUBLIC = {
    "crypto_agile_eventlog": ("sha256",),
    "ubuntu_2104_shielded_vm_no_secure_boot_eventlog": ("sha1", "sha256", "sha384"),
    "windows_gcp_shielded_vm_eventlog": ("sha1",),
}


def read_pcrs(path: Path) -> dict[int, bytes]:
    return {
        int(a): bytes.fromhex(b)
        for a, b in (line.split() for line in path.read_text().splitlines() if line.strip())
    }


def guest_log(name: str) -> eventlog.EventLog:
    return eventlog.parse((GUEST[name] / "binary_bios_measurements").read_bytes())


@pytest.mark.parametrize("name", sorted(GUEST))
@pytest.mark.parametrize("bank", ["sha1", "sha256"])
def test_guest_log_replays_to_the_guest_tpm(name: str, bank: str) -> None:
    log = guest_log(name)
    assert log.crypto_agile
    assert bank in log.banks
    tpm = read_pcrs(GUEST[name] / f"pcr-{bank}.txt")
    replayed = eventlog.replay(log, bank)
    assert set(replayed) >= {0, 1, 2, 3, 4, 5, 6, 7}
    assert eventlog.compare(log, bank, tpm) == []
    assert eventlog.verify_digests(log) == []


def test_secure_boot_state_is_in_the_log() -> None:
    """OVMF measures SecureBoot, PK, KEK, db and dbx into PCR 7, with the contents efivarfs
    shows. (A kernel qemu loads itself, -kernel, is verified but not measured as an
    application, so these logs have no EV_EFI_VARIABLE_AUTHORITY events.)"""
    for name, enabled in (("secureboot", 1), ("uefi", 0)):
        log = guest_log(name)
        pcr7 = [e for e in log.events if e.pcr == 7 and e.type != eventlog.EV_NO_ACTION]
        variables = [e.variable for e in pcr7 if e.type == eventlog.EV_EFI_VARIABLE_DRIVER_CONFIG]
        names = [v.name for v in variables if v is not None]
        assert names == ["SecureBoot", "PK", "KEK", "db", "dbx"], names
        for v in variables:
            assert v is not None and v.data == efivar(name, v.name), v
        assert variables[0] is not None and variables[0].data == bytes([enabled])
        assert pcr7[-1].type == eventlog.EV_SEPARATOR


def test_pcr7_prediction_replaces_authorities() -> None:
    db_cert = eventlog.variable_data(eventlog.EFI_IMAGE_SECURITY_DATABASE, "db", b"cert A")
    events = [
        event2(
            7,
            eventlog.EV_EFI_VARIABLE_DRIVER_CONFIG,
            {
                0x0B: hashlib.sha256(
                    eventlog.variable_data(eventlog.EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01")
                ).digest()
            },
            eventlog.variable_data(eventlog.EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01"),
        ),
        event2(7, eventlog.EV_SEPARATOR, {0x0B: hashlib.sha256(bytes(4)).digest()}, bytes(4)),
        event2(
            7, eventlog.EV_EFI_VARIABLE_AUTHORITY, {0x0B: hashlib.sha256(db_cert).digest()}, db_cert
        ),
    ]
    log = eventlog.parse(spec_id({0x0B: 32}) + b"".join(events))
    assert eventlog.predict_pcr7(log, "sha256") == eventlog.replay(log, "sha256")[7]
    new_cert = eventlog.variable_data(eventlog.EFI_IMAGE_SECURITY_DATABASE, "db", b"cert B")
    expected = bytes(32)
    for measured in (
        eventlog.variable_data(eventlog.EFI_GLOBAL_VARIABLE, "SecureBoot", b"\x01"),
        bytes(4),
        new_cert,
    ):
        expected = hashlib.sha256(expected + hashlib.sha256(measured).digest()).digest()
    assert eventlog.predict_pcr7(log, "sha256", authorities=[new_cert]) == expected
    with pytest.raises(eventlog.EventLogError, match="not a Secure Boot variable"):
        eventlog.predict_pcr7(log, "sha256", {"BootOrder": b""})


def efivar(name: str, variable: str) -> bytes:
    guid = eventlog.SECURE_BOOT_VARIABLES[variable]
    path = GUEST[name] / "efivars" / f"{variable}-{guid}"
    return path.read_bytes()[4:] if path.exists() else b""


@pytest.mark.parametrize("name", sorted(GUEST))
def test_pcr7_predicted_from_the_variables_as_they_are(name: str) -> None:
    """Recomputing PCR 7 from the variables read back from efivarfs gives the TPM's PCR 7:
    the prediction measures exactly what the firmware measured."""
    log = guest_log(name)
    variables = {v: efivar(name, v) for v in eventlog.SECURE_BOOT_VARIABLES}
    tpm = read_pcrs(GUEST[name] / "pcr-sha256.txt")
    assert eventlog.predict_pcr7(log, "sha256", variables) == tpm[7]
    assert eventlog.predict_pcr7(log, "sha256") == tpm[7]


def test_pcr7_predicted_for_the_other_firmware_state() -> None:
    """From the Secure Boot boot's log alone, predict PCR 7 of the boot after the keys are
    cleared (setup mode: every variable empty, SecureBoot 0, nothing authorised)."""
    log = guest_log("secureboot")
    cleared = {"SecureBoot": b"\0", "PK": b"", "KEK": b"", "db": b"", "dbx": b""}
    predicted = eventlog.predict_pcr7(log, "sha256", cleared, authorities=[])
    assert predicted == read_pcrs(GUEST["uefi"] / "pcr-sha256.txt")[7]
    # And a db change alone moves it.
    assert eventlog.predict_pcr7(log, "sha256", {"db": b"other"}) != predicted


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_logs_parse(name: str) -> None:
    log = eventlog.parse((FIXTURES / "eventlogs" / name).read_bytes())
    assert log.banks == PUBLIC[name]
    assert eventlog.verify_digests(log) == []
    for bank in log.banks:
        assert 0 in eventlog.replay(log, bank)


def test_legacy_log_replays_to_its_tpm_quote() -> None:
    """A SHA-1 log from a real (Windows, GCP shielded VM) TPM, with the PCRs its quote
    signed: every PCR the log measures replays to the quoted value."""
    log = eventlog.parse((FIXTURES / "eventlogs/windows_gcp_shielded_vm_eventlog").read_bytes())
    assert not log.crypto_agile
    pcrs = read_pcrs(FIXTURES / "eventlogs/windows_gcp_shielded_vm_pcr-sha1.txt")
    replayed = eventlog.replay(log, "sha1")
    assert {0, 4, 5, 7, 11, 12, 13, 14} <= set(replayed)
    assert all(pcrs[p] == v for p, v in replayed.items())


def tpm2_eventlog_pcrs(path: Path) -> dict[str, dict[int, bytes]]:
    out = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True)
    pcrs: dict[str, dict[int, bytes]] = {}
    section = out.stdout[out.stdout.index("pcrs:") :]
    bank = ""
    for line in section.splitlines()[1:]:
        if m := re.fullmatch(r"\s+(sha\d+):", line):
            bank = m[1]
            pcrs[bank] = {}
        elif m := re.fullmatch(r"\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)", line):
            pcrs[bank][int(m[1])] = bytes.fromhex(m[2])
    return pcrs


@pytest.mark.parametrize(
    "path",
    [
        GUEST["secureboot"] / "binary_bios_measurements",
        FIXTURES / "eventlogs/ubuntu_2104_shielded_vm_no_secure_boot_eventlog",
    ],
    ids=["ovmf", "ubuntu"],
)
def test_replay_agrees_with_tpm2_eventlog(path: Path) -> None:
    require_tool("tpm2_eventlog")
    theirs = tpm2_eventlog_pcrs(path)
    log = eventlog.parse(path.read_bytes())
    assert set(theirs) == set(log.banks) & set(theirs)
    for bank, values in theirs.items():
        assert eventlog.replay(log, bank) == values


# -- built logs: the layout rules, one at a time -------------------------------------------


def spec_id(banks: dict[int, int]) -> bytes:
    body = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(banks))
    body += b"".join(struct.pack("<HH", a, s) for a, s in banks.items()) + b"\0"
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body


def event2(pcr: int, etype: int, digests: dict[int, bytes], data: bytes) -> bytes:
    out = struct.pack("<III", pcr, etype, len(digests))
    out += b"".join(struct.pack("<H", a) + d for a, d in digests.items())
    return out + struct.pack("<I", len(data)) + data


def test_startup_locality_sets_pcr0_start() -> None:
    sha256 = {0x0B: 32}
    locality = b"StartupLocality\0" + b"\x03"
    measured = hashlib.sha256(b"crtm").digest()
    raw = spec_id(sha256) + event2(0, 3, {0x0B: bytes(32)}, locality)
    raw += event2(0, 8, {0x0B: measured}, b"crtm")
    log = eventlog.parse(raw)
    assert log.startup_locality == 3
    expected = hashlib.sha256(bytes(31) + b"\x03" + measured).digest()
    assert eventlog.replay(log, "sha256") == {0: expected}


def test_trailing_zero_padding_ends_the_log() -> None:
    raw = spec_id({0x0B: 32}) + event2(4, 4, {0x0B: hashlib.sha256(bytes(4)).digest()}, bytes(4))
    assert len(eventlog.parse(raw + bytes(64)).events) == 2


def test_altered_event_data_is_detected() -> None:
    data = bytes(4)
    raw = spec_id({0x0B: 32}) + event2(4, 4, {0x0B: hashlib.sha256(data).digest()}, data)
    assert eventlog.verify_digests(eventlog.parse(raw)) == []
    raw = raw[:-1] + b"\x01"
    assert eventlog.verify_digests(eventlog.parse(raw)) == [1]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty"),
        (spec_id({0x0B: 32})[:30], "needs"),
        (spec_id({0x0B: 20}), "digest size 20"),
        (spec_id({0x0B: 32}) + event2(24, 4, {}, b""), "PCR 24"),
        (spec_id({0x0B: 32}) + event2(4, 4, {0x04: bytes(20)}, b""), "not declared"),
        (spec_id({0x0B: 32}) + struct.pack("<III", 4, 4, 9), "9 digests"),
        (
            spec_id({0x0B: 32})
            + struct.pack("<IIIH", 4, 4, 1, 0x0B)
            + bytes(32)
            + struct.pack("<I", 1 << 30),
            "implausible",
        ),
    ],
)
def test_malformed_logs_say_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(eventlog.EventLogError, match=message):
        eventlog.parse(raw)


def test_every_truncation_of_a_real_log_is_an_error_or_a_prefix() -> None:
    raw = (GUEST["secureboot"] / "binary_bios_measurements").read_bytes()
    full = eventlog.parse(raw)
    for cut in range(0, len(raw), 7):
        try:
            log = eventlog.parse(raw[:cut])
        except eventlog.EventLogError:
            continue
        assert log.events == full.events[: len(log.events)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(raw: bytes) -> None:
    try:
        log = eventlog.parse(raw)
    except eventlog.EventLogError:
        return
    for bank in log.banks:
        with contextlib.suppress(eventlog.EventLogError):
            eventlog.replay(log, bank)
    eventlog.summary(log)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_fuzz_mutated_real_log(data: st.DataObject) -> None:
    raw = bytearray((GUEST["uefi"] / "binary_bios_measurements").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        log = eventlog.parse(bytes(raw[:cut]))
    except eventlog.EventLogError:
        return
    for bank in log.banks:
        try:
            eventlog.replay(log, bank)
            eventlog.predict_pcr7(log, bank)
        except eventlog.EventLogError:
            pass
    eventlog.verify_digests(log)
    eventlog.summary(log)


def test_cli_prints_the_replay(tmp_path: Path) -> None:
    import json

    from incusos_hal import cli

    path = FIXTURES / "eventlogs/ubuntu_2104_shielded_vm_no_secure_boot_eventlog"
    out = subprocess.run(
        [sys.executable, "-m", "incusos_hal", "eventlog", "--pcrs", str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO / "src")},
    ).stdout
    log = eventlog.parse(path.read_bytes())
    assert json.loads(out)["pcrs"]["sha384"] == {
        str(k): v.hex() for k, v in sorted(eventlog.replay(log, "sha384").items())
    }
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00" * 7)
    assert cli.main(["eventlog", str(bad)]) == cli.EXIT_INVALID


def _eventlog_cases(tmp_path: Path) -> list[Path]:
    """Every fixture log, cut short at a few places (each cut is an error of its own), an
    empty file, a missing one and a directory."""
    logs = [*sorted((FIXTURES / "eventlogs").glob("*_eventlog"))]
    logs += [GUEST[name] / "binary_bios_measurements" for name in sorted(GUEST)]
    cases = list(logs)
    for i, log in enumerate(logs):
        raw = log.read_bytes()
        for cut in (3, 40, len(raw) // 3, len(raw) - 5):
            short = tmp_path / f"cut-{i}-{cut}"
            short.write_bytes(raw[:cut])
            cases.append(short)
    (tmp_path / "empty").write_bytes(b"")
    return [*cases, tmp_path / "empty", tmp_path / "missing", tmp_path]


def test_cli_pcrs_fast_path_answers_as_the_parser_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`eventlog --pcrs FILE` is answered before argparse (hal.eventrecords alone); with one
    more argument it goes through argparse and hal.eventlog: the same stdout, stderr and
    exit status, for good logs and for every kind of bad one."""
    from incusos_hal import cli

    assert cli._eventlog_pcrs_file(["eventlog", "--pcrs", "f"]) == "f"
    assert cli._eventlog_pcrs_file(["eventlog", "f", "--pcrs"]) == "f"
    for argv in (["eventlog", "--pcr", "f"], ["eventlog", "--pcrs", ""], ["eventlog", "--pcrs"]):
        assert cli._eventlog_pcrs_file(argv) is None, argv
    errors = 0
    for case in _eventlog_cases(tmp_path):
        fast_code = cli.main(["eventlog", "--pcrs", str(case)])
        fast = capsys.readouterr()
        full_code = cli.main(["eventlog", str(case), "--pcrs", "--root", "/"])
        full = capsys.readouterr()
        assert (fast_code, fast.out, fast.err) == (full_code, full.out, full.err), case
        errors += fast_code != 0
    assert 0 < errors < len(_eventlog_cases(tmp_path))


def test_cli_pcrs_imports_only_what_it_needs() -> None:
    """The start-up budget of `incusos-hal eventlog --pcrs FILE`: beyond the interpreter's
    own start, the package, the CLI, hal.eventrecords, struct and hashlib; the heaviest
    imports it must not pay for are named."""

    def imported(code: str) -> dict[str, int]:
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": str(REPO / "src")},
        ).stderr
        rows = re.findall(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", err)
        return {name: int(cumulative) for cumulative, _, name in rows}

    log = GUEST["secureboot"] / "binary_bios_measurements"
    baseline = imported("pass")
    ours = imported(f"from incusos_hal.cli import main; main(['eventlog', '--pcrs', '{log}'])")
    extra = set(ours) - set(baseline)
    allowed = {
        "__future__",
        "incusos_hal",
        "incusos_hal.cli",
        "incusos_hal.cli.common",
        "incusos_hal.hal",
        "incusos_hal.hal.eventrecords",
        "hashlib",
        "_hashlib",
        "_blake2",
        "struct",
        "_struct",
    }
    heaviest = sorted(extra - allowed, key=lambda name: -ours[name])
    assert not heaviest, f"eventlog --pcrs imports {heaviest[:8]} (heaviest first)"
    for never in ("argparse", "json", "pathlib", "dataclasses", "typing", "re", "uuid"):
        assert never not in ours or never in baseline, never
