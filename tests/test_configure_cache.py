"""The configure step's boot cache: `incusos-hal configure --boot` as the unit runs it.

Every run is a separate process through the CLI's entry point, against a built sysfs and
a scratch target. Each case runs the command twice from the same starting state: as it
comes (the fast path when the cache holds) and with configure.cache removed (the full
path, always right); the target, the state directory (every byte, the caches included)
and the log must come out the same. Each way a cache can be stale is a case that must
take the full path.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from incusos_hal import __version__
from incusos_hal.apply import fast
from incusos_hal.boot import generator
from incusos_hal.cli import _configure_boot_options
from incusos_hal.hal import net
from incusos_hal.state import store

from conftest import build_sysfs

SRC = str(Path(__file__).resolve().parent.parent / "src")
UNIT_DIR = "/usr/lib/systemd/system"
MACS = ["52:54:00:0a:00:01", "52:54:00:0a:00:02", "52:54:00:0a:00:03"]
CONFIG = b"""
[[network.interfaces]]
name = "uplink"
hwaddr = "52:54:00:0a:00:01"
addresses = ["dhcp4", "slaac"]
[[network.interfaces]]
name = "lan"
hwaddr = "52:54:00:0a:00:02"
addresses = ["10.0.0.2/24"]
[network.dns]
hostname = "box"
[network.time]
timezone = "Europe/Berlin"
[logging.syslog]
address = "192.0.2.1"
"""

# cli.main as the installed script calls it; then which modules it loaded.
RUNNER = f"""
import sys
sys.path.insert(0, {SRC!r})
from incusos_hal.cli import main
code = main(sys.argv[1:])
modules = sorted(sys.modules)
import json
sys.stdout.write(json.dumps({{"code": code, "modules": modules}}))
"""


def port(mac: str) -> str:
    return "_p" + mac.replace(":", "")


def nics(macs: list[str], names: list[str] | None = None) -> list[dict[str, str]]:
    return [
        {"name": (names or [port(m) for m in macs])[i], "hwaddr": m} for i, m in enumerate(macs)
    ]


class Machine:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.sys_root = base / "root"
        self.target = base / "target"
        self.state = base / "state"
        self.state.mkdir()
        self.set_nics(nics(MACS[:2]))
        (self.state / store.CONFIG_FILE).write_bytes(CONFIG)
        self.zone = self.target / "usr/share/zoneinfo/Europe/Berlin"
        self.zone.parent.mkdir(parents=True)
        self.zone.write_bytes(b"TZif2")

    def set_nics(self, spec: list[dict[str, str]]) -> None:
        shutil.rmtree(self.sys_root, ignore_errors=True)
        build_sysfs(self.sys_root, spec)

    def run(self, *extra: str) -> tuple[int, bool, list[str]]:
        """(exit code, whether the full path ran, the log lines)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin"),
            "INCUSOS_HAL_STATE_DIR": str(self.state),
            "INCUSOS_HAL_ROOT": str(self.sys_root),
        }
        argv = ["configure", "--boot", f"--unit-dir={UNIT_DIR}", f"--target={self.target}"]
        proc = subprocess.run(
            [sys.executable, "-I", "-c", RUNNER, *argv, *extra],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.stdout, proc.stderr
        result = json.loads(proc.stdout)
        return result["code"], "incusos_hal.config" in result["modules"], proc.stderr.splitlines()

    def snapshot(self) -> dict[str, object]:
        return {"target": tree(self.target), "state": tree(self.state)}

    def save(self) -> Path:
        saved = self.base / "saved"
        shutil.rmtree(saved, ignore_errors=True)
        for name in ("target", "state", "root"):
            shutil.copytree(self.base / name, saved / name, symlinks=True)
        return saved

    def restore(self, saved: Path) -> None:
        for name in ("target", "state", "root"):
            shutil.rmtree(self.base / name)
            shutil.copytree(saved / name, self.base / name, symlinks=True)


def tree(root: Path) -> dict[str, object]:
    """Every entry under root: link target, or mode and bytes; directories by mode."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("L", os.readlink(path))
        elif path.is_dir():
            out[rel] = ("D", path.stat().st_mode & 0o7777)
        else:
            out[rel] = ("F", path.stat().st_mode & 0o7777, path.read_bytes())
    return out


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    m = Machine(tmp_path)
    code, full, _ = m.run()  # the first boot: the full path, which writes the cache
    assert code == 0 and full
    assert (m.state / fast.CACHE_FILE).is_file()
    return m


def both_ways(m: Machine) -> tuple[bool, list[str]]:
    """Run as it comes, then from the same start with the cache removed (the full path):
    the same target, state directory and log. Returns (full path ran, log)."""
    saved = m.save()
    code, full, log = m.run()
    assert code == 0
    after = m.snapshot()
    m.restore(saved)
    (m.state / fast.CACHE_FILE).unlink(missing_ok=True)
    code, forced_full, forced_log = m.run()
    assert code == 0 and forced_full
    assert m.snapshot() == after
    assert log == forced_log
    return full, log


def test_unchanged_boot_takes_the_fast_path_and_writes_what_the_full_path_does(
    machine: Machine,
) -> None:
    shutil.rmtree(machine.target / "run")  # a boot: /run is empty
    (machine.target / "etc/localtime").unlink()
    full, log = both_ways(machine)
    assert not full
    assert any(line.startswith("<6>wrote ") and "10-incusos-bridge-uplink" in line for line in log)
    assert os.readlink(machine.target / "etc/localtime") == "../usr/share/zoneinfo/Europe/Berlin"


def test_a_second_run_writes_nothing(machine: Machine) -> None:
    before = machine.snapshot()
    code, full, log = machine.run()
    assert code == 0 and not full and log == []
    assert machine.snapshot() == before


def test_fast_path_imports_only_the_cli_and_the_codec(machine: Machine) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin")}
    bare = subprocess.run(
        [sys.executable, "-I", "-c", "import sys; print(repr(sorted(sys.modules)))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    baseline = set(ast.literal_eval(bare.stdout))
    proc = subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, "configure", "--boot", f"--unit-dir={UNIT_DIR}",
         f"--target={machine.target}"],
        env={**env, "INCUSOS_HAL_STATE_DIR": str(machine.state),
             "INCUSOS_HAL_ROOT": str(machine.sys_root)},
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    modules = set(json.loads(proc.stdout)["modules"]) - baseline
    assert sorted(modules) == [
        "__future__",
        "_blake2",
        "incusos_hal",
        "incusos_hal.apply",
        "incusos_hal.apply.fast",
        "incusos_hal.cli",
        "incusos_hal.cli.common",
        "incusos_hal.state",
        "incusos_hal.state.cachefile",
    ]


def test_broken_config_replays_the_last_good_fallback_and_its_warnings(machine: Machine) -> None:
    (machine.state / store.CONFIG_FILE).write_bytes(b"[network]\nbogus = 1\n")
    code, full, log = machine.run()  # new inputs: the full path, which caches them
    assert code == 0 and full
    assert any("network.bogus: unknown key" in line for line in log)
    shutil.rmtree(machine.target / "run")
    full, log = both_ways(machine)
    assert not full
    assert any(line.startswith("<4>") and "network.bogus: unknown key" in line for line in log)
    assert any("using " in line and store.LAST_GOOD_FILE in line for line in log)


def _edit_config(m: Machine) -> None:
    (m.state / store.CONFIG_FILE).write_bytes(CONFIG.replace(b"10.0.0.2/24", b"10.0.0.3/24"))


def _drop_last_good(m: Machine) -> None:
    (m.state / store.LAST_GOOD_FILE).unlink()


def _edit_last_good(m: Machine) -> None:
    with open(m.state / store.LAST_GOOD_FILE, "ab") as f:
        f.write(b"\n")


def _edit_cache(m: Machine) -> None:
    cache = m.state / fast.CACHE_FILE
    data = cache.read_bytes()
    cache.write_bytes(data.replace(b"10.0.0.2/24", b"10.6.6.6/24"))
    assert cache.read_bytes() != data


def _reseal(m: Machine, edit: Callable[[bytes], bytes]) -> None:
    """An intact cache (a valid digest) with its body edited: for another run."""
    cache = m.state / fast.CACHE_FILE
    body = fast.unseal(fast.MAGIC, cache.read_bytes())
    assert body is not None
    edited = edit(body)
    assert edited != body
    cache.write_bytes(fast.seal(fast.MAGIC, edited))


def _truncate_cache(m: Machine) -> None:
    cache = m.state / fast.CACHE_FILE
    cache.write_bytes(cache.read_bytes()[:-40])


def _stale_owned_file(m: Machine) -> None:
    (m.target / "run/systemd/network/10-incusos-bridge-old.network").write_text("[Match]\n")


def _foreign_file(m: Machine) -> None:
    (m.target / "run/systemd/network/50-admin.network").write_text("someone else's")


STALE: dict[str, Callable[[Machine], None]] = {
    "config changed": _edit_config,
    "config removed (a fresh machine's default)": lambda m: (m.state / store.CONFIG_FILE).unlink(),
    "last-good removed (not yet confirmed)": _drop_last_good,
    "last-good changed": _edit_last_good,
    "NIC added": lambda m: m.set_nics(nics(MACS)),
    "NIC removed": lambda m: m.set_nics(nics(MACS[:1])),
    "NIC renamed (needs a rename: never cached)": lambda m: m.set_nics(
        nics(MACS[:2], [port(MACS[0]), "enp6s0"])
    ),
    "NIC's MAC changed": lambda m: m.set_nics(nics(["52:54:00:0a:00:01", "52:54:00:0a:00:09"])),
    "NIC became wireless": lambda m: m.set_nics([{**n, "wireless": "1"} for n in nics(MACS[:2])]),
    "NIC enslaved": lambda m: m.set_nics([{**n, "master": "br9"} for n in nics(MACS[:2])]),
    "version changed": lambda m: _reseal(
        m, lambda b: b.replace(__version__.encode(), b"0.0.0-other", 1)
    ),
    "cache for another target": lambda m: _reseal(
        m, lambda b: b.replace(str(m.target).encode(), str(m.target).encode() + b"x", 1)
    ),
    "cache truncated": _truncate_cache,
    "cache edited": _edit_cache,
    "cache garbage": lambda m: (m.state / fast.CACHE_FILE).write_bytes(b"\x00" * 100),
    "generator.cache removed": lambda m: (m.state / generator.CACHE_FILE).unlink(),
    "time zone file removed": lambda m: m.zone.unlink(),
    "stale file of ours in an owned directory": _stale_owned_file,
    "someone else's file in an owned directory": _foreign_file,
    "a directory where a file of ours goes": lambda m: (
        (m.target / "run/systemd/network/10-incusos-bridge-lan.network").unlink()
        or (m.target / "run/systemd/network/10-incusos-bridge-lan.network").mkdir()
    ),
}


@pytest.mark.parametrize("change", STALE, ids=list(STALE))
def test_every_stale_cache_takes_the_full_path(machine: Machine, change: str) -> None:
    STALE[change](machine)
    full, _ = both_ways(machine)
    assert full, f"{change}: the cache was used"


def test_a_rename_is_never_cached(machine: Machine) -> None:
    machine.set_nics(nics(MACS[:2], ["enp5s0", "enp6s0"]))
    code, full, _ = machine.run()
    assert code == 0 and full
    assert not (machine.state / fast.CACHE_FILE).exists()


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p.write_text("edited by hand\n"),
        lambda p: p.chmod(0o600),
        lambda p: p.unlink(),
    ],
    ids=["content", "mode", "removed"],
)
def test_a_file_of_ours_changed_by_hand_is_put_back_as_the_full_path_does(
    machine: Machine, edit: Callable[[Path], None]
) -> None:
    path = machine.target / "run/systemd/network/10-incusos-bridge-uplink.network"
    wanted = path.read_bytes()
    edit(path)
    full, log = both_ways(machine)
    assert not full
    assert log == [f"<6>wrote {path}"]
    assert path.read_bytes() == wanted and path.stat().st_mode & 0o777 == 0o644


def test_last_good_is_marked_by_the_full_path_only(machine: Machine) -> None:
    _drop_last_good(machine)
    code, full, log = machine.run()
    assert code == 0 and full
    assert "<6>recorded as the last good configuration" in log
    code, full, log = machine.run()
    assert code == 0 and not full and log == []


def test_an_intact_cache_for_another_version_is_refused_in_process(machine: Machine) -> None:
    kwargs = {
        "state": str(machine.state),
        "sys_root": str(machine.sys_root),
        "target": str(machine.target),
        "unit_dir": UNIT_DIR,
    }
    assert fast.configure_boot(**kwargs, version=__version__)
    assert not fast.configure_boot(**kwargs, version="0.0.0-other")
    assert not fast.configure_boot(
        **{**kwargs, "unit_dir": "/etc/systemd/system"}, version=__version__
    )


def test_nic_facts_cover_every_sysfs_file_list_nics_reads(tmp_path: Path) -> None:
    """Changing or removing any file under a NIC's directory either leaves list_nics'
    answer as it was or changes the facts: the cache key never misses a change."""
    spec = [
        {"name": "_p5254000a0001", "hwaddr": MACS[0], "devtype": "wlan", "wireless": "1",
         "perm_hwaddr": "52:54:00:0a:00:07", "master": "bond0"},
        {"name": "veth0", "hwaddr": MACS[1], "physical": False},
    ]  # fmt: skip
    root = build_sysfs(tmp_path / "root", spec)
    base = root / "sys/class/net"
    facts, listed = fast.nic_facts(str(root)), net.list_nics(root)
    checked = 0
    for nic in os.listdir(base):
        nic_dir = (base / nic).resolve()
        for path in sorted(nic_dir.rglob("*")):
            saved = tmp_path / "saved"
            dir_or_link = path.is_symlink() or path.is_dir()
            mutations = ["remove"] if dir_or_link else ["remove", "edit"]
            for how in mutations:
                shutil.rmtree(saved, ignore_errors=True)
                shutil.copytree(nic_dir, saved, symlinks=True)
                if how == "remove":
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                else:
                    path.write_bytes(b"DEVTYPE=x\n" + path.read_bytes().upper())
                if net.list_nics(root) != listed:
                    assert fast.nic_facts(str(root)) != facts, (path, how)
                    checked += 1
                shutil.rmtree(nic_dir)
                shutil.copytree(saved, nic_dir, symlinks=True)
    assert checked >= 8  # address, type, uevent, perm_hwaddr, device, wireless, master...
    assert fast.nic_facts(str(root)) == facts


def test_names_shared_with_the_store_and_the_generator() -> None:
    assert fast.CONFIG_FILE == store.CONFIG_FILE
    assert fast.LAST_GOOD_FILE == store.LAST_GOOD_FILE
    assert fast.GENERATOR_CACHE == generator.CACHE_FILE
    assert fast.STATE_DIR_ENV == store.STATE_DIR_ENV
    assert fast.DEFAULT_STATE_DIR == store.DEFAULT_STATE_DIR


def test_the_units_arguments_are_what_the_cli_answers_before_argparse() -> None:
    unit = Path(SRC).parent / "units/incusos-hal-configure.service.in"
    exec_start = next(
        line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")
    )
    argv = exec_start.replace("@UNITDIR@", UNIT_DIR).split()[1:]
    assert _configure_boot_options(argv) == {"--unit-dir": UNIT_DIR}
    assert _configure_boot_options([*argv, "--target", "/x", "--state-dir=/s"]) == {
        "--unit-dir": UNIT_DIR,
        "--target": "/x",
        "--state-dir": "/s",
    }
    for other in (
        ["configure"],
        ["configure", "--boot", "--help"],
        ["configure", "--boot", "--unit=/x"],  # argparse would expand it
        ["configure", "--boot", "--target", "/a", "--target", "/b"],
        ["configure", "--boot", "--target"],
        ["configure", "--boot", "--target="],
        ["configure", "--boot", "--target", "-x"],
        ["configure", "--boot", "--boot"],
        ["configure", "--boot", "extra"],
        ["render", "--boot"],
    ):
        assert _configure_boot_options(other) is None, other
