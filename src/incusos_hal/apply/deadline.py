"""How long applying a change may take, and how the work is stopped in time.

The bound is set by the work (`TimeLimit`): a base plus an allowance per file and per
link, so a network of thousands of VLANs gets the time its files need while a small
change still fails fast. It is a `Deadline` the configure step checks between file
writes (cooperative: a worker thread cannot be stopped from outside, and one left running
would race with the rollback); on expiry the configure step puts back every file it
touched and raises `TimedOut`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TimeLimit:
    """How long applying a change may take: `base` seconds (IncusOS gives a network
    change 30 s) plus `per_item` for each file to write or remove and each link to
    rename; networkd's reload grows with the links too, and the same deadline covers it."""

    base: float = 30.0
    per_item: float = 0.02

    def seconds(self, items: int) -> float:
        return self.base + self.per_item * items


class Interrupted(Exception):
    """The work stopped between two steps (cancelled, or out of time); the configure
    step put back every file it had touched before raising this."""


class TimedOut(Interrupted):
    """The deadline passed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"applying the configuration timed out after {seconds:g} s")
        self.seconds = seconds


class Deadline:
    """A `TimeLimit` running since its creation, shared by the event loop and the worker
    thread: the configure step says how much work there is (`allow`) once it has
    rendered, and calls `check` between steps. No limit: only `cancel` ends it early."""

    def __init__(
        self, limit: TimeLimit | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self._clock = clock
        self._start = clock()
        self._items = 0
        self._cancelled = threading.Event()

    def allow(self, items: int) -> None:
        """The number of files and links the work touches (sets the allowance)."""
        self._items = items

    @property
    def seconds(self) -> float:
        return float("inf") if self.limit is None else self.limit.seconds(self._items)

    def remaining(self) -> float:
        return self._start + self.seconds - self._clock()

    def cancel(self) -> None:
        self._cancelled.set()

    def check(self) -> None:
        if self._cancelled.is_set():
            raise Interrupted("applying the configuration was cancelled")
        if self.remaining() <= 0:
            raise TimedOut(self.seconds)
