"""IncusOS's debug area, :suspend, the custom CAs in the system trust store and the
recovery key of a first boot, against a real `incusos-hal serve` (tests/apiserver.py),
driven with curl.

The assertions of IncusOS's own test of the area (lxc/incus-os
incus-osd/tests/incusos_tests/tests_incusos_api_debug.py, TestIncusOSAPIDebug, and
tests_incusos_api_system_security.py, TestIncusOSAPISystemSecurity, at de27173) are
ported where they concern what is built here; the rest checks what IncusOS's code does
(incus-osd/internal/rest/api_debug.go).
"""

from __future__ import annotations

import base64
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from incusos_hal.api.debug import journal_arguments
from incusos_hal.api.service import ApiError
from incusos_hal.hal import eventlog
from incusos_hal.hal import secureboot as sb

import apiserver
from conftest import REPO, require_tool

SECURITY = REPO / "tests/fixtures/security"
SNAKEOIL_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
SNAKEOIL_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
OWNER = uuid.UUID("00000000-0000-4000-8000-000000000002")
TRUST_UNIT = REPO / "units/incusos-hal-trust.service"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require_tool("openssl", "curl")
    return apiserver.openssl_client_cert(tmp_path_factory.mktemp("certs"), "trusted")


def serve(base: Path, client: tuple[Path, Path], root: Path | None = None) -> apiserver.Server:
    base.mkdir(parents=True, exist_ok=True)
    srv = apiserver.make(base, [client[0]])
    srv.root = root
    srv.start()
    return srv


@pytest.fixture
def api(tmp_path: Path, client: tuple[Path, Path]) -> Iterator[apiserver.Server]:
    srv = serve(tmp_path / "api", client)
    try:
        yield srv
    finally:
        srv.stop()


def openssl(*args: str, cwd: Path, input: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *args], cwd=cwd, input=input, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


# -- the list, :suspend ----------------------------------------------------------------------


def test_debug_lists_what_incusos_lists(api: apiserver.Server) -> None:
    """TestIncusOSAPIDebug step 1: five entries, IncusOS's order; behind Incus's /os
    proxy (first X-IncusOS-Proxy value) they keep the client's prefix."""
    r = api.curl("GET", "/1.0/debug")
    assert r.status == 200
    assert r.json["metadata"] == [
        "/1.0/debug/kernel",
        "/1.0/debug/log",
        "/1.0/debug/processes",
        "/1.0/debug/:run-script",
        "/1.0/debug/secureboot",
    ]
    proxied = api.curl("GET", "/1.0/debug/secureboot", "-H", "X-IncusOS-Proxy: /os")
    assert proxied.json["metadata"] == ["/os/1.0/debug/secureboot/event-log"]


def test_suspend_needs_systemd_and_changes_nothing(api: apiserver.Server) -> None:
    """Without systemd (a scratch target) :suspend, like :reboot, says why it cannot;
    under systemd it starts suspend.target as `systemctl suspend` does."""
    before = api.config_file.read_bytes()
    for action in (":suspend", ":reboot"):
        r = api.curl("POST", f"/1.0/system/{action}")
        assert r.status == 503 and "without systemd" in r.json["error"], r.body
    assert api.config_file.read_bytes() == before
    r = api.curl("GET", "/1.0/system/:suspend")
    assert r.status == 405


# -- kernel, processes, log -----------------------------------------------------------------

MODULES = """\
kvm_intel 409600 0 - Live 0x0000000000000000
kvm 1351680 1 kvm_intel, Live 0x0000000000000000
irqbypass 12288 1 kvm, Live 0x0000000000000000
vfio_pci 16384 0 - Live 0x0000000000000000
vfio_pci_core 94208 1 vfio_pci, Live 0x0000000000000000
vfio 69632 2 vfio_pci_core,vfio_pci, Live 0x0000000000000000
"""


