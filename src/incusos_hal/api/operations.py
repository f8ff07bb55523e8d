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
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import envelope as env

OPERATION_KEEP_SECONDS = 300.0
EVENT_QUEUE = 256


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class Events:
    """Fan-out of events to subscribers (websocket clients); a slow one drops events
    rather than holding up the service."""

    def __init__(self) -> None:
        self._queues: dict[asyncio.Queue[dict[str, Any]], frozenset[str]] = {}

    def subscribe(self, types: frozenset[str]) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(EVENT_QUEUE)
        self._queues[queue] = types
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._queues.pop(queue, None)

    def send(self, kind: str, metadata: dict[str, Any]) -> None:
        event = {"type": kind, "timestamp": _now(), "metadata": metadata, "location": "none"}
        for queue, types in self._queues.items():
            if kind in types:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(event)


Progress = Callable[[dict[str, Any]], None]


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
    def __init__(self, events: Events) -> None:
        self.events = events
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
            op.status_code, op.err = env.FAILURE, str(e) or type(e).__name__
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
