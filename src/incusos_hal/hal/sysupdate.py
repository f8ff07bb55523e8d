"""OS updates written A/B by systemd-sysupdate, and which slot the machine booted.

The transfer definitions this project ships (sysupdate/*.transfer, installed to
/usr/lib/sysupdate.d) name a fixed source directory. `stage()` renders a copy of them
that names the directory a verified download lies in (and, for tests, the disk to
write), and runs `systemd-sysupdate update VERSION` on that copy: the new /usr, its
verity tree and signature go into the partitions the running version does not use
(ProtectVersion=%A), the UKI into the ESP as IMAGE_ID_VERSION+3.efi (boot counting).

`booted()` says what runs: the running /usr's IMAGE_VERSION, the `usrhash=` the kernel
was given, and the boot entry systemd-boot chose (LoaderEntrySelected), with its tries.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..core import tools

SHIPPED_DEFINITIONS = "/usr/lib/sysupdate.d"
SYSUPDATE = "/usr/lib/systemd/systemd-sysupdate"
# Where rendered copies of the definitions go (the service may write /run).
RUNTIME_DIR = "/run/incusos-hal"
# systemd-boot's vendor GUID for its EFI variables (the Boot Loader Interface).
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
# A version as it can stand in a partition label and a UKI's name: the labels are
# IMAGE_ID_VERSION (so no "_"), the UKI IMAGE_ID_VERSION+LEFT-DONE.efi (so no "+"), the
# /usr file IMAGE_ID_VERSION.usr-ARCH.UUID.raw: dots are fine (the image's own version is
# meson's, 0.1.0; systemd-sysupdate reads the version up to the literal after it), but
# not ".usr-" or ".efi" (the UKI's name ends the version at its ".efi"), nor a dot at
# either end. Its length is bounded by the labels: a GPT partition name holds 36 UTF-16
# units, and the longest label is IMAGE_ID_VERSION_verity_sig (`check_version`).
VERSION = re.compile(
    r"(?!.*\.(?:usr-|efi))[0-9A-Za-z](?:[0-9A-Za-z.~^-]{0,34}[0-9A-Za-z~^-])?", re.ASCII
)
LABEL_UNITS = 36
LONGEST_LABEL_SUFFIX = "_verity_sig"
SYSUPDATE_TIMEOUT_SECONDS = 900.0


class SysupdateError(RuntimeError):
    """systemd-sysupdate refused or failed; the message is its own last words."""


def check_version(version: str, field: str = "version", image_id: str | None = None) -> str:
    """`version` when it can stand in every label and file name an update of image
    `image_id` makes (without one: of any image); ValueError naming `field` otherwise.
    Checked before anything is downloaded: systemd-sysupdate refuses a label that is
    too long only after it has emptied the slot it would write (the fallback version)."""
    if not VERSION.fullmatch(version):
        raise ValueError(
            f"{field}: {version!r} is not a version (letters, digits, ~ ^ - and inner dots;"
            " not .usr- or .efi)"
        )
    if image_id:
        room = LABEL_UNITS - len(f"{image_id}_") - len(LONGEST_LABEL_SUFFIX)
        if len(version) > room:
            raise ValueError(
                f"{field}: {version!r} is longer than the {room} characters the partition"
                f" labels of image {image_id} leave a version"
            )
    return version


def image_id(root: str = "/") -> str:
    """The running image's IMAGE_ID (os-release), "" when it has none."""
    base = Path(root)
    release = _os_release(base / "usr/lib/os-release") or _os_release(base / "etc/os-release")
    return release.get("IMAGE_ID", "")


def _check_path(path: str, field: str) -> str:
    """An absolute path that can stand as an INI value: no control characters (a
    newline would start a new setting), no backslash (a line continuation)."""
    if not path.startswith("/") or any(ord(c) < 32 or c in "\\\x7f" for c in path):
        raise ValueError(f"{field}: must be an absolute path without control characters")
    return path


def render_definitions(text: str, source_dir: str, target: str | None = None) -> str:
    """One transfer definition with [Source] Path= set to `source_dir` and, when
    `target` is given, a partition [Target]'s Path=auto set to that block device
    (tests lay out a loop device; the machine's own disk is `auto`). Every other line
    is kept as shipped."""
    source = _check_path(source_dir.rstrip("/") + "/", "source directory")
    device = _check_path(target, "target") if target is not None else None
    out: list[str] = []
    section = ""
    partition_target = re.search(r"(?m)^Type=partition$", text.split("[Target]", 1)[-1])
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped
        elif section == "[Source]" and stripped.startswith("Path="):
            line = f"Path={source}"
        elif (
            section == "[Target]"
            and stripped == "Path=auto"
            and device is not None
            and partition_target
        ):
            line = f"Path={device}"
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True)
class Staged:
    version: str
    # What systemd-sysupdate lists after the update: every version it finds, newest first.
    versions: tuple[str, ...]


