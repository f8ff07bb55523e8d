"""The inventory HAL: Incus's resources API sections and the additions, on recorded and
built machines, on this machine live, and on bad input.

Every scan validates against tests/schema/incus-resources.schema.json (transcribed from
lxc/incus shared/api/resource.go, commit in the file). Each fixture tree has a golden
inventory.json (ci/regen-golden rewrites them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incusos_hal import inventory
from incusos_hal.inventory import UnknownSection, scan
from incusos_hal.inventory.cpu import parse_cpuinfo, parse_cpulist
from incusos_hal.inventory.hwdata import parse_ids
from incusos_hal.inventory.memory import parse_meminfo
from incusos_hal.inventory.pci import parse_vpd
from incusos_hal.inventory.record import record
from incusos_hal.inventory.survey import survey

from conftest import build_sysfs, require_root, require_tool
from golden import SECTIONS, fixture_trees, run_cli, scan_tree

HERE = Path(__file__).parent
FIXTURES = HERE / "fixtures"
SCHEMA = json.loads((HERE / "schema/incus-resources.schema.json").read_text())
TREES = [t.name for t in fixture_trees()]


def incus_valid(doc: dict[str, object]) -> None:
    """The Incus sections of `doc` against Incus's schema."""
    jsonschema.validate({k: doc[k] for k in inventory.INCUS_SECTIONS}, SCHEMA)


def test_fixture_trees_exist() -> None:
    assert {"ci-host", "fc-host", "nvme-tcp-host", "vm-guest"} <= set(TREES)


@pytest.mark.parametrize("tree", TREES)
def test_tree_matches_its_golden(tree: str) -> None:
    expected = (FIXTURES / tree / "inventory.json").read_text()
    assert scan_tree(FIXTURES / tree) == expected, "run ci/regen-golden and review the diff"


@pytest.mark.parametrize("tree", TREES)
def test_tree_is_incus_shaped(tree: str) -> None:
    incus_valid(scan(FIXTURES / tree))


def test_this_machine_is_incus_shaped() -> None:
    doc = scan("/")
    incus_valid(doc)
    assert doc["cpu"]["total"] >= 1 and doc["memory"]["total"] > 0


def test_schema_rejects_what_incus_would_not_send() -> None:
    doc = scan(FIXTURES / "ci-host")
    doc["cpu"]["sockets"][0]["cores"][0]["frequncy"] = 1  # a misspelt key
    with pytest.raises(jsonschema.ValidationError):
        incus_valid(doc)
    doc = scan(FIXTURES / "ci-host")
    del doc["storage"]["disks"][0]["device_id"]  # a required key
    with pytest.raises(jsonschema.ValidationError):
        incus_valid(doc)


