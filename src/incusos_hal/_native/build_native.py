"""Builds the cffi (API mode) extension `incusos_hal._native._ihal_native`: the ioctls the
inventory calls per device, in C, so each is one call from Python with no struct packing.

    python build_native.py OUT.c        emit the C source (meson compiles it at install)
    python build_native.py --compile DIR    compile in DIR (the tests' in-tree build)

Each function returns 0 or -errno and never touches memory beyond the lengths given.
"""

from __future__ import annotations

import sys

import cffi

CDEF = """
int ihal_nvme_admin(int fd, uint8_t opcode, uint32_t nsid, uint32_t cdw10, uint32_t cdw11,
                    void *buf, uint32_t len, uint32_t *result);
int ihal_sg_inquiry(int fd, int evpd, int page, void *buf, unsigned int len,
                    unsigned char *sense, unsigned int sense_len, int *resid,
                    unsigned char *status);
int ihal_ethtool(int sock, const char *ifname, void *cmd);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/nvme_ioctl.h>
#include <linux/sockios.h>
#include <scsi/sg.h>

int ihal_nvme_admin(int fd, uint8_t opcode, uint32_t nsid, uint32_t cdw10, uint32_t cdw11,
                    void *buf, uint32_t len, uint32_t *result)
{
    struct nvme_admin_cmd cmd;
    memset(&cmd, 0, sizeof(cmd));
    cmd.opcode = opcode;
    cmd.nsid = nsid;
    cmd.addr = (uint64_t)(uintptr_t)buf;
    cmd.data_len = len;
    cmd.cdw10 = cdw10;
    cmd.cdw11 = cdw11;
    cmd.timeout_ms = 10000;
    int rc = ioctl(fd, NVME_IOCTL_ADMIN_CMD, &cmd);
    if (rc < 0)
        return -errno;
    *result = cmd.result;
    return rc; /* > 0: the NVMe status code of a failed command */
}

int ihal_sg_inquiry(int fd, int evpd, int page, void *buf, unsigned int len,
                    unsigned char *sense, unsigned int sense_len, int *resid,
                    unsigned char *status)
{
    unsigned char cdb[6] = {0x12, evpd ? 1 : 0, (unsigned char)page,
                            (unsigned char)(len >> 8), (unsigned char)len, 0};
    struct sg_io_hdr io;
    if (len > 0xffff || sense_len > 255)
        return -EINVAL;
    memset(&io, 0, sizeof(io));
    io.interface_id = 'S';
    io.dxfer_direction = SG_DXFER_FROM_DEV;
    io.cmd_len = sizeof(cdb);
    io.mx_sb_len = (unsigned char)sense_len;
    io.dxfer_len = len;
    io.dxferp = buf;
    io.cmdp = cdb;
    io.sbp = sense;
    io.timeout = 10000;
    if (ioctl(fd, SG_IO, &io) < 0)
        return -errno;
    *resid = io.resid;
    *status = io.status;
    if (io.host_status || io.driver_status & 0x0f)
        return -EIO;
    return 0;
}

int ihal_ethtool(int sock, const char *ifname, void *cmd)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    if (strlen(ifname) >= IFNAMSIZ)
        return -EINVAL;
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    ifr.ifr_data = cmd;
    if (ioctl(sock, SIOCETHTOOL, &ifr) < 0)
        return -errno;
    return 0;
}
"""

MODULE = "incusos_hal._native._ihal_native"


def builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, SOURCE)
    return ffi


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compile"]:
        print(builder().compile(tmpdir=sys.argv[2]))
    elif len(sys.argv) == 2:
        builder().emit_c_code(sys.argv[1])
    else:
        raise SystemExit(__doc__)
