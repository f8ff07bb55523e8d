"""The TCG event log: what the firmware measured into the TPM, and in what order.

Parses `/sys/kernel/security/tpm0/binary_bios_measurements` in both layouts of the TCG PC
Client Platform Firmware Profile: the crypto-agile one (a SHA-1 shaped header event whose
data is the "Spec ID Event03" naming the banks, then TCG_PCR_EVENT2 records with one digest
per bank) and the legacy SHA-1 one. Then replays it per bank (each measured event extends
its PCR: new = H(old || digest)) so the result can be compared with the TPM's own PCRs,
and predicts PCR 7 for a changed set of Secure Boot variables, which is how a disk bound
to PCR 7 is rebound before a db/KEK update instead of after it.

Everything here is a pure function of bytes. The log comes from firmware and could be
anything: every length is checked against what is left, and a bad log raises
EventLogError naming the byte offset, never a struct.error, IndexError or a long loop.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from incusos_hal.hal import eventrecords
from incusos_hal.hal.eventrecords import LOG_PATH as LOG_PATH
from incusos_hal.hal.eventrecords import MAX_EVENT_SIZE as MAX_EVENT_SIZE
from incusos_hal.hal.eventrecords import MAX_LOG_SIZE as MAX_LOG_SIZE
from incusos_hal.hal.eventrecords import PCR_COUNT as PCR_COUNT
from incusos_hal.hal.eventrecords import SPEC_ID_SIGNATURE as SPEC_ID_SIGNATURE
from incusos_hal.hal.eventrecords import STARTUP_LOCALITY_SIGNATURE as STARTUP_LOCALITY_SIGNATURE
from incusos_hal.hal.eventrecords import EventLogError as EventLogError

# The record reading lives in hal.eventrecords (plain tuples, no dataclasses: what the
# `eventlog --pcrs` command needs); these names are its, kept here for every other caller.
ALGORITHMS: Mapping[int, tuple[str, int]] = eventrecords.ALGORITHMS
ALGORITHM_IDS: Mapping[str, int] = eventrecords.ALGORITHM_IDS
_HASHLIB = eventrecords.HASHLIB

EV_EFI = 0x80000000
EVENT_TYPES: Mapping[int, str] = {
    0x0: "EV_PREBOOT_CERT",
    0x1: "EV_POST_CODE",
    0x2: "EV_UNUSED",
    0x3: "EV_NO_ACTION",
    0x4: "EV_SEPARATOR",
    0x5: "EV_ACTION",
    0x6: "EV_EVENT_TAG",
    0x7: "EV_S_CRTM_CONTENTS",
    0x8: "EV_S_CRTM_VERSION",
    0x9: "EV_CPU_MICROCODE",
    0xA: "EV_PLATFORM_CONFIG_FLAGS",
    0xB: "EV_TABLE_OF_DEVICES",
    0xC: "EV_COMPACT_HASH",
    0xD: "EV_IPL",
    0xE: "EV_IPL_PARTITION_DATA",
    0xF: "EV_NONHOST_CODE",
    0x10: "EV_NONHOST_CONFIG",
    0x11: "EV_NONHOST_INFO",
    0x12: "EV_OMIT_BOOT_DEVICE_EVENTS",
    EV_EFI + 0x1: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    EV_EFI + 0x2: "EV_EFI_VARIABLE_BOOT",
    EV_EFI + 0x3: "EV_EFI_BOOT_SERVICES_APPLICATION",
    EV_EFI + 0x4: "EV_EFI_BOOT_SERVICES_DRIVER",
    EV_EFI + 0x5: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    EV_EFI + 0x6: "EV_EFI_GPT_EVENT",
    EV_EFI + 0x7: "EV_EFI_ACTION",
    EV_EFI + 0x8: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    EV_EFI + 0x9: "EV_EFI_HANDOFF_TABLES",
    EV_EFI + 0xA: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    EV_EFI + 0xB: "EV_EFI_HANDOFF_TABLES2",
    EV_EFI + 0xC: "EV_EFI_VARIABLE_BOOT2",
    EV_EFI + 0xD: "EV_EFI_GPT_EVENT2",
    EV_EFI + 0x10: "EV_EFI_HCRTM_EVENT",
    EV_EFI + 0xE0: "EV_EFI_VARIABLE_AUTHORITY",
    EV_EFI + 0xE1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    EV_EFI + 0xE2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_EFI_VARIABLE_DRIVER_CONFIG = EV_EFI + 0x1
EV_EFI_VARIABLE_BOOT = EV_EFI + 0x2
EV_EFI_VARIABLE_BOOT2 = EV_EFI + 0xC
EV_EFI_ACTION = EV_EFI + 0x7
EV_EFI_VARIABLE_AUTHORITY = EV_EFI + 0xE0

# Variable events whose digest is the hash of the whole UEFI_VARIABLE_DATA, the ones a
# verifier can recompute (PFP 10.4.4; EV_EFI_VARIABLE_BOOT hashes only the data).
_VARIABLE_DIGEST_OVER_EVENT = (EV_EFI_VARIABLE_DRIVER_CONFIG, EV_EFI_VARIABLE_AUTHORITY)

EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")


@dataclass(frozen=True, slots=True)
class VariableData:
    """UEFI_VARIABLE_DATA: the event data of the EFI variable events."""

    guid: uuid.UUID
    name: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Event:
    index: int  # position in the log, the header event being 0
    offset: int  # byte offset of the record
    pcr: int
    type: int
    digests: Mapping[str, bytes]  # bank name → digest
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPES.get(self.type, f"0x{self.type:08x}")

    @property
    def variable(self) -> VariableData | None:
        """The variable of an EFI variable event, None for other events or bad data."""
        if self.type not in (
            *_VARIABLE_DIGEST_OVER_EVENT,
            EV_EFI_VARIABLE_BOOT,
            EV_EFI_VARIABLE_BOOT2,
        ):
            return None
        try:
            return parse_variable_data(self.data)
        except EventLogError:
            return None

    @property
    def text(self) -> str | None:
        """The string of an action or separator-like event with printable data."""
        if self.type in (EV_EFI_ACTION, 0x5, 0x8, 0xD) and self.data:
            try:
                return self.data.rstrip(b"\0").decode("ascii")
            except UnicodeDecodeError:
                return None
        return None


@dataclass(frozen=True, slots=True)
class EventLog:
    crypto_agile: bool
    banks: tuple[str, ...]
    events: tuple[Event, ...]  # measured and EV_NO_ACTION events, in log order
    startup_locality: int = 0
    spec_version: str = ""
    vendor_info: bytes = field(default=b"", repr=False)


def _guid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(bytes_le=raw)


def parse_variable_data(data: bytes) -> VariableData:
    if len(data) < 32:
        raise EventLogError("UEFI_VARIABLE_DATA shorter than its 32-byte header")
    guid = _guid(data[:16])
    name_chars, data_len = struct.unpack_from("<QQ", data, 16)
    if name_chars > (len(data) - 32) // 2 or data_len > len(data) - 32 - 2 * name_chars:
        raise EventLogError("UEFI_VARIABLE_DATA lengths exceed the event")
    name_end = 32 + 2 * name_chars
    try:
        name = data[32:name_end].decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise EventLogError("UEFI_VARIABLE_DATA name is not UTF-16") from e
    return VariableData(guid, name, data[name_end : name_end + data_len])


def variable_data(guid: uuid.UUID, name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA as the firmware measures it (the inverse of parse_variable_data)."""
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(encoded) // 2, len(value)) + encoded + value


