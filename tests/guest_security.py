"""Probe part, in the VM guest: the security HAL on a real kernel, TPM and systemd.

expect["security"]: {"label": "secureboot" | "setup-mode", "serial": NVMe controller serial
(four blank namespaces), "key": the volumes' first passphrase}.

Boot 1 (Secure Boot on): three LUKS2 volumes, formatted by the HAL, each with a recovery key
(the HAL's, systemd's modhex format):
  seca: TPM token enrolled by the HAL, PCR 7 as now + PCR 15 zero;
  secb: TPM token enrolled by systemd-cryptenroll, PCR 7;
  secc: TPM token enrolled by the HAL, PCR 7 *predicted* from this boot's event log for the
        firmware with its keys cleared (setup mode) + PCR 15 zero;
  secd: bound to a signing key over PCR 11 (no PCR by value), by the HAL and by
        systemd-cryptenroll --tpm2-public-key; the signature document (the HAL signs PCR 11
        as it is) in /var/lib/ihal-test, named by crypttab's tpm2-signature=.
crypttab (rendered by the HAL) names all four, `tpm2-device=auto,headless=true,nofail`.
Then, this boot: systemd-cryptsetup (through crypttab units) unlocks seca; the HAL unlocks
secb (systemd's token); cryptsetup's systemd token plugin reads seca; secc stays sealed.
Boot 2 (setup mode, PCR 7 changed): systemd unlocked secc and secd at boot with no
passphrase; seca and secb stayed locked; the recovery key opens seca. Then tpm-rebind
re-seals seca and secb, and systemd opens them without a passphrase.
"""

import base64
import json
import os
import subprocess
from pathlib import Path

from guest_lib import crashed, nvme_namespace, sh

NAMES = ("seca", "secb", "secc", "secd")
KEYS = Path("/var/lib/ihal-test")
TCTI = "device:/dev/tpmrm0"
SIGNATURE = KEYS / "pcr-signature.json"


def devices(serial: str) -> dict:
    return {name: nvme_namespace(serial, i) for i, name in enumerate(NAMES, 1)}


def unit_state(name: str) -> dict:
    unit = f"systemd-cryptsetup@{name}.service"
    # Key=value, by name: systemctl prints properties in its own order, not the asked one.
    shown = sh("systemctl", "show", "-p", "ActiveState", "-p", "Result", unit)
    props = dict(line.partition("=")[::2] for line in shown["out"].splitlines())
    return {
        "active": props.get("ActiveState", ""),
        "result": props.get("Result", ""),
        "mapped": Path(f"/dev/mapper/{name}").exists(),
    }


def token_of(device: str, kind: str) -> dict:
    dumped = sh("cryptsetup", "luksDump", "--dump-json-metadata", device)
    tokens = json.loads(dumped["out"]).get("tokens", {})
    return next((t for t in tokens.values() if t["type"] == kind), {})


