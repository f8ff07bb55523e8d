"""The API-shaped security view (incusos_hal.security), its configuration (recovery keys,
custom CAs) and crypttab rendering, on recorded firmware trees and a real TPM (swtpm)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from incusos_hal.config import ConfigError, formats, parse_toml
from incusos_hal.config.model import Security
from incusos_hal.hal import devmapper, eventlog, luks, tpm
from incusos_hal.render import crypttab
from incusos_hal.security import rebind, recovery, volumes
from incusos_hal.security import state as sec_state

from conftest import REPO, require_tool

FIXTURES = REPO / "tests/fixtures/security"
FAST = luks.Pbkdf(type="pbkdf2", hash="sha256", iterations=1000)


def machine_root(tmp_path: Path, firmware: str) -> Path:
    """A root with the guest's recorded event log and Secure Boot variables."""
    root = tmp_path / "root"
    shutil.copytree(FIXTURES / firmware / "efivars", root / "sys/firmware/efi/efivars")
    log = root / eventlog.LOG_PATH
    log.parent.mkdir(parents=True)
    shutil.copy(FIXTURES / firmware / "binary_bios_measurements", log)
    return root


def measure(t: tpm.Tpm, root: Path) -> None:
    """Extend the root's event log into the TPM, as the firmware did at boot."""
    for event in eventlog.read(root).events:
        if event.type != eventlog.EV_NO_ACTION:
            t.extend(event.pcr, {"sha256": event.digests["sha256"]})


def test_state_of_a_trusted_machine(tmp_path: Path, swtpm: str) -> None:
    root = machine_root(tmp_path, "secureboot")
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        view = sec_state.security(Security(encryption_recovery_keys=("k" * 20 + "!",)), root, t)
    state = view["state"]
    assert state["tpm_status"] == "ok"
    assert state["secure_boot_enabled"] is True
    assert state["system_state_is_trusted"] is True
    assert state["system_state_status"] == "system state is fully trusted"
    assert state["tpm_public_key"].startswith("-----BEGIN PUBLIC KEY-----")
    assert {c["type"] for c in state["secure_boot_certificates"]} == {"PK", "KEK", "db"}
    assert state["encrypted_volumes"] == []
    assert view["config"] == {"encryption_recovery_keys": ["k" * 20 + "!"]}


def test_pcr_mismatch_and_secure_boot_off(tmp_path: Path, swtpm: str) -> None:
    root = machine_root(tmp_path, "uefi")
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        t.extend(7, {"sha256": bytes(32)})  # measured, but not in the log
        state = sec_state.security_state(root, t)
    assert state["tpm_status"] == "pcr mismatch"
    assert state["secure_boot_enabled"] is False
    assert state["system_state_is_trusted"] is False
    assert "Secure Boot is disabled" in state["system_state_status"]


def test_swtpm_and_no_tpm(tmp_path: Path, swtpm: str) -> None:
    root = machine_root(tmp_path, "secureboot")
    (root / eventlog.LOG_PATH).unlink()
    (root / "boot/swtpm").mkdir(parents=True)
    with tpm.open_tpm(swtpm) as t:
        assert sec_state.tpm_status(root, t) == "swtpm"
    assert sec_state.tpm_status(root, None) == "unavailable"
    trusted, why = sec_state.trust("swtpm", True)
    assert not trusted and why == "using swtpm"


def volume_root(tmp_path: Path) -> tuple[Path, Path, str]:
    """A Secure Boot machine root with one LUKS2 image linked as /dev/disk/by-uuid/UUID and
    mapped (in sysfs) as "data": (root, image, UUID)."""
    root = machine_root(tmp_path, "secureboot")
    links = root / "dev/disk/by-uuid"
    links.mkdir(parents=True)
    volume = tmp_path / "data.img"
    with open(volume, "wb") as f:
        f.truncate(32 << 20)
    uuid = luks.format_volume(volume, b"first passphrase", pbkdf=FAST)
    (links / uuid).symlink_to(volume)
    (root / "etc").mkdir()
    dm = root / "sys/block/dm-0/dm"
    dm.mkdir(parents=True)
    (dm / "name").write_text("data\n")
    return root, volume, uuid