def parse(raw: bytes) -> EventLog:
    """Parse a binary event log (crypto-agile or legacy SHA-1), in the steps of
    hal.eventrecords: the first record (SHA-1 layout); if it is the Spec ID event, its banks
    and the TCG_PCR_EVENT2 records after it, else the legacy SHA-1 records."""
    r = eventrecords.open_log(raw)
    pcr, etype, sha1, data = eventrecords.read_first_record(r)
    if eventrecords.is_spec_id(etype, data):
        sizes, version, vendor = eventrecords.parse_spec_id(data)
        records = [(0, pcr, etype, {}, data), *eventrecords.read_agile_records(r, sizes)]
        banks = tuple(eventrecords.bank_name(alg) for alg in sizes)
        locality = eventrecords.startup_locality(records)
        return EventLog(True, banks, _events(records), locality, version, vendor)
    records = [(0, pcr, etype, {"sha1": sha1}, data), *eventrecords.read_legacy_records(r)]
    return EventLog(False, ("sha1",), _events(records))


def _events(records: Sequence[eventrecords.Record]) -> tuple[Event, ...]:
    return tuple(
        Event(index, offset, pcr, etype, digests, data)
        for index, (offset, pcr, etype, digests, data) in enumerate(records)
    )


def read(root: Path | str = "/") -> EventLog:
    """The running machine's log (under `root`, for recorded trees)."""
    return parse((Path(root) / LOG_PATH).read_bytes())


_hash = eventrecords.hash_name


def replay(log: EventLog, bank: str) -> dict[int, bytes]:
    """PCR values the log adds up to in `bank`, for every PCR it measures into."""
    if bank not in log.banks:
        raise EventLogError(f"the log has no {bank} bank (it has {', '.join(log.banks)})")
    return _replay(log.events, bank, log.startup_locality)


def _replay(events: Iterable[Event], bank: str, locality: int) -> dict[int, bytes]:
    return eventrecords.replay_records(
        [(e.index, e.pcr, e.type, e.digests) for e in events], bank, locality
    )


