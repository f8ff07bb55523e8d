"""ethtool's view of a NIC through SIOCETHTOOL (the ioctl `ethtool` itself uses for these):
driver info (ETHTOOL_GDRVINFO) and link settings (ETHTOOL_GLINKSETTINGS), which fill
the resources API's supported_modes, supported_ports, port_type, transceiver_type,
auto_negotiation, link speed and duplex, and the card's firmware_version.

Both replies are checked before use: the link-mode word count the kernel hands back in
the handshake must be sane, and strings are cut at their NUL within their field.
"""

from __future__ import annotations

import _socket
import contextlib
import struct
from dataclasses import dataclass, field

from .. import _native

ETHTOOL_GDRVINFO = 0x03
ETHTOOL_GLINKSETTINGS = 0x4C
DRVINFO = "=I32s32s32s32s32s12s5I"  # struct ethtool_drvinfo, 196 bytes
LINK_HEADER = "=IIBBBBBBBbBBBB7I"  # struct ethtool_link_settings before its masks, 48 bytes
MAX_NWORDS = 32  # the kernel has 3 today (__ETHTOOL_LINK_MODE_MASK_NBITS <= 96)

# enum ethtool_link_mode_bit_indices (linux/ethtool.h), in bit order.
LINK_MODES = (
    "10baseT_Half",
    "10baseT_Full",
    "100baseT_Half",
    "100baseT_Full",
    "1000baseT_Half",
    "1000baseT_Full",
    "Autoneg",
    "TP",
    "AUI",
    "MII",
    "FIBRE",
    "BNC",
    "10000baseT_Full",
    "Pause",
    "Asym_Pause",
    "2500baseX_Full",
    "Backplane",
    "1000baseKX_Full",
    "10000baseKX4_Full",
    "10000baseKR_Full",
    "10000baseR_FEC",
    "20000baseMLD2_Full",
    "20000baseKR2_Full",
    "40000baseKR4_Full",
    "40000baseCR4_Full",
    "40000baseSR4_Full",
    "40000baseLR4_Full",
    "56000baseKR4_Full",
    "56000baseCR4_Full",
    "56000baseSR4_Full",
    "56000baseLR4_Full",
    "25000baseCR_Full",
    "25000baseKR_Full",
    "25000baseSR_Full",
    "50000baseCR2_Full",
    "50000baseKR2_Full",
    "100000baseKR4_Full",
    "100000baseSR4_Full",
    "100000baseCR4_Full",
    "100000baseLR4_ER4_Full",
    "50000baseSR2_Full",
    "1000baseX_Full",
    "10000baseCR_Full",
    "10000baseSR_Full",
    "10000baseLR_Full",
    "10000baseLRM_Full",
    "10000baseER_Full",
    "2500baseT_Full",
    "5000baseT_Full",
    "FEC_NONE",
    "FEC_RS",
    "FEC_BASER",
    "50000baseKR_Full",
    "50000baseSR_Full",
    "50000baseCR_Full",
    "50000baseLR_ER_FR_Full",
    "50000baseDR_Full",
    "100000baseKR2_Full",
    "100000baseSR2_Full",
    "100000baseCR2_Full",
    "100000baseLR2_ER2_FR2_Full",
    "100000baseDR2_Full",
    "200000baseKR4_Full",
    "200000baseSR4_Full",
    "200000baseLR4_ER4_FR4_Full",
    "200000baseDR4_Full",
    "200000baseCR4_Full",
    "100baseT1_Full",
    "1000baseT1_Full",
    "400000baseKR8_Full",
    "400000baseSR8_Full",
    "400000baseLR8_ER8_FR8_Full",
    "400000baseDR8_Full",
    "400000baseCR8_Full",
    "FEC_LLRS",
    "100000baseKR_Full",
    "100000baseSR_Full",
    "100000baseLR_ER_FR_Full",
    "100000baseCR_Full",
    "100000baseDR_Full",
    "200000baseKR2_Full",
    "200000baseSR2_Full",
    "200000baseLR2_ER2_FR2_Full",
    "200000baseDR2_Full",
    "200000baseCR2_Full",
    "400000baseKR4_Full",
    "400000baseSR4_Full",
    "400000baseLR4_ER4_FR4_Full",
    "400000baseDR4_Full",
    "400000baseCR4_Full",
    "100baseFX_Half",
    "100baseFX_Full",
    "10baseT1L_Full",
)
PORTS = {
    0: "twisted pair",
    1: "AUI",
    2: "media-independent",
    3: "fibre",
    4: "BNC",
    5: "direct attach",
    0xEF: "none",
    0xFF: "other",
}
PORT_BITS = {
    "TP": "twisted pair",
    "AUI": "AUI",
    "MII": "media-independent",
    "FIBRE": "fibre",
    "BNC": "BNC",
    "Backplane": "backplane",
}
TRANSCEIVERS = {0: "internal", 1: "external"}
SPEED_UNKNOWN = 0xFFFFFFFF


