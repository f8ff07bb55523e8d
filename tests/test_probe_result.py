"""The guests' results are read so that a failed step says what the guest said: the
recording side (guest_lib, which runs in the guest) against the reading side
(probe_result), with real commands on this host."""

from __future__ import annotations

import json
import sys

import pytest

import guest_lib
import probe_result


def recorded(document: dict[str, object]) -> probe_result.Reading:
    """What the host reads: the document after its trip through result.json."""
    return probe_result.Reading(json.loads(json.dumps(document)), "boot")


def test_a_failed_command_read_as_data_fails_with_its_stderr_and_status() -> None:
    failing = [sys.executable, "-c", "import sys; sys.exit('no such tree: /x')"]
    result = recorded({"part": {"tree": guest_lib.data(*failing), "live": {"cpu": 1}}})
    assert result["part"]["live"] == {"cpu": 1}
    with pytest.raises(probe_result.GuestStepFailed) as e:
        result["part"]["tree"]
    assert "boot.part.tree" in str(e.value)
    assert "exited 1" in str(e.value) and "no such tree: /x" in str(e.value)


def test_output_that_is_not_json_is_a_failure_too() -> None:
    result = recorded({"x": guest_lib.data(sys.executable, "-c", "print('hello')")})
    with pytest.raises(probe_result.GuestStepFailed, match="not JSON"):
        result["x"]


def test_good_json_reads_as_the_data() -> None:
    result = recorded({"x": guest_lib.data(sys.executable, "-c", "print('[1, {\"a\": 2}]')")})
    assert result["x"] == [1, {"a": 2}]
    assert result["x"][1]["a"] == 2


def test_a_step_that_raised_fails_with_its_traceback() -> None:
    try:
        {}["inventory"]
    except KeyError:
        record = guest_lib.crashed("native part")
    result = recorded({"native": record})
    with pytest.raises(probe_result.GuestStepFailed, match=r"(?s)native part.*KeyError"):
        result["native"]


@pytest.mark.parametrize(
    "read",
    [
        lambda r: r.get("steps")["tree"],
        lambda r: dict(r["steps"].items()),
        lambda r: list(r["steps"].values()),
        lambda r: [x for x in r["list"]],
        lambda r: r["list"][1],
    ],
    ids=["get", "items", "values", "iter", "index"],
)
def test_every_way_of_reading_sees_the_failure(read: object) -> None:
    bad = guest_lib.failed("ip -j link", {"rc": 255, "out": "", "err": "Cannot open netlink"})
    result = recorded({"steps": {"tree": bad}, "list": [{"ok": 1}, bad]})
    with pytest.raises(probe_result.GuestStepFailed, match="Cannot open netlink"):
        read(result)  # type: ignore[operator]


def test_a_missing_key_names_what_is_there() -> None:
    with pytest.raises(KeyError, match=r"boot.part has no 'rc'; it has \['cpu'\]"):
        recorded({"part": {"cpu": 1}})["part"]["rc"]


def test_raw_gives_the_record_itself() -> None:
    bad = guest_lib.failed("x")
    assert probe_result.is_failure(recorded({"x": bad}).raw("x"))
