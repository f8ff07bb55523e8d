"""Re-sealing the TPM-bound volumes to the next boot's PCR 7 around a Secure Boot variable
update (security.reseal, the update checker's Secure Boot step), on LUKS2 images and a
real TPM (swtpm) whose PCR 7 is the replay of the OVMF guest's recorded event log.

A "reboot" here resets the swtpm (TPM2_Startup after a TPM init, every PCR at zero) and
extends PCR 7 as that firmware would at its next boot: the log's PCR 7 events, each
EV_EFI_VARIABLE_DRIVER_CONFIG event measured from the variable as the root's efivarfs
holds it after the update. That measurement is written out here from the PFP's
definition, not through eventlog.predict_pcr7, so the test checks the prediction rather
than repeating it."""

from __future__ import annotations

import datetime
import hashlib
import socket
import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from incusos_hal.config.model import Config, Security
from incusos_hal.hal import eventlog, luks, tpm
from incusos_hal.hal import secureboot as sb
from incusos_hal.security import reseal
from incusos_hal.security.rebind import RebindError, RebindRefused
from incusos_hal.update import checker
from incusos_hal.update import secureboot as sbupdate
from test_security import FAST, header_bytes, machine_root, measure, tpm2_tokens, two_volumes
from test_update import archive, auth

from conftest import require_tool

KEY = "first-recovery-key!"
OWNER = uuid.UUID("00000000-0000-4000-8000-000000000007")
# NV | BS | RT | TIME_BASED_AUTHENTICATED_WRITE_ACCESS: what efivarfs shows for db.
DB_ATTRIBUTES = 0x27


def reboot(tcti: str, root: Path) -> None:
    """Reset the swtpm (its control channel's INIT, then TPM2_Startup(CLEAR) on the command
    port) and measure PCR 7 as the firmware would from the root's log and efivarfs."""
    require_tool("swtpm_ioctl")
    port = int(tcti.rpartition("port=")[2])
    subprocess.run(["swtpm_ioctl", "--tcp", f"127.0.0.1:{port + 1}", "-i"], check=True)
    startup = struct.pack(">HIIH", 0x8001, 12, 0x144, 0x0000)  # TPM2_Startup(TPM_SU_CLEAR)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(startup)
        response = s.recv(10)
    assert struct.unpack(">HII", response) == (0x8001, 10, 0), response.hex()
    with tpm.open_tpm(tcti) as t:
        assert t.pcr_read("sha256", [7, 15]) == {7: bytes(32), 15: bytes(32)}
        for event in eventlog.read(root).events:
            if event.pcr != 7 or event.type == eventlog.EV_NO_ACTION:
                continue
            digest = event.digests["sha256"]
            if event.type == eventlog.EV_EFI_VARIABLE_DRIVER_CONFIG:
                digest = hashlib.sha256(measured_variable(root, event.data)).digest()
            t.extend(7, {"sha256": digest})


def measured_variable(root: Path, logged: bytes) -> bytes:
    """UEFI_VARIABLE_DATA (PFP 10.4.4: VariableName GUID, UnicodeNameLength,
    VariableDataLength, UnicodeName, VariableData) of the variable a logged event names,
    with the data efivarfs holds now (after its 4 attribute bytes)."""
    guid = uuid.UUID(bytes_le=logged[:16])
    chars = struct.unpack_from("<Q", logged, 16)[0]
    name = logged[32 : 32 + 2 * chars].decode("utf-16-le")
    path = root / sb.EFIVARS / f"{name}-{guid}"
    data = path.read_bytes()[4:] if path.exists() else b""
    return logged[:16] + struct.pack("<QQ", chars, len(data)) + logged[32 : 32 + 2 * chars] + data


def appended_db(root: Path) -> bytes:
    """The db the firmware holds after a signed append of one new entry (what efivarfs
    shows then): the old lists, then the new one."""
    path = root / sb.EFIVARS / f"db-{sb.VARIABLE_GUIDS['db']}"
    new = sb.signature_list("sha256", [(OWNER, hashlib.sha256(b"next db entry").digest())])
    contents = path.read_bytes()[4:] + new
    path.write_bytes(struct.pack("<I", DB_ATTRIBUTES) + contents)
    return contents


def machine(tmp_path: Path) -> tuple[Path, list[Path]]:
    """The Secure Boot guest's root (log, efivars) with two LUKS2 volumes in crypttab."""
    machine_root(tmp_path, "secureboot")
    return two_volumes(tmp_path, KEY)  # in the same root