def first_boot(spec: dict, devs: dict, out: dict) -> None:
    from incusos_hal.hal import eventlog, luks, tpm
    from incusos_hal.render import crypttab

    key = spec["key"].encode()
    fast = luks.Pbkdf(type="pbkdf2", hash="sha256", iterations=1000)
    KEYS.mkdir(parents=True, exist_ok=True)
    uuids = {}
    for name, dev in devs.items():
        uuids[name] = luks.format_volume(dev, key, pbkdf=fast)
        recovery, _ = luks.enroll_recovery_key(dev, key)
        luks.write_key_file(KEYS / f"{name}.recovery", recovery)
    out["recovery_key_example"] = (KEYS / "seca.recovery").read_text()
    out["recovery_key_mode"] = oct((KEYS / "seca.recovery").stat().st_mode & 0o777)
    log = eventlog.read("/")
    cleared = {"SecureBoot": b"\0", "PK": b"", "KEK": b"", "db": b"", "dbx": b""}
    predicted = eventlog.predict_pcr7(log, "sha256", cleared, authorities=[])
    out["predicted_setup_mode_pcr7"] = predicted.hex()
    with tpm.open_tpm(TCTI) as t:
        now = t.pcr_read("sha256", [7, 15])
        out["pcr7"] = now[7].hex()
        luks.enroll_tpm2(devs["seca"], key, t, tpm.PCRPolicy("sha256", {7: now[7], 15: bytes(32)}))
        luks.enroll_tpm2(
            devs["secc"], key, t, tpm.PCRPolicy("sha256", {7: predicted, 15: bytes(32)})
        )
    enrolled = subprocess.run(
        ["systemd-cryptenroll", "--tpm2-device=auto", "--tpm2-pcrs=7", devs["secb"]],
        env=dict(os.environ, PASSWORD=spec["key"]),
        capture_output=True,
        text=True,
    )
    out["cryptenroll"] = {"rc": enrolled.returncode, "err": enrolled.stderr[-2000:]}
    out["tokens"] = {name: token_of(dev, "systemd-tpm2") for name, dev in devs.items()}
    out["recovery_tokens"] = {name: token_of(dev, "systemd-recovery") for name, dev in devs.items()}

    # Ours reads systemd's: the HAL unseals secb's token and the passphrase opens it.
    with tpm.open_tpm(TCTI) as t:
        try:
            slot, _ = luks.unlock_tpm2(devs["secb"], t)
            out["hal_unlocks_systemd_token"] = {"ok": True, "slot": slot}
        except Exception as e:
            out["hal_unlocks_systemd_token"] = {"ok": False, "error": str(e)}
        try:
            luks.unlock_tpm2(devs["secc"], t)
            out["predicted_unlocks_now"] = True
        except luks.WrongKeyError:
            out["predicted_unlocks_now"] = False
    # systemd's token plugin for libcryptsetup reads ours.
    plugin = sh(
        "cryptsetup",
        "open",
        "--test-passphrase",
        "--token-only",
        "--token-type",
        "systemd-tpm2",
        devs["seca"],
    )
    out["token_plugin_opens_ours"] = plugin["rc"] == 0
    out["token_plugin"] = plugin

    signed_boot(spec, devs, out)

    Path("/etc/crypttab").write_text(
        crypttab.render(
            [
                crypttab.CryptVolume(
                    name,
                    f"UUID={uuids[name]}",
                    nofail=True,
                    tpm2_signature=str(SIGNATURE) if name == "secd" else "",
                )
                for name in NAMES
            ]
        )
    )
    out["crypttab"] = Path("/etc/crypttab").read_text()
    # systemd itself, through the units systemd-cryptsetup-generator makes of crypttab.
    sh("systemctl", "daemon-reload")
    for name in ("seca", "secb", "secd"):
        started = sh("systemctl", "start", f"systemd-cryptsetup@{name}.service", timeout=300)
        out[f"start_{name}"] = {"rc": started["rc"], **unit_state(name)}
        sh("systemctl", "stop", f"systemd-cryptsetup@{name}.service", timeout=120)
    out["journal_seca"] = sh(
        "journalctl", "-b", "-o", "cat", "-u", "systemd-cryptsetup@seca.service"
    )["out"][-3000:]


