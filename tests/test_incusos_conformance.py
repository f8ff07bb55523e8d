"""IncusOS's own API tests, ported: the assertions of lxc/incus-os at commit de27173
(de2717305758401aa1add53200caa5e3c212f25c), incus-osd/tests/incusos_tests/, for the areas
built here, against a real `incusos-hal serve` (tests/apiserver.py) writing into a scratch
target and reading this machine.

Each test names the upstream file and function. Requests go as IncusOS's harness sends them
(incus_test_vm/__init__.py APIRequest): through Incus's /os proxy, i.e. on the unix socket
with `X-IncusOS-Proxy: /` from the client and `/os` appended by Incus, the body as `curl -d`
sends it (form-urlencoded, not application/json); every answer, errors too, is a JSON
envelope. What cannot hold here (a reboot, install media, incus-osd's own log lines, a
state shape that is another area's) says so in a comment and in docs/incusos-differences.md.

Also here: a GET -> PUT round trip of every section in the table is accepted and changes no
stored byte, and the first-boot default renders exactly what an unset network renders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.config import Config, dumps_toml, parse_toml
from incusos_hal.hal import net
from incusos_hal.render.effective import first_boot_network
from incusos_hal.sections import SECTIONS, render_files

import apiserver
from conftest import build_sysfs, load_nics, require_tool

UPSTREAM = "lxc/incus-os@de27173 incus-osd/tests/incusos_tests"
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "curl")
    d = tmp_path_factory.mktemp("certs")
    return {"trusted": apiserver.openssl_client_cert(d, "trusted")}


@pytest.fixture
def srv(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> Iterator[apiserver.Server]:
    server = apiserver.make(tmp_path, [certs["trusted"][0]])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def api_request(
    srv: apiserver.Server,
    path: str,
    method: str = "GET",
    body: str | bytes | None = None,
    content_type: str | None = None,
    return_raw_content: bool = False,
) -> Any:
    """APIRequest of IncusOS's harness, as Incus's /os proxy forwards it to the socket."""
    args = ["-H", "X-IncusOS-Proxy: /", "-H", "X-IncusOS-Proxy: /os"]
    if content_type is not None:
        args += ["-H", f"Content-Type: {content_type}"]
    data = body.encode() if isinstance(body, str) else body
    r = srv.curl(method, path, *args, body=data)
    assert r.rc == 0, r.err
    if return_raw_content:
        return r.body
    result = r.json  # errors are JSON envelopes too
    http = {"sync": result["status_code"], "error": result["error_code"], "async": 202}
    assert http[result["type"]] == r.status, result
    return result


def physical_nics() -> list[str]:
    """IncusOS's rule for the default network, read from sysfs without this project's
    code: every Ethernet link that is not virtual, loopback aside."""
    out = []
    for name in sorted(os.listdir("/sys/class/net")):
        d = Path("/sys/class/net", name)
        if "/virtual/" in os.path.realpath(d) or (d / "type").read_text().strip() != "1":
            continue
        if (d / "wireless").exists():
            continue
        out.append(name)
    return out


# -- tests_incusos_api.py ----------------------------------------------------------------


def test_incusos_api(srv: apiserver.Server) -> None:
    """tests_incusos_api.py TestIncusOSAPI. os_name/os_version are this project's (the
    upstream test reads them off the image's file name)."""
    from incusos_hal import __version__

    result = api_request(srv, "/1.0")
    assert result["status_code"] == 200
    env = result["metadata"]["environment"]
    assert env["os_name"] == "IncusOS-HAL"
    assert env["os_version"] == __version__
    # IncusOS's environment keys (api_root.go:256-322).
    assert {"hostname", "machine_id", "os_name", "os_version", "system_is_ready", "uptime"} <= set(
        env
    )
    assert api_request(srv, "/")["metadata"] == ["/1.0"]


# -- tests_incusos_api_system.py -----------------------------------------------------------


def test_incusos_api_system(srv: apiserver.Server, certs: dict[str, tuple[Path, Path]]) -> None:
    """tests_incusos_api_system.py TestIncusOSAPISystem: exactly eight entries, the
    fallback listener not among them."""
    result = api_request(srv, "/1.0/system")
    assert result["status_code"] == 200
    assert len(result["metadata"]) == 8
    for name in ("kernel", "logging", "network", "provider", "resources", "security"):
        assert f"/1.0/system/{name}" in result["metadata"]
    for name in ("storage", "update"):
        assert f"/1.0/system/{name}" in result["metadata"]
    # Over HTTPS, as IncusOS's fallback listener answers: /os paths, /os lists.
    tls = srv.curl_tls("GET", "/os/1.0/system", cert=certs["trusted"]).json["metadata"]
    assert tls == ["/os" + p for p in result["metadata"]]