def test_debug_kernel_on_a_built_root(tmp_path: Path, client: tuple[Path, Path]) -> None:
    """IncusOS's DebugKernel from procfs: each module with the modules it depends on
    (the users field turned round), in use when its refcount is not 0; sorted. And the
    command line (ours)."""
    root = tmp_path / "root"
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/modules").write_text(MODULES)
    (root / "proc/cmdline").write_text("BOOT_IMAGE=/vmlinuz ro console=ttyS0 quiet\n")
    (root / "proc/sys/kernel/osrelease").write_text("6.12.117+deb13-amd64\n")
    srv = serve(tmp_path / "api", client, root)
    try:
        r = srv.curl("GET", "/1.0/debug/kernel")
    finally:
        srv.stop()
    assert r.status == 200, r.body
    m = r.json["metadata"]
    assert m["version"] == "6.12.117+deb13-amd64"
    assert m["command_line"] == "BOOT_IMAGE=/vmlinuz ro console=ttyS0 quiet"
    assert m["modules"] == [
        {"name": "irqbypass", "dependencies": [], "in_use": True},
        {"name": "kvm", "dependencies": ["irqbypass"], "in_use": True},
        {"name": "kvm_intel", "dependencies": ["kvm"], "in_use": False},
        {"name": "vfio", "dependencies": [], "in_use": True},
        {"name": "vfio_pci", "dependencies": ["vfio", "vfio_pci_core"], "in_use": False},
        {"name": "vfio_pci_core", "dependencies": ["vfio"], "in_use": True},
    ]


def test_debug_kernel_processes_on_this_machine(api: apiserver.Server) -> None:
    kernel = api.curl("GET", "/1.0/debug/kernel").json["metadata"]
    assert kernel["version"] == os.uname().release
    assert kernel["architecture"] == platform.machine()
    assert kernel["command_line"] == Path("/proc/cmdline").read_text().strip()
    assert set(kernel) == {"version", "architecture", "cpu_baseline", "modules", "command_line"}
    if platform.machine() == "x86_64":
        assert re.fullmatch(r"x86_64_v[1-4]", kernel["cpu_baseline"]), kernel["cpu_baseline"]
    r = api.curl("GET", "/1.0/debug/processes")
    assert r.status == 200 and isinstance(r.json["metadata"], str)
    assert api.process is not None
    # `ps fauxww`: a header, then a line per process, this server's among them, unabridged.
    lines = r.json["metadata"].splitlines()
    assert lines[0].split()[:2] == ["USER", "PID"]
    mine = [line for line in lines if line.split()[1] == str(api.process.pid)]
    assert len(mine) == 1 and "incusos_hal serve --state-dir" in mine[0]


def test_debug_log_defaults_to_this_boot_as_incusos() -> None:
    """IncusOS runs `journalctl -o json -b 0` with no limit unless asked."""
    assert journal_arguments({}) == ["journalctl", "--no-pager", "-o", "json", "-b", "0"]
    args = journal_arguments(
        {"unit": "incusos-hal.service", "boot": "-1", "entries": "5", "since": "-1h"}
    )
    assert args[4:] == ["--unit=incusos-hal.service", "-b", "-1", "-n", "5", "--since=-1h"]
    for query in ({"unit": "a b"}, {"boot": "1; id"}, {"entries": "0"}):
        with pytest.raises(ApiError) as e:
            journal_arguments(query)
        assert e.value.status == 400 and next(iter(query)) in e.value.message


def test_debug_log_answers_with_the_journal(api: apiserver.Server) -> None:
    """The shape TestIncusOSAPIDebug reads: a list of the journal's objects. A boot the
    journal does not have is the client's mistake, said in journalctl's words."""
    require_tool("journalctl")
    r = api.curl("GET", "/1.0/debug/log?entries=3")
    assert r.status == 200 and isinstance(r.json["metadata"], list), r.body
    assert all("MESSAGE" in entry for entry in r.json["metadata"])
    boots = subprocess.run(
        ["journalctl", "--list-boots", "-q", "--no-pager"], capture_output=True, text=True
    )
    if len(boots.stdout.splitlines()) < 2:
        r = api.curl("GET", "/1.0/debug/log?boot=-1")
        assert r.status == 400 and "journalctl:" in r.json["error"], r.body


# -- Secure Boot event log ------------------------------------------------------------------


def recorded_root(tmp_path: Path, firmware: str) -> Path:
    """A root with what the VM rung's guest recorded: its event log, its efivarfs and its
    PCRs as the kernel shows them in sysfs."""
    root = tmp_path / f"root-{firmware}"
    log = root / eventlog.LOG_PATH
    log.parent.mkdir(parents=True)
    shutil.copy(SECURITY / firmware / "binary_bios_measurements", log)
    shutil.copytree(SECURITY / firmware / "efivars", root / sb.EFIVARS)
    pcrs = root / "sys/class/tpm/tpm0/pcr-sha256"
    pcrs.mkdir(parents=True)
    for line in (SECURITY / firmware / "pcr-sha256.txt").read_text().splitlines():
        index, value = line.split()
        (pcrs / index).write_text(value + "\n")
    return root


