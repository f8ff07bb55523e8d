"""Shared test helpers. The checkout's src/ comes first on the path: the suite tests the
code as it is in the tree, not whatever version is installed."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import vm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

# What a test needs, as markers (registered in pyproject.toml, --strict-markers), so the
# fast loop can leave out what boots a machine (ci/test --quick: not nspawn, not vm) and
# a machine without root or swtpm can leave those out too. Tests using these fixtures
# get the marker here; a module or test marks itself for what no fixture says
# (`pytest.mark.vm`, `.nspawn`, `.root`).
FIXTURE_MARKS = {
    "swtpm": "swtpm",
    "appliance": "vm",
    "secure_boot": "vm",
    "setup_mode": "vm",
}
# Booting a container or the VM guest needs root, and is what `system` has always meant.
IMPLIED_MARKS = {"nspawn": ("system", "root"), "vm": ("system", "root"), "image": ("root",)}
_current: pytest.Item | None = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            if fixture in FIXTURE_MARKS:
                item.add_marker(FIXTURE_MARKS[fixture])
        for marker, implied in IMPLIED_MARKS.items():
            if item.get_closest_marker(marker):
                for name in implied:
                    item.add_marker(name)
        if item.get_closest_marker("system") and not (
            item.get_closest_marker("nspawn") or item.get_closest_marker("vm")
        ):
            raise pytest.UsageError(f"{item.nodeid}: marked system but neither nspawn nor vm")
        if "appliance" in getattr(item, "fixturenames", ()):
            # ci/test's second phase runs these (two boots of one machine) in one process
            # and every other rung in another, side by side.
            item.add_marker("appliance")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before the item's fixtures are set up: require_root() in a fixture sees its test.
    global _current
    _current = item


def require_tool(*names: str) -> None:
    """A test needing a missing tool fails, saying which: CI installs them (ci/setup)."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.fail(f"needs {', '.join(missing)} on PATH; run ci/setup as root to install")


def require_root() -> None:
    """A test needing root fails without it; and must be marked `root`, so that
    `-m "not root"` leaves out every test that would fail that way."""
    if _current is not None and _current.get_closest_marker("root") is None:
        pytest.fail(f"{_current.nodeid} needs root but is not marked: add @pytest.mark.root")
    if os.geteuid() != 0:
        pytest.fail("needs root (network namespaces, systemd-nspawn, loop devices)")


def build_sysfs(root: Path, nics: list[dict[str, Any]]) -> Path:
    """A /sys/class/net tree shaped as the kernel lays it out, from a list of NICs.

    Each NIC: name, hwaddr, and optionally physical (bool, default true: gets a PCI
    `device` link), wireless, type (ARPHRD, default 1), devtype, master, perm_hwaddr.
    """
    classdir = root / "sys/class/net"
    classdir.mkdir(parents=True, exist_ok=True)
    for index, nic in enumerate(nics, start=2):
        name = nic["name"]
        if nic.get("physical", True):
            pci = f"0000:00:{index:02x}.0"
            devdir = root / "sys/devices/pci0000:00" / pci
            (devdir / "net" / name).mkdir(parents=True)
            (devdir / "vendor").write_text("0x8086\n")
            (devdir / "device").write_text("0x10d3\n")
            (devdir / "numa_node").write_text("-1\n")
            netdir = devdir / "net" / name
            (netdir / "device").symlink_to(os.path.relpath(devdir, netdir))
        else:
            netdir = root / "sys/devices/virtual/net" / name
            netdir.mkdir(parents=True)
        (classdir / name).symlink_to(os.path.relpath(netdir, classdir))
        (netdir / "address").write_text(nic["hwaddr"] + "\n")
        (netdir / "type").write_text(f"{nic.get('type', 1)}\n")
        (netdir / "addr_assign_type").write_text("0\n")
        (netdir / "ifindex").write_text(f"{index}\n")
        (netdir / "flags").write_text("0x1002\n")
        uevent = f"INTERFACE={name}\nIFINDEX={index}\n"
        if nic.get("devtype"):
            uevent = f"DEVTYPE={nic['devtype']}\n" + uevent
        (netdir / "uevent").write_text(uevent)
        if nic.get("wireless"):
            (netdir / "wireless").mkdir()
        if nic.get("perm_hwaddr"):
            (netdir / "bonding_slave").mkdir()
            (netdir / "bonding_slave" / "perm_hwaddr").write_text(nic["perm_hwaddr"] + "\n")
        if nic.get("master"):
            # Only the link's last component is read; the kernel's target is the
            # master's device directory.
            (netdir / "master").symlink_to(f"../../../virtual/net/{nic['master']}")
    return root