# TestIncusOSAPISystemPoweroff / TestIncusOSAPISystemReboot: the scratch server has no
# systemd to stop the machine (503). Under real systemd, tests/test_api_system.py drives
# :poweroff in the container rung, and tests/test_vm_image.py :poweroff and :reboot on
# the booted image. Reboot's step 2 (debug/log with boot=-1) is the debug area's.


# -- tests_incusos_api_system_logging.py ---------------------------------------------------


def test_incusos_api_system_logging(srv: apiserver.Server) -> None:
    """tests_incusos_api_system_logging.py TestIncusOSAPISystemLogging."""
    result = api_request(srv, "/1.0/system/logging")
    assert result["status_code"] == 200
    syslog = result["metadata"]["config"]["syslog"]
    assert syslog["address"] == "" and syslog["protocol"] == "" and syslog["log_format"] == ""

    cfg = result["metadata"]
    cfg["config"]["syslog"] = {"address": "127.0.0.1", "protocol": "tcp", "log_format": "rfc5424"}
    result = api_request(srv, "/1.0/system/logging", "PUT", json.dumps(cfg))
    assert result["status_code"] == 200, result

    syslog = api_request(srv, "/1.0/system/logging")["metadata"]["config"]["syslog"]
    assert syslog == {"address": "127.0.0.1", "protocol": "tcp", "log_format": "rfc5424"}


# -- tests_incusos_api_system_network.py ---------------------------------------------------


def test_incusos_api_system_network_defaults(srv: apiserver.Server) -> None:
    """tests_incusos_api_system_network.py TestIncusOSAPISystemNetworkDefaults, config
    half: the first-boot default is stored and returned (every NIC with dhcp4 and slaac,
    required_for_online "no", time zone UTC, no roles stored). The state half (type
    "interface", two bare addresses, mtu, derived roles) is the network state's
    (h15-netstate); step 2 (curl to the images server) is out of scope."""
    result = api_request(srv, "/1.0/system/network")
    assert result["status_code"] == 200
    config = result["metadata"]["config"]
    assert config["time"]["timezone"] == "UTC"
    nics = physical_nics()
    assert nics, "this machine has no physical NIC to default to"
    assert [i["name"] for i in config["interfaces"]] == nics
    for iface in config["interfaces"]:
        assert "dhcp4" in iface["addresses"] and "slaac" in iface["addresses"]
        assert iface["required_for_online"] == "no"
        assert "roles" not in iface
        mac = Path("/sys/class/net", iface["name"], "address").read_text().strip()
        assert iface["hwaddr"] == mac
    # Stored, not computed on the fly: the document on disk says the same.
    stored = parse_toml(srv.config_file.read_bytes()).network
    assert [i.name for i in stored.interfaces] == nics
    assert stored.time is not None and stored.time.timezone == "UTC"


# TestIncusOSAPISystemNetworkBadMAC asserts incus-osd log lines at boot only (no API
# call): out of scope. An interface whose MAC no NIC has is kept and shown `missing` in
# the network state (render/effective.py); IncusOS fails the boot
# (docs/incusos-differences.md).


