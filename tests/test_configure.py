"""The configure step against a built sysfs and a scratch target root, and its link
renames against real links in a network namespace."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from incusos_hal.apply.configure import configure
from incusos_hal.apply.deadline import Deadline, TimedOut, TimeLimit
from incusos_hal.boot.generator import CACHE_FILE
from incusos_hal.state import store

from conftest import build_sysfs, require_root, require_tool

NICS = [
    {"name": "enp5s0", "hwaddr": "52:54:00:0a:00:01"},
    {"name": "enp6s0", "hwaddr": "52:54:00:0a:00:02"},
]
CONFIG = b"""
[network.time]
timezone = "Europe/Berlin"
[[network.interfaces]]
name = "uplink"
hwaddr = "enp5s0"
addresses = ["dhcp4"]
[logging.syslog]
address = "192.0.2.1"
"""


@pytest.fixture
def machine(tmp_path: Path) -> tuple[Path, Path, Path]:
    sys_root = build_sysfs(tmp_path / "sys-root", NICS)
    target = tmp_path / "target"
    (target / "usr/share/zoneinfo/Europe").mkdir(parents=True)
    (target / "usr/share/zoneinfo/Europe/Berlin").write_bytes(b"TZif2")
    state = tmp_path / "state"
    state.mkdir()
    (state / store.CONFIG_FILE).write_bytes(CONFIG)
    return sys_root, target, state


def listing(target: Path) -> list[str]:
    return sorted(
        str(p.relative_to(target)) for p in target.rglob("*") if p.is_file() or p.is_symlink()
    )


def test_applies_config_removes_stale_keeps_foreign(machine: tuple[Path, Path, Path]) -> None:
    sys_root, target, state = machine
    netdir = target / "run/systemd/network"
    netdir.mkdir(parents=True)
    (netdir / "10-incusos-bridge-old.network").write_text("stale")
    (netdir / "50-admin.network").write_text("someone else's")
    result = configure(
        state=state,
        sys_root=sys_root,
        target=target,
        live=False,
        unit_dir="/usr/lib/systemd/system",
    )
    assert result.ok, result.problems
    assert result.source == "config"
    files = listing(target)
    assert "run/systemd/network/10-incusos-bridge-old.network" not in files
    assert "run/systemd/network/50-admin.network" in files
    assert "run/systemd/network/10-incusos-bridge-uplink.network" in files
    assert "run/systemd/netlogd.conf.d/50-incusos-hal.conf" in files
    assert os.readlink(target / "etc/localtime") == "../usr/share/zoneinfo/Europe/Berlin"
    assert (state / store.LAST_GOOD_FILE).read_bytes() == store.dumps_toml(store.load(state).config)
    assert (state / CACHE_FILE).is_file()


def test_second_run_changes_nothing(machine: tuple[Path, Path, Path]) -> None:
    sys_root, target, state = machine
    configure(state=state, sys_root=sys_root, target=target, live=False)
    again = configure(state=state, sys_root=sys_root, target=target, live=False)
    assert again.applied is not None
    assert again.applied.written == () and again.applied.removed == ()


def test_dropping_syslog_removes_its_file(machine: tuple[Path, Path, Path]) -> None:
    sys_root, target, state = machine
    configure(state=state, sys_root=sys_root, target=target, live=False)
    (state / store.CONFIG_FILE).write_bytes(CONFIG.split(b"[logging.syslog]")[0])
    result = configure(state=state, sys_root=sys_root, target=target, live=False)
    assert result.applied is not None
    assert str(target / "run/systemd/netlogd.conf.d/50-incusos-hal.conf") in result.applied.removed


def test_missing_time_zone_is_left_alone_with_a_warning(machine: tuple[Path, Path, Path]) -> None:
    sys_root, target, state = machine
    (target / "usr/share/zoneinfo/Europe/Berlin").unlink()
    result = configure(state=state, sys_root=sys_root, target=target, live=False)
    assert not (target / "etc/localtime").is_symlink()
    assert any("is not installed" in p for p in result.problems)


def test_broken_config_applies_last_good(machine: tuple[Path, Path, Path]) -> None:
    sys_root, target, state = machine
    configure(state=state, sys_root=sys_root, target=target, live=False)
    before = listing(target)
    (state / store.CONFIG_FILE).write_text("[[network.interfaces]\n")
    result = configure(state=state, sys_root=sys_root, target=target, live=False)
    assert result.source == "last-good"
    assert listing(target) == before
    assert any("not valid TOML" in p for p in result.problems)


def test_write_failure_restores_previous_files(machine: tuple[Path, Path, Path]) -> None:
    sys_root, target, state = machine
    configure(state=state, sys_root=sys_root, target=target, live=False)
    network = target / "run/systemd/network"
    before = {p.name: p.read_bytes() for p in network.iterdir()}
    # New config adds a netlogd file; make that write fail.
    (state / store.CONFIG_FILE).write_bytes(CONFIG.replace(b"uplink", b"wan"))
    blocker = target / "run/systemd/netlogd.conf.d"
    for p in blocker.iterdir():
        p.unlink()
    blocker.rmdir()
    blocker.write_text("not a directory")
    result = configure(state=state, sys_root=sys_root, target=target, live=False)
    assert result.applied is None and not result.ok
    assert {p.name: p.read_bytes() for p in network.iterdir()} == before


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and link under `root`, by content (mode and link target included)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[rel] = f"{p.stat().st_mode & 0o7777:o} {digest}"
        else:
            out[rel] = "dir"
    return out


def with_vlans(count: int) -> bytes:
    vlans = "".join(
        f'[[network.vlans]]\nname = "v{i}"\nparent = "uplink"\nid = {i}\n'
        f'addresses = ["10.{i // 250}.{i % 250}.1/24"]\n'
        for i in range(1, count + 1)
    )
    return CONFIG + vlans.encode()


def test_out_of_time_puts_the_previous_files_back_and_marks_nothing_good(
    machine: tuple[Path, Path, Path],
) -> None:
    """A deadline that runs out half way through the writes (a clock that ticks once
    per check): TimedOut, the target as before, last-good still the previous document."""
    sys_root, target, state = machine
    configure(state=state, sys_root=sys_root, target=target, live=False)
    files, good = tree_digest(target), (state / store.LAST_GOOD_FILE).read_bytes()
    (state / store.CONFIG_FILE).write_bytes(with_vlans(100))
    ticks = itertools.count()
    deadline = Deadline(TimeLimit(100, 0), ticks.__next__)
    with pytest.raises(TimedOut, match="timed out after 100 s"):
        configure(state=state, sys_root=sys_root, target=target, live=False, deadline=deadline)
    # The 100th check raised: one before renaming, then 98 files written before it.
    assert next(ticks) == 101
    assert tree_digest(target) == files
    assert (state / store.LAST_GOOD_FILE).read_bytes() == good


def test_allowance_follows_the_work(machine: tuple[Path, Path, Path]) -> None:
    """The limit is the base plus the allowance for every file rendered, every file of
    ours already there (a change from 40 VLANs to 10 removes 60 files) and every link to
    rename (the one NIC, to its `_p<mac>` name)."""
    sys_root, target, state = machine
    (state / store.CONFIG_FILE).write_bytes(with_vlans(40))
    first = Deadline(TimeLimit(30, 0.5))
    configure(state=state, sys_root=sys_root, target=target, live=False, deadline=first)
    rendered = len(list((target / "run/systemd/network").iterdir())) + 2  # netlogd, localtime
    assert first.seconds == 30 + 0.5 * (rendered + 1)
    (state / store.CONFIG_FILE).write_bytes(with_vlans(10))
    second = Deadline(TimeLimit(30, 0.5))
    result = configure(state=state, sys_root=sys_root, target=target, live=False, deadline=second)
    assert result.applied is not None and len(result.applied.removed) == 60
    ours_before = rendered - 1  # /etc/localtime is not in an owned directory
    assert second.seconds == 30 + 0.5 * (rendered - 60 + ours_before + 1)


def test_mark_good_false_leaves_last_good_to_the_caller(machine: tuple[Path, Path, Path]) -> None:
    sys_root, target, state = machine
    result = configure(state=state, sys_root=sys_root, target=target, live=False, mark_good=False)
    assert result.ok and result.config == store.load(state).config
    assert not (state / store.LAST_GOOD_FILE).exists()


RENAME = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from incusos_hal.apply.configure import _rename
done, problems = _rename(Path("/"), (("ihal-down", "_pdown"), ("ihal-up", "_pup"),
                                     ("ihal-none", "_pnone")))
print(json.dumps({"done": done, "problems": problems}))
"""


@pytest.mark.root
def test_renames_real_links_and_leaves_up_ones(tmp_path: Path) -> None:
    require_root()
    require_tool("ip")
    ns = f"ihal-rename-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            ["link", "add", "ihal-down", "type", "veth", "peer", "name", "peer0"],
            ["link", "add", "ihal-up", "type", "veth", "peer", "name", "peer1"],
            ["link", "set", "ihal-up", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        src = str(Path(__file__).resolve().parent.parent / "src")
        out = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", RENAME, src],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = json.loads(out)
        names = json.loads(
            subprocess.run(
                ["ip", "-n", ns, "-j", "link"], capture_output=True, text=True, check=True
            ).stdout
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert result["done"] == [["ihal-down", "_pdown"]]
    assert any("ihal-up" in p and "while it is up" in p for p in result["problems"])
    assert any("ihal-none" in p and "failed" in p for p in result["problems"])
    assert {"_pdown", "ihal-up"} <= {link["ifname"] for link in names}
