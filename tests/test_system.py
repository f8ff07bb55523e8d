"""System test: real systemd boots a Debian root with this project installed, and the
stored config becomes the running network.

Boot 1 stores a config with `incusos-hal save` (which also primes the generator cache),
boots, and checks from inside: the generator wired the configure service in, the
configure step wrote exactly what `render` writes for the same NICs, networkd built the
bridges with static, DHCP and SLAAC addresses, routes and MTU, and the daemons around it
(resolved, netlogd forwarding to a syslog listener, proxy environment, time zone,
hostname) follow the config. Boot 2 corrupts config.toml and checks that the machine
comes up the same, from the last good copy, saying why.

This host's kernel has no VLAN, bonding or bridge VLAN filtering: bonds and VLANs are the
VM rung's (tests over the same renderer); here networkd logs that VLAN filtering could
not be enabled, and the bridges work without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import nspawn
import vm
from conftest import build_sysfs, require_root, require_tool
from golden import manifest, run_cli
from system_case import EXPECT, LAN0_MAC, LAN1_MAC, MARKER, config, new_lan

CONFIG = config("vc1")


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_root()
    require_tool("debootstrap", "systemd-nspawn", "ip", "dnsmasq", "mount")
    work = tmp_path_factory.mktemp("system")
    root = nspawn.rootfs()
    package = nspawn.install_layer(root, work / "package")
    probe = work / "probe"
    probe.mkdir()
    (probe / "config.toml").write_text(CONFIG)
    with nspawn.overlay([package, root], work / "machine") as merged:
        yield merged, probe, work


@pytest.fixture(scope="module")
def container_first_boot(machine: Any) -> nspawn.Boot:
    merged, probe, work = machine
    nspawn.nspawn_run(
        merged, "incusos-hal save --config /probe/config.toml", binds=(f"{probe}:/probe",)
    )
    with nspawn.lan(new_lan(work / "lan1")) as lan:
        result = nspawn.boot(merged, lan, probe, EXPECT)
        result.result["syslog_received"] = lan.syslog()
    return result


@pytest.fixture(scope="module")
def container_second_boot(machine: Any, container_first_boot: nspawn.Boot) -> nspawn.Boot:
    merged, probe, work = machine
    state = merged / "var/lib/incusos-hal"
    assert (state / "config.last-good.toml").is_file(), "boot 1 recorded no last good config"
    (state / "config.toml").write_bytes(b"version = 1\n[[network.interfaces]\nbroken")
    with nspawn.lan(new_lan(work / "lan2")) as lan:
        return nspawn.boot(merged, lan, probe, dict(EXPECT, syslog_marker=None))


def _from_guest(boot: vm.Result) -> nspawn.Boot:
    system: dict[str, Any] = boot.result["system"]
    return nspawn.Boot(system, boot.console)


# Every check runs on both rungs: the container (this module's machine) and the VM guest
# (tests/appliance.py, booted once for all VM checks), which has the same LAN and config
# plus a bond, and boots with Secure Boot on and then in setup mode.
@pytest.fixture(
    scope="module",
    params=[
        pytest.param("container", marks=pytest.mark.nspawn),
        pytest.param("vm", marks=[pytest.mark.vm, pytest.mark.appliance]),
    ],
)
def rung(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def first_boot(rung: str, request: pytest.FixtureRequest) -> nspawn.Boot:
    if rung == "vm":
        return _from_guest(request.getfixturevalue("secure_boot"))
    boot: nspawn.Boot = request.getfixturevalue("container_first_boot")
    return boot


@pytest.fixture(scope="module")
def second_boot(rung: str, first_boot: nspawn.Boot, request: pytest.FixtureRequest) -> nspawn.Boot:
    if rung == "vm":
        return _from_guest(request.getfixturevalue("setup_mode"))
    boot: nspawn.Boot = request.getfixturevalue("container_second_boot")
    return boot


def _link(result: dict[str, Any], name: str) -> dict[str, Any]:
    for link in result["links"]:
        if link["ifname"] == name:
            return link  # type: ignore[no-any-return]
    raise AssertionError(f"no link {name}: {[x['ifname'] for x in result['links']]}")


def expected_network_files(tmp_path: Path) -> dict[str, str]:
    """What `incusos-hal render` writes for this config and the container's NICs."""
    root = build_sysfs(
        tmp_path / "root",
        [
            {"name": "vc0", "hwaddr": LAN0_MAC, "physical": False},
            {"name": "vc1", "hwaddr": LAN1_MAC, "physical": False},
        ],
    )
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["render", "--config", str(config), "--root", str(root), "--out", str(out)]
    )
    assert code == 0, err
    _, files = manifest(out)
    prefix = "/run/systemd/network/"
    return {k[len(prefix) :]: v.decode() for k, v in files.items() if k.startswith(prefix)}


def test_boot_settles(first_boot: nspawn.Boot) -> None:
    r = first_boot.result
    assert r["waited_for"] == {"busy": [], "missing": []}, r["journal_networkd"]
    assert r["failed_units"] == "", r["failed_units"]
    for unit, state in r["active"].items():
        assert state == "active", f"{unit} is {state}"


def test_generator_wired_the_boot(first_boot: nspawn.Boot) -> None:
    r = first_boot.result
    gen = "/run/systemd/generator"
    assert f"{gen}/sysinit.target.wants/incusos-hal-configure.service" in r["generator_files"]
    assert f"{gen}/multi-user.target.wants/systemd-netlogd.service" in r["generator_files"]
    assert f"{gen}/service.d/50-incusos-hal-proxy.conf" in r["generator_files"]


