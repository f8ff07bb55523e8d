"""The TCG event log's records, read as plain tuples: the steps `hal.eventlog.parse` is
made of, and all that `incusos-hal eventlog --pcrs` needs to replay a log.

Kept to `struct` and `hashlib` so that the command starts as fast as the C tool it stands
beside (`tpm2_eventlog`): hal.eventlog adds the dataclasses, variables and predictions on
top. The log comes from firmware and could be anything: every length is checked against
what is left, and a bad log raises EventLogError naming the byte offset, never a
struct.error, IndexError or a long loop.
"""

from __future__ import annotations

import hashlib
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and collections.abc cost the command's start-up
    from collections.abc import Mapping, Sequence

LOG_PATH = "sys/kernel/security/tpm0/binary_bios_measurements"

# TPM_ALG_ID → (name, digest size); the banks a PC Client TPM can have.
ALGORITHMS = {
    0x0004: ("sha1", 20),
    0x000B: ("sha256", 32),
    0x000C: ("sha384", 48),
    0x000D: ("sha512", 64),
    0x0012: ("sm3_256", 32),
}
ALGORITHM_IDS = {name: alg for alg, (name, _) in ALGORITHMS.items()}
HASHLIB = {"sha1": "sha1", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512"}

EV_NO_ACTION = 0x3
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"
PCR_COUNT = 24
# Far above any real event (a db with every Microsoft certificate is ~10 KiB; a log is a few
# hundred KiB), low enough that a corrupt length cannot make us allocate gigabytes.
MAX_EVENT_SIZE = 1 << 20
MAX_LOG_SIZE = 64 << 20

# One measured or EV_NO_ACTION event: (offset, pcr, type, {bank: digest}, data).
Record = tuple[int, int, int, dict[str, bytes], bytes]


class EventLogError(ValueError):
    """The log is not a TCG event log this parser can trust."""


class Reader:
    """A cursor over the log's bytes; every read is checked against what is left."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise EventLogError(f"{what} at offset {self.pos}: needs {n} bytes, {self.left} left")
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self, what: str) -> int:
        value: int = struct.unpack("<I", self.take(4, what))[0]
        return value

    def u16(self, what: str) -> int:
        value: int = struct.unpack("<H", self.take(2, what))[0]
        return value

    @property
    def left(self) -> int:
        return len(self.raw) - self.pos

    def rest_is_zero(self) -> bool:
        return not any(self.raw[self.pos :])


def bank_name(alg: int) -> str:
    known = ALGORITHMS.get(alg)
    return known[0] if known else f"0x{alg:04x}"


def open_log(raw: bytes) -> Reader:
    """A reader over the log, refused when empty or implausibly large."""
    if len(raw) > MAX_LOG_SIZE:
        raise EventLogError(f"event log of {len(raw)} bytes is larger than {MAX_LOG_SIZE}")
    r = Reader(bytes(raw))
    if r.left == 0:
        raise EventLogError("event log is empty")
    return r


def read_first_record(r: Reader) -> tuple[int, int, bytes, bytes]:
    """The first record, always in the SHA-1 layout (TCG_PCClientPCREvent): (pcr, type,
    SHA-1 digest, data)."""
    pcr = r.u32("first event PCR index")
    etype = r.u32("first event type")
    sha1 = r.take(20, "first event digest")
    size = r.u32("first event size")
    if size > MAX_EVENT_SIZE:
        raise EventLogError(f"first event at offset 0: size {size} is implausible")
    data = r.take(size, "first event data")
    if pcr >= PCR_COUNT:
        raise EventLogError(f"first event: PCR {pcr} out of range")
    return pcr, etype, sha1, data


def is_spec_id(etype: int, data: bytes) -> bool:
    """Whether the first record is the crypto-agile log's Spec ID Event03."""
    return etype == EV_NO_ACTION and data.startswith(SPEC_ID_SIGNATURE)


def parse_spec_id(data: bytes) -> tuple[dict[int, int], str, bytes]:
    """The Spec ID Event03 data: {algorithm id: digest size}, spec version, vendor info."""
    r = Reader(data)
    r.take(16, "Spec ID signature")
    r.u32("platform class")
    minor, major, errata, uintn = r.take(4, "Spec ID version")
    if uintn not in (1, 2):
        raise EventLogError(f"Spec ID Event03: uintnSize {uintn} is neither 1 nor 2")
    count = r.u32("number of algorithms")
    if not 0 < count <= 16:
        raise EventLogError(f"Spec ID Event03: {count} algorithms")
    sizes: dict[int, int] = {}
    for _ in range(count):
        alg = r.u16("algorithm id")
        size = r.u16("digest size")
        known = ALGORITHMS.get(alg)
        if known is not None and known[1] != size:
            raise EventLogError(f"Spec ID Event03: {known[0]} digest size {size}, not {known[1]}")
        if not 0 < size <= 64:
            raise EventLogError(f"Spec ID Event03: digest size {size} for algorithm 0x{alg:04x}")
        sizes[alg] = size
    vendor = r.take(r.take(1, "vendor info size")[0], "vendor info")
    return sizes, f"{major}.{minor}.{errata}", vendor


def read_agile_records(r: Reader, sizes: dict[int, int]) -> list[Record]:
    """The TCG_PCR_EVENT2 records after the Spec ID event, up to the end or the zero
    padding of the firmware's buffer."""
    records: list[Record] = []
    while r.left:
        offset = r.pos
        if r.left < 8 and r.rest_is_zero():
            break  # zero padding at the end of the firmware's buffer
        pcr = r.u32("PCR index")
        etype = r.u32("event type")
        count = r.u32("digest count")
        if pcr == 0 and etype == 0 and count == 0 and r.rest_is_zero():
            break
        if pcr >= PCR_COUNT:
            raise EventLogError(f"event at offset {offset}: PCR {pcr} out of range")
        if count > len(sizes):
            raise EventLogError(
                f"event at offset {offset}: {count} digests, the log has {len(sizes)} banks"
            )
        digests: dict[str, bytes] = {}
        for _ in range(count):
            alg = r.u16("digest algorithm")
            if alg not in sizes:
                raise EventLogError(
                    f"event at offset {offset}: digest algorithm 0x{alg:04x} not declared"
                )
            digests[bank_name(alg)] = r.take(sizes[alg], "digest")
        size = r.u32("event size")
        if size > MAX_EVENT_SIZE:
            raise EventLogError(f"event at offset {offset}: size {size} is implausible")
        data = r.take(size, "event data")
        locality = etype == EV_NO_ACTION and data.startswith(STARTUP_LOCALITY_SIGNATURE)
        if locality and len(data) < 17:
            raise EventLogError(f"event at offset {offset}: short StartupLocality")
        records.append((offset, pcr, etype, digests, data))
    return records


def startup_locality(records: Sequence[Record]) -> int:
    """The locality the firmware started from (PFP 3.3.4.4): the last StartupLocality
    event's (read_agile_records checked its length), else 0."""
    locality = 0
    for _, _, etype, _, data in records:
        if etype == EV_NO_ACTION and data.startswith(STARTUP_LOCALITY_SIGNATURE):
            locality = data[16]
    return locality


def read_legacy_records(r: Reader) -> list[Record]:
    """The SHA-1 records of a legacy log after its first one."""
    records: list[Record] = []
    while r.left:
        offset = r.pos
        if r.rest_is_zero():
            break
        pcr = r.u32("PCR index")
        etype = r.u32("event type")
        sha1 = r.take(20, "digest")
        size = r.u32("event size")
        if pcr >= PCR_COUNT:
            raise EventLogError(f"event at offset {offset}: PCR {pcr} out of range")
        if size > MAX_EVENT_SIZE:
            raise EventLogError(f"event at offset {offset}: size {size} is implausible")
        records.append((offset, pcr, etype, {"sha1": sha1}, r.take(size, "data")))
    return records


def read_records(raw: bytes) -> tuple[bool, tuple[str, ...], list[Record], int]:
    """(crypto agile, banks, records with the first, startup locality) of a log."""
    r = open_log(raw)
    pcr, etype, sha1, data = read_first_record(r)
    if is_spec_id(etype, data):
        sizes, _, _ = parse_spec_id(data)
        records = [(0, pcr, etype, {}, data), *read_agile_records(r, sizes)]
        banks = tuple(bank_name(alg) for alg in sizes)
        return True, banks, records, startup_locality(records)
    records = [(0, pcr, etype, {"sha1": sha1}, data), *read_legacy_records(r)]
    return False, ("sha1",), records, 0


def hash_name(bank: str) -> str:
    try:
        return HASHLIB[bank]
    except KeyError:
        raise EventLogError(f"no hash function for bank {bank}") from None


def initial_value(pcr: int, size: int, locality: int) -> bytes:
    # PCR 0 starts at the locality the firmware started from (PFP 3.3.4.4, StartupLocality).
    if pcr == 0 and locality:
        return bytes(size - 1) + bytes([locality])
    return bytes(size)


def replay_records(
    records: Sequence[tuple[int, int, int, Mapping[str, bytes]]], bank: str, locality: int
) -> dict[int, bytes]:
    """PCR values (index, pcr, type, digests) records add up to in `bank`: each measured
    event extends its PCR, new = H(old || digest)."""
    name = hash_name(bank)
    size = hashlib.new(name).digest_size
    pcrs: dict[int, bytes] = {}
    for index, pcr, etype, digests in records:
        if etype == EV_NO_ACTION:
            continue
        digest = digests.get(bank)
        if digest is None:
            raise EventLogError(f"event {index} has no {bank} digest")
        old = pcrs.get(pcr, initial_value(pcr, size, locality))
        pcrs[pcr] = hashlib.new(name, old + digest).digest()
    return pcrs


def pcrs_json(raw: bytes) -> str:
    """`incusos-hal eventlog --pcrs`'s output: every hashable bank replayed, as JSON with
    json.dumps(indent=2)'s layout (the values are digit and hex strings: nothing to
    escape), without loading the json module."""
    _, banks, records, locality = read_records(raw)
    indexed = [(i, pcr, etype, digests) for i, (_, pcr, etype, digests, _) in enumerate(records)]
    blocks = []
    for bank in banks:
        if bank not in HASHLIB:
            continue
        values = sorted(replay_records(indexed, bank, locality).items())
        rows = ",\n".join(f'      "{pcr}": "{value.hex()}"' for pcr, value in values)
        blocks.append(f'    "{bank}": ' + (f"{{\n{rows}\n    }}" if rows else "{}"))
    inner = "{\n" + ",\n".join(blocks) + "\n  }" if blocks else "{}"
    return f'{{\n  "pcrs": {inner}\n}}'