def test_incusos_api_system_network_rollback(srv: apiserver.Server) -> None:
    """tests_incusos_api_system_network.py TestIncusOSAPISystemNetworkRollback, config
    half. Differences: a pending change refuses another with 409 (IncusOS: 400), an
    invalid address is a 400 naming the field before anything is applied (IncusOS: a 500
    from inside apply, then an immediate rollback), and the waits are seconds, not 45 s.
    The state lengths (one address, then two) are the network state's (h15-netstate)."""
    result = api_request(srv, "/1.0/system/network")
    assert result["status_code"] == 200
    cfg = result["metadata"]

    cfg["config"]["confirmation_timeout"] = "bizbaz"
    result = api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))
    assert result["status_code"] != 200
    assert (
        'invalid confirmation timeout provided: time: invalid duration "bizbaz"'
        in (result["error"])
    )

    cfg["config"]["confirmation_timeout"] = "-1m"
    result = api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))
    assert result["status_code"] != 200
    assert "confirmation timeout must be greater than zero" in result["error"]

    # A short hold (upstream: 45s) so the expiry is seen within the test.
    cfg["config"]["confirmation_timeout"] = "3s"
    cfg["config"]["interfaces"][0]["addresses"] = ["dhcp4"]
    result = api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))
    assert result["status_code"] == 200, result

    got = api_request(srv, "/1.0/system/network")["metadata"]
    assert got["config"]["interfaces"][0]["addresses"] == ["dhcp4"]
    assert got["state"]["configuration_in_process"] is True
    # Applied, never stored: IncusOS clears it before storing.
    assert "confirmation_timeout" not in got["config"]
    assert "confirmation_timeout" not in srv.config_file.read_text()

    result = api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))
    assert result["status_code"] != 200
    assert result["error"] == (
        "a pending network configuration must first be confirmed before a new "
        "configuration can be applied"
    )

    wait_for(lambda: not network(srv)["state"]["configuration_in_process"])
    got = network(srv)
    assert "dhcp4" in got["config"]["interfaces"][0]["addresses"]
    assert "slaac" in got["config"]["interfaces"][0]["addresses"]

    cfg["config"]["interfaces"][0]["addresses"] = ["dhcp4", "bizbaz"]
    before = srv.config_file.read_bytes()
    result = api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))
    assert result["status_code"] != 200
    assert result["error"].startswith("config.interfaces[0].addresses[1]: 'bizbaz'")
    assert srv.config_file.read_bytes() == before
    got = network(srv)
    assert got["config"]["interfaces"][0]["addresses"] == ["dhcp4", "slaac"]

    cfg["config"]["interfaces"][0]["addresses"] = ["dhcp4"]
    cfg["config"]["confirmation_timeout"] = "45s"
    assert api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))["status_code"] == 200
    assert network(srv)["config"]["interfaces"][0]["addresses"] == ["dhcp4"]
    result = api_request(srv, "/1.0/system/network/:confirm", "POST")
    assert result["status_code"] == 200, result
    got = network(srv)
    assert got["config"]["interfaces"][0]["addresses"] == ["dhcp4"]
    assert got["state"]["configuration_in_process"] is False

    result = api_request(srv, "/1.0/system/network/:confirm", "POST")
    assert result["status_code"] != 200
    assert result["error"] == "no network configuration is pending a confirmation"

    # A GET -> PUT round trip now holds nothing: the timeout was never stored.
    before = srv.config_file.read_bytes()
    assert api_request(srv, "/1.0/system/network", "PUT", json.dumps(got))["status_code"] == 200
    assert network(srv)["state"]["configuration_in_process"] is False
    assert srv.config_file.read_bytes() == before


def test_incusos_api_system_network_config_interfaces(srv: apiserver.Server) -> None:
    """tests_incusos_api_system_network.py TestIncusOSAPISystemNetworkConfigInterfaces,
    config half, with this machine's NIC and a second MAC standing for enp6s0 (absent
    here: kept, its .link matching nothing, and shown `missing` in the state). The state
    half (keys by configured name, roles, no `addresses` on `vm`) is the network state's
    (tests/test_network_state.py)."""
    mac = Path("/sys/class/net", physical_nics()[0], "address").read_text().strip()
    body = {
        "config": {
            "time": {"timezone": "UTC"},
            "interfaces": [
                {
                    "addresses": ["dhcp4", "slaac"],
                    "hwaddr": mac,
                    "name": "management",
                    "required_for_online": "both",
                    "roles": ["management", "cluster", "storage"],
                },
                {"hwaddr": "10:66:6a:00:00:06", "name": "vm", "roles": ["instances"]},
            ],
        }
    }
    result = api_request(srv, "/1.0/system/network", "PUT", json.dumps(body))
    assert result["status_code"] == 200, result
    got = network(srv)["config"]
    assert got == body["config"]  # as IncusOS writes it: nothing added, nothing dropped


# -- tests_incusos_api_system_backup.py ----------------------------------------------------