def test_installed_generator_replays_its_cache(first_boot: nspawn.Boot) -> None:
    """The installed script, run again as on daemon-reload, takes the cache path (primed
    at boot) and produces what the boot's generator did, importing none of the slow path."""
    rerun = first_boot.result["generator_rerun"]
    assert rerun["rc"] == 0, rerun["err"]
    ours = [m for m in rerun["imports"] if m.startswith("incusos_hal")]
    # The fast path and the cache codec (state.cachefile, which needs only _blake2).
    expected = {"incusos_hal", "incusos_hal.boot", "incusos_hal.boot.fast"}
    expected |= {"incusos_hal.state", "incusos_hal.state.cachefile"}
    assert set(ours) == expected, rerun["imports"]
    assert not {"os", "tomllib", "dataclasses", "ipaddress"} & set(rerun["imports"])
    booted = {
        f.removeprefix("/run/systemd/generator/") for f in first_boot.result["generator_files"]
    }
    assert rerun["files"] and set(rerun["files"]) <= booted


def test_configure_wrote_what_render_writes(
    rung: str, first_boot: nspawn.Boot, tmp_path: Path
) -> None:
    files = first_boot.result["network_files"]
    if rung == "container":
        assert files == expected_network_files(tmp_path)
    else:
        # The guest's NICs are qemu's: render ran there too, after boot, on the same /sys.
        rendered = first_boot.result["render_here"]
        assert rendered["rc"] == 0, rendered["err"]
        assert files == rendered["files"]
        assert {"10-incusos-bridge-lan0.network", "10-incusos-bond-uplink.netdev"} <= set(files)


def test_networkd_built_the_bridges(first_boot: nspawn.Boot) -> None:
    r = first_boot.result
    port0, port1 = "_p" + LAN0_MAC.replace(":", ""), "_p" + LAN1_MAC.replace(":", "")
    names = {x["ifname"] for x in r["links"]}
    assert {"lan0", "lan1", port0, port1} <= names
    # Renamed: each NIC's MAC is on its port and its bridge only, not a kernel name.
    for mac, bridge, port in ((LAN0_MAC, "lan0", port0), (LAN1_MAC, "lan1", port1)):
        holders = {x["ifname"] for x in r["links"] if x.get("address") == mac}
        assert holders == {bridge, port}, holders
    lan0, lan1 = _link(r, "lan0"), _link(r, "lan1")
    assert lan0["linkinfo"]["info_kind"] == "bridge"
    assert lan0["address"] == LAN0_MAC, "bridge MAC is not its NIC's"
    assert _link(r, port0)["master"] == "lan0"
    assert _link(r, port1)["master"] == "lan1"
    assert lan1["mtu"] == 1400 and _link(r, port1)["mtu"] == 1400
    networkd = {x["Name"]: x for x in r["networkd"]}
    for name in ("lan0", "lan1", port0, port1):
        assert networkd[name]["AdministrativeState"] == "configured", networkd[name]


def test_addresses_and_routes(first_boot: nspawn.Boot) -> None:
    r = first_boot.result
    assert {"10.99.0.2/24", "fd00:99::2/64"} <= set(r["addresses"]["lan0"])
    lan1 = r["addresses"]["lan1"]
    assert any(a.startswith("10.99.1.1") and a.endswith("/24") for a in lan1), lan1  # DHCP
    assert any(a.startswith("fd00:99:1:0:") for a in lan1), lan1  # SLAAC from dnsmasq's RA
    route = [x for x in r["routes"] if x.get("dst") == "10.98.0.0/16"]
    assert route and route[0]["gateway"] == "10.99.0.1" and route[0]["dev"] == "lan0"
    assert r["ping"]["rc"] == 0, r["ping"]


def test_system_settings_follow_the_config(first_boot: nspawn.Boot) -> None:
    r = first_boot.result
    assert r["hostname"] == "ihal-node"
    assert r["localtime"] == "../usr/share/zoneinfo/Europe/Berlin"
    assert r["environ"]["https_proxy"] == "http://svc:pa%3Ass@10.99.0.1:3128"
    assert ".test.example" in r["environ"]["no_proxy"].split(",")
    assert MARKER in r["syslog_received"], "netlogd forwarded nothing to the listener"


def test_units_verify_with_debians_systemd(first_boot: nspawn.Boot) -> None:
    verify = first_boot.result["verify"]
    assert verify["rc"] == 0, verify["out"] + verify["err"]


def test_broken_config_boots_with_the_last_good_one(
    first_boot: nspawn.Boot, second_boot: nspawn.Boot
) -> None:
    r = second_boot.result
    assert r["waited_for"] == {"busy": [], "missing": []}, r["journal_networkd"]
    assert {"10.99.0.2/24", "fd00:99::2/64"} <= set(r["addresses"]["lan0"])
    assert r["network_files"] == first_boot.result["network_files"]
    assert r["hostname"] == "ihal-node"
    # The generator used the last good config too: only it enables netlogd and the proxy.
    # (Its own log goes to /dev/kmsg, which containers do not have; the VM rung reads it.)
    gen = "/run/systemd/generator"
    assert f"{gen}/multi-user.target.wants/systemd-netlogd.service" in r["generator_files"]
    assert f"{gen}/service.d/50-incusos-hal-proxy.conf" in r["generator_files"]
    journal = r["journal_configure"]
    assert "config.toml: not valid TOML" in journal, journal
    assert "using /var/lib/incusos-hal/config.last-good.toml" in journal, journal
    assert r["active"]["incusos-hal-configure.service"] == "active"