@dataclass(frozen=True, slots=True)
class Mismatch:
    pcr: int
    logged: bytes
    tpm: bytes


def compare(log: EventLog, bank: str, tpm_pcrs: Mapping[int, bytes]) -> list[Mismatch]:
    """PCRs whose replayed value differs from the TPM's (only those the log measures into
    and the TPM reported)."""
    replayed = replay(log, bank)
    return [
        Mismatch(pcr, value, tpm_pcrs[pcr])
        for pcr, value in sorted(replayed.items())
        if pcr in tpm_pcrs and tpm_pcrs[pcr] != value
    ]


def verify_digests(log: EventLog) -> list[int]:
    """Indexes of events whose data does not hash to their logged digest, for the event types
    whose digest is defined as the hash of the event data (separators, EFI actions,
    Secure Boot variable and authority events). A non-empty result means the log was
    altered, or the firmware measures something other than what it logged."""
    bad = []
    for event in log.events:
        if event.type not in (EV_SEPARATOR, EV_EFI_ACTION, *_VARIABLE_DIGEST_OVER_EVENT):
            continue
        for bank, digest in event.digests.items():
            if bank in _HASHLIB and hashlib.new(_HASHLIB[bank], event.data).digest() != digest:
                bad.append(event.index)
                break
    return bad


# Variables measured into PCR 7 by their (GUID, name).
SECURE_BOOT_VARIABLES: Mapping[str, uuid.UUID] = {
    "SecureBoot": EFI_GLOBAL_VARIABLE,
    "PK": EFI_GLOBAL_VARIABLE,
    "KEK": EFI_GLOBAL_VARIABLE,
    "db": EFI_IMAGE_SECURITY_DATABASE,
    "dbx": EFI_IMAGE_SECURITY_DATABASE,
}


def predict_pcr7(
    log: EventLog,
    bank: str,
    variables: Mapping[str, bytes] | None = None,
    authorities: Sequence[bytes] | None = None,
) -> bytes:
    """PCR 7 as it will be on the next boot if the Secure Boot variables become `variables`
    (name → contents, e.g. a new db) and, when given, the EV_EFI_VARIABLE_AUTHORITY events
    carry `authorities` (their UEFI_VARIABLE_DATA, in order) instead. Everything not named
    keeps the value the log recorded. With no changes this is the log's own PCR 7."""
    variables = variables or {}
    unknown = set(variables) - set(SECURE_BOOT_VARIABLES)
    if unknown:
        raise EventLogError(f"not a Secure Boot variable: {', '.join(sorted(unknown))}")
    name = _hash(bank)
    changed: list[Event] = []
    authority_events = [e for e in log.events if e.pcr == 7 and e.type == EV_EFI_VARIABLE_AUTHORITY]
    replacements = list(authorities) if authorities is not None else None
    for event in log.events:
        if event.pcr != 7 or event.type == EV_NO_ACTION:
            continue
        digest = event.digests.get(bank)
        if event.type == EV_EFI_VARIABLE_DRIVER_CONFIG:
            var = event.variable
            if (
                var is not None
                and var.name in variables
                and SECURE_BOOT_VARIABLES[var.name] == var.guid
            ):
                measured = variable_data(var.guid, var.name, variables[var.name])
                digest = hashlib.new(name, measured).digest()
        elif event.type == EV_EFI_VARIABLE_AUTHORITY and replacements is not None:
            position = authority_events.index(event)
            if position >= len(replacements):
                continue  # fewer authorities next boot: the event is not measured
            digest = hashlib.new(name, replacements[position]).digest()
        if digest is None:
            raise EventLogError(f"event {event.index} has no {bank} digest")
        changed.append(Event(event.index, event.offset, 7, event.type, {bank: digest}, b""))
    if replacements is not None:
        for extra in replacements[len(authority_events) :]:
            changed.append(
                Event(
                    -1,
                    -1,
                    7,
                    EV_EFI_VARIABLE_AUTHORITY,
                    {bank: hashlib.new(name, extra).digest()},
                    b"",
                )
            )
    return _replay(changed, bank, log.startup_locality).get(7, bytes(hashlib.new(name).digest_size))


def summary(log: EventLog) -> list[dict[str, object]]:
    """The log as JSON-ready records (the API's debug view, and `incusos-hal eventlog`)."""
    out: list[dict[str, object]] = []
    for event in log.events:
        record: dict[str, object] = {
            "index": event.index,
            "pcr": event.pcr,
            "type": event.type_name,
            "digests": {bank: d.hex() for bank, d in event.digests.items()},
            "size": len(event.data),
        }
        var = event.variable
        if var is not None:
            record["variable"] = {"guid": str(var.guid), "name": var.name, "size": len(var.data)}
        elif event.text is not None:
            record["text"] = event.text
        out.append(record)
    return out
