"""hal.luks on real LUKS2 headers (image files and a loop device), checked against
cryptsetup's own reading of them; the TPM token against swtpm and systemd-cryptenroll.

This host has no device-mapper, so nothing here maps a volume (`cryptsetup open` needs
dm-crypt); unlocking is tested the way `cryptsetup open --test-passphrase` does it. The
VM rung (test_vm_security.py) maps them and lets systemd unlock them at boot.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

from incusos_hal._native import cryptsetup as cs
from incusos_hal.hal import luks, tpm

from conftest import LUKS_KEY, opens, require_root, require_tool

FAST = luks.Pbkdf(type="pbkdf2", hash="sha256", iterations=1000)
KEY = LUKS_KEY


def dump(device: Path) -> dict:
    require_tool("cryptsetup")
    out = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(device)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def test_format_and_header_agree_with_cryptsetup(volume: Path) -> None:
    header = luks.header(volume)
    theirs = dump(volume)
    assert sorted(header.keyslots) == sorted(int(k) for k in theirs["keyslots"])
    assert header.keyslots[0].key_size == theirs["keyslots"]["0"]["key_size"] == 64
    assert header.keyslots[0].pbkdf == "pbkdf2"
    segment = header.segments[0]
    assert segment.encryption == theirs["segments"]["0"]["encryption"] == "aes-xts-plain64"
    assert segment.offset == int(theirs["segments"]["0"]["offset"])
    assert segment.size == "dynamic"
    uuid = subprocess.run(
        ["cryptsetup", "luksUUID", str(volume)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert header.uuid == uuid
    assert opens(volume, KEY)
    assert not opens(volume, b"something else")


def test_keyslots_added_and_removed(volume: Path) -> None:
    slot = luks.add_key(volume, KEY, "second passphrase", pbkdf=FAST)
    assert slot == 1
    assert luks.test_key(volume, "second passphrase") == 1
    assert opens(volume, "second passphrase")
    luks.remove_keyslot(volume, 0)
    assert not opens(volume, KEY)
    assert sorted(luks.header(volume).keyslots) == [1]
    with pytest.raises(luks.LuksError, match="last keyslot"):
        luks.remove_keyslot(volume, 1)
    with pytest.raises(luks.LuksError, match="no such keyslot"):
        luks.remove_keyslot(volume, 5)


def test_wrong_key_changes_nothing_and_is_not_repeated(volume: Path) -> None:
    before = volume.read_bytes()[: 16 << 20]
    secret = "not-the-key-4711"
    with pytest.raises(luks.WrongKeyError) as err:
        luks.add_key(volume, secret, "new key", pbkdf=FAST)
    assert secret not in str(err.value)
    assert volume.read_bytes()[: 16 << 20] == before


def test_key_files(volume: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "data.key"
    luks.write_key_file(key_file, b"\x00binary key\xff" * 4)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    luks.add_key(volume, KEY, luks.read_key_file(key_file), pbkdf=FAST)
    result = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", str(key_file), str(volume)],
        capture_output=True,
    )
    assert result.returncode == 0, result.stderr
    big = tmp_path / "big.key"
    big.write_bytes(b"x" * 10000)
    with pytest.raises(luks.LuksError, match="larger"):
        luks.read_key_file(big)


def test_recovery_key_is_systemds(volume: Path) -> None:
    key, slot = luks.enroll_recovery_key(volume, KEY)
    assert luks.is_recovery_key(key)
    assert re.fullmatch(r"([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}", key)
    assert opens(volume, key)
    tokens = dump(volume)["tokens"]
    assert {"type": "systemd-recovery", "keyslots": [str(slot)]} in tokens.values()
    assert luks.make_recovery_key(bytes(range(32))).startswith("cccbcdce-cfcgchci-")
    assert len({luks.make_recovery_key() for _ in range(10)}) == 10


def test_removing_a_keyslot_drops_its_token(volume: Path) -> None:
    _, slot = luks.enroll_recovery_key(volume, KEY)
    luks.remove_keyslot(volume, slot)
    assert not luks.header(volume).tokens
    assert "tokens" not in dump(volume) or not dump(volume)["tokens"]


@pytest.mark.root
def test_loop_device(tmp_path: Path) -> None:
    """The same on a block device, as on a machine's disk."""
    require_root()
    require_tool("losetup")
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        uuid = luks.format_volume(loop, KEY, pbkdf=FAST)
        assert luks.header(loop).uuid == uuid
        assert opens(Path(loop), KEY)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_tpm2_token_is_what_systemd_reads(volume: Path, swtpm: str) -> None:
    with tpm.open_tpm(swtpm) as t:
        slot, token_id = luks.enroll_tpm2(volume, KEY, t, t.current_policy("sha256", [7]))
        assert luks.unlock_tpm2(volume, t)[0] == slot
    token = dump(volume)["tokens"][str(token_id)]
    assert token["type"] == "systemd-tpm2"
    assert token["keyslots"] == [str(slot)]
    assert token["tpm2-pcrs"] == [7]
    assert token["tpm2-pcr-bank"] == "sha256"
    assert re.fullmatch(r"[0-9a-f]{64}", token["tpm2-policy-hash"])
    # The sealed object: TPM2B_PRIVATE then TPM2B_PUBLIC of a keyed-hash object, fixedTPM
    # and fixedParent only, its authPolicy the token's policy hash (as systemd writes it).
    _, public = tpm.split_blob(__import__("base64").b64decode(token["tpm2-blob"]))
    assert public[2:4] == b"\x00\x08" and public[4:6] == b"\x00\x0b"
    assert public[6:10] == b"\x00\x00\x00\x12"
    assert public[12:44].hex() == token["tpm2-policy-hash"]
    # Its keyslot is a fast one: the key has full entropy.
    assert dump(volume)["keyslots"][str(slot)]["kdf"]["type"] == "pbkdf2"