def test_volumes_resealed_to_the_next_boot_open_after_it(tmp_path: Path, swtpm: str) -> None:
    root, (alpha, beta) = machine(tmp_path)
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        this_boot = t.pcr_read("sha256", [7])[7]
        assert this_boot == eventlog.replay(eventlog.read(root), "sha256")[7]
        luks.enroll_tpm2(alpha, KEY, t, t.current_policy("sha256", [7, 15]))
        luks.enroll_tpm2(beta, KEY, t, t.current_policy("sha256", [7]))
        old = [luks.parse_tpm2_token(0, tpm2_tokens(i)[0]) for i in (alpha, beta)]
        prepared = reseal.prepare(root, t, ["not-this-one-either!", KEY])
        assert prepared is not None and prepared.plan.banks == ("sha256",)
        appended_db(root)
        done = reseal.reseal_for_next_boot(root, t, prepared)
        assert [(r.volume, r.pcrs) for r in done.rebound] == [("alpha", (7, 15)), ("beta", (7,))]
        for image, rebound, token in zip((alpha, beta), done.rebound, old, strict=True):
            assert rebound.removed == (token.keyslot,)
            assert len(tpm2_tokens(image)) == 1
            assert luks.opens(image, KEY)  # the recovery key stays
            with pytest.raises(luks.WrongKeyError):  # sealed to the next boot, not this one
                luks.unlock_tpm2(image, t)
        (predicted,) = reseal.next_boot_pcr7(root, eventlog.read(root), ["sha256"]).values()
        assert predicted[7] != this_boot
        policy = tpm.PCRPolicy("sha256", {7: predicted[7], 15: bytes(32)})
        assert tpm2_tokens(alpha)[0]["tpm2-policy-hash"] == tpm.policy_pcr_digest(policy).hex()

    reboot(swtpm, root)
    with tpm.open_tpm(swtpm) as t:
        assert t.pcr_read("sha256", [7])[7] == predicted[7]
        for image, rebound, token in zip((alpha, beta), done.rebound, old, strict=True):
            assert luks.unlock_tpm2(image, t)[0] == rebound.keyslot
            private, public = tpm.split_blob(token.blob)
            with pytest.raises(tpm.TPMError):  # the old token would have needed the key
                t.unseal(private, public, token.bank, token.pcrs, token.srk)


def test_the_old_token_opens_at_an_unchanged_boot(tmp_path: Path, swtpm: str) -> None:
    """The control for the test above: a reboot with the variables unchanged gives the
    PCR 7 the old token was sealed to, so its failure there is the new db's doing."""
    root, (alpha, _beta) = machine(tmp_path)
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        luks.enroll_tpm2(alpha, KEY, t, t.current_policy("sha256", [7]))
    reboot(swtpm, root)
    with tpm.open_tpm(swtpm) as t:
        assert luks.unlock_tpm2(alpha, t)


def test_refused_before_anything_changes(tmp_path: Path, swtpm: str) -> None:
    root, (alpha, beta) = machine(tmp_path)
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        # Nothing bound to the TPM: nothing to do, no TPM needed.
        assert reseal.prepare(root, None, [KEY]) is None
        assert not reseal.tpm_bound(root)
        for image in (alpha, beta):
            luks.enroll_tpm2(image, KEY, t, t.current_policy("sha256", [7]))
        assert reseal.tpm_bound(root)
        before = [header_bytes(alpha), header_bytes(beta)]
        with pytest.raises(RebindRefused, match="volume alpha: none of the") as e:
            reseal.prepare(root, t, ["some-other-key!!"])
        assert "some-other-key" not in str(e.value)
        with pytest.raises(RebindRefused, match="bound to a TPM, and there is none"):
            reseal.prepare(root, None, [KEY])
        # PCR 7 measured beyond the log: the log predicts nothing.
        t.extend(7, {"sha256": bytes(range(32))})
        with pytest.raises(RebindRefused, match="does not replay to the TPM's PCR 7"):
            reseal.prepare(root, t, [KEY])
        (root / eventlog.LOG_PATH).unlink()
        with pytest.raises(RebindRefused, match="event log cannot be read"):
            reseal.prepare(root, t, [KEY])
        assert [header_bytes(alpha), header_bytes(beta)] == before


def test_a_failed_seal_takes_back_every_new_token(tmp_path: Path, swtpm: str) -> None:
    root, (alpha, beta) = machine(tmp_path)
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        for image in (alpha, beta):
            luks.enroll_tpm2(image, KEY, t, t.current_policy("sha256", [7]))
        prepared = reseal.prepare(root, t, [KEY])
        assert prepared is not None
        for n in range(40):  # no free keyslot on beta
            try:
                luks.add_key(beta, KEY, f"filler-key-{n}!", pbkdf=FAST)
            except luks.LuksError:
                break
        appended_db(root)
        before = [(luks.header(i).keyslots, luks.header(i).tokens) for i in (alpha, beta)]
        with pytest.raises(RebindError, match=r"volume beta: .*no volume changed") as e:
            reseal.reseal_for_next_boot(root, t, prepared)
        assert KEY not in str(e.value)
        assert [(luks.header(i).keyslots, luks.header(i).tokens) for i in (alpha, beta)] == before
        for image in (alpha, beta):  # the old tokens still open this boot
            assert luks.unlock_tpm2(image, t)