def load_nics(path: Path) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(path.read_text())
    return data


# The VM rung's machine (tests/appliance.py), shared by every VM test module: booting it
# costs minutes under software emulation, so it boots twice per run and all checks read
# those two boots.
@pytest.fixture(scope="session")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> vm.Guest:
    import appliance as machine

    require_root()
    require_tool(
        "qemu-system-x86_64",
        "debootstrap",
        "systemd-nspawn",
        "mkfs.ext4",
        "debugfs",
        "swtpm",
        "sbsign",
        "openssl",
        "dnsmasq",
    )
    for firmware in (
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/ovmf/PkKek-1-snakeoil.key",
    ):
        if not Path(firmware).exists():
            pytest.fail(f"needs {firmware} (Debian's ovmf package); run ci/setup as root")
    return machine.build(tmp_path_factory.mktemp("appliance"))


@pytest.fixture(scope="session")
def secure_boot(appliance: vm.Guest) -> vm.Result:
    """Boot 1: Secure Boot on (snakeoil keys enrolled, the kernel signed with them)."""
    import appliance as machine

    return machine.boot(
        appliance, "secureboot", "secureboot", syslog_marker=True, parts=machine.FIRST_BOOT_PARTS
    )


@pytest.fixture(scope="session")
def setup_mode(appliance: vm.Guest, secure_boot: vm.Result) -> vm.Result:
    """Boot 2 of the same disks and TPM: firmware without keys, config.toml corrupted."""
    import appliance as machine

    machine.corrupt_config(appliance)
    parts = (*machine.PARTS, "api")
    return machine.boot(appliance, "uefi", "setup-mode", syslog_marker=False, parts=parts)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def swtpm(tmp_path: Path) -> Any:
    """A fresh TPM 2.0 (swtpm, TCP) for one test: its TCTI string. Every PCR starts at
    zero and no key exists yet, as on a machine just out of a TPM clear."""
    import subprocess
    import time

    require_tool("swtpm")
    state = tmp_path / "swtpm"
    state.mkdir()
    for _ in range(5):
        # The swtpm TCTI talks to the control channel on the command port + 1.
        server = _free_port()
        ctrl = server + 1
        proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={server},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={ctrl},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={state}",
                "--flags",
                "startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", server), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        if proc.poll() is None:
            break
    else:
        pytest.fail(f"swtpm did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
    try:
        yield f"swtpm:host=127.0.0.1,port={server}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- LUKS2 images ----------------------------------------------------------------------------

LUKS_KEY = b"first passphrase"  # the first keyslot's, on throwaway images


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """A 32 MiB LUKS2 image file, keyslot 0 opening with LUKS_KEY (fast PBKDF2)."""
    from incusos_hal.hal import luks

    image = tmp_path / "volume.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    luks.format_volume(
        image, LUKS_KEY, pbkdf=luks.Pbkdf(type="pbkdf2", hash="sha256", iterations=1000)
    )
    return image


def opens(device: Path, key: bytes | str) -> bool:
    """cryptsetup's own answer: does this key open the volume?"""
    import subprocess

    require_tool("cryptsetup")
    data = key.encode() if isinstance(key, str) else key
    return (
        subprocess.run(
            ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(device)],
            input=data,
            capture_output=True,
        ).returncode
        == 0
    )


def force_tpm_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """hal.tpm as on a machine where _native.tss's libraries do not load: tpm2-pytss for
    everything (a soname that does not exist, and the loaded libraries forgotten)."""
    from incusos_hal._native import tss

    monkeypatch.setattr(tss, "TCTILDR_SONAME", "libtss2-tctildr-absent.so.0")
    monkeypatch.setattr(tss, "_libs", None)
    assert not tss.available()
