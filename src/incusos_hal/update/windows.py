"""Maintenance windows (IncusOS's SystemUpdateMaintenanceWindow), as pure functions of
the clock: `now` is always an argument, so tests give the time instead of waiting for it.

A window is a span of minutes in the week counted from Sunday 00:00, as IncusOS computes
it (lxc/incus-os incus-osd/api/system_update.go, TimeUntilActiveReference): without days
it recurs daily and may run past midnight; with days it starts on one and ends on the
other, possibly wrapping past Saturday. The end minute is inside the window.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

from ..config.model import WEEKDAYS, MaintenanceWindow

DAY = 24 * 60
WEEK = 7 * DAY
# systemd.time(7)'s day names, Sunday first as WEEKDAYS is.
_CALENDAR_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


def _weekday(now: datetime.datetime) -> int:
    """Sunday = 0, as Go's time.Weekday."""
    return (now.weekday() + 1) % 7


def _day(name: str) -> int:
    return WEEKDAYS.index(name)


def minutes_until_active(window: MaintenanceWindow, now: datetime.datetime) -> int:
    """0 inside the window, else the minutes until it next starts."""
    today = _weekday(now)
    start_of = window.start_hour * 60 + window.start_minute
    end_of = window.end_hour * 60 + window.end_minute
    minute = now.hour * 60 + now.minute
    daily = not window.start_day_of_week and not window.end_day_of_week
    if daily:
        start, end = today * DAY + start_of, today * DAY + end_of
        if end_of < start_of:  # runs past midnight
            if minute < start_of:
                start -= DAY
            else:
                end += DAY
        # Measured from this minute of the day, a daily window is simple.
        position = today * DAY + minute
        if start <= position <= end:
            return 0
        if position < start:
            return start - position
        return start - position + DAY
    first, last = _day(window.start_day_of_week), _day(window.end_day_of_week)
    start = first * DAY + start_of
    end = (last if last >= first else last + 7) * DAY + end_of
    position = today * DAY + minute
    if end >= WEEK and today <= last:
        position += WEEK  # inside the part of the window past Saturday
    if start <= position <= end:
        return 0
    if position < start:
        return start - position
    return start - position + WEEK


def inside(windows: Sequence[MaintenanceWindow], now: datetime.datetime) -> bool:
    """No windows: any time is a maintenance time (IncusOS's default)."""
    return not windows or any(minutes_until_active(w, now) == 0 for w in windows)


def next_start(
    windows: Sequence[MaintenanceWindow], now: datetime.datetime
) -> datetime.datetime | None:
    """When the next window opens (now, if inside one); None without windows."""
    if not windows:
        return None
    wait = min(minutes_until_active(w, now) for w in windows)
    if wait == 0:
        return now
    return now.replace(second=0, microsecond=0) + datetime.timedelta(minutes=wait)


def calendar(window: MaintenanceWindow) -> str:
    """The window's start as a systemd OnCalendar= expression (systemd.time(7)), so the
    timer fires when a window opens instead of polling for it."""
    days = ""
    if window.start_day_of_week:
        days = _CALENDAR_DAYS[_day(window.start_day_of_week)] + " "
    return f"{days}*-*-* {window.start_hour:02d}:{window.start_minute:02d}:00"
