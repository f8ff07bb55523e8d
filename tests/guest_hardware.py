"""Probe part, in the VM guest (stdlib only): records the TPM, firmware, NVMe, multipath
and LUKS state that the VM rung's tests assert on, and copies the raw firmware data
(TCG event log, Secure Boot variables) to /probe/artifacts/<label>/ for fixtures.

expect["hardware"]: {"label": "secureboot", "tpm_handle": "0x81010010",
"luks": {"serial": "...", "nsid": 1, "key": "...", "marker": "..."},
"multipath_wwid": "3500..."}
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from guest_lib import crashed, nvme_namespace, sh

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"
EFI_IMAGE_SECURITY = "d719b2cb-3d3a-4596-a3bc-dad00e67656f"
TPM_ENV = dict(os.environ, TPM2TOOLS_TCTI="device:/dev/tpmrm0")


def efivar(name: str, guid: str) -> bytes | None:
    path = Path(f"/sys/firmware/efi/efivars/{name}-{guid}")
    try:
        return path.read_bytes()[4:]  # the first four bytes are the attributes
    except OSError:
        return None


def tpm(expect: dict, artifacts: Path) -> dict:
    out: dict = {"devices": sorted(p.name for p in Path("/dev").glob("tpm*"))}
    bank = Path("/sys/class/tpm/tpm0/pcr-sha256")
    out["pcr_sha256"] = (
        {p.name: p.read_text().strip() for p in bank.glob("*")} if bank.exists() else {}
    )
    out["pcrread"] = sh("env", "TPM2TOOLS_TCTI=device:/dev/tpmrm0", "tpm2_pcrread", "sha256:7")
    log = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
    if log.exists():
        shutil.copy(log, artifacts / "binary_bios_measurements")
        out["eventlog_bytes"] = (artifacts / "binary_bios_measurements").stat().st_size
    handle = expect.get("tpm_handle")
    if handle:
        tools = ("env", "TPM2TOOLS_TCTI=device:/dev/tpmrm0")
        listed = sh(*tools, "tpm2_getcap", "handles-persistent")
        out["persistent_before"] = listed["out"]
        if handle not in listed["out"]:
            ctx = "/run/ihal-primary.ctx"
            out["createprimary"] = sh(
                *tools, "tpm2_createprimary", "-C", "o", "-G", "ecc", "-c", ctx
            )
            out["evictcontrol"] = sh(*tools, "tpm2_evictcontrol", "-C", "o", "-c", ctx, handle)
        out["persistent_after"] = sh(*tools, "tpm2_getcap", "handles-persistent")["out"]
    return out


def firmware(artifacts: Path) -> dict:
    out: dict = {"efi": Path("/sys/firmware/efi").is_dir()}
    if not out["efi"]:
        return out
    for name in ("SecureBoot", "SetupMode", "AuditMode", "DeployedMode"):
        value = efivar(name, EFI_GLOBAL)
        out[name] = value[0] if value else None
    keys = artifacts / "efivars"
    keys.mkdir(exist_ok=True)
    for name, guid in (
        ("PK", EFI_GLOBAL),
        ("KEK", EFI_GLOBAL),
        ("db", EFI_IMAGE_SECURITY),
        ("dbx", EFI_IMAGE_SECURITY),
        ("SecureBoot", EFI_GLOBAL),
        ("SetupMode", EFI_GLOBAL),
    ):
        src = Path(f"/sys/firmware/efi/efivars/{name}-{guid}")
        if src.exists():
            (keys / src.name).write_bytes(src.read_bytes())
    out["efivars_copied"] = sorted(p.name for p in keys.iterdir())
    out["mokutil"] = sh("mokutil", "--sb-state")
    return out


def nvme() -> dict:
    controllers = {
        p.name: {
            "serial": (p / "serial").read_text().strip(),
            "namespaces": sorted(n.name for n in p.glob("nvme*n*")),
        }
        for p in sorted(Path("/sys/class/nvme").glob("nvme*"))
    }
    listed = sh("nvme", "list", "-o", "json")
    return {
        "sysfs": controllers,
        "list_rc": listed["rc"],
        "list": json.loads(listed["out"]) if listed["rc"] == 0 and listed["out"] else None,
        "list_err": listed["err"],
    }


def multipath(expect: dict) -> dict:
    wwid = expect.get("multipath_wwid", "")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        maps = sh("multipathd", "show", "maps", "json")
        if maps["rc"] == 0 and wwid and wwid in maps["out"]:
            break
        time.sleep(1)
    scsi = {}
    for dev in sorted(Path("/sys/block").glob("sd*")):
        wwid_file = dev / "device/wwid"
        scsi[dev.name] = {
            "wwid": wwid_file.read_text().strip() if wwid_file.exists() else None,
            "udev": sh("udevadm", "info", "--query=property", f"--name=/dev/{dev.name}")["out"],
        }
    return {
        "maps_json": json.loads(maps["out"]) if maps["rc"] == 0 and maps["out"] else None,
        "maps_rc": maps["rc"],
        "maps_err": maps["err"],
        "ll": sh("multipath", "-ll")["out"],
        "scsi": scsi,
    }


def luks(spec: dict) -> dict:
    """A LUKS2 volume on an NVMe namespace: formatted on the first boot; opened on every
    boot, where a marker written through the mapping on the first must read back."""
    dev = nvme_namespace(spec["serial"], spec["nsid"])
    out: dict = {"device": dev, "steps": {}}
    key = spec["key"].encode()
    steps = out["steps"]

    def step(name: str, *cmd: str, stdin: bytes | None = None) -> bool:
        r = subprocess.run(cmd, input=stdin, capture_output=True, check=False)
        steps[name] = {"rc": r.returncode, "err": r.stderr.decode(errors="replace")[-2000:]}
        return r.returncode == 0

    out["was_luks"] = step("isluks", "cryptsetup", "isLuks", "--type", "luks2", dev)
    if not out["was_luks"]:
        # pbkdf2 with few iterations: a test volume under software emulation, not a secret.
        step(
            "format",
            "cryptsetup",
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            "-",
            dev,
            stdin=key,
        )
    if not step("open", "cryptsetup", "open", "--key-file", "-", dev, "ihal-luks", stdin=key):
        return out
    out["mapper"] = Path("/dev/mapper/ihal-luks").exists()
    out["status"] = sh("cryptsetup", "status", "ihal-luks")["out"]
    # The marker goes straight onto the opened volume: what survives is the ciphertext
    # on the namespace, readable only through the mapping.
    marker = spec["marker"].encode()
    with open("/dev/mapper/ihal-luks", "r+b") as volume:
        found = volume.read(len(marker))
        out["marker_before"] = found.decode() if found == marker else None
        if found != marker:
            volume.seek(0)
            volume.write(marker)
            volume.flush()
            os.fsync(volume.fileno())
    step("close", "cryptsetup", "close", "ihal-luks")
    with open(dev, "rb") as raw:
        out["plaintext_on_disk"] = marker in raw.read(64 << 20)
    out["wrong_key_refused"] = not step(
        "open_wrong_key",
        "cryptsetup",
        "open",
        "--test-passphrase",
        "--key-file",
        "-",
        dev,
        stdin=b"not the key",
    )
    return out


def run(expect_all: dict) -> dict:
    expect = expect_all.get("hardware", {})
    artifacts = Path("/probe/artifacts") / expect.get("label", "boot")
    artifacts.mkdir(parents=True, exist_ok=True)
    out: dict = {"kernel": os.uname().release}
    sections = {
        "tpm": lambda: tpm(expect, artifacts),
        "firmware": lambda: firmware(artifacts),
        "nvme": nvme,
        "multipath": lambda: multipath(expect),
    }
    if "luks" in expect:
        sections["luks"] = lambda: luks(expect["luks"])
    for name, section in sections.items():
        try:
            out[name] = section()
        except Exception:
            out[name] = crashed(f"hardware part, {name}")
    out["failed_units"] = sh("systemctl", "list-units", "--failed", "--plain", "--no-legend")["out"]
    return out
