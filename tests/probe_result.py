"""Reading what a container's or VM guest's probe recorded (result.json), so that a step
the guest could not do fails the test with what the guest said.

A probe part marks a step it could not do with a failure record (guest_lib.failed,
guest_lib.crashed, guest_lib.data): the command, its exit status, stderr and output, or
the traceback. `Reading` wraps the recorded document: reading a failure record out of it,
at any depth and through any accessor (`[]`, `get`, `items`, `values`, iteration of a
list), raises `GuestStepFailed` naming the step's path and quoting the guest, instead of
handing the record to a test that would index it as the data it stands in for (a
KeyError that says nothing of the cause). So does reading a key a part did not record
when the guest's probe says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from guest_lib import FAILED


class GuestStepFailed(AssertionError):
    """A step in the guest failed; the message is the guest's own account of it."""


def describe(record: dict[str, Any]) -> str:
    """A failure record as text: what ran, how it ended, and what it said."""
    failure = record[FAILED]
    if not isinstance(failure, dict):
        return str(failure)
    lines = [str(failure.get("what", "a step"))]
    if failure.get("rc") is not None:
        lines[0] += f" exited {failure['rc']}"
    for name in ("err", "out", "traceback", "note"):
        text = str(failure.get(name) or "").rstrip()
        if text:
            label = {"err": "stderr", "out": "stdout"}.get(name, name)
            lines.append(f"--- {label}:\n{text[-6000:]}")
    return "\n".join(lines)


def is_failure(value: Any) -> bool:
    return isinstance(value, dict) and FAILED in value


def _wrap(value: Any, path: str) -> Any:
    if is_failure(value):
        raise GuestStepFailed(f"in the guest, {path} failed: {describe(value)}")
    if isinstance(value, dict) and not isinstance(value, Reading):
        return Reading(value, path)
    if isinstance(value, list) and not isinstance(value, ReadingList):
        return ReadingList(value, path)
    return value


class Reading(dict[str, Any]):
    """A recorded document whose failure records raise when read (see the module doc)."""

    def __init__(self, data: dict[str, Any], path: str = "result") -> None:
        super().__init__(data)
        self.path = path

    def __getitem__(self, key: str) -> Any:
        try:
            value = super().__getitem__(key)
        except KeyError:
            raise KeyError(f"{self.path} has no {key!r}; it has {sorted(self)}") from None
        return _wrap(value, f"{self.path}.{key}")

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key not in self:
            return default
        return self[key]

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        return (self[k] for k in self)

    def items(self) -> Iterator[tuple[str, Any]]:  # type: ignore[override]
        return ((k, self[k]) for k in self)

    def raw(self, key: str) -> Any:
        """The recorded value as it is, failure record or not (for a test that checks
        the guest's failure itself)."""
        return super().__getitem__(key)


class ReadingList(list[Any]):
    def __init__(self, data: list[Any], path: str) -> None:
        super().__init__(data)
        self.path = path

    def __getitem__(self, index: Any) -> Any:
        value = super().__getitem__(index)
        if isinstance(index, slice):
            return ReadingList(value, f"{self.path}[{index.start}:{index.stop}]")
        return _wrap(value, f"{self.path}[{index}]")

    def __iter__(self) -> Iterator[Any]:
        return (_wrap(v, f"{self.path}[{i}]") for i, v in enumerate(super().__iter__()))