def test_record_replays_this_machine(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    manifest = record(tree)
    listed = json.loads((tree / "MANIFEST.json").read_text())
    assert len(listed["entries"]) == len(manifest.entries) > 50
    for entry in listed["entries"][:20]:
        assert (tree / entry["path"]).is_symlink() or (tree / entry["path"]).is_file()
    # What does not move between two reads is the same from the tree as from the machine.
    stable = [s for s in SECTIONS if s not in ("load", "memory")]
    assert scan(tree, stable) == scan("/", stable)


def test_record_refuses_a_directory_with_content(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(FileExistsError):
        record(tmp_path)
    code, _, err = run_cli(["record", str(tmp_path)])
    assert code == 2 and "not empty" in err
    assert (tmp_path / "x").read_text() == "keep me"


def test_fc_host() -> None:
    doc = scan(FIXTURES / "fc-host", ["fibre_channel", "multipath", "storage"])
    hosts = doc["fibre_channel"]["hosts"]
    assert [h["wwpn"] for h in hosts] == ["0x21000024ff7f0f2a", "0x21000024ff7f0f2b"]
    assert all(h["port_state"] == "Online" and h["driver"] == "qla2xxx" for h in hosts)
    assert [r["roles"] for h in hosts for r in h["remote_ports"]] == ["FCP Target"] * 2
    (mp,) = doc["multipath"]["maps"]
    assert mp["wwid"] == "3600a098038303053453f463045727a4f"
    assert sorted(p["id"] for p in mp["paths"]) == ["sdb", "sdc"]
    assert {d["wwn"] for d in doc["storage"]["disks"]} == {"naa.600a098038303053453f463045727a4f"}


def test_nvme_tcp_host() -> None:
    doc = scan(FIXTURES / "nvme-tcp-host", ["nvme", "storage"])
    (sub,) = doc["nvme"]["subsystems"]
    assert sub["nqn"] == "nqn.2014-08.org.example:storage:array1"
    assert [c["transport"] for c in sub["controllers"]] == ["tcp", "tcp"]
    assert sub["controllers"][1]["address"].startswith("traddr=192.0.2.11,trsvcid=4420")
    for c in sub["controllers"]:
        (ns,) = c["namespaces"]
        assert ns["id"] == "nvme0n1" and ns["paths"] == ["nvme0c0n1", "nvme0c1n1"]
    (disk,) = doc["storage"]["disks"]
    assert (disk["id"], disk["type"], disk["block_size"]) == ("nvme0n1", "nvme", 4096)


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


def test_unknown_sections_are_errors_not_empty_answers() -> None:
    with pytest.raises(UnknownSection, match="no inventory section 'bogus'"):
        scan("/", ["bogus"])
    code, _, err = run_cli(["inventory", "bogus"])
    assert code == 2 and "bogus" in err


def test_load_keeps_incus_keys_unless_asked() -> None:
    tree = FIXTURES / "fc-host"
    assert scan(tree, ["load"])["load"] == {
        "Average1Min": 0.5,
        "Average5Min": 0.4,
        "Average10Min": 0.3,  # Incus's name for the 15 minute average
        "Processes": 345,
    }
    assert scan(tree, ["load"], load_snake_case=True)["load"] == {
        "average_1min": 0.5,
        "average_5min": 0.4,
        "average_15min": 0.3,
        "processes": 345,
    }


@pytest.mark.parametrize("fmt", ["json", "yaml", "table"])
def test_cli_formats(fmt: str) -> None:
    code, out, err = run_cli(
        ["inventory", "--root", str(FIXTURES / "ci-host"), "--format", fmt, "network", "storage"]
    )
    assert code == 0, err
    assert "02:fc:00:00:00:01" in out and "virtio_net" in out and "vda" in out
    if fmt == "json":
        assert json.loads(out)["network"]["total"] == 1
    if fmt == "yaml":
        assert 'pci_address: "0000:00:03.0"' in out
        assert out.startswith("network:\n  cards:\n    - driver:")
    if fmt == "table":
        assert "PORT" in out and "DISK" in out


def test_cli_table_for_every_section() -> None:
    code, out, err = run_cli(
        ["inventory", "--root", str(FIXTURES / "fc-host"), "--format", "table", *SECTIONS]
    )
    assert code == 0, err
    for needle in ("0x21000024ff7f0f2b", "3600a098038303053453f463045727a4f", "Example Servers"):
        assert needle in out


def test_cli_fast_path_reads_only_what_argparse_reads_the_same_way() -> None:
    """`inventory` with --root, --format and sections is answered before argparse; every
    other shape is left to the parser."""
    from incusos_hal import cli

    shapes = {
        ("inventory",): (None, None, []),
        ("inventory", "storage"): (None, None, ["storage"]),
        ("inventory", "--format", "json", "cpu", "pci"): (None, "json", ["cpu", "pci"]),
        ("inventory", "cpu", "pci", "--root", "/r"): ("/r", None, ["cpu", "pci"]),
        ("inventory", "--root", "/r", "cpu", "--format", "yaml"): ("/r", "yaml", ["cpu"]),
        ("inventory", ""): (None, None, [""]),  # argparse's too: an unknown section
    }
    for argv, expected in shapes.items():
        assert cli._inventory_args(list(argv)) == expected, argv
    for argv in (
        [],
        ["survey"],
        ["inventory", "--help"],
        ["inventory", "-h"],
        ["inventory", "--format=json"],
        ["inventory", "--form", "json"],  # argparse expands abbreviations
        ["inventory", "--format", "xml"],
        ["inventory", "--format"],
        ["inventory", "--format", "json", "--format", "json"],
        ["inventory", "--root", ""],
        ["inventory", "--root", "-x"],
        ["inventory", "--load-snake-case", "load"],
        ["inventory", "cpu", "--root", "/r", "pci"],  # argparse refuses the second run
        ["inventory", "--", "cpu"],
    ):
        assert cli._inventory_args(argv) is None, argv


@pytest.mark.parametrize("tree", TREES)
def test_cli_fast_path_answers_as_the_parser_path(tree: str) -> None:
    """The same stdout, stderr and exit status with and without argparse, in every format,
    for Incus's sections, the additions and an unknown section. (--load-snake-case, which
    changes nothing without `load`, sends the same arguments through the parser.)"""
    root = str(FIXTURES / tree)
    extras = ["nvme", "tpm", "secure_boot", "fibre_channel", "multipath"]
    no_load = [s for s in SECTIONS if s != "load"]
    for fmt in ("json", "yaml", "table"):
        for sections in (no_load, extras, ["storage"], ["storage", "bogus"]):
            argv = ["inventory", "--root", root, "--format", fmt, *sections]
            fast = run_cli(argv)
            assert fast == run_cli([*argv, "--load-snake-case"]), (fmt, sections)
            assert fast[0] == (2 if "bogus" in sections else 0), fast


# Bad input: the scan reports what it can and never crashes.

GARBAGE = [b"", b"\x00\xff\xfe garbage \x00", b"-1", b"99999999999999999999999999", b"0x", b"\n\n"]


@pytest.mark.parametrize("junk", GARBAGE)
@pytest.mark.parametrize("tree", ["ci-host", "fc-host", "nvme-tcp-host"])
def test_garbage_in_every_file(tmp_path: Path, tree: str, junk: bytes) -> None:
    root = tmp_path / tree
    shutil.copytree(FIXTURES / tree, root, symlinks=True)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.name not in ("NOTE.md",):
            path.write_bytes(junk)
    doc = scan(root, SECTIONS)
    incus_valid(doc)


def test_missing_everything(tmp_path: Path) -> None:
    doc = scan(tmp_path, SECTIONS)
    incus_valid(doc)
    assert doc["cpu"]["total"] == 0 and doc["storage"]["disks"] == []
    assert doc["system"]["type"] == "unknown"


def test_truncated_and_dangling(tmp_path: Path) -> None:
    root = tmp_path / "t"
    shutil.copytree(FIXTURES / "nvme-tcp-host", root, symlinks=True)
    shutil.rmtree(root / "sys/devices/virtual/nvme-fabrics/ctl/nvme1")  # dangling class link
    (root / "sys/devices/virtual/nvme-subsystem/nvme-subsys0/nvme0n1/size").write_text("12ab")
    doc = scan(root, ["nvme", "storage"])
    (sub,) = doc["nvme"]["subsystems"]
    assert [c["id"] for c in sub["controllers"]] == ["nvme0"]
    assert doc["storage"]["disks"][0]["size"] == 0  # unreadable size: reported as unknown


# Parsers of what the kernel hands over.


def vpd_image() -> bytes:
    name = b"Example 25GbE 2-port Adapter"
    ro = (
        b"PN" + bytes([6]) + b"ABC123" + b"SN" + bytes([4]) + b"0042" + b"RV" + bytes([1]) + b"\x00"
    )
    return (
        bytes([0x82])
        + len(name).to_bytes(2, "little")
        + name
        + bytes([0x90])
        + len(ro).to_bytes(2, "little")
        + ro
        + bytes([0x78])
    )


def test_vpd_parses_name_and_keywords() -> None:
    vpd = parse_vpd(vpd_image())
    assert vpd.product_name == "Example 25GbE 2-port Adapter"
    assert vpd.entries == {"PN": "ABC123", "SN": "0042"}


def test_vpd_truncated_keeps_what_came_before() -> None:
    image = vpd_image()
    cut = parse_vpd(image[: image.index(b"SN") + 4])  # the SN keyword claims 4 bytes, has 1
    assert cut.product_name == "Example 25GbE 2-port Adapter"
    assert cut.entries == {}  # the read-only resource's length runs past the buffer
    lying = bytearray(image)
    lying[1:3] = (0xFFFF).to_bytes(2, "little")  # a length far past the end
    assert parse_vpd(bytes(lying)).product_name == ""


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_vpd_never_raises(data: bytes) -> None:
    vpd = parse_vpd(data)
    assert len(vpd.product_name) <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_text_parsers_never_raise(text: str) -> None:
    parse_cpulist(text)
    parse_cpuinfo(text)
    parse_meminfo(text)
    parse_ids(text)


def test_ids_and_lists() -> None:
    vendors, devices = parse_ids(
        "# comment\n1af4  Red Hat, Inc.\n\t1041  Virtio 1.0 network device\n"
        "\t\t1af4 1100  QEMU\nC 02  Network controller\n\t00  Ethernet controller\n"
    )
    assert vendors == {"1af4": "Red Hat, Inc."}
    assert devices == {("1af4", "1041"): "Virtio 1.0 network device"}
    assert parse_cpulist("0-3,8,x,10-9") == {0, 1, 2, 3, 8}
    assert parse_meminfo("MemTotal: 10 kB\nHugePages_Total: 3\nbad\n") == {
        "MemTotal": 10240,
        "HugePages_Total": 3,
    }


# The host survey for migration tools.


def test_survey_live_and_recorded() -> None:
    live = survey("/")
    assert live["source"] == "live" and live["cpus"] >= 1 and live["memory"] > 0
    assert live["firmware"] in ("uefi", "bios") and live["os"]["id"]
    recorded = survey(FIXTURES / "ci-host")
    assert recorded["source"] == "recorded"
    assert recorded["nics"] == [{"id": "eth0", "mac": "02:fc:00:00:00:01", "driver": "virtio_net"}]
    assert [d["id"] for d in recorded["disks"]] == ["vda"]
    assert (recorded["firmware"], recorded["secure_boot"], recorded["tpm"]) == (
        "bios",
        False,
        False,
    )


@pytest.mark.root
def test_survey_of_a_mounted_disk_image(tmp_path: Path) -> None:
    """Another machine's root filesystem, as an ext4 image mounted read-only: what its
    files tell is reported, what only the running machine could tell is unknown."""
    require_root()
    require_tool("mkfs.ext4", "mount", "umount")
    content = tmp_path / "content"
    (content / "etc").mkdir(parents=True)
    (content / "usr/bin").mkdir(parents=True)
    (content / "etc/os-release").write_text(
        'NAME="Rocky Linux"\nVERSION="9.4 (Blue Onyx)"\nID="rocky"\nVERSION_ID="9.4"\n'
        'PRETTY_NAME="Rocky Linux 9.4 (Blue Onyx)"\n'
    )
    (content / "etc/hostname").write_text("db01\n")
    (content / "etc/fstab").write_text(
        "UUID=1 / xfs defaults 0 0\nUUID=2 /boot/efi vfat umask=077 0 2\n"
    )
    shutil.copy(os.path.realpath("/bin/sh"), content / "usr/bin/sh")
    (content / "bin").symlink_to("usr/bin")
    image, mnt = tmp_path / "root.img", tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(image), "16M"], check=True)
    subprocess.run(["mount", "-o", "loop,ro", str(image), str(mnt)], check=True)
    try:
        doc = survey(mnt)
        code, out, _ = run_cli(["survey", "--root", str(mnt)])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    assert doc["source"] == "image"
    assert doc["os"] == {
        "name": "Rocky Linux",
        "id": "rocky",
        "version": "9.4 (Blue Onyx)",
        "version_id": "9.4",
        "pretty_name": "Rocky Linux 9.4 (Blue Onyx)",
    }
    assert doc["hostname"] == "db01" and doc["architecture"] == os.uname().machine
    for key in ("firmware", "secure_boot", "tpm", "cpus", "memory", "disks", "nics"):
        assert doc[key] is None and "no sysfs" in doc["unknown"][key]
    assert doc["hints"]["firmware"].startswith("uefi")
    assert code == 0 and json.loads(out) == doc