def _sysupdate(definitions: Path, *args: str, env: dict[str, str] | None = None) -> str:
    cmd = [SYSUPDATE, f"--definitions={definitions}", "--no-pager", *args]
    proc = tools.run(cmd, timeout=SYSUPDATE_TIMEOUT_SECONDS, error=SysupdateError, env=env)
    if proc.returncode != 0:
        words = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        raise SysupdateError(
            f"systemd-sysupdate {' '.join(args)} failed ({proc.returncode}): " + " / ".join(words)
        )
    return proc.stdout


def list_versions(definitions: Path, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The versions systemd-sysupdate sees, in the sources and on the targets, newest
    first (`list --json=short`: {"all": [...], ...})."""
    out = _sysupdate(definitions, "--json=short", "list", env=env)
    doc = json.loads(out)
    versions = doc.get("all") if isinstance(doc, dict) else None
    if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
        raise SysupdateError(f"systemd-sysupdate list: unexpected answer {out[:200]!r}")
    return tuple(versions)


def stage(
    source_dir: str,
    version: str,
    *,
    shipped: str = SHIPPED_DEFINITIONS,
    target: str | None = None,
    runtime_dir: str = RUNTIME_DIR,
    env: dict[str, str] | None = None,
) -> Staged:
    """Write `version` (its files verified and lying in `source_dir`) into the inactive
    slot. The running slot is never touched (ProtectVersion=%A in every definition);
    a failure leaves the inactive slot as systemd-sysupdate leaves it (a partition it
    was writing is relabelled only once complete, so a half-written one is never booted)."""
    check_version(version, image_id=image_id())
    _check_path(source_dir, "source directory")
    texts = {p.name: p.read_text() for p in sorted(Path(shipped).glob("*.transfer"))}
    if not texts:
        raise SysupdateError(f"no transfer definitions in {shipped}")
    Path(runtime_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix="sysupdate.d.", dir=runtime_dir) as rendered:
        for name, text in texts.items():
            (Path(rendered) / name).write_text(render_definitions(text, source_dir, target))
        _sysupdate(Path(rendered), "update", version, env=env)
        versions = list_versions(Path(rendered), env=env)
    os.sync()  # the ESP consistent if the machine is cut off now
    return Staged(version, versions)


@dataclass(frozen=True, slots=True)
class Booted:
    """What runs: `version` is the running /usr's IMAGE_VERSION; `usr_hash` the root
    hash the kernel was told to verify /usr against; `entry` the UKI systemd-boot
    started, `tries_left`/`tries_done` its boot counter (-1: not counted, i.e. blessed
    or never counted)."""

    version: str
    usr_hash: str
    entry: str
    tries_left: int
    tries_done: int


_ENTRY = re.compile(r"(?P<base>.+?)(?:\+(?P<left>[0-9]+)(?:-(?P<done>[0-9]+))?)?\.efi", re.ASCII)


def parse_entry(entry: str) -> tuple[str, int, int]:
    """A UKI's file name -> (its name without the counter, tries left, tries done)."""
    match = _ENTRY.fullmatch(entry)
    if match is None:
        return entry, -1, -1
    left, done = match["left"], match["done"]
    return (
        match["base"],
        int(left) if left is not None else -1,
        int(done) if done is not None else (0 if left is not None else -1),
    )


def _efi_string(path: Path) -> str:
    """An EFI variable holding a UTF-16LE string (after efivarfs's 4 attribute bytes)."""
    try:
        data = path.read_bytes()[4:]
    except OSError:
        return ""
    return data.decode("utf-16-le", errors="replace").rstrip("\0")


def _os_release(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key):
            out[key] = value.strip().strip("\"'")
    return out


def booted(root: str = "/") -> Booted:
    base = Path(root)
    release = _os_release(base / "usr/lib/os-release") or _os_release(base / "etc/os-release")
    try:
        cmdline = (base / "proc/cmdline").read_text().split()
    except OSError:
        cmdline = []
    usr_hash = next((a.split("=", 1)[1] for a in cmdline if a.startswith("usrhash=")), "")
    entry = _efi_string(base / f"sys/firmware/efi/efivars/LoaderEntrySelected-{LOADER_GUID}")
    _, left, done = parse_entry(entry) if entry else ("", -1, -1)
    return Booted(release.get("IMAGE_VERSION", ""), usr_hash, entry, left, done)
