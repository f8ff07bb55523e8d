"""The appliance image (mkosi/, tests/image.py), booted as a user's machine would boot it:
qemu (TCG here) with OVMF Secure Boot enrolled with the build's test keys (PK, KEK, db)
and a swtpm TPM 2.0, from its own disk, with no kernel handed in from outside.

Boot 1 (first boot): systemd-repart lays out root (LUKS2, TPM-bound), swap and local-data;
the config handed over as a credential (listen address, this test's client certificate)
is stored; the API answers over mutual TLS through qemu's forwarded port; Secure Boot is
on, the TPM trusted, root and swap are encrypted volumes and a recovery key was made for
both. Then the update through the API, from an update server on the host publishing
the same inputs built as the next version (signed index, gzipped files) and a Secure
Boot update: a certificate appended to db, signed with the test KEK, which OVMF checks
on the write; root and swap are re-sealed to the PCR 7 the next boot will measure;
systemd-sysupdate writes slot B and the UKI with its boot counter; it powers off through
the API. Boot 2, same disk and TPM, runs the new version from slot B with the new db:
root unlocked by the TPM with no passphrase and no re-enrolment, its PCR 11 the HAL's
prediction for the new UKI, the recovery key and the machine's identity those of first
boot. A factory reset
with a bad seed is refused and changes nothing; one with a network seed clears the TPM,
deletes root, swap and local-data and reboots. Boot 3 is a first boot again, of slot B:
the seed applied, a new recovery key, a new identity; it reboots through the API. Boot 4,
Secure Boot turned off in the firmware (PCR 7 changes): the TPM no longer opens root and
the initrd asks for a passphrase on the console.

Each boot costs minutes under TCG; the build (ci/image build) more on first use. Run
under the machine's heavy-job lock.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import ssl
import subprocess
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.hal import pcrsig, secureboot, sysupdate
from updateserver import GUEST_HOST, PKI, UpdateServer, file_entry, make_pki, release

import image
import vm
from apiserver import free_port, openssl_client_cert

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.image]

BOOT_TIMEOUT = 1500  # seconds from qemu start to the API answering, under TCG and load
# The update check in the guest: 265 MB fetched over TLS, 1.1 GiB expanded and hashed,
# slot B written, all under TCG.
UPDATE_TIMEOUT = 2400
PASSPHRASE_PROMPT = "Please enter passphrase for disk"
DB_OWNER = uuid.UUID("6f1e0b67-4c0d-4a39-9d0a-6e2d1f3c5a70")  # the db entry's owner GUID
RESET_HOSTNAME = "ihal-reset"  # the network seed a factory reset hands the next first boot


# The boots that are run again, once: PID 1 frozen in the generators, or qemu's early
# kernel panic (tests/vm.py says why each is not the image's fault).
RETRIED_BOOT = re.compile(f"{vm.GENERATORS_FROZE.pattern}|{vm.EARLY_PANIC.pattern}", re.S)
# What ends the wait for the API at once: those, or the passphrase prompt (a boot the TPM
# should have unlocked).
STOPS_BOOT = re.compile(f"{RETRIED_BOOT.pattern}|{re.escape(PASSPHRASE_PROMPT)}", re.S)


@contextlib.contextmanager
def _answering(
    machine: image.Machine, port: int, ctx: ssl.SSLContext, console: Path, *, first_boot: bool
) -> Iterator[tuple[Any, float]]:
    """The machine booted, its API answering: (qemu, seconds until it answered). A boot
    whose PID 1 froze running the generators (vm.GENERATORS_FROZE: systemd's own flake
    under TCG) or whose kernel panicked on a stale translation in its first seconds
    (vm.EARLY_PANIC: qemu's, seen on the update boot in a fresh-clone run) is killed at
    once and made again, once; a first boot from a new machine."""
    for attempt in (1, 2):
        with machine.running(console) as proc:
            stop = (console, STOPS_BOOT)
            seconds = image.wait_for_api(port, ctx, proc, time.monotonic(), BOOT_TIMEOUT, stop)
            text = console.read_text(errors="replace")
            if PASSPHRASE_PROMPT in text:  # the TPM did not open root: no use waiting
                pytest.fail(f"the initrd asked for root's passphrase; console:\n{text[-6000:]}")
            if seconds is None and attempt == 1 and RETRIED_BOOT.search(text):
                shutil.copy(console, console.with_suffix(".froze.log"))
            else:
                if seconds is None:
                    pytest.fail(f"the API never answered (qemu exit {proc.poll()}); console:\n"
                                f"{text[-6000:]}")  # fmt: skip
                yield proc, seconds
                return
        if first_boot:
            machine.reset()


# Run in the guest through POST /1.0/debug/:run-script, signed with the image's test key
# (which the firmware's db holds, so the API runs it): what the API does not show.
PROBE_SCRIPT = """#!/bin/sh
echo "pcr11 $(cat /sys/class/tpm/tpm0/pcr-sha256/11)"
echo "pcr7 $(cat /sys/class/tpm/tpm0/pcr-sha256/7)"
# Every partition's GPT label (slot B's three share one: by-partlabel holds it once).
for label in $(lsblk -nro PARTLABEL /dev/vda); do echo "partlabel $label"; done
echo "luks-begin"
cryptsetup luksDump --dump-json-metadata /dev/disk/by-partlabel/root-x86-64
echo  # the JSON ends without a newline
echo "luks-end"
for unit in $(systemctl --failed --plain --no-legend | cut -d' ' -f1); do echo "failed $unit"; done
for unit in $(systemctl --failed --plain --no-legend | cut -d' ' -f1); do
  systemctl status --no-pager --lines=0 "$unit" 2>&1 | sed "s/^/why $unit: /"
  journalctl -b -u "$unit" -n 25 --no-pager -o short-monotonic | sed "s/^/why $unit: /"
done
# The recovery key (RECOVERY_KEY, filled in by _run_probe) opens root and swap.
for part in root-x86-64 swap; do
  if printf '%s' 'RECOVERY_KEY' | cryptsetup open --test-passphrase --key-file=- \
      "/dev/disk/by-partlabel/$part"; then echo "opens $part"; fi
done
echo "findmnt $(findmnt -n -o SOURCE,FSTYPE /usr)"
# gpt-auto mounts the ESP on first access (an automount) and lets it go after 2 idle
# minutes: look inside first, as the update does (CI's probe found it let go).
ls /boot/ /efi/ > /dev/null 2>&1
echo "esp $(findmnt -n -o TARGET,FSTYPE --source /dev/disk/by-partlabel/esp | tr '\n' ' ')"
echo "swaps $(tail -n +2 /proc/swaps | cut -d' ' -f1 | tr '\n' ' ')"
# systemd-gpt-auto-generator mounts the ESP and enables swap; run again to see its verdict.
out=$(mktemp -d)
SYSTEMD_LOG_LEVEL=debug /usr/lib/systemd/system-generators/systemd-gpt-auto-generator \
  "$out" "$out" "$out" 2>&1 | grep -iE "image policy|refusing" | sed "s/^/gptauto /"
"""


def _run_probe(port: int, ctx: ssl.SSLContext, recovery_key: str) -> dict[str, Any]:
    keys = image.test_keys()
    assert re.fullmatch(r"[a-z-]+", recovery_key), "systemd's format: modhex and dashes"
    script = PROBE_SCRIPT.replace("RECOVERY_KEY", recovery_key)
    signed = subprocess.run(
        ["openssl", "smime", "-sign", "-signer", str(keys / "db.crt"), "-inkey",
         str(keys / "db.key")],
        input=script.encode(), capture_output=True, check=True,
    ).stdout  # fmt: skip
    output: str = image.api(port, ctx, "/1.0/debug/:run-script", data=signed)
    lines = output.splitlines()
    start, end = lines.index("luks-begin"), lines.index("luks-end")
    out: dict[str, Any] = {
        "luks": json.loads("\n".join(lines[start + 1 : end])),
        "partlabels": [], "failed": [],
    }  # fmt: skip
    for line in lines[:start] + lines[end + 1 :]:
        key, _, value = line.partition(" ")
        if key in ("partlabel", "failed", "why", "gptauto", "opens"):
            out.setdefault(key + "s" if key == "partlabel" else key, []).append(value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def built() -> image.Image:
    return image.build()


@pytest.fixture(scope="module")
def update_image(built: image.Image) -> image.Image:
    """The same inputs built as the next version (ci/image build --update)."""
    return image.build(image_version=image.update_version())


def _publish_update(
    work: Path, update: image.Image, version: str
) -> tuple[UpdateServer, PKI, str, str]:
    """An update server on the host's loopback publishing `update` as `version` on the
    stable channel, with a Secure Boot update appending a new certificate to db (signed
    with the test KEK, as a vendor's would be): (the server, its test PKI, its URL as the
    guest reaches it, the new db certificate's SHA-256 fingerprint)."""
    (work / "pki").mkdir()
    pki = make_pki(work / "pki")
    server = UpdateServer(pki, host="127.0.0.1")
    files = {name: path.read_bytes() for _, name, path in image.update_payload(update, version)}
    new_key, new_cert = work / "pki" / "db-new.key", work / "pki" / "db-new.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                    "-subj", "/CN=incusos-hal test db (update)", "-keyout", str(new_key),
                    "-out", str(new_cert), "-outform", "DER"],
                   check=True, capture_output=True)  # fmt: skip
    der = new_cert.read_bytes()
    fingerprint = hashlib.sha256(der).hexdigest()
    lists = secureboot.signature_list("x509", [(DB_OWNER, der)])
    keys = image.test_keys()  # the test certificate is PK, KEK and db alike
    auth = image.signed_append(
        "db", secureboot.EFI_IMAGE_SECURITY_DATABASE, lists, keys / "db.key", keys / "db.crt"
    )
    # And a dbx update revoking the certificate the image is signed with, signed as
    # validly (the firmware would take it): the machine must refuse it, or no boot after
    # this one would pass Secure Boot (issue 19's bad input, on the booted image).
    signer = subprocess.run(
        ["openssl", "x509", "-in", str(keys / "db.crt"), "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    revoke = secureboot.signature_list("x509", [(DB_OWNER, signer)])
    dbx_auth = image.signed_append(
        "dbx", secureboot.EFI_IMAGE_SECURITY_DATABASE, revoke, keys / "db.key", keys / "db.crt"
    )
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in (
            (f"db_{fingerprint}.auth", auth),
            (f"dbx_{hashlib.sha256(signer).hexdigest()}.auth", dbx_auth),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    made = release(version, ["stable"], files)
    sb_name = f"incusos-hal_{version}.secureboot.tar"
    made["files"].append(file_entry(sb_name, archive.getvalue(), "os", "update-secureboot"))
    server.publish(pki, [(made, {**files, sb_name: archive.getvalue()})])
    return server, pki, f"https://{GUEST_HOST}:{server.port}", fingerprint


def _security_once_keyed(port: int, ctx: ssl.SSLContext) -> Any:
    """GET /1.0/system/security once first boot's recovery key is there, or after 5 min:
    the service enrolls it in the background after it starts answering (a keyslot's
    PBKDF takes a while under TCG), as IncusOS's tests wait for its "System is ready"."""
    deadline = time.monotonic() + 300
    while True:
        security = image.api(port, ctx, "/1.0/system/security")
        if security["config"]["encryption_recovery_keys"] or time.monotonic() > deadline:
            return security
        time.sleep(3)


def _network_once_addressed(port: int, ctx: ssl.SSLContext) -> Any:
    """GET /1.0/system/network once the NIC has qemu's DHCP address (the default asks no
    link to be online, so the API may answer before the lease), or after 3 minutes."""
    deadline = time.monotonic() + 180
    while True:
        network = image.api(port, ctx, "/1.0/system/network")
        states = network.get("state", {}).get("interfaces", {})
        if any(image.GUEST_ADDRESS in s.get("addresses", []) for s in states.values()):
            return network
        if time.monotonic() > deadline:
            return network
        time.sleep(2)


def _put(port: int, ctx: ssl.SSLContext, path: str, body: dict[str, Any]) -> None:
    # A PUT applies (a daemon-reload, our generator run again): minutes under TCG (seen:
    # the security PUT outlasted 120 s).
    try:
        answer = image.call(port, ctx, "PUT", path, json.dumps(body).encode(), timeout=900)
    except image.ApiCallError as e:
        # The journal of this boot says what failed underneath (a unit the apply started).
        log = image.api(port, ctx, "/1.0/debug/log?entries=120")
        lines = "\n".join(f"{x.get('_SYSTEMD_UNIT', '')}: {x.get('MESSAGE')}" for x in log)
        pytest.fail(f"{e}\njournal:\n{lines}")
    assert answer["status_code"] == 200, answer


def test_image_boots_encrypts_updates_and_answers(
    built: image.Image, update_image: image.Image, tmp_path_factory: Any
) -> None:
    work = tmp_path_factory.mktemp("machine")
    cert, key = openssl_client_cert(work, "tester")
    seeded_cert, seeded_key = openssl_client_cert(work, "seeded")
    config = (
        "[listener]\n"
        'listen_address = "[::]:8443"\n'
        f"trusted_client_certificates = [{json.dumps(cert.read_text())}]\n"
    )
    port = free_port()
    # The API's apply gets the emulated machine's time limit (tests/vm.py), as a drop-in
    # handed over as a systemd credential: the image itself keeps its default.
    credentials = {
        "incusos-hal.config.toml": config,
        "systemd.unit-dropin.incusos-hal.service": vm.TCG_APPLY_DROP_IN,
    }
    machine = image.Machine(work, built, api_port=port, credentials=credentials)
    ctx = image.api_client(cert, key)

    # Boot 1: first boot, then the OS update as an operator makes it: the provider pointed
    # at an update server (on the host, with the test CA trusted for TLS and for the
    # index's signature), a check, slot B written. (One boot for both: a boot costs
    # minutes under TCG, and boot 2's TPM unlock is the one that says more.)
    version, next_version = image.version(), image.update_version()
    server, pki, url, db_added = _publish_update(work, update_image, next_version)
    console = work / "console-1.log"
    try:
        with _answering(machine, port, ctx, console, first_boot=True) as (proc, first):
            security = _security_once_keyed(port, ctx)
            kernel = image.api(port, ctx, "/1.0/debug/kernel")
            events = image.api(port, ctx, "/1.0/debug/secureboot/event-log")
            seed = image.api(port, ctx, "/1.0/debug/seed")
            network = _network_once_addressed(port, ctx)
            probe = _run_probe(port, ctx, security["config"]["encryption_recovery_keys"][0])
            trusted = {"config": {**security["config"], "custom_ca_certs": [pki.ca]}}
            _put(port, ctx, "/1.0/system/security", trusted)
            provider = {"name": "images", "config": {"server_url": url, "update_ca": pki.ca}}
            _put(port, ctx, "/1.0/system/provider", {"config": provider})
            started = image.call(port, ctx, "POST", "/1.0/system/update/:check", b"{}")
            checked = image.operation(port, ctx, started, UPDATE_TIMEOUT)
            staged = image.api(port, ctx, "/1.0/system/update")["state"]
            image.power_off(port, ctx, proc)
    finally:
        server.close()
    # The disk as first boot laid it out: /usr (verity, its signature), root, swap, local-data.
    assert {"seed-data", "root-x86-64", "swap", "local-data"} <= set(probe["partlabels"]), probe
    assert probe["partlabels"].count("_empty") == 3, probe["partlabels"]  # slot B
    # IncusOS's TestIncusOSAPISystemNetworkDefaults on the booted image: the first-boot
    # default (every NIC, dhcp4 and slaac) stored and returned; its state from networkd.
    interfaces = network["config"]["interfaces"]
    assert [i["hwaddr"] for i in interfaces] == [image.NIC_MAC], interfaces
    assert {"dhcp4", "slaac"} <= set(interfaces[0]["addresses"]), interfaces
    live = network["state"]["interfaces"][interfaces[0]["name"]]
    assert live["type"] == "interface" and image.GUEST_ADDRESS in live["addresses"], live
    # The image's own seed-data partition is blank: no seed, and nothing wrong with it.
    assert (seed["applied"], seed["problems"]) == (False, []), seed
    assert probe["findmnt"].startswith("/dev/mapper/usr erofs"), probe["findmnt"]
    assert probe["failed"] == [], "\n".join([*probe["failed"], *probe.get("why", [])])
    # What systemd-gpt-auto-generator made of the disk (checked last, below: the update
    # needs the ESP it mounts, and says so in its own status if it is not there).
    gpt_auto = (probe.get("gptauto", []), probe["esp"], probe["swaps"])
    print(f"first boot: gpt-auto {gpt_auto}")
    # Root's LUKS2 TPM token, as systemd-repart enrolled it: PCR 7 by value, PCR 11 by the
    # UKI's signed policy (its public key), so a new signed UKI needs no re-enrolment.
    tokens = [t for t in probe["luks"]["tokens"].values() if t["type"] == "systemd-tpm2"]
    assert len(tokens) == 1, probe["luks"]["tokens"]
    assert tokens[0]["tpm2-pcrs"] == [7], tokens[0]
    assert tokens[0]["tpm2_pubkey_pcrs"] == [11], tokens[0]
    # PCR 11: the event log's UKI measurements replay to what the HAL predicts from the
    # UKI's sections, and the booted system's PCR 11 is that plus the four boot phases.
    sections = image.pe_sections(built.uki.read_bytes())
    measured = {n: d for n, d in sections.items() if n in pcrsig.UKI_SECTIONS}
    replayed = bytes(32)
    for event in events["event_log"]:
        if event["Index"] == 11:
            replayed = hashlib.sha256(replayed + base64.b64decode(event["Digest"])).digest()
    assert replayed == pcrsig.uki_pcr11(measured)
    phases = ["enter-initrd", "leave-initrd", "sysinit", "ready"]
    assert probe["pcr11"].lower() == pcrsig.uki_pcr11(measured, phases).hex()  # sysfs: upper
    state = security["state"]
    assert state["secure_boot_enabled"] is True, state
    assert state["tpm_status"] == "ok", state
    assert state["system_state_is_trusted"] is True, state
    # Root and swap, both opened by systemd-gpt-auto-generator with their TPM tokens; the
    # first-boot recovery key is enrolled on both (IncusOS's), and opens both.
    volumes = {v["volume"]: v["state"] for v in state["encrypted_volumes"]}
    assert volumes == {"root": "unlocked (TPM)", "swap": "unlocked (TPM)"}, volumes
    keys = security["config"]["encryption_recovery_keys"]
    assert len(keys) == 1 and len(keys[0]) == 71, "one recovery key, systemd's format"
    assert probe.get("opens") == ["root-x86-64", "swap"], probe.get("opens")
    assert state["encryption_recovery_keys_retrieved"] is False
    # The machine's identity key (TPM, persistent): made on first boot, kept after.
    identity = state["tpm_public_key"]
    assert identity.startswith("-----BEGIN PUBLIC KEY-----"), identity
    assert "usrhash=" in json.dumps(kernel), kernel
    assert PASSPHRASE_PROMPT not in console.read_text(errors="replace")
    print(f"first boot: API answered {first:.0f}s after qemu started")
    print(f"update check: {checked['status']}; state {staged}")
    assert checked["status"] == "Success", checked
    # The Secure Boot update first (IncusOS's order): db written through efivarfs (OVMF
    # checked the KEK's signature), root and swap re-sealed to the next boot's PCR 7.
    updated = f"The OS has been updated to version {next_version}; "
    assert staged["status"].startswith(updated), staged
    assert "re-sealed to the next boot's PCR 7" in staged["status"], staged
    # The dbx update revoking the image's own signer: refused, naming what it would
    # revoke (boot 2 booting under Secure Boot shows it was never written).
    assert "refusing dbx update" in staged["status"], staged
    assert "it would revoke the boot image incusos-hal" in staged["status"], staged
    assert "failed" not in staged["status"], staged
    assert staged["needs_reboot"] is True, staged
    assert staged["booted"]["version"] == version, staged

    # Boot 2: systemd-boot picks the new UKI (boot counting), whose usrhash= names slot B;
    # root unlocks with no passphrase and no re-enrolment: PCR 7 is as it was, and the new
    # UKI's PCR 11 policy is signed with the same key.
    console = work / "console-2.log"
    with _answering(machine, port, ctx, console, first_boot=False) as (proc, updated):
        after = image.api(port, ctx, "/1.0/system/update")["state"]
        again = image.api(port, ctx, "/1.0/system/security")
        probe = _run_probe(port, ctx, again["config"]["encryption_recovery_keys"][0])
        # IncusOS's TestIncusOSAPISystemReset: a seed that does not validate is refused
        # before anything is erased; then a reset with a network seed (the machine's own
        # network, named anew), which reboots: qemu (-no-reboot) ends.
        named = {
            "interfaces": [
                {"name": i["name"], "hwaddr": i["hwaddr"], "addresses": ["dhcp4", "slaac"]}
                for i in interfaces
            ],
            "dns": {"hostname": RESET_HOSTNAME},
        }
        bad = {"seeds": {"network": {"version": "1", "interfaces": "not a list"}}}
        try:
            image.api(port, ctx, "/1.0/system/:factory-reset", data=json.dumps(bad).encode())
            bad_status = 200
        except image.ApiCallError as e:
            bad_status = e.status
        still = image.api(port, ctx, "/1.0/system/security")
        # The incus seed's client certificate (as IncusOS's tests give theirs) is how the
        # operator reaches the machine after the reset: boot 3 asks with it.
        seeded_client = {"type": "client", "certificate": seeded_cert.read_text()}
        reset = {
            "seeds": {
                "network": {"version": "1", **named},
                "incus": {"version": "1", "preseed": {"certificates": [seeded_client]}},
            }
        }
        image.api(port, ctx, "/1.0/system/:factory-reset", data=json.dumps(reset).encode())
        proc.wait(600)
    print(f"updated boot: API answered {updated:.0f}s after qemu started; booted {after}")
    assert bad_status == 400, "a bad seed must be refused before anything is erased"
    assert still["config"]["encryption_recovery_keys"] == keys, "the refused reset erased"
    assert "reboot: Restarting system" in console.read_text(errors="replace")
    assert PASSPHRASE_PROMPT not in console.read_text(errors="replace")
    assert after["booted"]["version"] == next_version, after
    # Blessed once booted (systemd-bless-boot): the boot counter is gone from its name.
    assert after["booted"]["entry"] == f"incusos-hal_{next_version}.efi", after
    assert sysupdate.parse_entry(after["booted"]["entry"])[1:] == (-1, -1), after
    assert after["needs_reboot"] is False, after
    secured = again["state"]
    assert (secured["system_state_is_trusted"], secured["tpm_public_key"]) == (True, identity)
    # The db the firmware measured into PCR 7 holds the update's certificate, and the
    # TPM still opened root and swap: the re-seal predicted that PCR 7.
    db = [c["fingerprint"] for c in secured["secure_boot_certificates"] if c["type"] == "db"]
    assert db_added in db, secured["secure_boot_certificates"]
    dbx = [c["fingerprint"] for c in secured["secure_boot_certificates"] if c["type"] == "dbx"]
    assert not set(dbx) & set(db), secured["secure_boot_certificates"]
    assert again["config"]["encryption_recovery_keys"] == keys
    assert probe.get("opens") == ["root-x86-64", "swap"], probe.get("opens")
    labels = probe["partlabels"]
    assert {f"incusos-hal_{version}", f"incusos-hal_{next_version}"} <= set(labels), labels
    assert probe["failed"] == [], "\n".join([*probe["failed"], *probe.get("why", [])])
    new_sections = image.pe_sections(update_image.uki.read_bytes())
    new_measured = {n: d for n, d in new_sections.items() if n in pcrsig.UKI_SECTIONS}
    assert probe["pcr11"].lower() == pcrsig.uki_pcr11(new_measured, phases).hex()

    # systemd-gpt-auto-generator accepted the disk under the image policy on first boot:
    # it mounts the ESP (where an update's UKI goes) and enables the encrypted swap.
    refused, esp, swaps = gpt_auto
    assert refused == [], "\n".join(refused)
    assert esp.split()[:2] in (["/boot", "vfat"], ["/efi", "vfat"]), esp
    assert swaps.strip(), "no swap active"

    # Boot 3: a first boot again, after the factory reset: slot B still runs (only root,
    # swap and local-data went), systemd-repart made them anew under a cleared TPM, the
    # seed the reset wrote applied, and a new recovery key and identity. Then IncusOS's
    # TestIncusOSAPISystemReboot under real systemd: qemu (-no-reboot) ends on :reboot.
    console = work / "console-3.log"
    with _answering(machine, port, ctx, console, first_boot=False) as (proc, afresh):
        reset_security = _security_once_keyed(port, ctx)
        reset_seed = image.api(port, ctx, "/1.0/debug/seed")
        reset_network = image.api(port, ctx, "/1.0/system/network")
        reset_update = image.api(port, ctx, "/1.0/system/update")["state"]
        seeded_ctx = image.api_client(seeded_cert, seeded_key)
        seeded_answer = image.api(port, seeded_ctx, "/1.0/system")
        new_keys = reset_security["config"]["encryption_recovery_keys"]
        probe = _run_probe(port, ctx, new_keys[0] if new_keys else "none")
        image.api(port, ctx, "/1.0/system/:reboot", data=b"")
        proc.wait(600)
    print(f"after the reset: API answered {afresh:.0f}s after qemu started")
    assert "reboot: Restarting system" in console.read_text(errors="replace")
    assert PASSPHRASE_PROMPT not in console.read_text(errors="replace")
    assert (reset_seed["applied"], reset_seed["problems"]) == (True, []), reset_seed
    assert reset_network["config"]["dns"]["hostname"] == RESET_HOSTNAME, reset_network
    assert sorted(reset_seed["files"]) == ["incus.json", "network.json"], reset_seed
    assert "/os/1.0/system/network" in seeded_answer, seeded_answer  # the seed's certificate
    assert reset_update["booted"]["version"] == next_version, reset_update
    assert len(new_keys) == 1 and new_keys != keys, "a new first boot makes a new key"
    state = reset_security["state"]
    # The identity key is derived from the endorsement seed, which TPM2_Clear keeps: the
    # same key after the reset (IncusOS makes a new random one; docs/incusos-differences.md).
    assert state["tpm_public_key"] == identity, "derived from the endorsement seed"
    volumes = {v["volume"]: v["state"] for v in state["encrypted_volumes"]}
    assert volumes == {"root": "unlocked (TPM)", "swap": "unlocked (TPM)"}, volumes
    assert probe.get("opens") == ["root-x86-64", "swap"], probe.get("opens")
    assert probe["failed"] == [], "\n".join([*probe["failed"], *probe.get("why", [])])

    # Boot 4: Secure Boot off (same keys enrolled): PCR 7 differs, the TPM refuses.
    machine.vars.unlink()
    image.enrolled_vars(image.test_keys(), machine.vars, image.tools_root(), secure_boot=False)
    console = work / "console-4.log"
    with machine.running(console) as proc:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if PASSPHRASE_PROMPT in console.read_text(errors="replace"):
                break
            time.sleep(2)
        text = console.read_text(errors="replace")
    assert PASSPHRASE_PROMPT in text, text[-6000:]


# systemd-boot's words when the firmware's LoadImage refuses the UKI (boot.c: "Error
# loading <path>: <EFI status>"; EFI_SECURITY_VIOLATION reads "Security violation", or
# "Access denied" from firmware that answers so).
REFUSED_UKI = re.compile(r"Error loading .*(Security violation|Access denied)", re.I)
KERNEL_STARTED = "Linux version"


def test_a_uki_with_a_bad_signature_does_not_boot(built: image.Image, tmp_path: Path) -> None:
    """The image's disk with one byte of its UKI's kernel flipped on the ESP: Secure Boot
    (the test keys in db) refuses to load it, so no kernel ever starts; the same disk
    untouched is the first test's (it boots)."""
    machine = image.Machine(tmp_path, built)
    machine.prepare()
    uki = image.tamper_uki(machine.disk, tmp_path)
    console = tmp_path / "console.log"
    with machine.running(console) as proc:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            text = console.read_text(errors="replace")
            if REFUSED_UKI.search(text) or KERNEL_STARTED in text:
                break
            time.sleep(2)
        time.sleep(5)  # what follows the refusal, for the record
        text = console.read_text(errors="replace")
    assert REFUSED_UKI.search(text), f"{uki}: no refusal on the console:\n{text[-4000:]}"
    assert KERNEL_STARTED not in text, text[-4000:]