def test_a_kernel_reply_with_a_bad_length_is_left_out_with_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "t"
    shutil.copytree(FIXTURES / "ci-host", root, symlinks=True)
    reply = root / "ioctl/ethtool/eth0/link-settings"
    reply.write_bytes(reply.read_bytes()[:-5])
    doc, warnings = inventory.scan_with_warnings(root, ["network"])
    (port,) = doc["network"]["cards"][0]["ports"]
    assert port["id"] == "eth0" and "port_type" not in port and "transceiver_type" not in port
    assert warnings == ["eth0: ethtool: a link settings reply of 91 bytes; left out"]
    code, _, err = run_cli(["inventory", "--root", str(root), "network"])
    assert code == 0 and "warning: eth0: ethtool" in err


def test_vm_guest_tree() -> None:
    """The guest of the VM rung, recorded inside it (tests/fixtures/vm-guest/NOTE.md)."""
    doc, warnings = inventory.scan_with_warnings(FIXTURES / "vm-guest", SECTIONS)
    assert warnings == []
    controllers = [c for s in doc["nvme"]["subsystems"] for c in s["controllers"]]
    assert sorted(c["serial"] for c in controllers) == ["IHALNVME0001", "IHALNVME0002"]
    assert all(c["transport"] == "pcie" and c["smart"]["passed"] for c in controllers)
    assert sorted(len(c["namespaces"]) for c in controllers) == [1, 2]
    (mp,) = doc["multipath"]["maps"]
    assert mp["wwid"] == "35000c50015ea71ac"
    assert sorted(p["id"] for p in mp["paths"]) == ["sda", "sdb"]
    disks = {d["id"]: d for d in doc["storage"]["disks"]}
    assert disks["sda"]["serial"] == disks["sdb"]["serial"] == "IHALMPATH01"
    assert disks["sda"]["wwn"] == "0x5000c50015ea71ac"
    # udev gives multipath members no by-id links (the map has them); NVMe disks do.
    assert disks["nvme0n1"]["type"] == "nvme" and disks["nvme0n1"]["device_id"]
    assert disks["sda"]["device_id"] == ""
    (tpm,) = doc["tpm"]["devices"]
    assert (tpm["version"], tpm["resource_manager"], tpm["event_log"]) == ("2.0", "tpmrm0", True)
    assert doc["secure_boot"]["enabled"] and doc["secure_boot"]["firmware"] == "uefi"
    assert doc["system"]["type"] == "virtual-machine"
    ports = [p for c in doc["network"]["cards"] for p in c["ports"]]
    assert ports and all(p.get("transceiver_type") == "internal" for p in ports)


@pytest.mark.parametrize("tree", ["fc-host", "nvme-tcp-host"])
def test_record_of_a_tree_replays_it(tmp_path: Path, tree: str) -> None:
    """Recording walks the device graph: dm slaves, FC hosts and remote ports, NVMe
    subsystems and their controllers survive a recording of a recording."""
    record(tmp_path / "again", FIXTURES / tree)
    assert scan(tmp_path / "again", SECTIONS) == scan(FIXTURES / tree, SECTIONS)


def test_name_lookup_agrees_with_the_full_parse() -> None:
    """Names are looked up in the .ids text without parsing it whole; every vendor and
    device of the system's files must come out as the full parse has them."""
    from incusos_hal.inventory import hwdata

    for candidates, lookup in (
        (hwdata.PCI_IDS, hwdata.pci_names),
        (hwdata.USB_IDS, hwdata.usb_names),
    ):
        vendors, devices = hwdata.load("/", candidates)
        assert len(devices) > 1000, f"{candidates[0]} missing: ci/setup installs pci.ids/usb.ids"
        for (vendor, device), name in list(devices.items())[::7]:
            assert lookup(Path("/"), vendor, device) == (vendors[vendor], name)
        assert lookup(Path("/"), "zzzz", "0000") == ("", "")