def test_encrypted_volumes_from_crypttab(tmp_path: Path, swtpm: str) -> None:
    root, volume, uuid = volume_root(tmp_path)
    (root / "etc/crypttab").write_text(
        crypttab.render(
            [
                crypttab.CryptVolume("data", f"UUID={uuid}"),
                crypttab.CryptVolume("gone", "/dev/disk/by-uuid/nothing"),
            ]
        )
    )
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        status = sec_state.tpm_status(root, t)
        before = volumes.encrypted_volumes(root, t, status)
        luks.enroll_tpm2(volume, b"first passphrase", t, t.current_policy("sha256", [7]))
        after = volumes.encrypted_volumes(root, t, status)
        t.extend(7, {"sha256": bytes(32)})
        pending = volumes.encrypted_volumes(root, t, "pcr mismatch")
    assert before == [
        {"volume": "data", "state": "unlocked (recovery passphrase)"},
        {"volume": "gone", "state": "locked"},
    ]
    assert after[0] == {"volume": "data", "state": "unlocked (TPM)"}
    assert pending[0] == {"volume": "data", "state": "unlocked (TPM; PCR update pending)"}


def test_signed_volume_state_follows_its_signature_document(tmp_path: Path, swtpm: str) -> None:
    """A volume bound to a signer counts as TPM-unlocked only with a signature for the PCRs
    as they are, read from the document its crypttab line names."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from incusos_hal.hal import pcrsig

    root, volume, uuid = volume_root(tmp_path)
    document = "/var/lib/incusos-hal/pcr-signature.json"
    (root / "etc/crypttab").write_text(
        crypttab.render([crypttab.CryptVolume("data", f"UUID={uuid}", tpm2_signature=document)])
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        luks.enroll_tpm2(
            volume,
            b"first passphrase",
            t,
            tpm.PCRPolicy("sha256", {}),
            signer=pcrsig.signer(public),
        )
        unsigned = volumes.encrypted_volumes(root, t, "ok")
        policy = tpm.policy_pcr_digest(t.current_policy("sha256", [11]))
        path = root / document.lstrip("/")
        path.parent.mkdir(parents=True)
        path.write_text(pcrsig.render_signatures([pcrsig.sign(private, "sha256", [11], policy)]))
        signed = volumes.encrypted_volumes(root, t, "ok")
        path.write_text("{not json")
        broken = volumes.encrypted_volumes(root, t, "ok")
    assert unsigned == [{"volume": "data", "state": "unlocked (recovery passphrase)"}]
    assert signed == [{"volume": "data", "state": "unlocked (TPM)"}]
    assert broken == unsigned


def test_crypttab_lines_systemd_reads() -> None:
    text = crypttab.render(
        [
            crypttab.CryptVolume("root", "PARTLABEL=root-x86-64"),
            crypttab.CryptVolume(
                "data",
                "UUID=0b4c1a2e-1111-4222-8333-444455556666",
                key_file="/var/lib/incusos-hal/keys/data.key",
                nofail=True,
                discard=True,
                timeout_s=30,
            ),
            crypttab.CryptVolume(
                "signed", "PARTLABEL=data", tpm2_signature="/var/lib/incusos-hal/pcrsig.json"
            ),
        ]
    )
    lines = text.splitlines()
    assert lines[0].startswith("#")
    assert lines[1] == "root PARTLABEL=root-x86-64 none luks,tpm2-device=auto,headless=true"
    assert lines[2] == (
        "data UUID=0b4c1a2e-1111-4222-8333-444455556666 /var/lib/incusos-hal/keys/data.key "
        "luks,tpm2-device=auto,headless=true,nofail,discard,x-systemd.device-timeout=30s"
    )
    assert lines[3] == (
        "signed PARTLABEL=data none "
        "luks,tpm2-device=auto,tpm2-signature=/var/lib/incusos-hal/pcrsig.json,headless=true"
    )
    parsed = crypttab.parse_crypttab(text)
    assert [(e.name, e.device, e.key_file) for e in parsed] == [
        ("root", "PARTLABEL=root-x86-64", ""),
        ("data", "UUID=0b4c1a2e-1111-4222-8333-444455556666", "/var/lib/incusos-hal/keys/data.key"),
        ("signed", "PARTLABEL=data", ""),
    ]
    assert volumes.signature_path(parsed[2]) == "/var/lib/incusos-hal/pcrsig.json"
    assert volumes.signature_path(parsed[0]) == "/run/systemd/tpm2-pcr-signature.json"


@pytest.mark.parametrize(
    ("volume", "field"),
    [
        (crypttab.CryptVolume("my vol", "/dev/sda1"), "name"),
        (crypttab.CryptVolume("../x", "/dev/sda1"), "name"),
        (crypttab.CryptVolume("v", "/dev/sda1 nofail"), "device"),
        (crypttab.CryptVolume("v", "/dev/../etc/passwd"), "device"),
        (crypttab.CryptVolume("v", "sda1"), "device"),
        (crypttab.CryptVolume("v", "/dev/sda1", key_file="relative.key"), "key_file"),
        (crypttab.CryptVolume("v", "/dev/sda1", timeout_s=-1), "timeout_s"),
        (crypttab.CryptVolume("v", "/dev/sda1", tpm2_signature="a,b"), "tpm2_signature"),
        (crypttab.CryptVolume("v", "/dev/sda1", tpm2=False), "cannot unlock"),
    ],
)
def test_crypttab_refuses_what_would_change_its_meaning(
    volume: crypttab.CryptVolume, field: str
) -> None:
    with pytest.raises(crypttab.CrypttabError, match=field):
        crypttab.line(volume)


def test_crypttab_names_are_unique() -> None:
    with pytest.raises(crypttab.CrypttabError, match="twice"):
        crypttab.render(
            [crypttab.CryptVolume("a", "/dev/sda1"), crypttab.CryptVolume("a", "/dev/sdb1")]
        )


# -- configuration -------------------------------------------------------------------------


def errors_for(toml: str) -> list[tuple[str, str]]:
    try:
        parse_toml(toml)
    except ConfigError as e:
        return [(f.path, f.message) for f in e.errors]
    return []


def test_recovery_key_rules() -> None:
    secret = "short!"
    keys = [
        secret,
        "aaaaaaaaaaaaaaaaaaaa",
        "abcdefghijklmnopqrst",
        "aaaa!!!!aaaa!!!!",
        "good-key-with-dash-1",
        "good-key-with-dash-1",
    ]
    listed = ", ".join(f'"{k}"' for k in keys)
    toml = f"version = 1\n[security]\nencryption_recovery_keys = [{listed}]\n"
    errors = errors_for(toml)
    assert errors == [
        ("security.encryption_recovery_keys[0]", "must be at least 15 characters long"),
        ("security.encryption_recovery_keys[1]", "must contain at least one special character"),
        ("security.encryption_recovery_keys[2]", "must contain at least one special character"),
        ("security.encryption_recovery_keys[3]", "must contain at least 5 unique characters"),
        ("security.encryption_recovery_keys[5]", "is the same as an earlier key"),
    ]
    assert not any(secret in m or "good-key" in m for _, m in errors)
    assert formats.check_recovery_key(luks.make_recovery_key()) is None
    assert recovery.check_recovery_keys([]) is not None


def test_unknown_security_keys_are_refused() -> None:
    errors = errors_for('version = 1\n[security]\nrecovery_keys = ["x"]\n')
    assert errors and errors[0][0] == "security.recovery_keys"


def test_custom_ca_certificates(tmp_path: Path) -> None:
    require_tool("openssl")

    def make(name: str, *ext: str) -> str:
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                str(tmp_path / f"{name}.key"),
                "-out",
                str(tmp_path / f"{name}.pem"),
                "-days",
                "3",
                "-subj",
                f"/CN={name}",
                *ext,
            ],
            check=True,
            capture_output=True,
        )
        return (tmp_path / f"{name}.pem").read_text()

    ca = make("ca", "-addext", "basicConstraints=critical,CA:TRUE")
    leaf = make("leaf", "-addext", "basicConstraints=critical,CA:FALSE")
    assert formats.check_ca_certificate(ca) is None
    assert (
        formats.check_ca_certificate(leaf) == "is not a CA certificate (basicConstraints CA:FALSE)"
    )
    assert formats.check_ca_certificate(ca + ca) is not None
    broken = ca.replace(ca.splitlines()[3], "A" * len(ca.splitlines()[3]))
    assert formats.check_ca_certificate(broken) == "is not a valid X.509 certificate"
    assert [
        p
        for p, _ in errors_for('version = 1\n[security]\ncustom_ca_certs = ["""' + leaf + '"""]\n')
    ] == ["security.custom_ca_certs[0]"]
    assert errors_for('version = 1\n[security]\ncustom_ca_certs = ["""' + ca + '"""]\n') == []


def two_volumes(tmp_path: Path, first_key: str) -> tuple[Path, list[Path]]:
    """A root whose crypttab names two LUKS2 images, each opening with `first_key`."""
    root = tmp_path / "root"
    links = root / "dev/disk/by-uuid"
    links.mkdir(parents=True)
    (root / "etc").mkdir()
    images, volumes = [], []
    for name in ("alpha", "beta"):
        image = tmp_path / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(32 << 20)
        uuid = luks.format_volume(image, first_key.encode(), pbkdf=FAST)
        (links / uuid).symlink_to(image)
        images.append(image)
        volumes.append(crypttab.CryptVolume(name, f"UUID={uuid}"))
    (root / "etc/crypttab").write_text(crypttab.render(volumes))
    return root, images


def _mapping(root: Path, dm: str, name: str, uuid: str, under: str) -> None:
    """A device-mapper node as sysfs shows it: dm/name, dm/uuid, its one slave."""
    node = root / "sys/block" / dm
    (node / "dm").mkdir(parents=True)
    (node / "dm/name").write_text(name + "\n")
    (node / "dm/uuid").write_text(uuid + "\n")
    (node / "slaves").mkdir()
    (node / "slaves" / under).symlink_to(f"../../{under}")


def test_gpt_autos_root_and_swap_are_system_volumes(tmp_path: Path) -> None:
    """The appliance's root and swap are opened by systemd-gpt-auto-generator, not by
    crypttab: found in device-mapper's sysfs by gpt-auto's names, each on the partition
    under it, and given the recovery keys like crypttab's volumes. A drive the storage
    API encrypted (luks-<id>, keys of its own) and a plain dm-crypt mapping are not."""
    key = "first-recovery-key!"
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    images = {}
    for kname in ("vda4", "vda5", "sdb"):
        image = tmp_path / f"{kname}.img"
        with open(image, "wb") as f:
            f.truncate(32 << 20)
        luks.format_volume(image, key.encode(), pbkdf=FAST)
        (root / "dev" / kname).symlink_to(image)
        images[kname] = image
    _mapping(root, "dm-0", "root", "CRYPT-LUKS2-5e0d0a1b2c3d4e5f-root", "vda4")
    _mapping(root, "dm-1", "swap", "CRYPT-LUKS2-6f1e1b2c3d4e5f60-swap", "vda5")
    _mapping(root, "dm-2", "luks-scsi-0QEMU_disk6", "CRYPT-LUKS2-7a2f-luks-scsi-0QEMU_disk6", "sdb")
    _mapping(root, "dm-3", "usr", "CRYPT-VERITY-8b3a-usr", "vda2")
    _mapping(root, "dm-4", "scratch", "CRYPT-PLAIN-scratch", "vdc")
    assert devmapper.open_luks(root) == {
        "root": "vda4",
        "swap": "vda5",
        "luks-scsi-0QEMU_disk6": "sdb",
    }
    found = volumes.system_volumes(root)
    assert [(v.name, v.device) for v in found] == [("root", "/dev/vda4"), ("swap", "/dev/vda5")]
    # crypttab's line wins for a name it has (same volume, its options).
    (root / "etc").mkdir()
    (root / "etc/crypttab").write_text(
        crypttab.render([crypttab.CryptVolume("root", "PARTLABEL=root-x86-64")])
    )
    names = [(v.name, v.device) for v in volumes.system_volumes(root)]
    assert names == [("root", "PARTLABEL=root-x86-64"), ("swap", "/dev/vda5")]
    (root / "etc/crypttab").unlink()
    new = ["second-recovery-key!"]
    changes = recovery.sync_recovery_keys(root, None, [key], new, pbkdf=FAST)
    assert [c.volume for c in changes] == ["root", "swap"]
    assert luks.opens(images["vda5"], new[0]) and not luks.opens(images["vda5"], key)
    assert luks.opens(images["sdb"], key) and not luks.opens(images["sdb"], new[0])


def test_recovery_keys_follow_the_config_on_every_volume(tmp_path: Path) -> None:
    old = ["first-recovery-key!"]
    root, images = two_volumes(tmp_path, old[0])
    new = ["second-recovery-key!", "third-recovery-key!"]
    changes = recovery.sync_recovery_keys(root, None, old, new, pbkdf=FAST)
    assert [c.volume for c in changes] == ["alpha", "beta"]
    for image in images:
        assert not luks.opens(image, old[0])
        assert luks.opens(image, new[0]) and luks.opens(image, new[1])
    # Nothing to do: nothing changes.
    before = [luks.header(i).keyslots for i in images]
    assert recovery.sync_recovery_keys(root, None, new, new, pbkdf=FAST) == []
    assert [luks.header(i).keyslots for i in images] == before


def test_recovery_keys_unlocked_by_the_tpm_when_no_key_opens(tmp_path: Path, swtpm: str) -> None:
    """A volume opened at boot by its TPM token: the TPM authorises the new key."""
    root, images = two_volumes(tmp_path, "install-time-passphrase!")
    with tpm.open_tpm(swtpm) as t:
        policy = t.current_policy("sha256", [7])
        for image in images:
            luks.enroll_tpm2(image, b"install-time-passphrase!", t, policy)
        recovery.sync_recovery_keys(root, t, [], ["operator-recovery-key!"], pbkdf=FAST)
    for image in images:
        assert luks.opens(image, "operator-recovery-key!")
        assert luks.header(image).token_slots("systemd-tpm2")  # the TPM token stays


def test_recovery_key_change_is_all_or_nothing(tmp_path: Path) -> None:
    old = ["first-recovery-key!"]
    root, images = two_volumes(tmp_path, old[0])
    # The second volume opens with another key only: nothing may change on the first.
    luks.add_key(images[1], old[0], "only-this-one-opens!", pbkdf=FAST)
    slot = luks.test_key(images[1], old[0])
    luks.remove_keyslot(images[1], slot)
    before = [luks.header(i).keyslots for i in images]
    with pytest.raises(recovery.RecoveryKeyError, match="volume beta") as e:
        recovery.sync_recovery_keys(root, None, old, ["second-recovery-key!"], pbkdf=FAST)
    assert "first-recovery-key!" not in str(e.value)
    assert [luks.header(i).keyslots for i in images] == before
    # An addition failing midway (no free keyslot on beta) rolls back alpha's.
    luks.add_key(images[1], "only-this-one-opens!", old[0], pbkdf=FAST)
    for n in range(30):
        try:
            luks.add_key(images[1], old[0], f"filler-key-{n}!", pbkdf=FAST)
        except luks.LuksError:
            break
    alpha_before = luks.header(images[0]).keyslots
    with pytest.raises(recovery.RecoveryKeyError, match="no volume changed"):
        recovery.sync_recovery_keys(root, None, old, ["second-recovery-key!"], pbkdf=FAST)
    assert luks.header(images[0]).keyslots == alpha_before
    assert luks.opens(images[0], old[0]) and not luks.opens(images[0], "second-recovery-key!")


def tpm2_tokens(image: Path) -> list[dict[str, object]]:
    return [t for t in luks.header(image).tokens.values() if t["type"] == luks.TOKEN_TPM2]


def header_bytes(image: Path) -> bytes:
    """The LUKS2 header area (both copies, keyslots): what any change would touch."""
    with open(image, "rb") as f:
        return f.read(16 << 20)


def test_tpm_rebind_reseals_what_the_tpm_no_longer_unseals(tmp_path: Path, swtpm: str) -> None:
    """After a boot that needed the recovery key (PCR 7 changed: new Secure Boot keys), the
    volumes' TPM tokens are sealed again to the PCRs as they are, keeping each token's
    PCR selection; PCR 15 is bound to zero, the value before systemd measures a volume."""
    key = "first-recovery-key!"
    root, (alpha, beta) = two_volumes(tmp_path, key)
    with tpm.open_tpm(swtpm) as t:
        luks.enroll_tpm2(alpha, key, t, t.current_policy("sha256", [7, 15]))
        luks.enroll_tpm2(beta, key, t, t.current_policy("sha256", [7]))
        before = [header_bytes(alpha), header_bytes(beta)]
        with pytest.raises(rebind.RebindRefused, match="unseals every TPM-bound volume"):
            rebind.tpm_rebind(root, t, [key])
        assert [header_bytes(alpha), header_bytes(beta)] == before
        old_slots = [luks.unlock_tpm2(i, t)[0] for i in (alpha, beta)]

        t.extend(7, {"sha256": bytes(range(32))})
        for image in (alpha, beta):
            with pytest.raises(luks.WrongKeyError):
                luks.unlock_tpm2(image, t)
        done = rebind.tpm_rebind(root, t, ["not-this-one-either!", key])
        assert [(r.volume, r.pcrs, r.removed) for r in done.rebound] == [
            ("alpha", (7, 15), (old_slots[0],)),
            ("beta", (7,), (old_slots[1],)),
        ]
        assert done.skipped == {}
        for image, rebound in zip((alpha, beta), done.rebound, strict=True):
            assert luks.unlock_tpm2(image, t)[0] == rebound.keyslot
            assert len(tpm2_tokens(image)) == 1
            assert luks.opens(image, key)  # the recovery key stays
        with pytest.raises(rebind.RebindRefused, match="unseals every"):
            rebind.tpm_rebind(root, t, [key])

        # A volume measured into PCR 15 since (tpm2-measure-pcr=yes): alpha's new token
        # expects PCR 15 at zero, as it will be when systemd opens it at the next boot.
        t.extend(7, {"sha256": bytes(32)})
        t.extend(15, {"sha256": bytes(range(32))})
        done = rebind.tpm_rebind(root, t, [key])
        assert [r.volume for r in done.rebound] == ["alpha", "beta"]
        pcr7 = t.pcr_read("sha256", [7])[7]
        expected = tpm.policy_pcr_digest(tpm.PCRPolicy("sha256", {7: pcr7, 15: bytes(32)}))
        assert tpm2_tokens(alpha)[0]["tpm2-policy-hash"] == expected.hex()
        assert luks.unlock_tpm2(beta, t)[0] == done.rebound[1].keyslot


def test_tpm_rebind_keeps_a_signed_token_signed(tmp_path: Path, swtpm: str) -> None:
    """A token bound to a signing key over PCR 11 and to PCR 7 by value is rebound with the
    same key: it unseals with a signature for PCR 11 as it is, and not without one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from incusos_hal.hal import pcrsig

    key = "first-recovery-key!"
    root, (alpha, beta) = two_volumes(tmp_path, key)
    beta.unlink()  # a disk that is gone: reported, not fatal
    private_key = ec.generate_private_key(ec.SECP256R1())
    private = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    signer = pcrsig.signer(
        private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    document = root / pcrsig.SIGNATURE_PATH.lstrip("/")
    document.parent.mkdir(parents=True)
    with tpm.open_tpm(swtpm) as t:
        luks.enroll_tpm2(alpha, key, t, t.current_policy("sha256", [7]), signer=signer)
        signed = tpm.policy_pcr_digest(t.current_policy("sha256", [11]))
        document.write_text(
            pcrsig.render_signatures([pcrsig.sign(private, "sha256", [11], signed)])
        )
        assert luks.unlock_tpm2(alpha, t, pcrsig.load_signatures(root))
        t.extend(7, {"sha256": bytes(range(32))})
        done = rebind.tpm_rebind(root, t, [key])
        assert [(r.volume, r.pcrs) for r in done.rebound] == [("alpha", (7,))]
        assert list(done.skipped) == ["beta"] and "not present" in done.skipped["beta"]
        (token,) = tpm2_tokens(alpha)
        assert token["tpm2_pubkey_pcrs"] == [11] and token["tpm2-pcrs"] == [7]
        assert luks.unlock_tpm2(alpha, t, pcrsig.load_signatures(root))
        with pytest.raises(luks.WrongKeyError):
            luks.unlock_tpm2(alpha, t, [])


def test_tpm_rebind_refuses_with_nothing_changed(tmp_path: Path, swtpm: str) -> None:
    key = "first-recovery-key!"
    root, (alpha, beta) = two_volumes(tmp_path, key)
    with tpm.open_tpm(swtpm) as t:
        with pytest.raises(rebind.RebindRefused, match="no volume in crypttab is bound"):
            rebind.tpm_rebind(root, t, [key])
        for image in (alpha, beta):
            luks.enroll_tpm2(image, key, t, t.current_policy("sha256", [7]))
        t.extend(7, {"sha256": bytes(range(32))})
        before = [header_bytes(alpha), header_bytes(beta)]
        # No configured key opens beta: refused before alpha is touched, no key echoed.
        with pytest.raises(rebind.RebindRefused, match="volume alpha: none of the") as e:
            rebind.tpm_rebind(root, t, ["some-other-key!!"])
        assert "some-other-key" not in str(e.value)
        assert [header_bytes(alpha), header_bytes(beta)] == before
        # Sealing fails on beta (no free keyslot): alpha's new token is taken back.
        for n in range(40):
            try:
                luks.add_key(beta, key, f"filler-key-{n}!", pbkdf=FAST)
            except luks.LuksError:
                break
        before_headers = [(luks.header(i).keyslots, luks.header(i).tokens) for i in (alpha, beta)]
        with pytest.raises(rebind.RebindError, match=r"volume beta: .*no volume changed"):
            rebind.tpm_rebind(root, t, [key])
        after = [(luks.header(i).keyslots, luks.header(i).tokens) for i in (alpha, beta)]
        assert after == before_headers
        with pytest.raises(luks.WrongKeyError):
            luks.unlock_tpm2(alpha, t)
