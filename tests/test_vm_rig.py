"""The VM rig's own file work on the host (tests/vm.py): what it does to a guest's root
before the disk image is made, and what it reports when a boot ends without a result."""

from __future__ import annotations

import json
from pathlib import Path

import vm


def test_services_off_removes_enable_links_that_dangle_on_the_host(tmp_path: Path) -> None:
    # A guest root's enable links point at absolute /usr/lib paths: from the host they
    # dangle whenever the host lacks the package, as it lacks targetcli's.
    etc = tmp_path / "etc/systemd/system"
    for wants, unit in (
        ("multi-user.target.wants", "rtslib-fb-targetctl.service"),
        ("multi-user.target.wants", "iscsid.service"),
        ("sockets.target.wants", "iscsid.socket"),
        ("sysinit.target.wants", "open-iscsi.service"),
        ("multi-user.target.wants", "lldpd.service"),
    ):
        (etc / wants).mkdir(parents=True, exist_ok=True)
        (etc / wants / unit).symlink_to(f"/nonexistent/usr/lib/systemd/system/{unit}")
    vm.services_off(tmp_path)
    left = sorted(
        f"{wants.name}/{link.name}" for wants in etc.iterdir() for link in wants.iterdir()
    )
    assert left == ["multi-user.target.wants/lldpd.service"], left


def test_a_boot_without_result_says_which_part_was_running(tmp_path: Path) -> None:
    assert "never started" in vm.progress_note(tmp_path)
    (tmp_path / "progress.json").write_text(
        json.dumps(
            {
                "uptime_at_start": 266.5,
                "ended": {"system": 40.2, "network": 61.0},
                "running": {"part": "security", "since_uptime": 527.4},
            }
        )
    )
    note = vm.progress_note(tmp_path)
    assert "began at uptime 266s" in note or "began at uptime 267s" in note
    assert "system 40.2s, network 61.0s" in note
    assert "running: security since uptime 527s" in note
    (tmp_path / "progress.json").write_text("{")
    assert "unreadable" in vm.progress_note(tmp_path)
