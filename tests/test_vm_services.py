"""VM rung, /1.0/services against real targets (tests/guest_services.py): an NVMe/TCP
target (nvmet-tcp through configfs) and an iSCSI target (LIO through targetcli) on the
guest's loopback, and the guest's multipath disk, driven through the guest's own
incusos-hal.service. One boot of its own (BIOS, no TPM): the host's kernel has none of
NVMe, iSCSI, configfs or device-mapper."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vm
from appliance import MULTIPATH

pytestmark = pytest.mark.vm

WWN = f"0x{MULTIPATH.wwn:016x}"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("vm-services")
    guest = vm.build(work, _no_initiator_name)
    guest.multipath = MULTIPATH
    # The part drives the API through guest_api's socket client.
    shutil.copy(Path(vm.TESTS, "guest_api.py"), guest.probe_dir / "guest_api.py")
    result = guest.boot(["services"], {"services": {"wwn": WWN}}, timeout=1500)
    part: dict[str, Any] = result.result["services"]
    (Path(work) / "services.json").write_text(json.dumps(part, indent=1))
    yield part


def _no_initiator_name(root: Path) -> None:
    """As on the appliance: no initiator name until the service makes one. Debian's
    open-iscsi package wrote one into the guest root when it was installed (a name made
    at image build time would be every machine's)."""
    (root / "etc/iscsi/initiatorname.iscsi").unlink(missing_ok=True)


def _ok(answer: dict[str, Any], journal: str) -> None:
    assert answer["status"] == 200, (answer, journal[-4000:])


def test_every_listed_service_is_there(services: dict[str, Any]) -> None:
    assert services["list"]["body"]["metadata"] == [
        "/1.0/services/iscsi",
        "/1.0/services/multipath",
        "/1.0/services/nvme",
    ]


def test_nvme_over_tcp_discovery_reset_disconnect_and_direct(services: dict[str, Any]) -> None:
    nvme, journal = services["nvme"], services["journal"]
    assert "crashed" not in nvme, nvme.get("crashed")
    _ok(nvme["put_discovery"], journal)
    state = nvme["get_discovery"]["body"]["metadata"]["state"]
    assert state["host_nqn"].startswith("nqn.2014-08.org.nvmexpress:uuid:")
    (subsystem,) = [s for s in state["subsystems"] if s["nqn"].startswith("nqn.2026-11")]
    (controller,) = subsystem["controllers"]
    assert controller["transport"] == "tcp" and controller["state"] == "live", controller
    assert "traddr=127.0.0.1" in controller["address"] and "trsvcid=4420" in controller["address"]
    assert len(controller["namespaces"]) == 1
    assert nvme["discovery_conf"]["out"] == "--transport=tcp --traddr=127.0.0.1 --trsvcid=4420\n"
    _ok(nvme["reset"], journal)
    _ok(nvme["put_disabled"], journal)
    assert nvme["after_disable"] == [], nvme["after_disable"]
    _ok(nvme["put_direct"], journal)
    direct = nvme["get_direct"]["body"]["metadata"]
    assert [s["nqn"] for s in direct["state"]["subsystems"]] == [
        "nqn.2026-11.org.incusos-hal:loop1"
    ]
    # Nobody serves the wrong NQN: 500, IncusOS's words, the previous document kept.
    wrong = nvme["put_wrong"]
    assert wrong["status"] == 500, wrong
    assert "couldn't connect to NVME subsystem" in wrong["body"]["error"]
    after = nvme["get_after_wrong"]["body"]["metadata"]
    assert after["config"] == direct["config"]
    assert [c["state"] for s in after["state"]["subsystems"] for c in s["controllers"]] == ["live"]


def test_iscsi_login_and_logout(services: dict[str, Any]) -> None:
    iscsi, journal = services["iscsi"], services["journal"]
    assert "crashed" not in iscsi, iscsi.get("crashed")
    _ok(iscsi["put"], journal)
    name = iscsi["get"]["body"]["metadata"]["state"]["initiator_name"]
    assert re.fullmatch(r"iqn\.2004-10\.org\.linuxcontainers:01:[0-9a-f]+", name), name
    # Debian's package made the file (its comments stay); the name in it is ours.
    out = iscsi["initiatorname"]["out"]
    names = [line for line in out.splitlines() if line.startswith("Initiator")]
    assert names == [f"InitiatorName={name}"], iscsi["initiatorname"]["out"]
    assert "iqn.2026-11.org.incusos-hal:loop1" in iscsi["sessions"]["out"], iscsi["sessions"]
    assert any("iqn.2026-11.org.incusos-hal:loop1-lun-0" in p for p in iscsi["by_path"])
    _ok(iscsi["put_disabled"], journal)
    assert "loop1" not in iscsi["sessions_after"]["out"]


def test_multipath_takes_the_listed_disk(services: dict[str, Any]) -> None:
    mp, journal = services["multipath"], services["journal"]
    assert "crashed" not in mp, mp.get("crashed")
    _ok(mp["put"], journal)
    state = mp["get"]["body"]["metadata"]["state"]
    device = state["devices"][WWN]
    (group,) = device["path_groups"]
    assert len(group["paths"]) == 2, (device, mp["multipath_ll"])
    assert all(p["status"] == "running" for p in group["paths"])
    assert device["size"] == "64M", (device, mp["multipath_ll"])
