"""incusos_hal.storage_info, the library a migration tool imports: drives from a recorded
machine (tests/fixtures/vm-guest), and on this host, where ZFS is unavailable, pools and
datasets that say so rather than raise. Imported alone, it loads no part of the service."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from incusos_hal import storage_info

HERE = Path(__file__).resolve().parent
GUEST = HERE / "fixtures/vm-guest"


def test_drives_of_a_recorded_machine(tmp_path: Path) -> None:
    drives = storage_info.list_drives(str(GUEST), tmp_path)
    assert [(d["id"], d["capacity_in_bytes"], d["bus"]) for d in drives] == [
        ("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_IHALNVME0001", 64 << 20, "nvme"),
        ("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_IHALNVME0001_2", 32 << 20, "nvme"),
        ("/dev/disk/by-id/nvme-QEMU_NVMe_Ctrl_IHALNVME0002", 96 << 20, "nvme"),
    ]
    assert all(d["serial_number"].startswith("IHALNVME000") for d in drives)
    assert not any(d["boot"] or "encrypted" in d for d in drives)
    # A drive whose LUKS key the state dir holds is shown encrypted, as IncusOS does.
    (tmp_path / "luks.nvme-QEMU_NVMe_Ctrl_IHALNVME0002.key").write_bytes(b"k" * 32)
    (encrypted,) = [d for d in storage_info.list_drives(str(GUEST), tmp_path) if "encrypted" in d]
    assert encrypted["id"].endswith("IHALNVME0002")
    assert encrypted["encrypted_id"] == "/dev/mapper/luks-nvme-QEMU_NVMe_Ctrl_IHALNVME0002"


def test_without_zfs_pools_and_datasets_say_why(tmp_path: Path) -> None:
    for listing in (storage_info.list_pools(tmp_path), storage_info.list_datasets("local")):
        assert listing.items == []
        assert listing.unavailable.startswith("ZFS unavailable: "), listing
    with pytest.raises(ValueError, match="not a pool name"):
        storage_info.list_datasets("local; rm -rf /")


def test_the_library_loads_none_of_the_service(tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from incusos_hal import storage_info\n"
        f"d = storage_info.list_drives({str(GUEST)!r}, {str(tmp_path)!r})\n"
        f"p = storage_info.list_pools({str(tmp_path)!r})\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('aiohttp', 'incusos_hal.api',"
        " 'incusos_hal.apply', 'incusos_hal.boot')))\n"
        "print(json.dumps([len(d), p.unavailable != '', heavy]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(done.stdout) == [3, True, []], done.stdout
