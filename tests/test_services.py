"""/1.0/services as a client sees it: a real `incusos-hal serve` on a scratch socket and a
scratch target, with the real nvme-cli, open-iscsi and multipath-tools on this machine.

This host's kernel has no NVMe, iSCSI, configfs or device-mapper and loads no modules: a
scratch target is not the running system, so the commands that would connect or log in
(`nvme connect-all`, `iscsiadm --login`, `systemctl start`) are logged, not run. What the
tools compute (host NQN, initiator name) and the files they read (discovery.conf,
multipath.conf, checked by multipath itself) are real.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.config.model import ServiceMultipathConfig
from incusos_hal.services import multipath

import apiserver
from conftest import require_root, require_tool

TOOLS = ("nvme", "iscsiadm", "iscsi-iname", "multipath", "multipathd", "curl", "openssl")
WWN = "0x5000c500a1b2c3d4"
NVME = {
    "enabled": True,
    "targets": [
        {"transport": "tcp", "address": "127.0.0.1", "port": 8009},
        {"transport": "tcp", "address": "::1", "port": 4420, "nqn": "nqn.2026-11.test:disk1"},
    ],
}
ISCSI = {
    "enabled": True,
    "targets": [{"target": "iqn.2026-11.test.example:disk1", "address": "127.0.0.1", "port": 3260}],
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[apiserver.Server]:
    require_tool(*TOOLS)
    srv = apiserver.make(tmp_path, [])
    # The machine it reads: a disk with the WWN multipath may be given.
    root = tmp_path / "root"
    (root / "dev/disk/by-id").mkdir(parents=True)
    (root / "dev/sda").touch()
    (root / "dev/disk/by-id" / f"wwn-{WWN}").symlink_to("../../sda")
    srv.root = root
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _get(api: apiserver.Server, name: str) -> dict[str, Any]:
    r = api.curl("GET", f"/1.0/services/{name}")
    assert r.status == 200, r.body
    metadata: dict[str, Any] = r.json["metadata"]
    return metadata


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_every_listed_service_answers_200(api: apiserver.Server) -> None:
    """IncusOS's TestIncusOSAPIServices: the list is not empty and every URL in it is 200."""
    listed = api.curl("GET", "/1.0/services").json["metadata"]
    assert listed == ["/1.0/services/iscsi", "/1.0/services/multipath", "/1.0/services/nvme"]
    for url in listed:
        assert api.curl("GET", url).status == 200, url
    # IncusOS's shapes, their non-omitempty keys there even when empty.
    assert _get(api, "nvme") == {
        "config": {"enabled": False, "targets": []},
        "state": {"host_id": "", "host_nqn": "", "subsystems": []},
    }
    assert _get(api, "iscsi") == {
        "config": {"enabled": False, "targets": []},
        "state": {"initiator_name": ""},
    }
    assert _get(api, "multipath") == {
        "config": {"enabled": False, "wwns": []},
        "state": {"controllers": [], "devices": {}},
    }


def test_services_not_built_or_unknown_answer_404(api: apiserver.Server) -> None:
    for name in ("ceph", "linstor", "lvm", "netbird", "ovn", "tailscale", "usbip", "nope"):
        r = api.curl("GET", f"/1.0/services/{name}")
        assert r.status == 404, name
        assert api.put(f"/1.0/services/{name}", {"config": {}}).status == 404, name


def test_nvme_put_generates_the_identity_and_discovery_conf(api: apiserver.Server) -> None:
    assert api.put("/1.0/services/nvme", {"config": NVME}).status == 200
    doc = _get(api, "nvme")
    assert doc["config"]["targets"][0] == {
        "transport": "tcp",
        "address": "127.0.0.1",
        "port": 8009,
    }
    assert doc["config"]["targets"][1]["nqn"] == "nqn.2026-11.test:disk1"
    nvme_dir = api.target / "etc/nvme"
    # nvme-cli's own NQN (nvme gen-hostnqn) and a UUID host ID, root's only.
    assert re.fullmatch(
        r"nqn\.2014-08\.org\.nvmexpress:uuid:[0-9a-f-]{36}", doc["state"]["host_nqn"]
    )
    assert re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", doc["state"]["host_id"])
    for name in ("hostnqn", "hostid", "discovery.conf"):
        assert (nvme_dir / name).stat().st_mode & 0o777 == 0o600, name
    # Discovery for the target without an NQN only; the other is connected by name.
    assert (nvme_dir / "discovery.conf").read_text() == (
        "--transport=tcp --traddr=127.0.0.1 --trsvcid=8009\n"
    )
    # The identity is made once: a second change keeps it.
    nqn = doc["state"]["host_nqn"]
    assert api.put("/1.0/services/nvme", {"config": {**NVME, "targets": []}}).status == 200
    assert _get(api, "nvme")["state"]["host_nqn"] == nqn
    assert (nvme_dir / "discovery.conf").read_text() == ""
    # Disabled: discovery.conf goes (IncusOS's Stop), the identity stays.
    assert api.put("/1.0/services/nvme", {"config": {"enabled": False}}).status == 200
    assert not (nvme_dir / "discovery.conf").exists()
    assert _get(api, "nvme")["state"]["host_nqn"] == nqn


