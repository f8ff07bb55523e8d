"""The ioctl fast paths on this host, with both backends: the cffi extension (compiled
here from build_native.py, as meson does at install) and the pure-Python fallback.

SIOCETHTOOL runs against a real veth pair and is compared with the `ethtool` tool; the
NVMe and SCSI parsers run on reply buffers built per the specs, whole, truncated and
lying about their lengths (the devices themselves are the VM rung's: test_vm_native.py).
"""

from __future__ import annotations

import contextlib
import secrets
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incusos_hal import _native
from incusos_hal.hal import ethtool, nvme, scsi

from conftest import REPO, require_root, require_tool


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> object:
    out = tmp_path_factory.mktemp("native")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "src/incusos_hal/_native/build_native.py"),
            "--compile",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"cffi build failed (needs gcc and python3-dev): {proc.stderr}"
    import importlib.util

    so = next(Path(out).rglob("_ihal_native*.so"))
    spec = importlib.util.spec_from_file_location("incusos_hal._native._ihal_native", so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["cffi", "python"])
def backend(request: pytest.FixtureRequest, compiled: object) -> Iterator[str]:
    before = _native.backend
    _native.use(request.param, compiled if request.param == "cffi" else None)  # type: ignore[arg-type]
    yield str(request.param)
    _native.use(before)