def recorded_pcr(firmware: str, index: int) -> str:
    for line in (SECURITY / firmware / "pcr-sha256.txt").read_text().splitlines():
        n, value = line.split()
        if int(n) == index:
            return value.lower()
    raise KeyError(index)


@pytest.mark.parametrize("firmware", ["secureboot", "uefi"])
def test_event_log_as_incusos_shows_it(
    tmp_path: Path, client: tuple[Path, Path], firmware: str
) -> None:
    """{event_log, pcr4, pcr7}: the events of PCRs 4, 7 and 11 (tcg.Event's fields), the
    PCRs from sysfs; the SHA-256 digests shown extend, in order, to the PCRs shown."""
    srv = serve(tmp_path / "api", client, recorded_root(tmp_path, firmware))
    try:
        r = srv.curl("GET", "/1.0/debug/secureboot/event-log")
    finally:
        srv.stop()
    assert r.status == 200, r.body
    m = r.json["metadata"]
    assert set(m) == {"event_log", "pcr4", "pcr7"}
    assert m["pcr4"] == recorded_pcr(firmware, 4) and m["pcr7"] == recorded_pcr(firmware, 7)
    assert {e["Index"] for e in m["event_log"]} <= {4, 7, 11}
    assert all(set(e) == {"Index", "Type", "Data", "Digest"} for e in m["event_log"])
    assert len(m["event_log"]) > 5
    for pcr in (4, 7):
        value = bytes(32)
        for e in (e for e in m["event_log"] if e["Index"] == pcr):
            value = hashlib.sha256(value + base64.b64decode(e["Digest"])).digest()
        assert value.hex() == m[f"pcr{pcr}"], pcr
    # The Secure Boot variables are in PCR 7's events, as the firmware measured them.
    names = set()
    for e in m["event_log"]:
        if e["Index"] == 7 and e["Type"] in (eventlog.EV_EFI_VARIABLE_DRIVER_CONFIG,):
            names.add(eventlog.parse_variable_data(base64.b64decode(e["Data"])).name)
    assert {"SecureBoot", "PK", "KEK", "db", "dbx"} <= names


def test_event_log_without_a_log_is_404(api: apiserver.Server) -> None:
    if Path("/", eventlog.LOG_PATH).exists():
        pytest.skip("this machine has a TPM event log")  # the recorded roots cover that
    r = api.curl("GET", "/1.0/debug/secureboot/event-log")
    assert r.status == 404 and "no TPM event log" in r.json["error"]


# -- :run-script ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def signers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys: the snakeoil key (in the recorded db), a test key to enroll into a copy of
    that db, and a stranger's."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("signers")
    openssl("rsa", "-in", str(SNAKEOIL_KEY), "-passin", "pass:snakeoil", "-out", "snakeoil.key",
            cwd=d)  # fmt: skip
    shutil.copy(SNAKEOIL_CERT, d / "snakeoil.pem")
    for name in ("enrolled", "stranger"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30",
                "-subj", f"/CN=Test {name} script signer", cwd=d)  # fmt: skip
    return d


def der(pem: Path) -> bytes:
    return openssl("x509", "-in", str(pem), "-outform", "der", cwd=pem.parent)


def enroll(root: Path, variable: str, cert: Path) -> None:
    """Append an X.509 EFI_SIGNATURE_LIST to db or dbx, as efivarfs shows the variable
    (4 bytes of attributes first)."""
    guid = sb.VARIABLE_GUIDS[variable]
    path = root / sb.EFIVARS / f"{variable}-{guid}"
    old = path.read_bytes() if path.exists() else (0x27).to_bytes(4, "little")
    path.write_bytes(old + sb.signature_list("x509", [(OWNER, der(cert))]))


def sign(signers: Path, name: str, script: str) -> bytes:
    return openssl("smime", "-sign", "-signer", f"{name}.pem", "-inkey", f"{name}.key",
                   cwd=signers, input=script.encode())  # fmt: skip