def test_incusos_api_system_backup(srv: apiserver.Server) -> None:
    """tests_incusos_api_system_backup.py TestIncusOSAPISystemBackup. :restore here
    answers 202 with an operation (applied without a reboot; IncusOS answers 200 and
    reboots); the test waits for the operation instead of the reboot."""
    result = api_request(srv, "/1.0/system/network")
    assert result["status_code"] == 200
    cfg = result["metadata"]
    cfg["config"]["dns"] = {"hostname": "incusos1"}
    cfg["config"]["time"] = {"timezone": "America/Chicago"}
    assert api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))["status_code"] == 200
    # IncusOS emits dns.domain (not omitempty) although it was not sent.
    assert network(srv)["config"]["dns"] == {"hostname": "incusos1", "domain": ""}

    backup = api_request(srv, "/1.0/system/:backup", "POST", return_raw_content=True)

    cfg["config"]["dns"] = {"hostname": "incusos2"}
    cfg["config"]["time"] = {"timezone": "America/Denver"}
    assert api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))["status_code"] == 200
    got = network(srv)["config"]
    assert got["dns"]["hostname"] == "incusos2" and got["time"]["timezone"] == "America/Denver"

    result = api_request(srv, "/1.0/system/:restore", "POST", backup, "application/x-tar")
    assert result["status_code"] == 100 and result["type"] == "async", result
    done = api_request(srv, result["operation"].removeprefix("/os") + "/wait?timeout=60")
    assert done["metadata"]["status"] == "Success", done

    got = network(srv)["config"]
    assert got["dns"]["hostname"] == "incusos1" and got["time"]["timezone"] == "America/Chicago"


# -- tests_incusos_api_system_security.py --------------------------------------------------


def test_incusos_api_system_security(srv: apiserver.Server) -> None:
    """tests_incusos_api_system_security.py TestIncusOSAPISystemSecurity, steps 2-5.
    Step 1 (tpm_status "ok", one recovery key made at first boot, two encrypted volumes)
    needs the VM's TPM and LUKS volumes: tests/test_vm_security.py (and the first-boot key
    is the debug/first-boot helper's, h15-debug). Here: no volume, no TPM."""
    result = api_request(srv, "/1.0/system/security")
    assert result["status_code"] == 200
    cfg = result["metadata"]
    assert cfg["state"]["encryption_recovery_keys_retrieved"] is False
    assert isinstance(cfg["state"]["drive_recovery_keys"], dict)  # {} when empty
    assert isinstance(cfg["state"]["pool_recovery_keys"], dict)

    cfg["config"]["encryption_recovery_keys"].append("foo-bar-biz-1234")
    result = api_request(srv, "/1.0/system/security", "PUT", json.dumps(cfg))
    assert result["status_code"] == 200, result

    got = api_request(srv, "/1.0/system/security")["metadata"]
    assert len(got["config"]["encryption_recovery_keys"]) == 1  # upstream: 2 (one made at boot)
    assert "foo-bar-biz-1234" in got["config"]["encryption_recovery_keys"]

    assert api_request(srv, "/1.0/system/security/:retrieved", "POST")["status_code"] == 200
    got = api_request(srv, "/1.0/system/security")["metadata"]
    assert got["state"]["encryption_recovery_keys_retrieved"] is True


# TestIncusOSAPISystemSecurityTPMRebind: a healthy system refuses (here 409 with this
# project's words, IncusOS 500 with its own); tests/test_security.py covers it with swtpm.


# -- tests_incusos_api_system_resources.py -------------------------------------------------


def test_incusos_api_system_resources(srv: apiserver.Server) -> None:
    """tests_incusos_api_system_resources.py TestIncusOSAPISystemResources."""
    result = api_request(srv, "/1.0/system/resources")
    assert result["status_code"] == 200
    for key in ("cpu", "memory", "network", "storage"):
        assert key in result["metadata"]


# -- shapes from incus-osd/api (no upstream test function: struct tags at de27173) -------


def test_update_config_as_incusos_writes_it(srv: apiserver.Server) -> None:
    """incus-osd/api/system_update.go: a fresh GET has auto_reboot, channel and
    check_frequency (IncusOS's defaults), last_check the zero time."""
    got = api_request(srv, "/1.0/system/update")["metadata"]
    assert got["config"] == {"auto_reboot": False, "channel": "stable", "check_frequency": "6h"}
    assert got["state"]["last_check"] == "0001-01-01T00:00:00Z"
    assert got["state"]["needs_reboot"] is False and isinstance(got["state"]["status"], str)


def test_fallback_listener_and_kernel_as_incusos_writes_them(srv: apiserver.Server) -> None:
    """incus-osd/api/system_fallback_listener.go and system_kernel.go: every field
    omitempty, so an unset kernel config reads {}; the listener's state has `active`."""
    listener = api_request(srv, "/1.0/system/fallback-listener")["metadata"]
    assert set(listener["config"]) == {"trusted_client_certificates"}
    assert listener["state"]["active"] is True
    assert api_request(srv, "/1.0/system/kernel")["metadata"]["config"] == {}


