"""What an attacker's review of the hardening found (issue 13), each against a real
`incusos-hal serve` (tests/apiserver.py) or the code it runs: a request that stops the
service from starting, a backup that captures a change not yet confirmed, a restore
that skips what a PUT checks, a NIC claimed twice, secrets in readable files, archives
that answer 500, internal paths in errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.api import backup
from incusos_hal.config import dumps_toml, from_dict, parse_toml, to_dict
from test_api import NETWORK, OTHER_NETWORK, state_digest, wait_operation

import apiserver
from conftest import require_tool

UNASSIGNED = "192.0.2.77:8443"  # TEST-NET-1: never an address of this machine


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "curl")
    d = tmp_path_factory.mktemp("certs")
    return {name: apiserver.openssl_client_cert(d, name) for name in ("first",)}


@pytest.fixture
def api(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> Iterator[apiserver.Server]:
    srv = apiserver.make(tmp_path, [certs["first"][0]])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# -- 1. the listen address ---------------------------------------------------------------


@pytest.mark.parametrize("address", [UNASSIGNED, "nosuchhost.invalid:8443", "taken"])
def test_a_stored_listen_address_that_cannot_be_had_never_stops_the_service(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]], address: str
) -> None:
    """Stored by an older version (or before the machine lost the address): the service
    starts, serves root on the unix socket and says HTTPS is not active."""
    srv = apiserver.make(tmp_path, [certs["first"][0]])
    with socket.socket() as holder:
        if address == "taken":
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            address = f"127.0.0.1:{holder.getsockname()[1]}"
        text = srv.config_file.read_text()
        assert "[listener]\n" in text
        text = text.replace("[listener]\n", f'[listener]\nlisten_address = "{address}"\n')
        srv.config_file.write_text(text)
        srv.options = ("--listen", "")  # the stored address, not the test's
        srv.start()
        try:
            assert srv.curl("GET", "/").json["metadata"] == ["/1.0"]
            listener = srv.curl("GET", "/1.0/system/fallback-listener").json["metadata"]
            assert listener["config"]["listen_address"] == address
            assert listener["state"]["active"] is False
        finally:
            srv.stop()
    assert any("HTTPS is not served on" in line for line in srv.log), srv.log


def test_put_of_a_listen_address_the_machine_cannot_have_is_400(api: apiserver.Server) -> None:
    before = state_digest(api.state)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        for address in (UNASSIGNED, "[2001:db8::77]:8443", "localhost:8443", taken):
            r = api.put("/1.0/system/fallback-listener", {"config": {"listen_address": address}})
            assert r.status == 400, (address, r.body)
            assert "config.listen_address" in r.json["error"], r.json
            assert state_digest(api.state) == before
    # An address of this machine with a free port is taken (used at the next start).
    free = f"127.0.0.1:{apiserver.free_port()}"
    listener = api.curl("GET", "/1.0/system/fallback-listener").json["metadata"]["config"]
    r = api.put("/1.0/system/fallback-listener", {"config": {**listener, "listen_address": free}})
    assert r.status == 200, r.body


# -- 2. a backup during a confirmation window ----------------------------------------------


def test_backup_is_refused_while_a_network_change_waits_for_confirmation(
    api: apiserver.Server,
) -> None:
    assert api.put("/1.0/system/network", NETWORK).status == 200
    good = (api.state / "config.last-good.toml").read_bytes()
    trial = {"config": {**OTHER_NETWORK["config"], "confirmation_timeout": "10m"}}
    assert api.put("/1.0/system/network", trial).status == 200
    before = state_digest(api.state)
    r = api.curl("POST", "/1.0/system/:backup")
    assert r.status == 409, r.body[:300]
    assert "confirm" in r.json["error"], r.json
    assert state_digest(api.state) == before
    assert (api.state / "config.last-good.toml").read_bytes() == good
    # Confirmed, the change is a good one and the backup holds it.
    assert api.curl("POST", "/1.0/system/network/:confirm").status == 200
    saved = api.curl("POST", "/1.0/system/:backup")
    assert saved.status == 200
    assert backup.read_archive(saved.body).config.network.interfaces[0].name == "lan"


def test_a_restore_whose_apply_fails_never_marks_it_last_good(api: apiserver.Server) -> None:
    assert api.put("/1.0/system/network", NETWORK).status == 200
    saved = api.curl("POST", "/1.0/system/:backup").body
    assert api.put("/1.0/system/network", OTHER_NETWORK).status == 200
    before = state_digest(api.state)
    blocker = api.target / "etc/sysctl.d"  # a file where the configure step needs a dir
    shutil.rmtree(blocker, ignore_errors=True)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("")
    r = api.curl("POST", "/1.0/system/:restore", body=saved)
    assert r.status == 202, r.body
    op = wait_operation(api, r.headers["location"])
    assert op["status"] == "Failure", op
    assert state_digest(api.state) == before


# -- 3. a restore makes the checks and the work a PUT makes ----------------------------------

MISSING_PCI = {"vendor_id": "10de", "product_id": "1eb8", "pci_address": "0000:ff:1f.7"}


def with_config(saved: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The archive `saved` with its config.toml changed by `change` (as a client editing
    a backup would), every other member as it was."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(saved)) as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info)
            assert f is not None
            data = f.read()
            if info.name == "config.toml":
                raw = to_dict(parse_toml(data))
                change(raw)
                data = dumps_toml(from_dict(raw))
            members.append((info.name, data))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_restore_refuses_what_a_put_of_each_section_refuses(api: apiserver.Server) -> None:
    keys = {"config": {"encryption_recovery_keys": ["first-recovery-key!"]}}
    assert api.put("/1.0/system/security", keys).status == 200
    saved = api.curl("POST", "/1.0/system/:backup").body

    def hostile(raw: dict[str, Any]) -> None:
        raw["security"]["encryption_recovery_keys"] = []
        raw["kernel"] = {"pci": {"passthrough": [MISSING_PCI]}}

    before = state_digest(api.state)
    r = api.curl("POST", "/1.0/system/:restore", body=with_config(saved, hostile))
    assert r.status == 400, r.body
    error = r.json["error"]
    assert "security.encryption_recovery_keys: at least one key is required" in error, error
    assert "kernel.pci.passthrough[0].pci_address" in error, error
    assert state_digest(api.state) == before
    # The same document passes validate alone (it checks the document), not --machine.
    doc = api.base / "restored.json"
    raw = to_dict(parse_toml(api.config_file.read_bytes()))
    hostile(raw)
    doc.write_text(json.dumps(raw))
    assert cli("validate", "--config", str(doc)).returncode == 0
    machine = cli(
        "validate", "--config", str(doc), "--machine", "--root", str(api.target),
        "--state-dir", str(api.state),
    )  # fmt: skip
    assert machine.returncode == 2, machine
    assert "security.encryption_recovery_keys" in machine.stderr
    assert "kernel.pci.passthrough[0].pci_address" in machine.stderr


def test_restore_enrolls_the_archives_recovery_keys(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]]
) -> None:
    """As IncusOS's restore (unless skip=encryption-recovery-keys): the volumes open with
    the archive's keys, not the replaced ones; a restore that does not take puts the
    running keys back."""
    from incusos_hal.hal import luks
    from test_security import two_volumes

    root, images = two_volumes(tmp_path, "first-recovery-key!")
    (tmp_path / "api").mkdir()
    srv = apiserver.make(tmp_path / "api", [certs["first"][0]])
    srv.root = root
    srv.start()
    try:
        first = {"config": {"encryption_recovery_keys": ["first-recovery-key!"]}}
        assert srv.put("/1.0/system/security", first).status == 200
        saved = srv.curl("POST", "/1.0/system/:backup").body
        second = {"config": {"encryption_recovery_keys": ["second-recovery-key!"]}}
        assert srv.put("/1.0/system/security", second).status == 200
        # An apply that fails (a file where a directory goes): the keys go back too.
        blocker = srv.target / "etc/sysctl.d"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("")
        r = srv.curl("POST", "/1.0/system/:restore", body=saved)
        assert slow_operation(srv, r.headers["location"])["status"] == "Failure"
        for image in images:
            assert luks.opens(image, "second-recovery-key!")
            assert not luks.opens(image, "first-recovery-key!")
        blocker.unlink()
        r = srv.curl("POST", "/1.0/system/:restore", body=saved)
        assert slow_operation(srv, r.headers["location"])["status"] == "Success"
        for image in images:
            assert luks.opens(image, "first-recovery-key!")
            assert not luks.opens(image, "second-recovery-key!")
    finally:
        srv.stop()
    assert "first-recovery-key!" not in "".join(srv.log)


def slow_operation(api: apiserver.Server, location: str) -> dict[str, Any]:
    """An operation that changes LUKS keyslots: each new one is stretched with the
    PBKDF cryptsetup benchmarks (seconds each, more on a loaded machine)."""
    for _ in range(10):
        r = api.curl("GET", f"{location}/wait?timeout=55")
        assert r.status == 200, r.body
        op: dict[str, Any] = r.json["metadata"]
        if op["status"] != "Running":
            return op
    raise AssertionError(f"{location} still running: {op}")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(apiserver.REPO / "src"))
    return subprocess.run(
        [sys.executable, "-m", "incusos_hal", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


# -- 4. one NIC claimed twice ---------------------------------------------------------------


def test_a_nic_claimed_by_name_and_by_mac_goes_to_its_first_claimant() -> None:
    """What validation cannot see (a name and a MAC naming the same NIC): the boot drops
    the second claimant with a warning, never two links with one MAC."""
    from incusos_hal.config.model import Bond, Interface, Network
    from incusos_hal.hal.net import Nic
    from incusos_hal.render.effective import effective_network

    mac = "02:fc:00:00:00:01"
    nics = (Nic("eth0", mac, True), Nic("eth1", "02:fc:00:00:00:02", True))
    network = Network(
        interfaces=(Interface(name="a", hwaddr="eth0"), Interface(name="b", hwaddr=mac.upper())),
        bonds=(
            Bond(
                name="bond0",
                mode="active-backup",
                members=("eth1", "02:FC:00:00:00:02", "eth0"),
                hwaddr=mac,
            ),
        ),
    )
    effective = effective_network(network, nics)
    assert [(i.name, i.hwaddr) for i in effective.network.interfaces] == [("a", mac)]
    assert [b.members for b in effective.network.bonds] == [("02:fc:00:00:00:02",)]
    assert effective.network.bonds[0].hwaddr == mac  # its own MAC is no claim
    assert any(
        "interface b" in w and "already used by interface a" in w for w in effective.warnings
    )
    assert sum("already used" in w for w in effective.warnings) == 3, effective.warnings


def test_put_refuses_a_nic_claimed_twice_on_this_machine(api: apiserver.Server) -> None:
    from incusos_hal.hal.net import list_nics

    nic = list_nics("/")[0][0]
    before = state_digest(api.state)
    twice = {
        "config": {
            "interfaces": [
                {"name": "a", "hwaddr": nic.name, "addresses": ["dhcp4"]},
                {"name": "b", "hwaddr": nic.hwaddr, "addresses": ["dhcp4"]},
            ]
        }
    }
    r = api.put("/1.0/system/network", twice)
    assert r.status == 400, r.body
    assert r.json["error"].startswith("config.interfaces[1].hwaddr: "), r.json
    assert state_digest(api.state) == before


# -- 6. an archive whose state.json nests too deep -------------------------------------------


@pytest.mark.parametrize("flags", [b"[" * 200_000, b'{"a": 1e999999}', b'{"a": NaN}', b"\xff"])
def test_restore_of_a_state_json_python_cannot_parse_is_400(
    api: apiserver.Server, flags: bytes
) -> None:
    saved = api.curl("POST", "/1.0/system/:backup").body
    members = []
    with tarfile.open(fileobj=io.BytesIO(saved)) as tar:
        for info in tar.getmembers():
            f = tar.extractfile(info)
            assert f is not None
            members.append((info.name, f.read()))
    members = [(n, d) for n, d in members if n != "state.json"] + [("state.json", flags)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o600
            tar.addfile(info, io.BytesIO(data))
    before = state_digest(api.state)
    r = api.curl("POST", "/1.0/system/:restore", body=buf.getvalue())
    assert r.status == 400, r.body[:300]
    assert "state.json" in r.json["error"], r.json
    assert state_digest(api.state) == before


# -- 8. paths inside messages ------------------------------------------------------------


def test_a_field_named_in_a_message_is_written_as_the_client_wrote_it(
    api: apiserver.Server,
) -> None:
    mac = "02:fc:00:00:00:99"
    body = {
        "config": {
            "interfaces": [{"name": "a", "hwaddr": mac, "addresses": ["dhcp4"]}],
            "bonds": [{"name": "b", "mode": "active-backup", "members": [mac]}],
        }
    }
    r = api.put("/1.0/system/network", body)
    assert r.status == 400, r.body
    error = r.json["error"]
    assert "config.bonds[0].members[0]: " in error, error
    assert "already used by config.interfaces[0].hwaddr" in error, error
    assert "network." not in error, error


# -- 7. no path of this machine in an error ---------------------------------------------------


def test_describe_os_error_keeps_the_reason_and_drops_the_machines_paths() -> None:
    from incusos_hal.core.files import describe_os_error

    e = NotADirectoryError(20, "Not a directory", "/srv/scratch/target/etc/sysctl.d")
    assert describe_os_error(e, "/srv/scratch/target") == "Not a directory: /etc/sysctl.d"
    assert describe_os_error(e, "/srv/scratch/target/") == "Not a directory: /etc/sysctl.d"
    assert describe_os_error(e, "/") == "Not a directory: /srv/scratch/target/etc/sysctl.d"
    assert describe_os_error(e, "/srv/other") == "Not a directory: sysctl.d"
    assert describe_os_error(e) == "Not a directory: sysctl.d"
    assert describe_os_error(OSError(28, "No space left on device")) == "No space left on device"


def test_a_failed_apply_or_restore_names_the_file_not_the_machines_path(
    api: apiserver.Server,
) -> None:
    assert api.put("/1.0/system/network", NETWORK).status == 200
    saved = api.curl("POST", "/1.0/system/:backup").body
    blocker = api.target / "etc/sysctl.d"  # a file where the configure step needs a dir
    shutil.rmtree(blocker, ignore_errors=True)
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("")
    r = api.put("/1.0/system/network", OTHER_NETWORK)
    assert r.status == 500, r.body
    error = r.json["error"]
    assert "Not a directory: /etc/sysctl.d" in error, error
    assert str(api.base) not in error and "/tmp" not in error, error
    r = api.curl("POST", "/1.0/system/:restore", body=saved)
    op = wait_operation(api, r.headers["location"])
    assert op["status"] == "Failure", op
    assert "Not a directory: /etc/sysctl.d" in op["err"], op
    assert str(api.base) not in op["err"] and "/tmp" not in op["err"], op
    api.stop()
    log = "\n".join(api.log)
    assert str(api.target / "etc/sysctl.d") in log  # the journal has it all


# -- 5. the Wake-on-LAN password ------------------------------------------------------------


def test_a_link_file_with_a_wake_on_lan_password_is_root_s_alone(tmp_path: Path) -> None:
    from incusos_hal.core.files import write_tree
    from incusos_hal.core.tree import File
    from incusos_hal.hal.net import Nic
    from incusos_hal.sections import render_files

    ethernet = {"wakeonlan": True, "wakeonlan_modes": ["secureon"]}
    config = from_dict(
        {
            "version": 1,
            "network": {
                "interfaces": [
                    {
                        "name": "wol",
                        "hwaddr": "52:54:00:0a:00:01",
                        "addresses": ["dhcp4"],
                        "ethernet": {**ethernet, "wakeonlan_password": "00:11:22:33:44:55"},
                    },
                    {
                        "name": "plain",
                        "hwaddr": "52:54:00:0a:00:02",
                        "addresses": ["dhcp4"],
                        "ethernet": ethernet,
                    },
                ]
            },
        }
    )
    nics = (Nic("eth0", "52:54:00:0a:00:01", True), Nic("eth1", "52:54:00:0a:00:02", True))
    files = render_files(config, nics).files
    links = {k: v for k, v in files.items() if k.endswith(".link") and isinstance(v, File)}
    assert len(links) == 2, sorted(files)
    modes = {}
    for path, entry in links.items():
        assert isinstance(entry, File)
        secret = b"WakeOnLanPassword=00:11:22:33:44:55" in entry.content
        modes[path] = entry.mode
        assert entry.mode == (0o600 if secret else 0o644), (path, oct(entry.mode))
    assert sorted(modes.values()) == [0o600, 0o644]
    write_tree(tmp_path, files, durable=False)
    for path, mode in modes.items():
        on_disk = (tmp_path / path.lstrip("/")).stat().st_mode & 0o777
        assert on_disk == mode, (path, oct(on_disk))
