"""The Incus-shaped network section, on the recorded CI host and on built trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incusos_hal.inventory import UnknownSection, scan

from conftest import build_sysfs
from golden import run_cli

FIXTURES = Path(__file__).parent / "fixtures"


def test_ci_host_network_section_is_incus_shaped() -> None:
    doc = scan(FIXTURES / "ci-host", ["network"])
    assert doc == json.loads((FIXTURES / "ci-host" / "inventory-network.json").read_text())
    card = doc["network"]["cards"][0]
    # Keys and types as lxc/incus shared/api/resource.go's ResourcesNetworkCard(Port).
    assert set(card) <= {
        "driver",
        "driver_version",
        "ports",
        "sriov",
        "vdpa",
        "numa_node",
        "pci_address",
        "vendor",
        "vendor_id",
        "product",
        "product_id",
        "firmware_version",
        "usb_address",
    }
    for port in card["ports"]:
        assert {"id", "port", "protocol", "auto_negotiation", "link_detected"} <= set(port)


def test_software_links_are_not_cards(tmp_path: Path) -> None:
    root = build_sysfs(
        tmp_path,
        [
            {"name": "eno1", "hwaddr": "aa:00:00:00:00:01"},
            {"name": "br0", "hwaddr": "aa:00:00:00:00:04", "physical": False},
        ],
    )
    doc = scan(root, ["network"])["network"]
    assert doc["total"] == 1
    assert [p["id"] for p in doc["cards"][0]["ports"]] == ["eno1"]


def test_sections_not_built_yet_are_errors_not_empty_answers() -> None:
    with pytest.raises(UnknownSection, match="not implemented yet"):
        scan("/", ["storage"])
    with pytest.raises(UnknownSection, match="no inventory section"):
        scan("/", ["bogus"])
    code, _, err = run_cli(["inventory", "cpu"])
    assert code == 2 and "not implemented yet" in err


@pytest.mark.parametrize("fmt", ["json", "yaml", "table"])
def test_cli_formats(fmt: str) -> None:
    code, out, err = run_cli(
        ["inventory", "--root", str(FIXTURES / "ci-host"), "--format", fmt, "network"]
    )
    assert code == 0, err
    assert "02:fc:00:00:00:01" in out and "virtio_net" in out
    if fmt == "json":
        assert json.loads(out)["network"]["total"] == 1
    if fmt == "yaml":
        assert 'pci_address: "0000:00:03.0"' in out
        assert out.startswith("network:\n  cards:\n    - driver:")