def test_get_then_put_changes_no_stored_byte(api: apiserver.Server) -> None:
    assert api.put("/1.0/services/nvme", {"config": NVME}).status == 200
    assert api.put("/1.0/services/iscsi", {"config": ISCSI}).status == 200
    assert (
        api.put("/1.0/services/multipath", {"config": {"enabled": True, "wwns": [WWN]}}).status
        == 200
    )
    stored, files = api.config_file.read_bytes(), _files(api.target)
    for name in ("nvme", "iscsi", "multipath"):
        doc = _get(api, name)
        assert api.put(f"/1.0/services/{name}", doc).status == 200, name
        assert api.config_file.read_bytes() == stored, name
        assert _files(api.target) == files, name


def test_iscsi_put_generates_the_initiator_name(api: apiserver.Server) -> None:
    assert api.put("/1.0/services/iscsi", {"config": ISCSI}).status == 200
    name = _get(api, "iscsi")["state"]["initiator_name"]
    # open-iscsi's own generator with IncusOS's prefix: iscsi-iname prints its random
    # part in hex without leading zeros, so it is up to 12 digits long.
    assert re.fullmatch(r"iqn\.2004-10\.org\.linuxcontainers:01:[0-9a-f]{1,12}", name), name
    path = api.target / "etc/iscsi/initiatorname.iscsi"
    assert path.read_text() == f"InitiatorName={name}\n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (api.target / "etc/iscsi/iscsid.conf").read_bytes() == b""
    assert _get(api, "iscsi")["config"] == ISCSI


def test_an_initiator_file_with_comments_is_read_as_iscsid_reads_it(
    api: apiserver.Server,
) -> None:
    # Debian's open-iscsi package writes its name under five comment lines (seen in the
    # VM rung: the whole file came back as the name).
    path = api.target / "etc/iscsi/initiatorname.iscsi"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "## DO NOT EDIT OR REMOVE THIS FILE!\n## If you remove this file, ...\n"
        "InitiatorName=iqn.1993-08.org.debian:01:a9db47acbcf3\n"
    )
    assert api.put("/1.0/services/iscsi", {"config": ISCSI}).status == 200
    name = _get(api, "iscsi")["state"]["initiator_name"]
    assert name == "iqn.1993-08.org.debian:01:a9db47acbcf3"  # kept, as IncusOS keeps it