def signed_boot(spec: dict, devs: dict, out: dict) -> None:
    """secd: the HAL's signed token and systemd-cryptenroll's, each unsealed by the other."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from incusos_hal.hal import luks, pcrsig, tpm

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (KEYS / "pcr-public.pem").write_bytes(public)
    signer = pcrsig.signer(public)
    with tpm.open_tpm(TCTI) as t:
        pcr11 = t.pcr_read("sha256", [11])[11]
        policy = tpm.policy_pcr_digest(tpm.PCRPolicy("sha256", {11: pcr11}))
        document = pcrsig.render_signatures([pcrsig.sign(private, "sha256", [11], policy)])
    SIGNATURE.write_text(document)
    # Where systemd-stub leaves it on a UKI boot: what the token plugin reads.
    Path(pcrsig.SIGNATURE_PATH).write_text(document)
    out["pcr11"] = pcr11.hex()
    out["signed_policy_candidates"] = [
        pcrsig.policy_authorize_digest(name).hex() for name in signer.names
    ]
    # systemd's first: enrolling a policy hash a token already has is a no-op for
    # systemd-cryptenroll ("already enrolled"), and the HAL's is that same hash.
    enrolled = subprocess.run(
        [
            "systemd-cryptenroll", "--tpm2-device=auto", "--tpm2-pcrs=",
            f"--tpm2-public-key={KEYS / 'pcr-public.pem'}", "--tpm2-public-key-pcrs=11",
            f"--tpm2-signature={SIGNATURE}", devs["secd"],
        ],
        env=dict(os.environ, PASSWORD=spec["key"]),
        capture_output=True,
        text=True,
    )  # fmt: skip
    out["cryptenroll_signed"] = {"rc": enrolled.returncode, "err": enrolled.stderr[-2000:]}
    with tpm.open_tpm(TCTI) as t:
        _, ours = luks.enroll_tpm2(
            devs["secd"], spec["key"].encode(), t, tpm.PCRPolicy("sha256", {}), signer=signer
        )
    out["our_signed_token"] = ours
    header = luks.header(devs["secd"])
    out["signed_tokens"] = {
        str(i): t for i, t in header.tokens.items() if t.get("type") == "systemd-tpm2"
    }
    with tpm.open_tpm(TCTI) as t:
        signatures = pcrsig.load_signatures("/", str(SIGNATURE))
        out["hal_unseals_signed"] = [
            token.id for token, _ in luks.unseal_tpm2_tokens(header, t, signatures)
        ]
        out["hal_unseals_signed_unsigned"] = [
            token.id for token, _ in luks.unseal_tpm2_tokens(header, t, [])
        ]
        # Why a token did not unseal, when one does not: the iterator above skips them.
        errors = {}
        for token_id, raw in header.tokens.items():
            if raw.get("type") != "systemd-tpm2":
                continue
            token = luks.parse_tpm2_token(token_id, raw)
            signed = tpm.SignedPolicy(token.signer, token.signer_pcrs, tuple(signatures))
            try:
                private, public_blob = tpm.split_blob(token.blob)
                t.unseal(private, public_blob, token.bank, token.pcrs, token.srk, signed)
            except Exception as e:
                errors[str(token_id)] = f"{type(e).__name__}: {e}"
        out["signed_unseal_errors"] = errors
    plugin = sh(
        "cryptsetup", "open", "--test-passphrase", "--token-only", "--token-id", str(ours),
        devs["secd"],
    )  # fmt: skip
    out["token_plugin_opens_our_signed"] = plugin


def second_boot(spec: dict, devs: dict, out: dict) -> None:
    from incusos_hal.hal import luks, tpm

    out["at_boot"] = {name: unit_state(name) for name in NAMES}
    out["journal"] = {
        name: sh("journalctl", "-b", "-o", "cat", "-u", f"systemd-cryptsetup@{name}.service")[
            "out"
        ][-2000:]
        for name in NAMES
    }
    with tpm.open_tpm(TCTI) as t:
        pcrs = t.pcr_read("sha256", [7, 11])
        out["pcr7"], out["pcr11"] = pcrs[7].hex(), pcrs[11].hex()
        try:
            luks.unlock_tpm2(devs["seca"], t)
            out["seca_tpm_unlocks"] = True
        except luks.WrongKeyError:
            out["seca_tpm_unlocks"] = False
    recovery = (KEYS / "seca.recovery").read_text()
    try:
        out["recovery_slot"] = luks.open_volume(devs["seca"], "seca", recovery)
        out["recovery_mapped"] = Path("/dev/mapper/seca").exists()
    finally:
        if Path("/dev/mapper/seca").exists():
            luks.close_volume("seca")


def rebind(spec: dict, devs: dict, out: dict) -> None:
    """Boot 2, after the recovery-key boot: the operator's tpm-rebind seals seca (the HAL's
    token) and secb (systemd-cryptenroll's) again to PCR 7 as it is now, leaves secc and
    secd (which the TPM unsealed at boot) alone; then systemd itself opens seca and secb
    through their crypttab units with no passphrase."""
    from incusos_hal.hal import tpm
    from incusos_hal.security import rebind as sec_rebind

    untouched = {name: token_of(devs[name], "systemd-tpm2") for name in ("secc", "secd")}
    with tpm.open_tpm(TCTI) as t:
        done = sec_rebind.tpm_rebind("/", t, [spec["key"]])
    out["rebind"] = {
        "rebound": [[r.volume, list(r.pcrs)] for r in done.rebound],
        "skipped": dict(done.skipped),
    }
    out["rebind_untouched"] = all(
        token_of(devs[name], "systemd-tpm2") == token for name, token in untouched.items()
    )
    out["rebind_tokens"] = {
        name: token_of(devs[name], "systemd-tpm2").get("tpm2-pcrs") for name in NAMES
    }
    for name in ("seca", "secb"):
        started = sh("systemctl", "start", f"systemd-cryptsetup@{name}.service", timeout=300)
        out[f"rebind_start_{name}"] = {"rc": started["rc"], **unit_state(name)}
        out[f"rebind_journal_{name}"] = sh(
            "journalctl", "-b", "-o", "cat", "-u", f"systemd-cryptsetup@{name}.service"
        )["out"][-2000:]
        sh("systemctl", "stop", f"systemd-cryptsetup@{name}.service", timeout=120)
    with tpm.open_tpm(TCTI) as t:
        try:
            sec_rebind.tpm_rebind("/", t, [spec["key"]])
            out["rebind_again"] = "rebound again"
        except sec_rebind.RebindRefused as e:
            out["rebind_again"] = str(e)


def run(expect: dict) -> dict:
    spec = expect["security"]
    out: dict = {"label": spec["label"]}
    try:
        from incusos_hal.hal import eventlog, tpm
        from incusos_hal.security import state as sec_state

        devs = devices(spec["serial"])
        if spec["label"] == "secureboot":
            first_boot(spec, devs, out)
        else:
            second_boot(spec, devs, out)
        log = eventlog.read("/")
        with tpm.open_tpm(TCTI) as t:
            out["replay"] = {
                bank: [m.pcr for m in eventlog.compare(log, bank, t.pcr_read(bank))]
                for bank in ("sha1", "sha256")
            }
            out["state"] = sec_state.security_state("/", t)
        out["eventlog_b64"] = base64.b64encode(
            Path("/sys/kernel/security/tpm0/binary_bios_measurements").read_bytes()
        ).decode()
        if spec["label"] != "secureboot":
            rebind(spec, devs, out)
    except Exception:
        # What was recorded before stays beside the failure record, for its message.
        out.update(crashed(f"security part, {spec['label']} boot"))
    return out