def test_run_script_only_when_the_firmware_db_trusts_its_signer(
    tmp_path: Path, client: tuple[Path, Path], signers: Path
) -> None:
    root = recorded_root(tmp_path, "secureboot")
    enroll(root, "db", signers / "enrolled.pem")
    ran = tmp_path / "ran"
    script = f"#!/bin/sh\necho ran by $(id -u) >> {ran}\necho 'hello from the script'\n"
    srv = serve(tmp_path / "api", client, root)

    def post(body: bytes) -> apiserver.Result:
        return srv.curl("POST", "/1.0/debug/:run-script", body=body)

    try:
        # Refused, and nothing runs: no signature, a stranger's, a tampered script.
        r = post(script.encode())
        assert r.status == 400 and r.json["error"] == "doesn't look like S/MIME-signed input"
        r = post(sign(signers, "stranger", script))
        assert r.status == 403 and "not trusted by the firmware's db" in r.json["error"], r.body
        tampered = sign(signers, "enrolled", script).replace(b"hello from", b"hello frOm")
        r = post(tampered)
        assert r.status == 403 and "not trusted by the firmware's db" in r.json["error"], r.body
        r = post(b"x" * ((1 << 20) + 1))
        assert r.status in (400, 413), r.body
        assert not ran.exists()
        # Signed by the key enrolled in db, and by the recorded db's own snakeoil key: run.
        for name in ("enrolled", "snakeoil"):
            r = post(sign(signers, name, script))
            assert r.status == 200, r.body
            assert r.json["metadata"] == "hello from the script\n"
        assert ran.read_text() == f"ran by {os.getuid()}\n" * 2
        # A script that fails: 500 with its exit status and output.
        r = post(sign(signers, "enrolled", "#!/bin/sh\necho partial\nexit 3\n"))
        assert r.status == 500 and "exit status 3" in r.json["error"]
        assert "partial" in r.json["error"]
        # Once dbx revokes the key, its scripts are refused.
        enroll(root, "dbx", signers / "enrolled.pem")
        r = post(sign(signers, "enrolled", script))
        assert r.status == 403 and "revoked by dbx" in r.json["error"], r.body
        assert ran.read_text() == f"ran by {os.getuid()}\n" * 2
    finally:
        srv.stop()
    assert any("a script was refused" in line for line in srv.log), srv.log


def test_run_script_refused_by_firmware_without_keys(
    tmp_path: Path, client: tuple[Path, Path], signers: Path
) -> None:
    """Setup mode, no db: no key is trusted, not even one the firmware would take."""
    srv = serve(tmp_path / "api", client, recorded_root(tmp_path, "uefi"))
    try:
        r = srv.curl(
            "POST", "/1.0/debug/:run-script", body=sign(signers, "snakeoil", "#!/bin/sh\n")
        )
    finally:
        srv.stop()
    assert r.status == 403 and "db holds no certificate" in r.json["error"], r.body


