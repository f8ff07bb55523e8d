"""The NIC list from sysfs: a recorded real machine, built trees, and damaged entries."""

from __future__ import annotations

from pathlib import Path

from incusos_hal.hal.net import Nic, list_nics

from conftest import build_sysfs

FIXTURES = Path(__file__).parent / "fixtures"


def test_ci_host_recording() -> None:
    nics, warnings = list_nics(FIXTURES / "ci-host")
    assert warnings == []
    assert [n.name for n in nics] == ["eth0", "ifb0", "ifb1"]  # lo is not Ethernet
    eth0 = nics[0]
    assert eth0 == Nic(name="eth0", hwaddr="02:fc:00:00:00:01", physical=True)
    assert eth0.wired
    assert not any(n.wired for n in nics[1:]), "ifb links are software, not NICs"


def test_kinds_masters_and_bond_members(tmp_path: Path) -> None:
    root = build_sysfs(
        tmp_path,
        [
            {"name": "eno1", "hwaddr": "AA:00:00:00:00:01"},
            {
                "name": "eno2",
                "hwaddr": "aa:00:00:00:00:01",
                "perm_hwaddr": "aa:00:00:00:00:02",
                "master": "bond0",
            },
            {"name": "wlp1s0", "hwaddr": "aa:00:00:00:00:03", "wireless": True},
            {"name": "br0", "hwaddr": "aa:00:00:00:00:04", "physical": False, "devtype": "bridge"},
            {"name": "ib0", "hwaddr": "aa:00:00:00:00:05", "type": 32},
        ],
    )
    nics = {n.name: n for n in list_nics(root)[0]}
    assert sorted(nics) == ["br0", "eno1", "eno2", "wlp1s0"]
    assert nics["eno1"].hwaddr == "aa:00:00:00:00:01"  # normalised
    assert nics["eno2"].hwaddr == "aa:00:00:00:00:02"  # permanent, not the bond's
    assert nics["eno2"].master == "bond0"
    assert nics["br0"].kind == "bridge" and not nics["br0"].wired
    assert nics["wlp1s0"].wireless and not nics["wlp1s0"].wired


def test_damaged_entries_are_skipped_with_a_warning(tmp_path: Path) -> None:
    root = build_sysfs(
        tmp_path,
        [
            {"name": "good", "hwaddr": "aa:00:00:00:00:01"},
            {"name": "badmac", "hwaddr": "not-a-mac"},
            {"name": "notype", "hwaddr": "aa:00:00:00:00:03"},
            {"name": "garbage", "hwaddr": "aa:00:00:00:00:04"},
        ],
    )
    (root / "sys/class/net/notype/type").unlink()
    (root / "sys/class/net/garbage/type").write_bytes(b"\xff\xfe\n")
    nics, warnings = list_nics(root)
    assert [n.name for n in nics] == ["good"]
    assert len(warnings) == 3
    assert any("badmac" in w and "malformed address" in w for w in warnings)


def test_missing_sysfs_is_a_warning(tmp_path: Path) -> None:
    nics, warnings = list_nics(tmp_path / "nothing-here")
    assert nics == () and warnings and "cannot list" in warnings[0]
