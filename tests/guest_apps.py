"""Probe, in a booted container (stdlib only): applications as system extensions through
the API of the socket-activated, hardened incusos-hal.service.

Builds sysext images with the root's mkfs.erofs (a unit, a tiny HTTP server, an
extension-release with ID=_any naming the unit), lays them in the service's local
image directory with their SHA256SUMS, then through /1.0/applications: install, update
(the unit restarted: a new MainPID, the app answering its new version; how long the
app's endpoint was down is measured), refusals that change nothing (a tampered hash, not
an image, an image systemd-sysext refuses), data backup / factory reset / restore, one
primary application, remove. Writes /probe/result.json and powers the machine off.
"""

import hashlib
import http.client
import json
import os
import socket
import subprocess
import threading
import time
import traceback
import urllib.request
from pathlib import Path

SOCKET = "/run/incusos-hal/unix.socket"
SOURCE = Path("/var/lib/incusos-hal/updates/applications")
APP_PORT = 8099
DATA = Path("/var/lib/incusos-apps/hello")

SERVER = """import http.server, os
VERSION = {version!r}
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello {{VERSION}} {{os.getpid()}}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("127.0.0.1", {port}), H).serve_forever()
"""

UNIT = """[Unit]
Description=A test application from a system extension

[Service]
ExecStart=/usr/bin/python3 /usr/libexec/{name}/serve
StateDirectory=incusos-apps/{name}
"""


class Unix(http.client.HTTPConnection):
    def __init__(self) -> None:
        super().__init__("ihal", timeout=300)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(SOCKET)


def call(method: str, path: str, body: object = None, raw: bytes | None = None) -> dict:
    conn = Unix()
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    if resp.getheader("Content-Type", "").startswith("application/json"):
        return {"status": resp.status, "body": json.loads(payload or b"null")}
    return {"status": resp.status, "raw": payload}


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()


def build(name: str, version: str, *, release_name: str | None = None) -> Path:
    """NAME_VERSION.raw: an erofs sysext whose unit runs a server answering its version."""
    tree = Path(f"/var/tmp/ext-{name}-{version}")
    subprocess.run(["rm", "-rf", str(tree)], check=True)
    (tree / "usr/lib/extension-release.d").mkdir(parents=True)
    (tree / f"usr/libexec/{name}").mkdir(parents=True)
    (tree / "usr/lib/systemd/system").mkdir(parents=True)
    # Only hello answers on APP_PORT; the other test applications elsewhere.
    port = APP_PORT if name == "hello" else APP_PORT + 1
    (tree / f"usr/libexec/{name}/serve").write_text(SERVER.format(version=version, port=port))
    (tree / f"usr/lib/systemd/system/{name}.service").write_text(UNIT.format(name=name))
    (tree / f"usr/lib/extension-release.d/extension-release.{release_name or name}").write_text(
        f"ID=_any\nSYSEXT_VERSION_ID={version}\nINCUSOS_HAL_UNITS={name}.service\n"
    )
    out = SOURCE / f"{name}_{version}.raw"
    subprocess.run(["mkfs.erofs", "--quiet", str(out), str(tree)], check=True)
    return out


def publish(extra: dict[str, str] | None = None) -> None:
    """SHA256SUMS for every image in the source (`extra`: file -> a hash to list instead)."""
    lines = []
    for p in sorted(SOURCE.glob("*.raw")):
        digest = (extra or {}).get(p.name) or hashlib.sha256(p.read_bytes()).hexdigest()
        lines.append(f"{digest}  {p.name}\n")
    (SOURCE / "SHA256SUMS").write_text("".join(lines))


def main_pid(unit: str) -> str:
    return sh("systemctl", "show", "-P", "MainPID", unit)


def app_answer() -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{APP_PORT}/", timeout=1) as r:
            return r.read().decode()
    except OSError:
        return ""


def wait_for(check, seconds: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def extension_image_sha() -> str:
    p = Path("/var/lib/extensions/hello.raw")
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else ""


def update_with_poller() -> dict:
    """:check-update while the app's endpoint is polled every 10 ms: the longest run of
    failed polls is the time the update kept the app down."""
    samples: list[tuple[float, bool]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), bool(app_answer())))
            time.sleep(0.01)

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    answer = call("POST", "/1.0/applications/hello/:check-update", {})
    took = time.monotonic() - started
    wait_for(lambda: app_answer().startswith("hello 2"), 30)
    time.sleep(0.3)
    stop.set()
    thread.join()
    down, gap_start = 0.0, None
    for t, ok in samples:
        if not ok and gap_start is None:
            gap_start = t
        elif ok and gap_start is not None:
            down = max(down, t - gap_start)
            gap_start = None
    return {"answer": answer, "call_s": took, "down_s": down, "polls": len(samples)}


