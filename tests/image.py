"""The appliance image (mkosi/): built by mkosi 25 in a Debian 13 tools root, booted by
qemu with OVMF Secure Boot enrolled with the build's own test keys and a swtpm TPM.

- `tools_root()`: Debian 13 with mkosi, systemd-ukify, systemd-repart and the file
  system tools, debootstrapped once and cached (nspawn.rootfs, flavor "mkosi-tools").
  The host (Debian 12, systemd 252) has no mkosi 25; mkosi runs inside this root under
  systemd-nspawn, with no tools tree of its own (`ToolsTree=` in mkosi/mkosi.conf).
- `test_keys()`: one RSA key and self-signed certificate, made on first use in the cache
  and never anywhere else: they sign the UKI and systemd-boot (Secure Boot's db), the
  /usr verity root hash (the signature partition) and the expected PCR 11 values (the
  UKI's .pcrsig). Test material only; an image signed with them is a test image.
- `build()`: the image, cached under $INCUSOS_HAL_CACHE/image/<key>, where the key hashes
  every input: the mkosi/ tree, the package's sources (what `meson install` reads), the
  tools root and the recipe below. An interrupted build leaves no usable-looking cache.
- `Machine`: the disk (a copy of the image grown to a machine's size), the firmware's
  variable store (PK, KEK and db: the test certificate) and the TPM state, in a work
  directory, so that they persist across boots as a machine's would.

`ci/image build` prints the cached image's directory (building it when needed).
Heavy: callers hold /work's heavy-job lock (ci/image takes it itself).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nspawn
import vm

REPO = nspawn.REPO
CACHE = nspawn.CACHE / "image"
# Bump when the way the image is built changes outside the hashed inputs.
IMAGE_RECIPE = 1
# debootstrap configures its --include set in an order of its own, which fails for
# Python modules configured before python3 ("possibly the package python3-zstandard is at
# fault", seen here): only the base goes through debootstrap, the tools through apt.
TOOLS_BASE = ("apt", "ca-certificates", "debian-archive-keyring")
TOOLS_PACKAGES = (
    "mkosi",
    "systemd-ukify",
    "systemd-repart",
    "systemd-container",
    "erofs-utils",
    "squashfs-tools",
    "dosfstools",
    "mtools",
    "cryptsetup-bin",
    "openssl",
    "sbsigntool",
    "bubblewrap",
    "python3-pefile",
    "python3-cryptography",
    "kmod",
    "cpio",
    "zstd",
    "e2fsprogs",
    "xz-utils",
    "udev",
    "fdisk",
    "gnupg",
    "sqopv",
    "python3-virt-firmware",
    "efitools",
)
TOOLS_SETUP = f"""
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends {" ".join(TOOLS_PACKAGES)}
apt-get clean
# mkosi 25 or later: bookworm's (nspawn.rootfs falls back to it) is too old for this config.
mkosi --version
mkosi --version | grep -Eq '^mkosi (2[5-9]|[3-9][0-9])'
"""
# What goes into the package as meson installs it (tests/test_install.py keeps meson.build
# listing every module).
PACKAGE_INPUTS = ("meson.build", "meson_options.txt", "src", "units", "generators", "docs")
# Secure Boot's variables take GUIDs for who owns an entry; this one is the test keys'.
OWNER_GUID = "b1a2c3d4-0000-4000-8000-696e63757368"
SOURCE_DATE_EPOCH = "1735689600"  # 2025-01-01: fixed, so two builds can be compared


def _log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def tools_root() -> Path:
    return nspawn.rootfs("mkosi-tools", TOOLS_BASE, setup=TOOLS_SETUP)


def _tree_files(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
        return
    for p in sorted(path.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            yield p


def inputs_key(tools: Path, image_version: str | None = None) -> str:
    """A hash of everything the image of `image_version` (default: meson's) is made from."""
    h = hashlib.sha256()
    made_as = [IMAGE_RECIPE, tools.name, nspawn.MIRROR, SOURCE_DATE_EPOCH]
    h.update(json.dumps([*made_as, image_version or version()]).encode())
    for top in ("mkosi", *PACKAGE_INPUTS):
        for f in _tree_files(REPO / top):
            rel = f.relative_to(REPO).as_posix()
            h.update(f"{rel}\0{f.stat().st_mode & 0o111}\0".encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def test_keys() -> Path:
    """The test signing key and certificate (keys/db.key, keys/db.crt, keys/db.der)."""
    keys = CACHE / "keys"
    if (keys / "db.der").exists():
        return keys
    tmp = CACHE / ".keys.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    nspawn.run(
        [
            "openssl",
            "req",
            "-new",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-days",
            "3650",
            "-subj",
            "/CN=incusos-hal TEST image key (never ship)/",
            "-keyout",
            str(tmp / "db.key"),
            "-out",
            str(tmp / "db.crt"),
        ],
        capture_output=True,
    )
    nspawn.run(
        [
            "openssl",
            "x509",
            "-in",
            str(tmp / "db.crt"),
            "-outform",
            "DER",
            "-out",
            str(tmp / "db.der"),
        ],
        capture_output=True,
    )
    tmp.rename(keys)
    return keys


def tools_run(
    tools: Path, script: str, binds: dict[Path, str], *, timeout: float = 3600, log: Path
) -> None:
    """Run a shell script in the tools root (host network, `binds` read-write)."""
    cmd = [
        "systemd-nspawn",
        "-q",
        "--register=no",
        "--keep-unit",
        "--timezone=off",
        "--resolv-conf=replace-host",
        # No pseudo-terminal: mkosi pages what it prints on one (and waits for a reader).
        "--console=pipe",
        "--capability=all",
        f"--machine=ihal-tools-{secrets.token_hex(3)}",  # not the directory's name
        "-D",
        str(tools),
        *[f"--bind={src}:{dst}" for src, dst in binds.items()],
        "/bin/sh",
        "-ec",
        script,
    ]
    with open(log, "ab") as out:
        proc = subprocess.run(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-6000:]
        raise RuntimeError(f"in the tools root: exit {proc.returncode}; {log}:\n{tail}")


@dataclass(frozen=True)
class Image:
    directory: Path
    key: str

    @property
    def disk(self) -> Path:
        return self.directory / "incusos-hal.raw"

    @property
    def uki(self) -> Path:
        return self.directory / "incusos-hal.efi"

    def usr_partition(self) -> Path:
        parts = sorted(self.directory.glob("incusos-hal.usr-x86-64.*.raw"))
        if not parts:
            raise RuntimeError(f"no split /usr partition in {self.directory}")
        return parts[0]


MKOSI_SCRIPT = """
cd /src/mkosi
mkosi \\
    --source-date-epoch="$SOURCE_DATE_EPOCH" \\
    --seed=5f1a5b8e-1d4c-4b0e-9a43-69686c2d696d \\
    --image-version="$VERSION" --output=incusos-hal \\
    --secure-boot-key=/keys/db.key --secure-boot-certificate=/keys/db.crt \\
    --verity-key=/keys/db.key --verity-certificate=/keys/db.crt \\
    --sign-expected-pcr-key=/keys/db.key --sign-expected-pcr-certificate=/keys/db.crt \\
    --output-directory=/out --cache-directory=/cache --workspace-directory=/var/tmp \\
    --force build
"""


def build(
    *, force: bool = False, out: Path | None = None, image_version: str | None = None
) -> Image:
    """The cached image for the current inputs (built now if there is none, or into
    `out` when given, uncached: the reproducibility check's second build), of
    `image_version` (default: meson's; the update test's is `update_version()`)."""
    tools = tools_root()
    keys = test_keys()
    image_version = image_version or version()
    key = inputs_key(tools, image_version)
    dest = out or CACHE / key
    if out is None and (dest / ".complete").exists() and not force:
        return Image(dest, key)
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out is None and (dest / ".complete").exists() and not force:
            return Image(dest, key)
        tmp = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (CACHE / "mkosi-cache").mkdir(exist_ok=True)
        log = tmp / "build.log"
        _log(f"building the image into {dest} (log {log})")
        started = time.monotonic()
        env = (
            f"export MIRROR={nspawn.MIRROR} SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH}"
            f" VERSION={image_version}\n"
        )
        tools_run(
            tools,
            env + MKOSI_SCRIPT,
            {REPO: "/src", keys: "/keys", tmp: "/out", CACHE / "mkosi-cache": "/cache"},
            log=log,
        )
        (tmp / ".complete").write_text(f"{time.monotonic() - started:.0f}s\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        if out is None:
            # Both versions of the current inputs stay; older builds go.
            current = {CACHE / inputs_key(tools, v) for v in (version(), update_version())}
            for old in CACHE.iterdir():
                keep = (*current, CACHE / "keys", CACHE / "mkosi-cache")
                if old.is_dir() and old not in keep and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
        return Image(dest, key)


def version() -> str:
    for line in (REPO / "meson.build").read_text().splitlines():
        if line.strip().startswith("version:"):
            return line.split("'")[1]
    raise RuntimeError("meson.build names no version")


def update_version() -> str:
    """The version the update test publishes: one point past the image's own (in the
    UAPI order systemd-sysupdate and the checker use, 0.1.0.1 is newer than 0.1.0)."""
    return f"{version()}.1"


# The OS update's files as the checker hands them to systemd-sysupdate (sysupdate/*.
# transfer: IMAGE_ID_VERSION.efi, IMAGE_ID_VERSION.usr-ARCH[-verity[-sig]].UUID.raw), each
# gzipped as IncusOS publishes them, with the index type it is listed under.
UPDATE_FILES = (
    ("update-efi", "{id}_{v}.efi", "incusos-hal.efi"),
    ("update-usr", "{id}_{v}.usr-x86-64.{uuid}.raw", "incusos-hal.usr-x86-64.*.raw"),
    (
        "update-usr-verity",
        "{id}_{v}.usr-x86-64-verity.{uuid}.raw",
        "incusos-hal.usr-x86-64-verity.*.raw",
    ),
    (
        "update-usr-verity-signature",
        "{id}_{v}.usr-x86-64-verity-sig.{uuid}.raw",
        "incusos-hal.usr-x86-64-verity-sig.*.raw",
    ),
)


def update_payload(built: Image, image_version: str) -> list[tuple[str, str, Path]]:
    """(index type, file name, gzipped file) for each OS file of `built`, the image of
    `image_version`: made once into its directory (gzip of the 1 GiB /usr takes a while)."""
    import gzip

    out = built.directory / "update"
    out.mkdir(exist_ok=True)
    files = []
    for kind, pattern, glob in UPDATE_FILES:
        matches = sorted(built.directory.glob(glob))
        if len(matches) != 1:
            raise RuntimeError(f"{built.directory}: {glob} matches {len(matches)} files")
        source = matches[0]
        uuid = source.name.split(".")[-2] if source.suffix == ".raw" else ""
        name = pattern.format(id="incusos-hal", v=image_version, uuid=uuid) + ".gz"
        gz = out / name
        if not gz.exists():
            part = gz.with_name(gz.name + ".part")
            with open(source, "rb") as src, gzip.GzipFile(part, "wb", 1, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 4 << 20)
            part.rename(gz)
        files.append((kind, name, gz))
    return files


def enrolled_vars(keys: Path, dest: Path, tools: Path, *, secure_boot: bool = True) -> None:
    """OVMF's empty variable store with the test certificate as PK, KEK and db, and
    Secure Boot on (virt-fw-vars, from the tools root)."""
    work = dest.parent
    shutil.copy(vm.OVMF / "OVMF_VARS_4M.fd", work / "vars-empty.fd")
    script = (
        "virt-fw-vars --input /work/vars-empty.fd --output /work/vars-new.fd"
        f" --set-pk {OWNER_GUID} /keys/db.crt --add-kek {OWNER_GUID} /keys/db.crt"
        f" --add-db {OWNER_GUID} /keys/db.crt" + (" --secure-boot" if secure_boot else "")
    )
    tools_run(tools, script, {work: "/work", keys: "/keys"}, log=work / "vars.log", timeout=120)
    (work / "vars-new.fd").rename(dest)
    (work / "vars-empty.fd").unlink()


# A unit's start gets 10 min too: with two emulated machines on two cores the guest's
# kernel saw soft lockups of 20 s, and systemd-sysctl.service (a oneshot, 90 s by
# default) failed at its time limit on a boot that was merely slow.
SLOW_MACHINE_CMDLINE = (
    "systemd.default_device_timeout_sec=900 systemd.default_timeout_start_sec=600"
)
NIC_MAC = "52:54:00:12:34:56"  # the machine's one NIC, on qemu's user network
GUEST_ADDRESS = "10.0.2.15"  # what qemu's DHCP server gives it


@dataclass
class Machine:
    """One machine booting the image: its disk, firmware variables and TPM in `work`."""

    work: Path
    image: Image
    # The image, slot B, root (where an update of 1.2 GiB is downloaded and expanded), swap,
    # local-data: a sparse file.
    disk_mib: int = 10240
    memory_mb: int = 2048
    cpus: int = 2
    api_port: int = 0  # host port forwarded to the guest's 8443 (0: no network)
    credentials: dict[str, str] | None = None

    @property
    def disk(self) -> Path:
        return self.work / "disk.raw"

    @property
    def vars(self) -> Path:
        return self.work / "efivars.fd"

    def reset(self) -> None:
        """As new: no disk, firmware variables or TPM state (made again on the next boot)."""
        self.disk.unlink(missing_ok=True)
        self.vars.unlink(missing_ok=True)
        shutil.rmtree(self.work / "tpm", ignore_errors=True)

    def prepare(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        if not self.disk.exists():
            shutil.copy(self.image.disk, self.disk)
            with open(self.disk, "r+b") as f:
                f.truncate(self.disk_mib * 1024 * 1024)
        if not self.vars.exists():
            enrolled_vars(test_keys(), self.vars, tools_root())

    def command(self, tpm_socket: Path) -> list[str]:
        cmd = [
            "qemu-system-x86_64",
            "-machine",
            "q35,smm=on",
            "-global",
            "driver=cfi.pflash01,property=secure,value=on",
            "-drive",
            f"if=pflash,format=raw,unit=0,file={vm.OVMF_CODE},readonly=on",
            "-drive",
            f"if=pflash,format=raw,unit=1,file={self.vars}",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-nographic",
            "-no-reboot",
            "-drive",
            f"file={self.disk},if=none,id=disk0,format=raw,cache=unsafe",
            "-device",
            "virtio-blk-pci,drive=disk0,bootindex=1",
            "-chardev",
            f"socket,id=tpmchr,path={tpm_socket}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=tpmchr",
            "-device",
            "tpm-crb,tpmdev=tpm0",
        ]
        if self.api_port:
            cmd += [
                "-nic",
                f"user,model=virtio-net-pci,mac={NIC_MAC},"
                f"hostfwd=tcp:127.0.0.1:{self.api_port}-:8443",
            ]
        else:
            cmd += ["-nic", "none"]
        # Under TCG a device can take minutes to appear (the /usr verity device did: the
        # 90 s default ended the first boot in the initrd's emergency mode). systemd-stub
        # appends this to the UKI's command line (measured into PCR 12, which nothing here
        # is bound to); the image itself keeps systemd's default.
        cmd += [
            "-smbios",
            f"type=11,value=io.systemd.stub.kernel-cmdline-extra={SLOW_MACHINE_CMDLINE}",
        ]
        for name, value in (self.credentials or {}).items():
            # qemu's option syntax: a comma in a value is written twice.
            escaped = value.replace(",", ",,")
            cmd += ["-smbios", f"type=11,value=io.systemd.credential:{name}={escaped}"]
        return cmd

    @contextlib.contextmanager
    def running(self, console: Path) -> Iterator[subprocess.Popen[bytes]]:
        """qemu running this machine (its serial console into `console`); killed on exit."""
        self.prepare()
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(vm.swtpm(self.work / "tpm", self.work))
            out = stack.enter_context(open(console, "wb"))
            proc = subprocess.Popen(
                self.command(sock),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                yield proc
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, 9)
                proc.wait()


ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
EFI_CERT_TYPE_PKCS7 = uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7")
# NV | BS | RT | TIME_BASED_AUTHENTICATED_WRITE_ACCESS | APPEND_WRITE: what the update
# writes with (update/secureboot.py), and so what the signature covers.
APPEND_ATTRIBUTES = 0x67


def signed_append(variable: str, vendor: uuid.UUID, lists: bytes, key: Path, cert: Path) -> bytes:
    """An EFI_VARIABLE_AUTHENTICATION_2 appending `lists` to `variable` (UEFI 2.10, 8.2.2),
    signed with the parent variable's key (KEK's for db): a timestamp, then a
    WIN_CERTIFICATE_UEFI_GUID around a detached PKCS#7 of VariableName, VendorGuid,
    Attributes, TimeStamp and the data, as the firmware checks it on the write."""
    import struct

    now = time.gmtime()
    stamp = struct.pack("<HBBBBBBIhBB", now.tm_year, now.tm_mon, now.tm_mday, now.tm_hour,
                        now.tm_min, now.tm_sec, 0, 0, 0, 0, 0)  # fmt: skip
    signed = (
        variable.encode("utf-16-le")
        + vendor.bytes_le
        + struct.pack("<I", APPEND_ATTRIBUTES)
        + stamp
        + lists
    )
    wrapped = subprocess.run(
        ["openssl", "smime", "-sign", "-binary", "-noattr", "-md", "sha256", "-outform", "DER",
         "-signer", str(cert), "-inkey", str(key)],
        input=signed, capture_output=True, check=True,
    ).stdout  # fmt: skip
    # The firmware wants the bare SignedData (EDK2 finds its digest algorithm's OID at a
    # fixed offset, 13, and refuses the write otherwise), not openssl's ContentInfo
    # around it: SEQUENCE { OID signedData, [0] EXPLICIT SignedData }.
    pkcs7 = signed_data(wrapped)
    header = struct.pack("<IHH", 24 + len(pkcs7), 0x0200, 0x0EF1) + EFI_CERT_TYPE_PKCS7.bytes_le
    return stamp + header + pkcs7 + lists


def _der_tlv(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, offset of the value, length of the value) of the DER element at `at`."""
    tag, first = data[at], data[at + 1]
    if first < 0x80:
        return tag, at + 2, first
    n = first & 0x7F
    return tag, at + 2 + n, int.from_bytes(data[at + 2 : at + 2 + n], "big")


def signed_data(content_info: bytes) -> bytes:
    """The SignedData inside a PKCS#7 ContentInfo (DER), as a whole element."""
    tag, value, _ = _der_tlv(content_info, 0)
    if tag != 0x30:
        raise ValueError("not a ContentInfo")
    oid_tag, oid_value, oid_length = _der_tlv(content_info, value)
    if oid_tag != 0x06:
        raise ValueError("ContentInfo without its content type")
    explicit, inner, _ = _der_tlv(content_info, oid_value + oid_length)
    if explicit != 0xA0:
        raise ValueError("ContentInfo without [0] content")
    seq, body, length = _der_tlv(content_info, inner)
    if seq != 0x30:
        raise ValueError("the content is not a SignedData")
    return content_info[inner : body + length]


def esp_offset(disk: Path) -> int:
    """The byte offset of the disk's ESP (sfdisk reads the GPT)."""
    table = json.loads(subprocess.run(
        ["sfdisk", "-J", str(disk)], capture_output=True, text=True, check=True
    ).stdout)["partitiontable"]  # fmt: skip
    sector = int(table.get("sectorsize", 512))
    esp = [p for p in table["partitions"] if p["type"].upper() == ESP_TYPE]
    if len(esp) != 1:
        raise RuntimeError(f"{disk}: {len(esp)} ESPs")
    return int(esp[0]["start"]) * sector


def tamper_uki(disk: Path, work: Path) -> str:
    """Flip one byte in the middle of the UKI's .linux section on the disk's ESP (mtools:
    no mount), so its Authenticode hash no longer matches its signature. Returns the
    UKI's path on the ESP (mtools' `::/EFI/Linux/NAME`)."""
    where = f"{disk}@@{esp_offset(disk)}"
    listing = subprocess.run(
        ["mdir", "-b", "-i", where, "::/EFI/Linux"], capture_output=True, text=True, check=True
    ).stdout.split()
    ukis = [n for n in listing if n.lower().endswith(".efi")]
    if len(ukis) != 1:
        raise RuntimeError(f"{disk}: UKIs on the ESP: {listing}")
    local = work / "tampered.efi"
    subprocess.run(["mcopy", "-n", "-i", where, ukis[0], str(local)], check=True)
    data = bytearray(local.read_bytes())
    start, size = pe_section_range(bytes(data), ".linux")
    data[start + size // 2] ^= 0xFF
    local.write_bytes(bytes(data))
    subprocess.run(["mcopy", "-o", "-i", where, str(local), ukis[0]], check=True)
    return ukis[0]


def pe_section_table(data: bytes) -> dict[str, tuple[int, int, int]]:
    """A PE image's section table: name -> (VirtualSize, SizeOfRawData, PointerToRawData)."""
    import struct

    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if data[pe : pe + 4] != b"PE\0\0":
        raise ValueError("not a PE image")
    count, _, _, _, optional_size = struct.unpack_from("<HIIIH", data, pe + 6)
    table = pe + 24 + optional_size
    out: dict[str, tuple[int, int, int]] = {}
    for i in range(count):
        entry = table + 40 * i
        name = data[entry : entry + 8].rstrip(b"\0").decode()
        virtual_size, _, raw_size, raw_pointer = struct.unpack_from("<IIII", data, entry + 8)
        out[name] = (virtual_size, raw_size, raw_pointer)
    return out


def pe_section_range(data: bytes, name: str) -> tuple[int, int]:
    """(file offset, raw size) of a PE section."""
    _, raw_size, raw_pointer = pe_section_table(data)[name]
    return raw_pointer, raw_size


def pe_sections(data: bytes) -> dict[str, bytes]:
    """A PE image's sections by name, each its VirtualSize bytes of content (what
    systemd-stub measures, and systemd-measure hashes)."""
    return {
        name: data[pointer : pointer + min(virtual, raw)]
        for name, (virtual, raw, pointer) in pe_section_table(data).items()
    }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def reproduce() -> tuple[str, str, list[str]]:
    """Build the image a second time, uncached, from the same inputs; return both /usr
    partitions' SHA-256 and, when they differ, the paths whose contents or metadata
    differ (both file systems extracted with fsck.erofs in the tools root)."""
    first = build()
    second = build(out=CACHE / "reproduce")
    a, b = first.usr_partition(), second.usr_partition()
    ha, hb = file_sha256(a), file_sha256(b)
    if ha == hb:
        return ha, hb, []
    work = CACHE / "reproduce-diff"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    tools_run(
        tools_root(),
        "fsck.erofs --extract=/w/a /a.raw >/dev/null\n"
        "fsck.erofs --extract=/w/b /b.raw >/dev/null\n"
        "cd /w && (diff -rq --no-dereference a b || true) >diff.txt\n"
        "(cd a && find . -printf '%p %m %U %G %T@ %s\\n' | sort) >a.list\n"
        "(cd b && find . -printf '%p %m %U %G %T@ %s\\n' | sort) >b.list\n"
        "(diff a.list b.list || true) >>diff.txt\n",
        {a: "/a.raw", b: "/b.raw", work: "/w"},
        log=work / "extract.log",
        timeout=1200,
    )
    differences = (work / "diff.txt").read_text(errors="replace").splitlines()
    return ha, hb, differences or ["the file systems' contents are equal; the images differ"]


def api_client(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS with this client certificate; the machine's own certificate (self-signed, made
    on its first boot) is not checked here: callers compare its fingerprint."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(cert, key)
    return ctx


def api(port: int, ctx: ssl.SSLContext, path: str, *, data: bytes | None = None) -> Any:
    """The `metadata` of an API answer (POST when `data` is given)."""
    return call(port, ctx, "GET" if data is None else "POST", path, data)["metadata"]


def call(
    port: int,
    ctx: ssl.SSLContext,
    method: str,
    path: str,
    data: bytes | None = None,
    *,
    timeout: float = 120,
) -> dict[str, Any]:
    """The whole answer (Incus's envelope: type, status_code, operation, metadata)."""
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=timeout) as r:
            answer: dict[str, Any] = json.loads(r.read())
            return answer
    except urllib.error.HTTPError as e:
        # The envelope's error says why; urllib's exception alone only has the status.
        raise ApiCallError(f"{method} {path}: {e.code} {e.read()[:4000]!r}", e.code) from None


class ApiCallError(Exception):
    """A non-2xx answer from the guest's API, with the body it came with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def operation(port: int, ctx: ssl.SSLContext, answer: dict[str, Any], limit: float) -> Any:
    """The operation a 202 answer started, waited for (at most `limit` seconds)."""
    assert answer["status_code"] == 100 or answer["type"] == "async", answer
    deadline = time.monotonic() + limit
    while True:
        op = api(port, ctx, f"{answer['operation']}/wait?timeout=55")
        if op["status"] != "Running" or time.monotonic() > deadline:
            return op


def wait_for_api(
    port: int,
    ctx: ssl.SSLContext,
    proc: subprocess.Popen[bytes],
    started: float,
    limit: float,
    stop_on: tuple[Path, re.Pattern[str]] | None = None,
) -> float | None:
    """Seconds from `started` until GET /1.0 answered, or None (qemu ended, `limit`, or
    the console `stop_on[0]` matched `stop_on[1]`: a machine that will not get further)."""
    while time.monotonic() - started < limit and proc.poll() is None:
        try:
            api(port, ctx, "/1.0")
            return time.monotonic() - started
        except (OSError, ApiCallError, ssl.SSLError):
            if stop_on is not None and stop_on[1].search(stop_on[0].read_text(errors="replace")):
                return None
            time.sleep(0.5)
    return None


def power_off(port: int, ctx: ssl.SSLContext, proc: subprocess.Popen[bytes]) -> None:
    api(port, ctx, "/1.0/system/:poweroff", data=b"")
    proc.wait(600)


# Booting without the OS layer, for ci/bench --image: the same image, with the configure
# step skipped by a drop-in and networkd configured by a static default instead, both
# handed over as systemd credentials (systemd.unit-dropin.*, network.network.*).
WITHOUT_OS_LAYER = {
    "systemd.unit-dropin.incusos-hal-configure.service": (
        "[Unit]\nConditionPathExists=/the-os-layer-is-off\n"
    ),
    "network.network.50-default": "[Match]\nType=ether\n[Network]\nDHCP=yes\n",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ci/image", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="verb", required=True)
    b = sub.add_parser("build", help="build (or find cached) the image; print its directory")
    b.add_argument("--force", action="store_true", help="build again even if cached")
    b.add_argument("--out", type=Path, help="build into this directory, uncached")
    b.add_argument(
        "--update", action="store_true", help="the update test's next version (update_version)"
    )
    sub.add_parser("key", help="print the inputs' hash (the cache key)")
    sub.add_parser("reproduce", help="build twice; compare the /usr partitions")
    args = parser.parse_args(argv)
    if args.verb == "key":
        print(inputs_key(tools_root()))
        return 0
    if args.verb == "reproduce":
        ha, hb, differences = reproduce()
        print(f"/usr first build:  {ha}\n/usr second build: {hb}")
        for line in differences[:200]:
            print(f"  {line}")
        return 0 if ha == hb else 1
    image_version = update_version() if args.update else None
    image = build(force=args.force, out=args.out, image_version=image_version)
    print(image.directory)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