@pytest.mark.parametrize(
    ("name", "config", "error"),
    [
        (
            "nvme",
            {"enabled": True, "targets": [{"transport": "tcp", "address": "target", "port": 4420}]},
            "config.targets[0].address: 'target' is not an IP address",
        ),
        (
            "nvme",
            {"enabled": True, "targets": [{"transport": "tcp", "address": "10.0.0.1"}]},
            "config.targets[0].port: 0 is not a port (1-65535)",
        ),
        (
            "nvme",
            {"enabled": True, "targets": [{"transport": "rdma", "address": "10.0.0.1"}]},
            "config.targets[0].transport: 'rdma' is not one of tcp, fc",
        ),
        (
            "nvme",
            {
                "enabled": True,
                "targets": [
                    {"transport": "tcp", "address": "10.0.0.1", "port": 1, "nqn": "nqn.a b"}
                ],
            },
            "config.targets[0].nqn: 'nqn.a b' is not an NVMe qualified name",
        ),
        (
            "nvme",
            {"enabled": True, "targets": [{"transport": "fc", "address": "nn-0x1:pn-0x2"}]},
            "config.targets[0].address: 'nn-0x1:pn-0x2' is not a Fibre Channel address",
        ),
        ("nvme", {"enabled": "yes"}, "config.enabled: expected true or false, got a string"),
        ("nvme", {"targets": [{"address": "10.0.0.1"}]}, "config.targets[0].transport: required"),
        ("nvme", {"wwns": []}, "config.wwns: unknown key"),
        (
            "iscsi",
            {"enabled": True, "targets": [{"target": "disk1", "address": "10.0.0.1"}]},
            "config.targets[0].target: 'disk1' is not an iSCSI name",
        ),
        (
            "iscsi",
            {"targets": [{"target": "iqn.2026-11.a.b", "address": "a\nb"}]},
            "config.targets[0].address: 'a\\nb' is not an IP address or a DNS name",
        ),
        (
            "iscsi",
            {"targets": [{"target": "iqn.2026-11.a.b", "address": "10.0.0.1", "port": 70000}]},
            "config.targets[0].port: 70000 is not a port (1-65535)",
        ),
        ("multipath", {"wwns": ['0x5000c500a1b2c3d4"']}, "config.wwns[0]: "),
        ("multipath", {"wwns": [WWN, WWN]}, "config.wwns[1]: '0x5000c500a1b2c3d4' is already"),
        (
            "multipath",
            {"enabled": True, "wwns": ["0x5000c500a1b2c3ff"]},
            'config.wwns[0]: failed to locate WWN "0x5000c500a1b2c3ff"',
        ),
    ],
)
def test_bad_input_is_400_naming_the_field_and_stores_nothing(
    api: apiserver.Server, name: str, config: dict[str, Any], error: str
) -> None:
    stored, files = api.config_file.read_bytes(), _files(api.target)
    r = api.put(f"/1.0/services/{name}", {"config": config})
    assert r.status == 400, r.body
    assert r.json["error"].startswith(error), r.json["error"]
    assert api.config_file.read_bytes() == stored
    assert _files(api.target) == files


def test_bad_bodies_are_400(api: apiserver.Server) -> None:
    for body in ([], {"config": []}, {"settings": {}}):
        assert api.put("/1.0/services/nvme", body).status == 400, body


def test_reset(api: apiserver.Server) -> None:
    # IncusOS's words: only nvme (and lvm) have a reset; nvme's needs it enabled.
    r = api.curl("POST", "/1.0/services/iscsi/:reset")
    assert (r.status, r.json["error"]) == (400, "reset isn't supported by this service")
    r = api.curl("POST", "/1.0/services/nvme/:reset")
    assert (r.status, r.json["error"]) == (400, "NVME isn't currently enabled")
    assert api.put("/1.0/services/nvme", {"config": NVME}).status == 200
    assert api.curl("POST", "/1.0/services/nvme/:reset").status == 200
    assert api.curl("POST", "/1.0/services/ceph/:reset").status in (404, 405)


