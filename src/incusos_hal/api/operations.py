"""Background operations and the event stream, the way Incus does them.

A long action (an apply, a restore) runs as an Operation: the request returns at once
with `type: async` and the operation's URL; `GET /1.0/operations/{id}` shows it,
`GET .../wait?timeout=N` blocks until it ends, `DELETE` cancels it when it can be
cancelled. Every change of an operation is also an `operation` event on `/1.0/events`,
beside `logging` events (what the service logs). Finished operations stay listed for
a while (OPERATION_KEEP_SECONDS), as Incus keeps them, then are forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import envelope as env
from .service import ApiError

OPERATION_KEEP_SECONDS = 300.0
EVENT_QUEUE = 256
INTERNAL_ERROR = "internal error (details in the service's journal)"

log = logging.getLogger("incusos_hal.api")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class Events:
    """Fan-out of events to subscribers (websocket clients); a slow one drops events
    rather than holding up the service. Each event is encoded once, as the text every
    subscriber gets."""

    def __init__(self) -> None:
        self._queues: dict[asyncio.Queue[str], frozenset[str]] = {}

    def subscribe(self, types: frozenset[str]) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(EVENT_QUEUE)
        self._queues[queue] = types
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self._queues.pop(queue, None)

    def send(self, kind: str, metadata: dict[str, Any]) -> None:
        wanted = [queue for queue, types in self._queues.items() if kind in types]
        if not wanted:
            return
        event = {"type": kind, "timestamp": _now(), "metadata": metadata, "location": "none"}
        try:
            text = json.dumps(event, separators=(",", ":"), allow_nan=False)
        except ValueError:  # a NaN or an infinity: never sent as not-JSON
            log.warning("a %s event was dropped: it holds a value JSON cannot carry", kind)
            return
        for queue in wanted:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(text)


Progress = Callable[[dict[str, Any]], None]


def public_error(error: BaseException, state_dir: str | None = None) -> str:
    """An operation's `err` as its client may see it: an ApiError's message, an OSError's
    reason and the file it names, anything else a generic line (the journal has the
    trace). Paths in the state directory are said relative to it, and the directory
    itself and the ones made beside it as "the state directory", so an error tells what
    went wrong without showing the service's internals."""
    if isinstance(error, ApiError):
        text = error.message
    elif isinstance(error, OSError) and error.strerror:
        name = error.filename if isinstance(error.filename, str) else ""
        text = error.strerror + (f": {name}" if name else "")
    else:
        text = INTERNAL_ERROR
    return hide_state_dir(text, state_dir) if state_dir else text


def hide_state_dir(text: str, state_dir: str) -> str:
    base = os.path.normpath(state_dir)
    parent, name = os.path.split(base)
    inside = re.escape(base) + r"(?:/([^\s'\"]*))?(?![^\s/'\"])"
    beside = re.escape(os.path.join(parent, "")) + r"\.?" + re.escape(name) + r"[.~-][^\s'\"]*"

    def relative(m: re.Match[str]) -> str:
        return m.group(1) or "the state directory"

    text = re.sub(beside, "a directory beside the state directory", text)
    return re.sub(inside, relative, text)


@dataclass
class Operation:
    id: str
    description: str
    resources: dict[str, list[str]]
    may_cancel: bool
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    status_code: int = env.RUNNING
    metadata: dict[str, Any] = field(default_factory=dict)
    err: str = ""
    task: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "class": "task",
            "description": self.description,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "status": env.STATUS_TEXT[self.status_code],
            "status_code": self.status_code,
            "resources": self.resources,
            "metadata": self.metadata,
            "may_cancel": self.may_cancel,
            "err": self.err,
            "location": "none",
        }


class Operations:
    def __init__(self, events: Events, state_dir: str | None = None) -> None:
        self.events = events
        self.state_dir = state_dir  # hidden from the errors operations report
        self._ops: dict[str, Operation] = {}

    def get(self, op_id: str) -> Operation | None:
        return self._ops.get(op_id)

    def all(self) -> list[Operation]:
        return list(self._ops.values())

    def start(
        self,
        description: str,
        work: Callable[[Progress], Awaitable[dict[str, Any] | None]],
        *,
        resources: dict[str, list[str]] | None = None,
        may_cancel: bool = False,
    ) -> Operation:
        op = Operation(str(uuid.uuid4()), description, resources or {}, may_cancel)
        self._ops[op.id] = op
        op.task = asyncio.get_running_loop().create_task(self._run(op, work))
        self._changed(op)
        return op

    async def _run(
        self, op: Operation, work: Callable[[Progress], Awaitable[dict[str, Any] | None]]
    ) -> None:
        def progress(values: dict[str, Any]) -> None:
            op.metadata = {**op.metadata, **values}
            self._changed(op)

        try:
            result = await work(progress)
        except asyncio.CancelledError:
            op.status_code, op.err = env.CANCELLED, "cancelled"
        except Exception as e:  # the operation reports it; the service keeps running
            op.status_code, op.err = env.FAILURE, public_error(e, self.state_dir)
            if not isinstance(e, ApiError):  # unforeseen: the journal gets the trace
                log.error("operation %s (%s) failed", op.id, op.description, exc_info=e)
        else:
            op.status_code = env.SUCCESS
            if result:
                op.metadata = {**op.metadata, **result}
        op.done.set()
        self._changed(op)
        asyncio.get_running_loop().call_later(OPERATION_KEEP_SECONDS, self._ops.pop, op.id, None)

    def cancel(self, op: Operation) -> bool:
        if not op.may_cancel or op.done.is_set() or op.task is None:
            return False
        op.status_code = env.CANCELLING
        self._changed(op)
        op.task.cancel()
        return True

    async def wait(self, op: Operation, timeout: float | None) -> bool:
        """True when the operation ended within `timeout` seconds (None: no limit)."""
        try:
            await asyncio.wait_for(op.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _changed(self, op: Operation) -> None:
        op.updated_at = _now()
        self.events.send("operation", op.to_dict())
