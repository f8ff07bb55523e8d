"""The update index, in IncusOS's format (lxc/incus-os incus-osd/api/images: Index,
UpdateFull, UpdateFile), and the plan made from it. Pure: bytes and values in, values out.

    {"format": "1.0", "updates": [{"version": "202511270405", "channels": ["stable"],
      "files": [{"architecture": "x86_64", "component": "os", "filename": "...",
                 "sha256": "<hex>", "size": 123, "type": "update-usr"}, ...],
      "origin": "...", "published_at": "...", "severity": "none", "url": "..."}]}

Updates are listed newest first; the first one on the machine's channel with files for
its architecture is the latest (IncusOS's checkRelease). Versions are compared in the
UAPI version order systemd-sysupdate uses (IncusOS's timestamps compare as its
DatetimeComparison does); a version that is not newer than the installed one is never
planned: a downgrade is refused, loudly.

Everything a server says is checked here before it is used: a file name is a relative
path of plain components (it becomes part of a URL and of a path on disk), a hash is 64
hex digits, a size is positive and bounded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.versions import VERSION

MAX_INDEX_BYTES = 16 << 20
MAX_FILE_SIZE = 16 << 30
MAX_UPDATES = 10000
_VERSION = VERSION  # core/versions.py: one grammar for every version taken
_COMPONENT = re.compile(r"[a-z0-9-]{1,64}")
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# IncusOS's file types for an OS update (incus-osd/api/images/update_file_type.go).
OS_TYPES = ("update-efi", "update-usr", "update-usr-verity", "update-usr-verity-signature")
SECUREBOOT_TYPE = "update-secureboot"
APPLICATION_TYPE = "application"


class BadIndex(ValueError):
    """An index that is not what the format says: nothing of it is used."""


@dataclass(frozen=True, slots=True)
class UpdateFile:
    filename: str
    sha256: str
    size: int
    component: str
    type: str
    architecture: str = ""

    @property
    def basename(self) -> str:
        return self.filename.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Release:
    version: str
    channels: tuple[str, ...]
    files: tuple[UpdateFile, ...]
    severity: str = "none"
    published_at: str = ""
    url: str = ""


def _text(raw: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise BadIndex(f"{where}.{key}: expected a string")
    if required and not value:
        raise BadIndex(f"{where}.{key}: missing")
    return value


def check_filename(name: str, where: str) -> str:
    parts = name.split("/")
    if not name or any(_PART.fullmatch(p) is None for p in parts) or len(parts) > 8:
        raise BadIndex(f"{where}: {name[:80]!r} is not a relative path of plain names")
    return name


def _file(raw: Any, where: str) -> UpdateFile:
    if not isinstance(raw, dict):
        raise BadIndex(f"{where}: expected an object")
    filename = check_filename(_text(raw, "filename", where), f"{where}.filename")
    sha256 = _text(raw, "sha256", where).lower()
    if _SHA256.fullmatch(sha256) is None:
        raise BadIndex(f"{where}.sha256: not 64 hex digits")
    size = raw.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_FILE_SIZE:
        raise BadIndex(f"{where}.size: not a size between 1 and {MAX_FILE_SIZE} bytes")
    component = _text(raw, "component", where, required=False)
    kind = _text(raw, "type", where, required=False)
    architecture = _text(raw, "architecture", where, required=False)
    for key, value in (("component", component), ("type", kind), ("architecture", architecture)):
        if value and _COMPONENT.fullmatch(value.replace("_", "-")) is None:
            raise BadIndex(f"{where}.{key}: {value[:80]!r} is not a name")
    return UpdateFile(filename, sha256, size, component, kind, architecture)


def _release(raw: Any, where: str) -> Release:
    if not isinstance(raw, dict):
        raise BadIndex(f"{where}: expected an object")
    version = _text(raw, "version", where)
    if _VERSION.fullmatch(version) is None:
        raise BadIndex(f"{where}.version: {version[:80]!r} is not a version")
    channels = raw.get("channels", [])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise BadIndex(f"{where}.channels: expected a list of strings")
    files = raw.get("files", [])
    if not isinstance(files, list):
        raise BadIndex(f"{where}.files: expected a list")
    parsed = tuple(_file(f, f"{where}.files[{i}]") for i, f in enumerate(files))
    names = [f.basename for f in parsed]
    if len(set(names)) != len(names):
        raise BadIndex(f"{where}.files: two files of one update have the same name")
    return Release(
        version,
        tuple(channels),
        parsed,
        _text(raw, "severity", where, required=False) or "none",
        _text(raw, "published_at", where, required=False),
        _text(raw, "url", where, required=False),
    )


def parse_index(data: bytes) -> tuple[Release, ...]:
    """The updates of an index document, newest first as the server lists them."""
    if len(data) > MAX_INDEX_BYTES:
        raise BadIndex(f"larger than {MAX_INDEX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadIndex(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadIndex("not a JSON object")
    updates = doc.get("updates")
    if not isinstance(updates, list):
        raise BadIndex("updates: expected a list")
    if len(updates) > MAX_UPDATES:
        raise BadIndex(f"updates: more than {MAX_UPDATES}")
    return tuple(_release(u, f"updates[{i}]") for i, u in enumerate(updates))


def is_newer(candidate: str, installed: str) -> bool:
    """The candidate sorts after the installed version, in the order systemd-sysupdate
    itself picks the newest by (`compare_versions`). For IncusOS's timestamps that is
    its DatetimeComparison (digits compare as numbers); it also orders this image's own
    dotted versions (meson's 0.1.0), which IncusOS's integers-only test refused."""
    return compare_versions(candidate, installed) > 0


_VERSION_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ~-^.")
_SEPARATORS = "-^."  # in this order: release, post-release, point release


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1: the UAPI version format's order (systemd's strverscmp_improved, as
    `systemd-analyze compare-versions` prints it), for ASCII versions (the index and the
    labels allow no other: systemd compares a non-ASCII byte as the C `char` of the
    machine, signed on x86-64, unsigned on arm64). Characters outside [A-Za-z0-9~^.-]
    are skipped. Segment by segment: a `~` sorts before anything, even the end (a
    pre-release); at an end, the longer string is newer; then `-`, `^` and `.` each sort
    before a segment without them; digits compare as numbers (leading zeros dropped) and
    are newer than letters; letters compare as ASCII, a longer run newer."""
    i = j = 0
    while True:
        while i < len(a) and a[i] not in _VERSION_CHARS:
            i += 1
        while j < len(b) and b[j] not in _VERSION_CHARS:
            j += 1
        x, y = a[i : i + 1], b[j : j + 1]
        if "~" in (x, y):
            if x != y:
                return -1 if x == "~" else 1
            i, j = i + 1, j + 1
            x, y = a[i : i + 1], b[j : j + 1]
        if not x or not y:
            return _sign(_c_strcmp(a[i:], b[j:]))
        for sep in _SEPARATORS:
            if sep in (x, y):
                if x != y:
                    return -1 if x == sep else 1
                i, j = i + 1, j + 1
                x, y = a[i : i + 1], b[j : j + 1]
        if _is_ascii_digit(x) or _is_ascii_digit(y):
            ei, ej = _run(a, i, _is_ascii_digit), _run(b, j, _is_ascii_digit)
            if (ei > i) != (ej > j):
                return 1 if ei > i else -1
            na, nb = a[i:ei].lstrip("0"), b[j:ej].lstrip("0")
            if len(na) != len(nb):
                return 1 if len(na) > len(nb) else -1
            if na != nb:
                return 1 if na > nb else -1
        else:
            ei, ej = _run(a, i, _is_ascii_letter), _run(b, j, _is_ascii_letter)
            sa, sb = a[i:ei], b[j:ej]
            common = min(len(sa), len(sb))
            if sa[:common] != sb[:common]:
                return 1 if sa[:common] > sb[:common] else -1
            if len(sa) != len(sb):
                return 1 if len(sa) > len(sb) else -1
        i, j = ei, ej


def _run(s: str, start: int, accept: Callable[[str], bool]) -> int:
    end = start
    while end < len(s) and accept(s[end]):
        end += 1
    return end


def _is_ascii_digit(c: str) -> bool:
    return "0" <= c <= "9"


def _is_ascii_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _c_strcmp(a: str, b: str) -> int:
    """C's strcmp on what is left (bytes, unsigned): only its sign is used."""
    ea, eb = a.encode(), b.encode()
    return (ea > eb) - (ea < eb)


def _sign(n: int) -> int:
    return (n > 0) - (n < 0)


def latest(
    releases: Sequence[Release], channel: str, architecture: str, running: str = ""
) -> Release | None:
    """The first release on `channel` with files for `architecture` (those files only).
    The running release counts even when no longer on the channel (IncusOS does the same:
    a machine on a channel that was emptied does not see a downgrade offered)."""
    for release in releases:
        if channel and channel not in release.channels and release.version != running:
            continue
        files = tuple(f for f in release.files if f.architecture in ("", architecture))
        if files:
            return Release(
                release.version,
                release.channels,
                files,
                release.severity,
                release.published_at,
                release.url,
            )
    return None


@dataclass(frozen=True, slots=True)
class Step:
    """One thing to download and hand on: `kind` is secureboot, application or os."""

    kind: str
    name: str
    version: str
    files: tuple[UpdateFile, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...]  # in order: Secure Boot certificates, applications, the OS
    refused: tuple[str, ...]  # why an offered update was not taken (a downgrade)


def _judge(kind: str, name: str, offered: str, installed: str) -> tuple[bool, str | None]:
    """Take it?, and the refusal to report when an offer is older than what we run."""
    if not installed:
        return True, None
    if compare_versions(offered, installed) == 0:  # the same, or spelled otherwise (0.1.00)
        return False, None
    if not is_newer(offered, installed):
        what = "the OS" if kind == "os" else f"{name}" if name else kind
        return False, (
            f"refusing to downgrade {what} from {installed} to {offered} "
            "(the provider offers an older version)"
        )
    return True, None


def plan(
    release: Release | None,
    *,
    os_version: str,
    staged_os: str = "",
    secureboot_version: str = "",
    applications: Mapping[str, str] | None = None,
    os_only: bool = False,
    secureboot: bool = True,
) -> Plan:
    """What to fetch from `release`, in IncusOS's order: Secure Boot certificates, then
    the applications (name -> installed version, "" when not yet installed), then the OS.
    `staged_os` is a version already downloaded and handed on (waiting for a reboot)."""
    if release is None:
        return Plan((), ())
    steps: list[Step] = []
    refused: list[str] = []

    def consider(kind: str, name: str, installed: str, files: tuple[UpdateFile, ...]) -> None:
        if not files:
            return
        take, why = _judge(kind, name, release.version, installed)
        if why:
            refused.append(why)
        if take:
            steps.append(Step(kind, name, release.version, files))

    if not os_only and secureboot:
        sb = tuple(f for f in release.files if f.type == SECUREBOOT_TYPE)
        consider("secureboot", "", secureboot_version, sb)
    if not os_only:
        for name, installed in sorted((applications or {}).items()):
            wanted = (f"{name}.raw.gz", f"{name}.raw")
            files = tuple(
                f for f in release.files if f.type == APPLICATION_TYPE and f.basename in wanted
            )
            consider("application", name, installed, files[:1])
    os_files = tuple(f for f in release.files if f.component == "os" and f.type in OS_TYPES)
    if os_files and release.version != staged_os:
        consider("os", "", os_version, os_files)
    return Plan(tuple(steps), tuple(refused))