def run() -> dict:
    r: dict = {}
    sh("systemctl", "start", "incusos-hal.socket")
    SOURCE.mkdir(parents=True, exist_ok=True)
    build("hello", "1")
    publish()
    r["list_empty"] = call("GET", "/1.0/applications")
    r["install"] = call("POST", "/1.0/applications", {"name": "hello"})
    r["install_again"] = call("POST", "/1.0/applications", {"name": "hello"})
    r["list"] = call("GET", "/1.0/applications")
    r["get1"] = call("GET", "/1.0/applications/hello")
    r["answered1_after_s"] = wait_for(lambda: app_answer().startswith("hello 1"), 30)
    r["pid1"] = main_pid("hello.service")
    r["answer1"] = app_answer()
    r["sysext_status"] = sh("systemd-sysext", "status")
    # Data, backed up, wiped, restored.
    (DATA / "note").write_text("kept")
    r["backup"] = call("POST", "/1.0/applications/hello/:backup", {})
    r["reset"] = call("POST", "/1.0/applications/hello/:factory-reset", {})
    r["note_after_reset"] = (DATA / "note").exists()
    archive = r["backup"].pop("raw", b"")
    r["backup_len"] = len(archive)
    r["restore"] = call("POST", "/1.0/applications/hello/:restore", raw=archive)
    r["note_after_restore"] = (DATA / "note").read_text() if (DATA / "note").exists() else None
    r["restore_bad"] = call("POST", "/1.0/applications/hello/:restore", raw=b"garbage")
    r["note_after_bad_restore"] = (DATA / "note").exists()
    r["get_restored"] = call("GET", "/1.0/applications/hello")
    r["answered_after_restore_s"] = wait_for(lambda: bool(app_answer()), 30)
    r["pid_before_update"] = main_pid("hello.service")
    # Refusals: each leaves version 1 running, the same process, the same image.
    image1 = extension_image_sha()
    bad = {}
    build("hello", "2")
    publish({"hello_2.raw": "0" * 64})  # a hash the image does not have
    bad["tampered"] = call("POST", "/1.0/applications/hello/:check-update", {})
    (SOURCE / "hello_2.raw").write_bytes(b"not an image" * 1000)
    publish()
    bad["not_an_image"] = call("POST", "/1.0/applications/hello/:check-update", {})
    build("hello", "2", release_name="other")  # systemd-sysext refuses it
    publish()
    bad["refused_by_sysext"] = call("POST", "/1.0/applications/hello/:check-update", {})
    bad["pid_after"] = main_pid("hello.service")
    bad["image_unchanged"] = extension_image_sha() == image1
    bad["answer_after"] = app_answer()
    bad["get_after"] = call("GET", "/1.0/applications/hello")
    r["bad"] = bad
    # The update.
    build("hello", "2")
    publish()
    r["update"] = update_with_poller()
    r["pid2"] = main_pid("hello.service")
    r["answer2"] = app_answer()
    r["get2"] = call("GET", "/1.0/applications/hello")
    r["restart"] = call("POST", "/1.0/applications/hello/:restart", {})
    wait_for(lambda: bool(app_answer()) and main_pid("hello.service") != r["pid2"], 30)
    r["pid_restarted"] = main_pid("hello.service")
    # :switch-version: back to the version kept on disk, a version not kept refused,
    # then forward again by name; each time the unit answers the version merged.
    switch = "/1.0/applications/hello/:switch-version"
    r["switch_back"] = call("POST", switch, {})
    r["switched_back_after_s"] = wait_for(lambda: app_answer().startswith("hello 1 "), 30)
    r["get_switched"] = call("GET", "/1.0/applications/hello")
    r["switch_unknown"] = call("POST", switch, {"version": "7"})
    r["switch_forward"] = call("POST", switch, {"version": "2"})
    r["switched_forward_after_s"] = wait_for(lambda: app_answer().startswith("hello 2 "), 30)
    r["kept_versions"] = sorted(os.listdir("/var/lib/incusos-extensions/hello"))
    r["extension_link"] = os.readlink("/var/lib/extensions/hello.raw")
    # One primary application.
    build("incus", "1")
    build("migration-manager", "1")
    publish()
    r["primary"] = call("POST", "/1.0/applications", {"name": "incus"})
    r["second_primary"] = call("POST", "/1.0/applications", {"name": "migration-manager"})
    r["remove_primary"] = call("POST", "/1.0/applications/incus/:remove", {})
    r["list_two"] = call("GET", "/1.0/applications")
    r["get_primary"] = call("GET", "/1.0/applications/incus")
    # Remove.
    r["remove"] = call("POST", "/1.0/applications/hello/:remove", {})
    r["list_after_remove"] = call("GET", "/1.0/applications")
    r["image_gone"] = not Path("/var/lib/extensions/hello.raw").exists()
    r["versions_gone"] = not Path("/var/lib/incusos-extensions/hello").exists()
    r["release_gone"] = not Path("/usr/lib/extension-release.d/extension-release.hello").exists()
    r["unit_after_remove"] = sh("systemctl", "show", "-P", "LoadState,ActiveState", "hello.service")
    r["data_after_remove"] = sorted(os.listdir(DATA)) if DATA.exists() else None
    r["journal"] = sh(
        "journalctl", "-b", "-u", "incusos-hal.service", "-u", "systemd-sysext", "--no-pager"
    )[-6000:]
    return r


def main() -> None:
    try:
        result = run()
    except Exception:
        result = {
            "crashed": traceback.format_exc(),
            "journal": sh("journalctl", "-b", "--no-pager")[-6000:],
        }
    Path("/probe/result.json").write_text(json.dumps(result, default=repr))


main()
