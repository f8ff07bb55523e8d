"""IncusOS's scrub_schedule: a five-field cron expression (minute hour day-of-month month
day-of-week, numbers, `*`, lists, ranges and steps), parsed strictly and turned into
systemd OnCalendar= values (systemd.time(7)) for the scrub timer.

Every field is expanded to its explicit values, so the OnCalendar= text uses only
systemd's plainest syntax. Cron fires when the day of the month OR the day of the week
matches (when both are restricted); OnCalendar= matches both, so that case becomes two
OnCalendar= lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_SCRUB_SCHEDULE = "0 4 * * 0"
# IncusOS's words (internal/rest/api_system_storage.go).
INVALID = "invalid cron expression provided for scrub schedule"
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_PART = re.compile(r"(\*|[0-9]{1,2}(?:-[0-9]{1,2})?)(?:/([0-9]{1,2}))?", re.ASCII)
_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


class CronError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Cron:
    """Each field's values, or None for `*` (every value)."""

    minutes: tuple[int, ...] | None
    hours: tuple[int, ...] | None
    days: tuple[int, ...] | None
    months: tuple[int, ...] | None
    weekdays: tuple[int, ...] | None


def _field(text: str, low: int, high: int) -> tuple[int, ...] | None:
    if text == "*":
        return None
    values: set[int] = set()
    for part in text.split(","):
        m = _PART.fullmatch(part)
        if m is None:
            raise CronError(INVALID)
        span, step_text = m.groups()
        step = int(step_text) if step_text else 1
        if step < 1:
            raise CronError(INVALID)
        if span == "*":
            start, end = low, high
        elif "-" in span:
            start, end = (int(x) for x in span.split("-"))
        else:
            start = int(span)
            end = high if step_text else start
        if not low <= start <= end <= high:
            raise CronError(INVALID)
        values.update(range(start, end + 1, step))
    return tuple(sorted(values))


def parse_cron(text: str) -> Cron:
    fields = text.split(" ")
    if len(fields) != 5 or any(not f for f in fields):
        raise CronError(INVALID)
    parsed = [_field(f, lo, hi) for f, (lo, hi) in zip(fields, _BOUNDS, strict=True)]
    weekdays = parsed[4]
    if weekdays is not None:  # 7 is Sunday too
        weekdays = tuple(sorted({d % 7 for d in weekdays}))
    return Cron(parsed[0], parsed[1], parsed[2], parsed[3], weekdays)


def _list(values: tuple[int, ...] | None, width: int = 2) -> str:
    return "*" if values is None else ",".join(f"{v:0{width}d}" for v in values)


def on_calendar(cron: Cron) -> list[str]:
    """The OnCalendar= values that fire when `cron` does."""
    time = f"{_list(cron.hours)}:{_list(cron.minutes)}:00"
    date = f"*-{_list(cron.months)}-{_list(cron.days)}"
    if cron.weekdays is None:
        return [f"{date} {time}"]
    days = ",".join(_DAYS[d] for d in cron.weekdays)
    if cron.days is None:
        return [f"{days} {date} {time}"]
    # Both restricted: cron's OR is two timers' worth of OnCalendar=.
    return [f"{days} *-{_list(cron.months)}-* {time}", f"{date} {time}"]
