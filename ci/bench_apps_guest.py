"""ci/bench --update, in a booted container (stdlib only): how long an application update
keeps the application's own API down, as a client of the application sees it.

tests/guest_apps.py's application (an erofs sysext: a unit running a small HTTP server
that answers "hello VERSION PID") is installed at version 1 through /1.0/applications,
then updated N times (2, 3, ...) through `:check-update`, the service's update path
(image placed, systemd-sysext refreshed, the unit restarted). During each update a
thread asks the application's endpoint every 10 ms (a fresh connection each time, a
0.2 s timeout); the downtime is the time from the old version's last answer to the new
version's first answer, both as received by that poller. The longest interval with no
answer at all is recorded beside it. Updates are spaced so that the unit's restarts stay
under systemd's start rate limit (StartLimitBurst starts per StartLimitIntervalSec, 5 in
10 s by default: a sixth restart within it fails "restart hello.service: job failed").
One JSON line goes to /probe/result.json (N is read from /probe/updates); the probe unit
then powers the machine off.
"""

import ast
import http.client
import itertools
import json
import statistics
import threading
import time
import traceback
import types
from pathlib import Path

INTERVAL = 0.01
TIMEOUT = 0.2


def guest_apps() -> types.ModuleType:
    """tests/guest_apps.py (copied next to this probe) without its last line's main(),
    which would run the whole system test: its image builder and API client only."""
    path = Path("/probe/guest_apps.py")
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [
        node
        for node in tree.body
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call))
    ]
    module = types.ModuleType("guest_apps")
    module.__file__ = str(path)
    exec(compile(tree, str(path), "exec"), module.__dict__)  # noqa: S102
    return module


apps = guest_apps()


def version_answering() -> str | None:
    """The version the application's endpoint answers with, or None (no answer)."""
    conn = http.client.HTTPConnection("127.0.0.1", apps.APP_PORT, timeout=TIMEOUT)
    try:
        conn.request("GET", "/")
        words = conn.getresponse().read().decode().split()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return words[1] if len(words) == 3 and words[0] == "hello" else None


def wait_for_version(version: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if version_answering() == version:
            return True
        time.sleep(0.05)
    return False


def start_spacing(unit: str) -> float:
    """Seconds between two starts of `unit` that keep any number of them under its start
    rate limit (systemd counts the starts within the interval from the first)."""
    path = "/org/freedesktop/systemd1/unit/" + "".join(
        c if c.isalnum() else f"_{ord(c):02x}" for c in unit
    )
    limits = []
    for prop in ("StartLimitIntervalUSec", "StartLimitBurst"):
        got = apps.sh(
            "busctl", "get-property", "org.freedesktop.systemd1", path,
            "org.freedesktop.systemd1.Unit", prop,
        ).split()  # fmt: skip
        limits.append(int(got[1]) if len(got) == 2 and got[1].isdigit() else 0)
    interval, burst = limits[0] / 1e6, limits[1]
    return 1.2 * interval / burst if interval and burst else 0.0


def one_update(old: str, new: str) -> dict:
    """Update `old` -> `new` through :check-update while the endpoint is polled."""
    samples: list[tuple[float, str | None]] = []  # (answer received or given up, version)
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            version = version_answering()
            samples.append((time.monotonic(), version))
            time.sleep(INTERVAL)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        answer = apps.call("POST", "/1.0/applications/hello/:check-update", {})
        call_s = time.monotonic() - started
        deadline = time.monotonic() + 60
        while not any(v == new for _, v in samples) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join()
    first_new = next((i for i, (_, v) in enumerate(samples) if v == new), None)
    if answer["status"] != 200 or first_new is None:
        return {
            "error": f"{old} -> {new}: {answer} (new version answered: {first_new is not None})"
        }
    last_old = max((i for i, (_, v) in enumerate(samples[:first_new]) if v == old), default=None)
    if last_old is None:
        return {"error": f"{old} -> {new}: the old version never answered the poller"}
    answered = [t for t, v in samples if v is not None]
    return {
        "down_s": samples[first_new][0] - samples[last_old][0],
        "longest_silence_s": max(b - a for a, b in itertools.pairwise(answered)),
        "call_s": call_s,
        "polls": len(samples),
        "failed_polls": sum(v is None for _, v in samples),
        "old_after_new": sum(v == old for _, v in samples[first_new:]),
        "others": sorted({v for _, v in samples if v not in (None, old, new)}),
        "state_version": apps.call("GET", "/1.0/applications/hello")["body"]["metadata"]["state"][
            "version"
        ],
    }


def run(updates: int) -> dict:
    apps.sh("systemctl", "start", "incusos-hal.socket")
    apps.SOURCE.mkdir(parents=True, exist_ok=True)
    apps.build("hello", "1")
    apps.publish()
    installed = apps.call("POST", "/1.0/applications", {"name": "hello"})
    if installed["status"] != 200 or not wait_for_version("1", 60):
        return {"error": f"install of version 1: {installed}"}
    spacing = start_spacing("hello.service")
    last_start = time.monotonic()  # the install's start (or later)
    each = []
    for n in range(2, updates + 2):
        apps.build("hello", str(n))
        apps.publish()
        time.sleep(max(0.0, last_start + spacing - time.monotonic()))
        got = one_update(str(n - 1), str(n))
        last_start = time.monotonic()  # the restart was before :check-update answered
        if "error" in got:
            return {**got, "done": each}
        each.append(got)
    downs = [u["down_s"] for u in each]
    return {
        "updates": len(each),
        "interval_s": INTERVAL,
        "spacing_s": spacing,
        "median_s": statistics.median(downs),
        "max_s": max(downs),
        "down_s": downs,
        "longest_silence_s": [u["longest_silence_s"] for u in each],
        "call_s": [u["call_s"] for u in each],
        "polls": [u["polls"] for u in each],
        "failed_polls": [u["failed_polls"] for u in each],
        "old_after_new": [u["old_after_new"] for u in each],
        "others": [u["others"] for u in each],
        "state_versions": [u["state_version"] for u in each],
    }


def main() -> None:
    count = Path("/probe/updates")
    try:
        result = run(int(count.read_text()) if count.exists() else 5)
    except Exception:
        result = {"error": traceback.format_exc()}
    if "error" in result:
        result["journal"] = apps.sh(
            "journalctl", "-b", "-u", "incusos-hal.service", "-u", "systemd-sysext",
            "-u", "hello.service", "--no-pager",
        )[-4000:]  # fmt: skip
    line = json.dumps(result)
    print(line, flush=True)
    Path("/probe/result.json").write_text(line + "\n")


main()