def test_time_zone_must_be_installed(srv: apiserver.Server) -> None:
    """IncusOS has timedatectl refuse a zone it does not have (a 500 from apply); here a
    400 naming the field, nothing stored."""
    cfg = network(srv)
    before = srv.config_file.read_bytes()
    cfg["config"]["time"] = {"timezone": "Mars/Olympus"}
    result = api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))
    assert result["error_code"] == 400
    assert result["error"].startswith("config.time.timezone: 'Mars/Olympus' is not a time zone")
    cfg["config"]["time"] = {"timezone": "America"}  # a directory, not a zone
    assert api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))["error_code"] == 400
    cfg["config"]["time"] = {"timezone": "../../etc/passwd"}  # the pattern check, first
    assert api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))["error_code"] == 400
    assert srv.config_file.read_bytes() == before
    cfg["config"]["time"] = {"timezone": "Europe/Berlin"}
    assert api_request(srv, "/1.0/system/network", "PUT", json.dumps(cfg))["status_code"] == 200


# -- GET -> PUT of every section changes nothing -------------------------------------------

SET: dict[str, dict[str, Any]] = {
    "logging": {"syslog": {"address": "192.0.2.9:514", "protocol": "tcp", "log_format": ""}},
    "update": {
        "channel": "testing",
        "check_frequency": "12h",
        "auto_reboot": False,
        "maintenance_windows": [{"start_hour": 1, "end_hour": 3, "end_minute": 30}],
    },
    "security": {"encryption_recovery_keys": ["foo-bar-biz-1234"]},
    "kernel": {
        "blacklist_modules": ["nouveau"],
        "memory": {"persistent_hugepages": 0, "zram_swap_size": ""},
        "network": {"buffer_size": 16777216, "tcp_mtu_probing": True},
    },
    "network": {
        "dns": {"hostname": "host1", "nameservers": ["192.0.2.53"]},
        "time": {"timezone": "Europe/Berlin"},
        "proxy": {
            "servers": {"corp": {"host": "proxy.example.com:3128", "auth": "anonymous"}},
            "rules": [{"destination": "*", "target": "corp"}],
        },
        "interfaces": [
            {
                "name": "uplink",
                "hwaddr": "52:54:00:12:34:56",
                "addresses": ["dhcp4", "192.0.2.10/24"],
                "routes": [{"to": "198.51.100.0/24", "via": "192.0.2.1"}],
                "roles": ["management"],
                "vlan_tags": [10],
            }
        ],
        "vlans": [{"name": "v10", "parent": "uplink", "id": 10, "addresses": ["dhcp4"]}],
    },
}


@pytest.mark.parametrize("name", [row.name for row in SECTIONS])
def test_get_put_round_trip_changes_nothing(srv: apiserver.Server, name: str) -> None:
    """For every section of the table: as IncusOS's tests do (PUT the whole GET
    document, `state` and all), an unchanged document is accepted and no stored byte,
    ETag or hold changes."""
    path = f"/1.0/system/{name}"
    if name in SET:
        result = api_request(srv, path, "PUT", json.dumps({"config": SET[name]}))
        assert result["status_code"] == 200, result
    got = srv.curl("GET", path)
    before, etag = srv.config_file.read_bytes(), got.headers["etag"]
    result = api_request(srv, path, "PUT", json.dumps(got.json["metadata"]))
    assert result["status_code"] == 200, result
    assert srv.config_file.read_bytes() == before
    again = srv.curl("GET", path)
    assert again.headers["etag"] == etag
    assert again.json["metadata"]["config"] == got.json["metadata"]["config"]
    if name == "network":
        assert again.json["metadata"]["state"]["configuration_in_process"] is False


# -- the first-boot default renders what an unset network renders -------------------------


@pytest.mark.parametrize(
    "case", sorted(p.parent for p in GOLDEN.glob("*/nics.json")), ids=lambda p: p.name
)
def test_first_boot_default_renders_byte_identical(case: Path, tmp_path: Path) -> None:
    root = build_sysfs(tmp_path / "root", load_nics(case / "nics.json"))
    nics, _ = net.list_nics(root)
    unset = Config()
    network = first_boot_network(unset.network, nics)
    if network is None:
        return  # no wired NIC in this case: nothing is stored, nothing to compare
    stored = parse_toml(dumps_toml(Config(network=network)))
    assert render_files(stored, nics) == render_files(unset, nics)


# -- helpers -------------------------------------------------------------------------------


def network(srv: apiserver.Server) -> Any:
    result = api_request(srv, "/1.0/system/network")
    assert result["status_code"] == 200
    return result["metadata"]


def wait_for(condition: Any, limit: float = 60.0) -> None:
    """Polls until `condition()` holds (a generous bound: the hold above is 3 s)."""
    import time

    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.2)