def test_tpm2_token_fails_closed_after_pcr_change(volume: Path, swtpm: str) -> None:
    with tpm.open_tpm(swtpm) as t:
        luks.enroll_tpm2(volume, KEY, t, t.current_policy("sha256", [7]))
        t.extend(7, {"sha256": bytes(range(32))})
        with pytest.raises(luks.WrongKeyError, match="no systemd-tpm2 token"):
            luks.unlock_tpm2(volume, t)


def test_we_unseal_what_systemd_cryptenroll_enrolled(volume: Path, swtpm: str) -> None:
    """systemd-cryptenroll (this host's: systemd 252, a transient primary rather than the
    SRK) enrolls; our HAL unseals it and the passphrase opens the volume."""
    require_tool("systemd-cryptenroll")
    env = dict(os.environ, PASSWORD=KEY.decode())
    result = subprocess.run(
        ["systemd-cryptenroll", f"--tpm2-device={swtpm}", "--tpm2-pcrs=7", str(volume)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with tpm.open_tpm(swtpm) as t:
        slot, passphrase = luks.unlock_tpm2(volume, t)
    assert opens(volume, passphrase)
    assert luks.header(volume).token_slots("systemd-tpm2") == [slot]


def test_failed_enrollment_leaves_the_header_as_it_was(
    volume: Path, swtpm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = dump(volume)

    def broken(*args: object, **kwargs: object) -> int:
        raise luks.LuksError("write token: injected failure")

    monkeypatch.setattr(luks, "_token_set", broken)
    with tpm.open_tpm(swtpm) as t:
        with pytest.raises(luks.LuksError, match="injected"):
            luks.enroll_tpm2(volume, KEY, t, t.current_policy("sha256", [7]))
        with pytest.raises(luks.WrongKeyError):
            luks.enroll_tpm2(volume, b"wrong key", t, t.current_policy("sha256", [7]))
    after = dump(volume)
    assert after["keyslots"].keys() == before["keyslots"].keys()
    assert after.get("tokens", {}) == before.get("tokens", {})


def test_wipe_other_tpm2_replaces_the_old_binding(volume: Path, swtpm: str) -> None:
    with tpm.open_tpm(swtpm) as t:
        old, _ = luks.enroll_tpm2(volume, KEY, t, t.current_policy("sha256", [7]))
        new, _ = luks.enroll_tpm2(
            volume, KEY, t, t.current_policy("sha256", [7]), wipe_other_tpm2=True
        )
    header = luks.header(volume)
    assert header.token_slots("systemd-tpm2") == [new]
    assert old not in header.keyslots


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ({"type": "systemd-tpm2", "keyslots": ["1", "2"]}, "one keyslot"),
        ({"type": "systemd-tpm2", "keyslots": ["x"]}, "one keyslot"),
        ({"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [99]}, "PCR numbers"),
        (
            {"type": "systemd-tpm2", "keyslots": ["1"], "tpm2-pcrs": [7], "tpm2-pcr-bank": "md5"},
            "unknown",
        ),
        (
            {
                "type": "systemd-tpm2",
                "keyslots": ["1"],
                "tpm2-pcrs": [7],
                "tpm2-blob": "!!",
                "tpm2-policy-hash": "00",
            },
            "base64",
        ),
        (
            {
                "type": "systemd-tpm2",
                "keyslots": ["1"],
                "tpm2-pcrs": [7],
                "tpm2-blob": "AAAA",
                "tpm2-policy-hash": "zz",
            },
            "hex",
        ),
    ],
)
def test_malformed_tokens_are_refused(token: dict, message: str) -> None:
    with pytest.raises(luks.LuksError, match=message):
        luks.parse_tpm2_token(0, token)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"keyslots": {"0": 5}}',
        '{"keyslots": {"a": {}}}',
        '{"segments": {"0": {"offset": "x"}}}',
    ],
)
def test_malformed_headers_are_refused(text: str) -> None:
    with pytest.raises(luks.LuksError):
        luks.parse_header(text)


def test_cdef_matches_the_installed_header() -> None:
    """ABI mode trusts our declarations: check the one struct we lay out against
    libcryptsetup.h (libcryptsetup-dev, installed by ci/setup)."""
    header = Path("/usr/include/libcryptsetup.h")
    if not header.exists():
        pytest.fail("needs /usr/include/libcryptsetup.h (libcryptsetup-dev); run ci/setup")
    body = re.search(r"struct crypt_pbkdf_type \{(.*?)\};", header.read_text(), re.S)
    assert body is not None
    theirs = re.findall(r"(\w[\w ]*?\**)\s*(\w+);", re.sub(r"/\*.*?\*/", "", body[1], flags=re.S))
    ours = re.search(r"struct crypt_pbkdf_type \{(.*?)\};", cs.CDEF, re.S)
    assert ours is not None
    assert [(t.strip(), n) for t, n in theirs] == [
        (t.strip(), n) for t, n in re.findall(r"(\w[\w ]*?\**)\s*(\w+);", ours[1])
    ]
