"""VM rung, API: at the end of boot 2 the guest's socket-activated incusos-hal.service
takes network changes through its unix socket (tests/guest_api.py): a VLAN on the LACP
bond's bridge and an address on a host VLAN, both applied by networkd on a real kernel;
then a change that drops the host VLAN's addresses, never confirmed, rolled back."""

from __future__ import annotations

import json
from typing import Any

import pytest

import apiserver
import appliance
import vm

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def api(setup_mode: vm.Result) -> dict[str, Any]:
    part: dict[str, Any] = setup_mode.result["api"]
    return part


def test_a_vlan_on_the_bond_through_the_api(api: dict[str, Any]) -> None:
    assert api["get_status"] == 200 and "TriggeredBy=incusos-hal.socket" in api["service"]
    assert api["put"]["status"] == 200, (api["put"], api["journal"])
    assert api["added_after_s"] is not None, (api["addresses_end"], api["journal"])
    assert api["vlan_after_s"] is not None, (api["vlan_link"], api["journal"])
    (link,) = json.loads(api["vlan_link"])
    wanted = appliance.API["vlan"]
    assert link["linkinfo"]["info_kind"] == "vlan"
    assert link["linkinfo"]["info_data"]["id"] == wanted["id"]
    assert link["link"] == wanted["parent"]


def test_an_unconfirmed_change_is_rolled_back(api: dict[str, Any]) -> None:
    apiserver.check_rolled_back(api)
    assert '"error_code": 403' in api["nobody"], api["nobody"]