@pytest.mark.root
def test_multipath_conf_is_read_by_multipath_as_written(
    api: apiserver.Server, tmp_path: Path
) -> None:
    """multipath -t (its configuration as it parsed it) run with the rendered file as
    /etc/multipath.conf, in a mount namespace with an overlay on /etc."""
    require_root()
    require_tool("unshare")
    assert (
        api.put("/1.0/services/multipath", {"config": {"enabled": True, "wwns": [WWN]}}).status
        == 200
    )
    conf = api.target / "etc/multipath.conf"
    assert conf.read_bytes() == multipath.render(ServiceMultipathConfig(True, (WWN,)))
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    (upper / "multipath.conf").write_bytes(conf.read_bytes())
    overlay = f"lowerdir=/etc,upperdir={upper},workdir={work}"
    script = f"mount -t overlay overlay -o {overlay} /etc && multipath -t"
    out = subprocess.run(
        ["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, check=True
    ).stdout
    sections = _conf_sections(out)
    assert 'wwid ".*"' in sections["blacklist"]
    assert sections["blacklist_exceptions"][0] == 'wwid "^35000c500a1b2c3d4$"'
    assert 'find_multipaths "off"' in sections["defaults"]  # "no", as multipath names it
    # Disabled: the file goes, the stored document says so.
    assert (
        api.put("/1.0/services/multipath", {"config": {"enabled": False, "wwns": [WWN]}}).status
        == 200
    )
    assert not conf.exists()


def _conf_sections(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.endswith(" {") and not line.startswith(("\t", " ")):
            current = out.setdefault(line[:-2], [])
        elif line.startswith("\t") and not line.startswith("\t\t") and current is not None:
            current.append(line.strip())
    return out


def test_multipath_writer_refuses_what_would_end_a_string() -> None:
    with pytest.raises(ValueError):
        multipath._quoted('a"b')
    with pytest.raises(ValueError):
        multipath._quoted("a\nb")


def test_nvme_subsystems_from_sysfs(tmp_path: Path) -> None:
    """The layout the kernel gives /sys/class/nvme-subsystem (a fabrics controller nvme1
    with its namespace seen as nvme1c1n1)."""
    from incusos_hal.services import Machine
    from incusos_hal.services.nvme import subsystems

    sub = tmp_path / "sys/class/nvme-subsystem/nvme-subsys1"
    ctrl = sub / "nvme1"
    (ctrl / "nvme1c1n1").mkdir(parents=True)
    (sub / "nvme1n1").mkdir()
    (sub / "subsysnqn").write_text("nqn.2026-11.test:disk1\n")
    (ctrl / "transport").write_text("tcp\n")
    (ctrl / "address").write_text("traddr=127.0.0.1,trsvcid=4420,src_addr=127.0.0.1\n")
    (ctrl / "state").write_text("live\n")
    assert subsystems(Machine(root=str(tmp_path))) == [
        {
            "name": "nvme-subsys1",
            "nqn": "nqn.2026-11.test:disk1",
            "controllers": [
                {
                    "name": "nvme1",
                    "transport": "tcp",
                    "address": "traddr=127.0.0.1,trsvcid=4420,src_addr=127.0.0.1",
                    "state": "live",
                    "namespaces": ["nvme1n1"],
                }
            ],
        }
    ]
    assert os.path.isdir(sub)


def test_multipath_devices_from_sysfs(tmp_path: Path) -> None:
    """The layout the kernel gives a dm multipath map (uuid mpath-<WWID>, its paths as
    slaves, each a SCSI disk at H:C:T:L): one device per listed WWN, its paths' state."""
    from incusos_hal.services import Machine

    blocks = tmp_path / "sys/class/block"
    dm = blocks / "dm-0"
    (dm / "dm").mkdir(parents=True)
    (dm / "dm/uuid").write_text("mpath-35000c500a1b2c3d4\n")
    (dm / "dm/name").write_text("35000c500a1b2c3d4\n")
    (dm / "size").write_text(f"{64 * 2048}\n")
    for hctl, name, state in (("2:0:0:0", "sda", "running"), ("3:0:0:0", "sdb", "offline")):
        scsi = tmp_path / "sys/devices/pci0000:00" / hctl
        scsi.mkdir(parents=True)
        (scsi / "state").write_text(f"{state}\n")
        (scsi / "vendor").write_text("QEMU    \n")
        (scsi / "model").write_text("QEMU HARDDISK   \n")
        (blocks / name).mkdir()
        (blocks / name / "device").symlink_to(scsi)
        (dm / "slaves").mkdir(exist_ok=True)
        (dm / "slaves" / name).symlink_to(blocks / name)
    config = ServiceMultipathConfig(True, (WWN, "0x5000c500a1b2c3ff"))
    state = multipath.read_state(Machine(root=str(tmp_path)), config)
    assert state == {
        "controllers": [],
        "devices": {
            WWN: {
                "vendor": "QEMU,QEMU HARDDISK",
                "size": "64M",
                "path_groups": [
                    {
                        "policy": "",
                        "priority": 0,
                        "status": "",
                        "paths": [
                            {"id": "2:0:0:0", "status": "running"},
                            {"id": "3:0:0:0", "status": "offline"},
                        ],
                    }
                ],
            }
        },
    }
    # Disabled: no devices (IncusOS reads them only while enabled).
    off = multipath.read_state(Machine(root=str(tmp_path)), ServiceMultipathConfig(False, (WWN,)))
    assert off["devices"] == {}


def test_iscsi_loads_the_kernels_transport_through_systemd_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """iscsiadm's discovery needs the iSCSI transport module; the API's sandbox may not
    load modules, so modprobe@iscsi_tcp.service is started before iscsid (a machine
    that has the module already is left alone)."""
    from incusos_hal.config.model import ServiceISCSIConfig
    from incusos_hal.services import Machine, iscsi

    said: list[str] = []
    machine = Machine(root="/nonexistent", target="/nonexistent", live=False,
                      log=lambda level, message: said.append(message))  # fmt: skip
    monkeypatch.setattr(iscsi, "ensure_initiator", lambda m: None)  # no files here
    iscsi.start(machine, ServiceISCSIConfig(enabled=True))
    skipped = [m.removeprefix("not the running system: skipped ") for m in said]
    assert skipped[:2] == [
        "systemctl start modprobe@iscsi_tcp.service",
        "systemctl start iscsid.service",
    ], said