@pytest.fixture(scope="module")
def veth() -> Iterator[str]:
    require_root()
    require_tool("ip", "ethtool")
    name = f"ihv{secrets.token_hex(2)}"
    subprocess.run(
        ["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True
    )
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


@pytest.mark.root  # the veth fixture makes a link
def test_ethtool_matches_the_tool(backend: str, veth: str) -> None:
    info = ethtool.driver_info(veth)
    tool_i = subprocess.run(["ethtool", "-i", veth], capture_output=True, text=True).stdout
    assert f"driver: {info.driver}" in tool_i and f"version: {info.version}" in tool_i
    link = ethtool.link_settings(veth)
    tool = subprocess.run(["ethtool", veth], capture_output=True, text=True).stdout
    assert f"Speed: {link.speed}Mb/s" in tool
    assert f"Duplex: {link.duplex.capitalize()}" in tool
    assert "Port: Twisted Pair" in tool and link.port_type == "twisted pair"
    assert f"Transceiver: {link.transceiver_type}" in tool
    assert ("Auto-negotiation: off" in tool) == (not link.auto_negotiation)


def test_ethtool_errors_name_the_interface(backend: str) -> None:
    with pytest.raises(OSError, match="SIOCETHTOOL ihal-nonesuch"):
        ethtool.driver_info("ihal-nonesuch")
    with pytest.raises(ValueError):
        ethtool.driver_info("x" * 16)


def test_link_modes_decode() -> None:
    header = bytearray(struct.calcsize(ethtool.LINK_HEADER))
    struct.pack_into("=IIBB", header, 0, ethtool.ETHTOOL_GLINKSETTINGS, 25000, 1, 3)
    masks = struct.pack("=9I", 1 << 5 | 1 << 10 | 1 << 6, 1 << 1, 0, 0, 0, 0, 0, 0, 0)
    link = ethtool.parse_link_settings(bytes(header) + masks, 3)
    assert link.supported_modes == ["1000baseT/Full", "25000baseSR/Full"]  # bits 5, 33
    assert link.supported_ports == ["fibre"]
    assert (link.speed, link.duplex, link.port_type) == (25000, "full", "fibre")
    with pytest.raises(ValueError):
        ethtool.parse_link_settings(bytes(header) + masks[:-4], 3)  # short mask
    with pytest.raises(ValueError):
        ethtool.parse_link_settings(bytes(header), 200)  # absurd word count


def id_ctrl_buffer() -> bytes:
    b = bytearray(4096)
    struct.pack_into("<HH", b, 0, 0x1B36, 0x1AF4)
    b[4:24] = b"IHALNVME0001".ljust(20)
    b[24:64] = b"QEMU NVMe Ctrl".ljust(40)
    b[64:72] = b"8.0.0".ljust(8)
    b[77] = 7
    struct.pack_into("<HI", b, 78, 1, 0x00010400)
    b[280:296] = (256 << 20).to_bytes(16, "little")
    struct.pack_into("<I", b, 516, 256)
    b[768 : 768 + 25] = b"nqn.2019-08.org.qemu:ihal"
    return bytes(b)


def test_nvme_parsers() -> None:
    c = nvme.parse_id_ctrl(id_ctrl_buffer())
    assert (c.vid, c.ssvid, c.sn, c.mn, c.fr) == (
        0x1B36,
        0x1AF4,
        "IHALNVME0001",
        "QEMU NVMe Ctrl",
        "8.0.0",
    )
    assert (c.mdts, c.cntlid, c.ver, c.nn, c.tnvmcap) == (7, 1, 0x10400, 256, 256 << 20)
    assert c.subnqn == "nqn.2019-08.org.qemu:ihal"
    ns = bytearray(4096)
    struct.pack_into("<QQQ", ns, 0, 1000, 1000, 10)
    ns[25], ns[26] = 1, 1  # two formats, the second in use
    ns[128 + 2], ns[132 + 2] = 9, 12
    parsed = nvme.parse_id_ns(bytes(ns))
    assert (parsed.nsze, parsed.nlbaf, parsed.block_size) == (1000, 1, 4096)
    log = bytearray(512)
    log[0], log[3] = 0, 100
    struct.pack_into("<H", log, 1, 310)
    log[128:144] = (1234).to_bytes(16, "little")
    smart = nvme.parse_smart_log(bytes(log))
    assert (smart.temperature, smart.avail_spare, smart.power_on_hours) == (310, 100, 1234)
    for parser, size in ((nvme.parse_id_ctrl, 4096), (nvme.parse_smart_log, 512)):
        with pytest.raises(ValueError, match="expected"):
            parser(bytes(size - 1))


def vpd83(designators: list[tuple[int, int, bytes]]) -> bytes:
    body = b"".join(bytes([code, flags, 0, len(v)]) + v for code, flags, v in designators)
    return bytes([0, 0x83]) + len(body).to_bytes(2, "big") + body


def test_scsi_parsers() -> None:
    std = bytes([0, 0, 5, 2, 31, 0, 0, 0]) + b"QEMU    " + b"QEMU HARDDISK   " + b"2.5+"
    assert scsi.parse_inquiry(std) == scsi.Inquiry(0, "QEMU", "QEMU HARDDISK", "2.5+")
    assert scsi.parse_serial(bytes([0, 0x80, 0, 11]) + b"IHALMPATH01") == "IHALMPATH01"
    ident = scsi.parse_device_identification(
        vpd83([(2, 0x01, b"QEMU    QEMU HARDDISK"), (1, 0x03, bytes.fromhex("5000c50015ea71ac"))])
    )
    assert ident.wwid == "naa.5000c50015ea71ac"
    with pytest.raises(ValueError, match="says 40 bytes"):
        scsi.parse_serial(bytes([0, 0x80, 0, 40]) + b"short")
    lying = bytearray(vpd83([(1, 0x03, bytes(8))]))
    lying[7] = 200  # the designator claims more than the page holds
    with pytest.raises(ValueError, match="runs past"):
        scsi.parse_device_identification(bytes(lying))
    with pytest.raises(ValueError):
        scsi.parse_inquiry(std[:20])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 255))
def test_parsers_reject_junk_cleanly(data: bytes, page: int) -> None:
    for call in (
        lambda: scsi.parse_serial(data),
        lambda: scsi.parse_device_identification(data),
        lambda: scsi.parse_inquiry(data),
        lambda: nvme.parse_id_ctrl(data),
        lambda: nvme.parse_smart_log(data),
        lambda: ethtool.parse_drvinfo(data),
        lambda: ethtool.parse_link_settings(data, page),
    ):
        with contextlib.suppress(ValueError, struct.error):
            call()


def test_sg_inquiry_refuses_bad_lengths() -> None:
    with pytest.raises(ValueError):
        _native.sg_inquiry(0, True, 0x80, 0)
    with pytest.raises(ValueError):
        _native.sg_inquiry(0, True, 0x80, 70000)