# -- custom CAs in the system trust store ----------------------------------------------------


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate it issued."""
    require_tool("openssl")
    d = tmp_path_factory.mktemp("ca")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "30", "-subj", "/CN=Test Custom CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=registry.example",
            cwd=d)  # fmt: skip
    openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "leaf.pem", "-days", "30", cwd=d)  # fmt: skip
    return d


def unit_value(unit: Path, key: str) -> str:
    values = [line.split("=", 1)[1] for line in unit.read_text().splitlines()
              if line.startswith(f"{key}=")]  # fmt: skip
    assert len(values) == 1, (key, values)
    return values[0]


def run_trust_unit(target: Path, certs: Path) -> bool:
    """What incusos-hal-trust.service does, with its own command lines, on a scratch
    /etc/ssl/certs: its condition, then (if met) its update-ca-certificates. True if it
    ran."""
    here = str(target / "etc/incusos-hal/ca-certificates")
    condition = unit_value(TRUST_UNIT, "ConditionPathIsDirectory")
    if not Path(condition.replace("/etc/incusos-hal/ca-certificates", here)).is_dir():
        return False
    check = shlex.split(unit_value(TRUST_UNIT, "ExecCondition"))
    check = [a.replace("/etc/incusos-hal/ca-certificates", here) for a in check]
    check = [a.replace("/etc/ssl/certs", str(certs)) for a in check]
    if subprocess.run(check).returncode != 0:
        return False
    start = shlex.split(unit_value(TRUST_UNIT, "ExecStart"))
    start = [a.replace("/etc/incusos-hal/ca-certificates", here) for a in start]
    start += ["--etccertsdir", str(certs), "--hooksdir", str(certs / "no-hooks")]
    done = subprocess.run(start, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return True


def verifies(certs: Path, leaf: Path) -> tuple[bool, bool]:
    """(openssl verify -CApath, openssl verify -CAfile bundle) for the leaf."""
    results = []
    # Only the store under test: none of the default file, directory or store.
    for how in (
        ["-no-CAfile", "-no-CAstore", "-CApath", str(certs)],
        ["-no-CApath", "-no-CAstore", "-CAfile", str(certs / "ca-certificates.crt")],
    ):
        done = subprocess.run(["openssl", "verify", *how, str(leaf)], capture_output=True)
        results.append(done.returncode == 0)
    return results[0], results[1]


def test_custom_cas_reach_the_trust_store_and_leave_it(
    api: apiserver.Server, test_ca: Path, tmp_path: Path
) -> None:
    """A PUT writes the CA where incusos-hal-trust.service takes it in; after the unit's
    own commands `openssl verify` trusts what the CA issued, by -CApath and by the bundle;
    a PUT without it removes the file, and the unit's next run the trust."""
    require_tool("update-ca-certificates", "openssl")
    certs = tmp_path / "ssl-certs"
    certs.mkdir()
    leaf = test_ca / "leaf.pem"
    assert not run_trust_unit(api.target, certs)  # never configured: nothing to do
    subprocess.run(
        ["update-ca-certificates", "--fresh", "--etccertsdir", str(certs), "--hooksdir",
         str(certs / "no-hooks")], check=True, capture_output=True,
    )  # fmt: skip
    assert verifies(certs, leaf) == (False, False)
    distribution_cas = len(list(certs.glob("*.pem")))

    security = api.curl("GET", "/1.0/system/security").json["metadata"]
    keys = security["config"].get("encryption_recovery_keys") or ["a-Long-enough-key!"]
    ca_pem = (test_ca / "ca.pem").read_text()
    doc = {"config": {"encryption_recovery_keys": keys, "custom_ca_certs": [ca_pem]}}
    r = api.put("/1.0/system/security", doc)
    assert r.status == 200, r.body
    files = list((api.target / "etc/incusos-hal/ca-certificates").iterdir())
    assert [f.name for f in files] == [
        f"incusos-hal-{hashlib.sha256(der(test_ca / 'ca.pem')).hexdigest()}.crt"
    ]
    assert files[0].read_text() == ca_pem.replace("\r\n", "\n")
    assert files[0].stat().st_mode & 0o777 == 0o644
    got = api.curl("GET", "/1.0/system/security").json["metadata"]["config"]
    assert got["custom_ca_certs"] == [ca_pem]

    assert run_trust_unit(api.target, certs)
    assert verifies(certs, leaf) == (True, True)
    assert len(list(certs.glob("*.pem"))) == distribution_cas + 1
    assert not run_trust_unit(api.target, certs)  # nothing changed since: not run again

    # A PUT of the same document changes no file (the unit is not due); a stranger's
    # certificate is refused, naming the field, and changes nothing.
    assert api.put("/1.0/system/security", doc).status == 200
    assert not run_trust_unit(api.target, certs)
    bad = {"config": {"encryption_recovery_keys": keys, "custom_ca_certs": ["junk"]}}
    r = api.put("/1.0/system/security", bad)
    assert r.status == 400 and "config.custom_ca_certs[0]" in r.json["error"], r.body
    assert [f.name for f in (api.target / "etc/incusos-hal/ca-certificates").iterdir()] == [
        files[0].name
    ]

    doc["config"]["custom_ca_certs"] = []
    assert api.put("/1.0/system/security", doc).status == 200
    assert list((api.target / "etc/incusos-hal/ca-certificates").iterdir()) == []
    assert run_trust_unit(api.target, certs)
    assert verifies(certs, leaf) == (False, False)
    assert len(list(certs.glob("*.pem"))) == distribution_cas
    assert not [p for p in certs.iterdir() if p.is_symlink() and not p.exists()]