@dataclass
class DriverInfo:
    driver: str
    version: str
    firmware_version: str
    bus_info: str


@dataclass
class LinkSettings:
    speed: int  # Mbit/s, 0 when unknown
    duplex: str  # full, half, or ""
    port_type: str
    transceiver_type: str
    auto_negotiation: bool
    supported_modes: list[str] = field(default_factory=list)
    supported_ports: list[str] = field(default_factory=list)


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def parse_drvinfo(raw: bytes) -> DriverInfo:
    if len(raw) < struct.calcsize(DRVINFO):
        raise ValueError(f"ethtool_drvinfo: {len(raw)} bytes, expected {struct.calcsize(DRVINFO)}")
    _, driver, version, fw, bus, *_ = struct.unpack_from(DRVINFO, raw)
    return DriverInfo(_cstr(driver), _cstr(version), _cstr(fw), _cstr(bus))


def mode_names(words: tuple[int, ...]) -> list[str]:
    names = []
    for i, word in enumerate(words):
        for bit in range(32):
            if word >> bit & 1:
                index = i * 32 + bit
                names.append(LINK_MODES[index] if index < len(LINK_MODES) else f"bit{index}")
    return names


def parse_link_settings(raw: bytes, nwords: int) -> LinkSettings:
    header = struct.calcsize(LINK_HEADER)
    if not 0 < nwords <= MAX_NWORDS or len(raw) < header + 12 * nwords:
        raise ValueError(f"ethtool_link_settings: {len(raw)} bytes for {nwords} mask words")
    fields = struct.unpack_from(LINK_HEADER, raw)
    speed, duplex, port, autoneg, transceiver = (
        fields[1],
        fields[2],
        fields[3],
        fields[5],
        fields[10],
    )
    supported = struct.unpack_from(f"={nwords}I", raw, header)
    names = mode_names(supported)
    return LinkSettings(
        speed=0 if speed in (0, SPEED_UNKNOWN) else speed,
        duplex={0: "half", 1: "full"}.get(duplex, ""),
        port_type=PORTS.get(port, ""),
        transceiver_type=TRANSCEIVERS.get(transceiver, ""),
        auto_negotiation=autoneg == 1,
        # "1000baseT_Full" -> "1000baseT/Full", as ethtool and Incus print them.
        supported_modes=[
            n.rsplit("_", 1)[0] + "/" + n.rsplit("_", 1)[1] for n in names if "base" in n
        ],
        supported_ports=[PORT_BITS[n] for n in names if n in PORT_BITS],
    )


def _sock() -> contextlib.closing[_socket.socket]:
    """A socket to aim the ioctl at, from the C module: `socket` would build its enums
    and load selectors (milliseconds of a cold inventory) for one descriptor."""
    return contextlib.closing(_socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM))


def raw_drvinfo(ifname: str) -> bytes:
    request = struct.pack("=I", ETHTOOL_GDRVINFO) + bytes(struct.calcsize(DRVINFO) - 4)
    with _sock() as s:
        return _native.ethtool(s.fileno(), ifname, request)


def raw_link_settings(ifname: str) -> bytes:
    """The two-step request: ask with no mask words, the kernel answers how many it has
    (negated), then ask again with room for them. The reply holds 3 masks of that many
    words after the header (supported, advertising, link partner)."""
    header = struct.calcsize(LINK_HEADER)
    with _sock() as s:
        probe = struct.pack("=I", ETHTOOL_GLINKSETTINGS) + bytes(header - 4)
        reply = _native.ethtool(s.fileno(), ifname, probe)
        nwords = -struct.unpack_from("=b", reply, 15)[0]
        if not 0 < nwords <= MAX_NWORDS:
            raise ValueError(f"{ifname}: ethtool handshake gave {nwords} mask words")
        request = bytearray(header + 12 * nwords)
        struct.pack_into("=I", request, 0, ETHTOOL_GLINKSETTINGS)
        struct.pack_into("=b", request, 15, nwords)
        return _native.ethtool(s.fileno(), ifname, bytes(request))


def driver_info(ifname: str) -> DriverInfo:
    return parse_drvinfo(raw_drvinfo(ifname))


def link_settings(ifname: str) -> LinkSettings:
    raw = raw_link_settings(ifname)
    return parse_link_settings(raw, (len(raw) - struct.calcsize(LINK_HEADER)) // 12)