# -- the update checker's Secure Boot step ---------------------------------------------------


RELEASED = auth(sb.signature_list("sha256", [(OWNER, hashlib.sha256(b"released").digest())]))


def db_update(tmp_path: Path) -> Path:
    """A release directory with an update-secureboot archive appending one db entry."""
    directory = tmp_path / "release"
    directory.mkdir(parents=True)
    (directory / "secureboot.tar").write_bytes(archive({f"db_{'6' * 64}.auth": RELEASED}))
    return directory


def written(root: Path) -> bool:
    """Was the update written to db (efivarfs: the attributes, then the whole payload)?"""
    return db_file(root).read_bytes()[4 : 4 + len(RELEASED)] == RELEASED


def inputs(root: Path, tcti: str, keys: tuple[str, ...] = (KEY,)) -> checker.Inputs:
    return checker.Inputs(
        Config(security=Security(encryption_recovery_keys=keys)),
        root / "state",
        str(root),
        lambda: datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        tcti=tcti,
    )


def db_file(root: Path) -> Path:
    return root / sb.EFIVARS / f"db-{sb.VARIABLE_GUIDS['db']}"


def test_checker_writes_the_update_and_reseals(tmp_path: Path, swtpm: str) -> None:
    """The whole step: plan, write through the efivarfs layout, re-seal. (A plain file
    takes the write as it is where the firmware would append it; the prediction and the
    reboot both measure what the file holds then, as on a machine.)"""
    root, (alpha, beta) = machine(tmp_path)
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        for image in (alpha, beta):
            luks.enroll_tpm2(image, KEY, t, t.current_policy("sha256", [7]))
    applied, note = checker._secureboot(inputs(root, swtpm), db_update(tmp_path))
    assert applied
    assert note == "TPM-bound volume(s) alpha, beta re-sealed to the next boot's PCR 7"
    assert written(root)
    reboot(swtpm, root)
    with tpm.open_tpm(swtpm) as t:
        for image in (alpha, beta):
            assert luks.unlock_tpm2(image, t)


def test_checker_refuses_the_write_it_could_not_follow(tmp_path: Path, swtpm: str) -> None:
    root, (alpha, beta) = machine(tmp_path)
    db_before = db_file(root).read_bytes()
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        for image in (alpha, beta):
            luks.enroll_tpm2(image, KEY, t, t.current_policy("sha256", [7]))
    before = [header_bytes(alpha), header_bytes(beta)]
    with pytest.raises(sbupdate.BadUpdate, match=r"not writing it: .*none of the") as e:
        checker._secureboot(inputs(root, swtpm, ("wrong-recovery-key!",)), db_update(tmp_path))
    assert "wrong-recovery-key" not in str(e.value)
    with tpm.open_tpm(swtpm) as t:
        t.extend(7, {"sha256": bytes(range(32))})  # the log no longer matches the TPM
    with pytest.raises(sbupdate.BadUpdate, match=r"not writing it: .*does not replay"):
        checker._secureboot(inputs(root, swtpm), db_update(tmp_path / "again"))
    assert db_file(root).read_bytes() == db_before
    assert [header_bytes(alpha), header_bytes(beta)] == before


def test_checker_without_tpm_bound_volumes_only_writes(tmp_path: Path) -> None:
    """No TPM-bound volume: nothing to re-seal, the update is written without a TPM (the
    TCTI names a port nothing listens on)."""
    root, _images = machine(tmp_path)
    applied, note = checker._secureboot(
        inputs(root, "swtpm:host=127.0.0.1,port=9"), db_update(tmp_path)
    )
    assert applied and note == ""
    assert written(root)


def test_checker_reports_a_reseal_that_failed_after_the_write(tmp_path: Path, swtpm: str) -> None:
    root, (alpha, beta) = machine(tmp_path)
    with tpm.open_tpm(swtpm) as t:
        measure(t, root)
        for image in (alpha, beta):
            luks.enroll_tpm2(image, KEY, t, t.current_policy("sha256", [7]))
    for n in range(40):  # no free keyslot on beta: its new token cannot be added
        try:
            luks.add_key(beta, KEY, f"filler-key-{n}!", pbkdf=FAST)
        except luks.LuksError:
            break
    before = [(luks.header(i).keyslots, luks.header(i).tokens) for i in (alpha, beta)]
    applied, note = checker._secureboot(inputs(root, swtpm), db_update(tmp_path))
    assert applied and written(root)  # the firmware has it: the reboot is still needed
    assert note.startswith(
        "the db update was written, but re-sealing the TPM-bound volumes to the next boot's "
        "PCR 7 failed (volume beta: sealing a new TPM token failed"
    )
    assert note.endswith("no volume changed): the next boot needs a recovery key")
    assert KEY not in note
    assert [(luks.header(i).keyslots, luks.header(i).tokens) for i in (alpha, beta)] == before