def test_trust_unit_is_valid_and_wanted_by_the_configure_step() -> None:
    require_tool("systemd-analyze")
    done = subprocess.run(
        ["systemd-analyze", "verify", str(TRUST_UNIT)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    configure = (REPO / "units/incusos-hal-configure.service.in").read_text()
    assert "Wants=incusos-hal-trust.service" in configure.splitlines()
    assert "After=incusos-hal-configure.service local-fs.target" in TRUST_UNIT.read_text()


# -- the recovery key of a first boot -------------------------------------------------------

RECOVERY_KEY = re.compile(r"[cbdefghijklnrtuv]{8}(-[cbdefghijklnrtuv]{8}){7}")


def test_recovery_key_format_is_systemds() -> None:
    from incusos_hal.config.formats import check_recovery_key
    from incusos_hal.security.firstboot import new_recovery_key

    keys = {new_recovery_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(RECOVERY_KEY.fullmatch(k) and check_recovery_key(k) is None for k in keys)


def test_first_boot_with_encrypted_volumes_generates_a_recovery_key(
    tmp_path: Path, client: tuple[Path, Path], swtpm: str
) -> None:
    """TestIncusOSAPISystemSecurity steps 3-12 on a machine with encrypted volumes: a
    fresh machine whose volumes the TPM opens, and no key in its config, gets one
    recovery key that opens every volume, shown as not retrieved until :retrieved; a
    second key appended through a PUT opens them too; a restart keeps both."""
    from incusos_hal.hal import luks, tpm
    from test_security import two_volumes

    install_key = "install-time-key!"  # what the installer formatted with, then forgot
    root, images = two_volumes(tmp_path, install_key)
    with tpm.open_tpm(swtpm) as t:
        for image in images:
            luks.enroll_tpm2(image, install_key, t, t.current_policy("sha256", [7]))
    srv = serve(tmp_path / "api", client, root)
    # Started without the TPM: no way into the volumes, nothing stored. (The key is made
    # in the background once the service answers.)
    assert srv.wait_for_line("no recovery key could be enrolled"), srv.log
    srv.stop()
    assert "encryption_recovery_keys" not in srv.config_file.read_text()
    srv.tcti = swtpm
    srv.start()
    try:
        assert srv.wait_for_line("a recovery key was generated"), srv.log
        security = srv.curl("GET", "/1.0/system/security").json["metadata"]
        keys = security["config"]["encryption_recovery_keys"]
        assert len(keys) == 1 and RECOVERY_KEY.fullmatch(keys[0]), keys
        assert security["state"]["encryption_recovery_keys_retrieved"] is False
        for image in images:
            assert luks.opens(image, keys[0]) and luks.opens(image, install_key)
        # Steps 6-9: IncusOS's own second key appended to the first-boot one.
        more = {**security["config"], "encryption_recovery_keys": [*keys, "foo-bar-biz-1234"]}
        assert srv.put("/1.0/system/security", {"config": more}).status == 200
        got = srv.curl("GET", "/1.0/system/security").json["metadata"]["config"]
        assert got["encryption_recovery_keys"] == [*keys, "foo-bar-biz-1234"]
        assert all(luks.opens(image, "foo-bar-biz-1234") for image in images)
        assert srv.curl("POST", "/1.0/system/security/:retrieved").status == 200
        state = srv.curl("GET", "/1.0/system/security").json["metadata"]["state"]
        assert state["encryption_recovery_keys_retrieved"] is True
    finally:
        srv.stop()
    keys = [*keys, "foo-bar-biz-1234"]
    srv.start()  # a second start: the stored key stays, nothing is added
    try:
        again = srv.curl("GET", "/1.0/system/security").json["metadata"]
    finally:
        srv.stop()
    assert again["config"]["encryption_recovery_keys"] == keys
    assert again["state"]["encryption_recovery_keys_retrieved"] is True
    # The install key, the TPM token's and the two recovery keys: nothing added on the
    # restart.
    assert all(len(luks.header(i).keyslots) == 4 for i in images)
    assert all(keys[0] not in line for line in srv.log)
    assert any("a recovery key was generated" in line for line in srv.log), srv.log


def test_no_recovery_key_without_encrypted_volumes(
    tmp_path: Path, client: tuple[Path, Path]
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    srv = serve(tmp_path / "api", client, root)
    try:
        security = srv.curl("GET", "/1.0/system/security").json["metadata"]
    finally:
        srv.stop()
    assert not security["config"].get("encryption_recovery_keys")
    assert not any("recovery key" in line for line in srv.log), srv.log
