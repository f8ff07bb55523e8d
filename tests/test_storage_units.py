"""The storage section's systemd side: the scrub timer the generator writes from
scrub_schedule, and the shipped units (pool import at boot, the scrub service), checked by
systemd itself: `systemd-analyze verify` accepts them, and `systemd-analyze calendar`
fires the timer exactly when cron would fire the schedule (in UTC, as IncusOS reads it)."""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

import pytest

from incusos_hal import sections
from incusos_hal.config import from_dict
from incusos_hal.config.cron import parse_cron
from incusos_hal.core.tree import File, Symlink

from conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
TIMER = "incusos-hal-scrub.timer"
SHIPPED = ("incusos-hal-zfs-import.service", "incusos-hal-scrub.service")
ENV = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "TZ": "UTC"}


def rendered(schedule: str) -> dict[str, File | Symlink]:
    config = from_dict({"version": 1, "storage": {"scrub_schedule": schedule}})
    tree = sections.render_units(
        config, source="/var/lib/incusos-hal/config.toml", unit_dir="/usr/lib/systemd/system"
    )
    return {k: v for k, v in tree.items() if isinstance(v, (File, Symlink))}


def install(units_dir: Path, schedule: str) -> None:
    """The generated timer and the shipped units as meson installs them."""
    units_dir.mkdir(parents=True, exist_ok=True)
    tree = rendered(schedule)
    timer = tree[TIMER]
    assert isinstance(timer, File)
    (units_dir / TIMER).write_bytes(timer.content)
    bindir = Path(sys.executable).parent  # holds an incusos-hal: ExecStart must exist
    assert (bindir / "incusos-hal").exists()
    for unit in SHIPPED:
        text = (REPO / "units" / f"{unit}.in").read_text()
        text = text.replace("@BINDIR@", str(bindir)).replace("@DOCDIR@", str(REPO / "docs"))
        (units_dir / unit).write_text(text)


def verify(units_dir: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        env={**ENV, "SYSTEMD_UNIT_PATH": f"{units_dir}:"},
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("schedule", ["0 4 * * 0", "0,30 2 1,15 */3 1-5", "*/15 * * * *"])
def test_systemd_accepts_the_timer_and_the_units(tmp_path: Path, schedule: str) -> None:
    require_tool("systemd-analyze")
    install(tmp_path, schedule)
    done = verify(tmp_path, TIMER, *SHIPPED)
    ours = [line for line in done.stderr.splitlines() if str(tmp_path) in line or "incusos" in line]
    assert done.returncode == 0 and not ours, done.stderr
    # The timer is wanted by timers.target, from the generator's own directory.
    link = rendered(schedule)[f"timers.target.wants/{TIMER}"]
    assert isinstance(link, Symlink) and link.target == f"../{TIMER}"
    # And the check sees a broken timer (this test can fail).
    (tmp_path / TIMER).write_text(
        "[Timer]\nOnCalendar=not a time\nUnit=incusos-hal-scrub.service\n"
    )
    assert str(tmp_path / TIMER) in verify(tmp_path, TIMER).stderr


def test_the_import_unit_is_wired_before_the_pools_users() -> None:
    """Opened drives (cryptsetup.target) first, then pools, before sysinit.target (so
    before every normal service, Incus included) and the ZFS mounts."""
    text = (REPO / "units/incusos-hal-zfs-import.service.in").read_text()
    after = " ".join(re.findall(r"^After=(.*)$", text, re.M)).split()
    before = " ".join(re.findall(r"^Before=(.*)$", text, re.M)).split()
    assert {"cryptsetup.target", "local-fs.target", "zfs-load-module.service"} <= set(after)
    assert {"sysinit.target", "zfs-mount.service", "zfs-import.target"} <= set(before)
    assert "DefaultDependencies=no" in text
    # The scrub is skipped, not failed, where ZFS is unavailable.
    scrub = (REPO / "units/incusos-hal-scrub.service.in").read_text()
    assert "ConditionPathExists=/dev/zfs" in scrub.splitlines()
    # It never fails the boot: the command exits 0 whatever it found (test_storage_boot).
    tree = rendered("0 4 * * 0")
    link = tree["sysinit.target.wants/incusos-hal-zfs-import.service"]
    assert isinstance(link, Symlink)
    assert link.target == "/usr/lib/systemd/system/incusos-hal-zfs-import.service"


_ELAPSE = re.compile(r"(?:Next elapse|Iter\. #\d+): \w{3} (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC")


def systemd_fires(when: str, base: datetime.datetime, count: int) -> list[datetime.datetime]:
    done = subprocess.run(
        [
            "systemd-analyze", "calendar", f"--iterations={count}",
            f"--base-time={base:%Y-%m-%d %H:%M:%S} UTC", when,
        ],
        env=ENV, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [
        datetime.datetime.strptime(m, "%Y-%m-%d %H:%M:%S").replace(tzinfo=datetime.UTC)
        for m in _ELAPSE.findall(done.stdout)
    ]


def cron_fires(schedule: str, base: datetime.datetime, count: int) -> list[datetime.datetime]:
    """cron(8)'s rule, by brute force over minutes: minute, hour and month match, and the
    day matches by day-of-month OR day-of-week when both are restricted (AND otherwise)."""
    c = parse_cron(schedule)
    out: list[datetime.datetime] = []
    t = base.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
    for _ in range(60 * 24 * 366 * 2):
        weekday = (t.weekday() + 1) % 7  # cron: 0 is Sunday
        dom = c.days is None or t.day in c.days
        dow = c.weekdays is None or weekday in c.weekdays
        day = (dom or dow) if (c.days is not None and c.weekdays is not None) else (dom and dow)
        if (
            day
            and (c.minutes is None or t.minute in c.minutes)
            and (c.hours is None or t.hour in c.hours)
            and (c.months is None or t.month in c.months)
        ):
            out.append(t)
            if len(out) == count:
                return out
        t += datetime.timedelta(minutes=1)
    return out


@pytest.mark.parametrize(
    "schedule",
    ["0 4 * * 0", "0,30 2 1,15 */3 1-5", "5 */6 * * *", "59 23 31 12 *", "0 0 13 * 5", "0 3 * * 7"],
)
def test_the_timer_fires_when_cron_would(schedule: str) -> None:
    require_tool("systemd-analyze")
    timer = rendered(schedule)[TIMER]
    assert isinstance(timer, File)
    values = re.findall(r"^OnCalendar=(.*)$", timer.content.decode(), re.M)
    assert values and all(v.endswith(" UTC") for v in values)
    base = datetime.datetime(2026, 1, 1, 0, 0, tzinfo=datetime.UTC)
    count = 12
    expected = cron_fires(schedule, base, count)  # a yearly one: two years' worth
    assert len(expected) >= 2
    fired = sorted({t for v in values for t in systemd_fires(v, base, count)})
    assert fired[: len(expected)] == expected, (schedule, values)


def test_the_timer_is_in_utc_whatever_the_machines_zone(tmp_path: Path) -> None:
    require_tool("systemd-analyze")
    timer = rendered("0 4 * * 0")[TIMER]
    assert isinstance(timer, File)
    (value,) = re.findall(r"^OnCalendar=(.*)$", timer.content.decode(), re.M)
    base = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    env = {**ENV, "TZ": "America/New_York"}
    done = subprocess.run(
        ["systemd-analyze", "calendar", f"--base-time={base:%Y-%m-%d %H:%M:%S} UTC", value],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    # 04:00 UTC on Sunday 2026-01-04 is 23:00 on Saturday in New York.
    assert "Sat 2026-01-03 23:00:00 EST" in done.stdout, done.stdout
