"""The three ioctls the inventory makes per device: NVMe admin passthrough, SCSI INQUIRY
over SG_IO, and SIOCETHTOOL. Two backends with one interface:

- "cffi": the extension compiled at install (build_native.py), C filling the kernel's
  structs; the fast path.
- "python": the same ioctls from the standard library (fcntl.ioctl, struct, ctypes
  buffers for the data the kernel writes through pointers); used when the extension is
  absent (no compiler at install), and by the tests to check both agree.

Every function returns the raw bytes the kernel wrote and raises OSError (with the errno)
when the ioctl fails; parsing and length checks are the callers' (hal.nvme, hal.scsi,
hal.ethtool), which trust no length field they did not check against the buffer.
"""

from __future__ import annotations

import errno
import fcntl
import importlib
import os
import struct

# Not `typing.TYPE_CHECKING`, and ctypes only in the "python" backend's functions: with
# the extension built, an inventory's ioctls import neither.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

NVME_IOCTL_ADMIN_CMD = 0xC0484E41  # _IOWR('N', 0x41, struct nvme_admin_cmd), 72 bytes
SG_IO = 0x2285
SIOCETHTOOL = 0x8946
SG_DXFER_FROM_DEV = -3
SENSE_LEN = 32

# struct nvme_admin_cmd (linux/nvme_ioctl.h) and struct sg_io_hdr (scsi/sg.h), native
# alignment as the C compiler lays them out: 72 and 88 bytes on 64-bit.
_NVME_ADMIN_CMD = "=BBHIIIQQII6III"
_SG_IO_HDR = "@iiBBHIPPPIIiPBBBBHHiII0P"  # 0P: the tail padding to 8

_compiled: ModuleType | None = None
try:
    _compiled = importlib.import_module("incusos_hal._native._ihal_native")
except ImportError:
    _compiled = None
backend = "cffi" if _compiled is not None else "python"


def use(name: str, module: ModuleType | None = None) -> None:
    """Select a backend ("cffi", optionally with a compiled module to use, or "python")."""
    global backend, _compiled
    if name == "cffi":
        if module is not None:
            _compiled = module
        if _compiled is None:
            raise ImportError("the cffi extension incusos_hal._native._ihal_native is not built")
    elif name != "python":
        raise ValueError(f"no backend {name!r}")
    backend = name


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


def nvme_admin(
    fd: int, opcode: int, nsid: int, cdw10: int, cdw11: int, length: int
) -> tuple[int, bytes]:
    """An NVMe admin command reading `length` bytes: (NVMe status, data). Status 0 is
    success; a positive one is the controller's error for the command."""
    if backend == "cffi":
        assert _compiled is not None
        ffi, lib = _compiled.ffi, _compiled.lib
        buf = ffi.new("unsigned char[]", length)
        result = ffi.new("uint32_t *")
        rc = _check(
            lib.ihal_nvme_admin(fd, opcode, nsid, cdw10, cdw11, buf, length, result),
            "NVMe admin",
        )
        return rc, bytes(ffi.buffer(buf, length))
    import ctypes

    buf_py = ctypes.create_string_buffer(length)
    cmd = bytearray(
        struct.pack(
            _NVME_ADMIN_CMD,
            opcode,
            0,
            0,
            nsid,
            0,
            0,
            0,
            ctypes.addressof(buf_py),
            0,
            length,
            cdw10,
            cdw11,
            0,
            0,
            0,
            0,
            10000,
            0,
        )
    )
    try:
        rc = fcntl.ioctl(fd, NVME_IOCTL_ADMIN_CMD, cmd, True)
    except OSError as e:
        raise OSError(e.errno, f"NVMe admin: {os.strerror(e.errno or errno.EIO)}") from None
    return rc, buf_py.raw


def sg_inquiry(fd: int, evpd: bool, page: int, length: int) -> tuple[int, bytes]:
    """SCSI INQUIRY (standard, or the VPD page `page` if `evpd`): (SCSI status, the bytes
    the device returned, shortened by what it left unwritten)."""
    if not 0 < length <= 0xFFFF:
        raise ValueError("INQUIRY allocation length must be 1..65535")
    if backend == "cffi":
        assert _compiled is not None
        ffi, lib = _compiled.ffi, _compiled.lib
        buf = ffi.new("unsigned char[]", length)
        sense = ffi.new("unsigned char[]", SENSE_LEN)
        resid = ffi.new("int *")
        status = ffi.new("unsigned char *")
        _check(
            lib.ihal_sg_inquiry(fd, int(evpd), page, buf, length, sense, SENSE_LEN, resid, status),
            "SG_IO INQUIRY",
        )
        got = length - max(0, min(resid[0], length))
        return status[0], bytes(ffi.buffer(buf, got))
    import ctypes

    data = ctypes.create_string_buffer(length)
    cdb = ctypes.create_string_buffer(
        bytes([0x12, 1 if evpd else 0, page, length >> 8, length & 0xFF, 0]), 6
    )
    sense_py = ctypes.create_string_buffer(SENSE_LEN)
    hdr = bytearray(
        struct.pack(
            _SG_IO_HDR,
            ord("S"),
            SG_DXFER_FROM_DEV,
            6,
            SENSE_LEN,
            0,
            length,
            ctypes.addressof(data),
            ctypes.addressof(cdb),
            ctypes.addressof(sense_py),
            10000,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        )
    )
    fcntl.ioctl(fd, SG_IO, hdr, True)
    fields: tuple[Any, ...] = struct.unpack(_SG_IO_HDR, hdr)
    status, host_status, driver_status, resid = fields[13], fields[17], fields[18], fields[19]
    if host_status or driver_status & 0x0F:
        raise OSError(errno.EIO, "SG_IO INQUIRY: transport error")
    got = length - max(0, min(resid, length))
    return status, data.raw[:got]


def ethtool(sock: int, ifname: str, request: bytes) -> bytes:
    """One SIOCETHTOOL request (an ethtool command struct, cmd first); returns the struct
    as the kernel left it."""
    name = ifname.encode()
    if not name or len(name) >= 16:
        raise ValueError(f"not an interface name: {ifname!r}")
    if backend == "cffi":
        assert _compiled is not None
        ffi, lib = _compiled.ffi, _compiled.lib
        buf = ffi.new("unsigned char[]", request)
        _check(lib.ihal_ethtool(sock, name, buf), f"SIOCETHTOOL {ifname}")
        return bytes(ffi.buffer(buf, len(request)))
    import ctypes

    buf_py = ctypes.create_string_buffer(request, len(request))
    ifreq = bytearray(struct.pack("16sP16x", name, ctypes.addressof(buf_py)))
    try:
        fcntl.ioctl(sock, SIOCETHTOOL, ifreq, True)
    except OSError as e:
        raise OSError(e.errno, f"SIOCETHTOOL {ifname}: {os.strerror(e.errno or 0)}") from None
    return buf_py.raw[: len(request)]
