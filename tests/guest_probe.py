"""Runs in the VM guest after boot (stdlib only), started by the probe unit.

Marks /probe/started (the host times the first guest command by it), then runs each part
named in /probe/expect.json's "parts": module guest_<part>.py beside this file, whose
`run(expect)` returns a dict. Results go to /probe/result.json keyed by part, written
atomically; a part that raises is recorded as a failure record with its traceback
(guest_lib.crashed) and the rest still run.
"""

import importlib
import json
import sys
import time
from pathlib import Path

PROBE = Path("/probe")
(PROBE / "started").write_text(f"{time.monotonic()}\n")
sys.path.insert(0, str(PROBE))
from guest_lib import crashed  # noqa: E402  (beside this file in /probe)

expect = json.loads((PROBE / "expect.json").read_text())


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def write(name: str, data: dict) -> None:
    tmp = PROBE / f"{name}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.rename(PROBE / name)


result = {"uptime_at_start": uptime(), "part_seconds": {}}
# progress.json says, after each part, which parts ended, in how long, and what runs
# now: a boot the host stops at its time limit still tells where the time went.
progress = {"uptime_at_start": result["uptime_at_start"], "ended": {}, "running": None}
for part in expect.get("parts", []):
    progress["running"] = {"part": part, "since_uptime": uptime()}
    write("progress.json", progress)
    began = time.monotonic()
    try:
        result[part] = importlib.import_module(f"guest_{part}").run(expect)
    except Exception:
        result[part] = crashed(f"probe part {part}")
    result["part_seconds"][part] = progress["ended"][part] = round(time.monotonic() - began, 1)
progress["running"] = None
write("progress.json", progress)
result["uptime"] = uptime()
write("result.json", result)
if expect.get("poweroff_by_api"):
    # The machine goes down through the API (POST /1.0/system/:poweroff); the unit's
    # own poweroff stands aside when the API accepted (see the probe unit).
    try:
        answer = importlib.import_module("guest_api").call("POST", "/1.0/system/:poweroff")
    except Exception:
        answer = crashed("POST /1.0/system/:poweroff")
    (PROBE / "poweroff-by-api").write_text(json.dumps(answer))
    if answer.get("status") == 200:
        (PROBE / "poweroff-accepted").write_text("")
