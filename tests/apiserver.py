"""A real `incusos-hal serve` process for the API tests and the benchmark: a unix socket,
HTTPS with client certificates made by the openssl command (a client from outside this
project), the configure step writing into a scratch target. Requests go through curl."""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def openssl_client_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed client certificate and key, as `incus remote add` users make them."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "30",
            "-subj", f"/CN={name}", "-addext", "extendedKeyUsage=clientAuth",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass
class Server:
    base: Path
    state: Path
    target: Path
    socket: Path
    port: int
    cert: Path
    key: Path
    root: Path | None = None  # --root: read the machine (crypttab, sysfs) under it
    tcti: str | None = None  # --tcti: the TPM it uses
    options: tuple[str, ...] = ()  # more `serve` options (--apply-time-limit)
    env: dict[str, str] = field(default_factory=dict)  # added to the environment
    nofile: tuple[int, int] | None = None  # RLIMIT_NOFILE (soft, hard) for the server
    process: subprocess.Popen[bytes] | None = None
    log: list[str] = field(default_factory=list)
    # A command the server runs under (it execs its arguments): a mount namespace, say.
    wrapper: tuple[str, ...] = ()
    listen_host: str = "127.0.0.1"  # the --listen address's host (`[::]`: every address)

    @property
    def config_file(self) -> Path:
        return self.state / "config.toml"

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1", **self.env)
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        self.process = subprocess.Popen(
            [
                *self.wrapper, sys.executable, "-m", "incusos_hal", "serve",
                "--state-dir", str(self.state), "--socket", str(self.socket),
                "--listen", f"{self.listen_host}:{self.port}", "--target", str(self.target),
                *(["--root", str(self.root)] if self.root else []),
                *(["--tcti", self.tcti] if self.tcti else []),
                *self.options,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )  # fmt: skip
        assert self.process.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode()
            if not line:
                break
            self.log.append(line)
            if line.startswith("serving on"):
                return
        raise AssertionError(f"the server did not start: {''.join(self.log)}")

    def wait_for_line(self, text: str, seconds: float = 120) -> bool:
        """Read the server's output until a line holding `text` (kept in `log`), or
        `seconds` pass: for what it does in the background once it serves."""
        import select

        assert self.process is not None and self.process.stdout is not None
        if any(text in line for line in self.log):
            return True
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.process.stdout], [], [], left)
            if not ready:
                break
            line = self.process.stdout.readline().decode(errors="replace")
            if not line:
                break
            self.log.append(line)
            if text in line:
                return True
        return False

    def stop(self, sig: int = 15) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        if self.process is not None and self.process.stdout is not None:
            self.log.extend(self.process.stdout.read().decode(errors="replace").splitlines())
        self.process = None

    # -- clients -----------------------------------------------------------------------

    def curl(self, method: str, path: str, *args: str, body: bytes | None = None) -> Result:
        return curl(["--unix-socket", str(self.socket)], f"http://ihal{path}", method, args, body)

    def curl_tls(
        self, method: str, path: str, *args: str, cert: tuple[Path, Path] | None = None
    ) -> Result:
        tls = ["--cacert", str(self.state / "server.crt"), "--tlsv1.3"]
        # The server certificate names the host, not 127.0.0.1: pin it instead.
        tls += ["--pinnedpubkey", f"sha256//{_pubkey_pin(self.state / 'server.crt')}", "-k"]
        if cert is not None:
            tls += ["--cert", str(cert[0]), "--key", str(cert[1])]
        return curl(tls, f"https://127.0.0.1:{self.port}{path}", method, args, None)

    def put(self, path: str, body: Any, *args: str) -> Result:
        return self.curl(
            "PUT",
            path,
            "-H",
            "Content-Type: application/json",
            *args,
            body=json.dumps(body).encode(),
        )


@dataclass
class Result:
    rc: int
    status: int
    headers: dict[str, str]
    body: bytes
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def curl(
    transport: list[str], url: str, method: str, args: tuple[str, ...], body: bytes | None
) -> Result:
    cmd = ["curl", "-sS", "-X", method, "-D", "-", "--max-time", "60", *transport, *args]
    if body is not None:
        cmd += ["--data-binary", "@-"]
    done = subprocess.run([*cmd, url], input=body, capture_output=True, check=False)
    payload = done.stdout
    while True:  # interim 1xx answers (100 Continue) come first, each with its own head
        head, _, payload = payload.partition(b"\r\n\r\n")
        if not re.match(rb"HTTP/[0-9.]+ 1[0-9][0-9] ", head):
            break
    lines = head.decode(errors="replace").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return Result(done.returncode, status, headers, payload, done.stderr.decode(errors="replace"))


def _pubkey_pin(cert: Path) -> str:
    pub = subprocess.run(
        ["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"], capture_output=True, check=True
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True, check=True
    ).stdout
    b64 = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=der, capture_output=True, check=True
    ).stdout
    import base64

    return base64.b64encode(b64).decode()


def make(base: Path, trusted: list[Path]) -> Server:
    """A server whose stored config trusts these client certificates (saved through the
    CLI, as an operator's first config would be)."""
    state, target = base / "state", base / "target"
    state.mkdir(mode=0o700)
    target.mkdir()
    pems = [p.read_text() for p in trusted]
    config = base / "seed.json"
    config.write_text(json.dumps({"version": 1, "listener": {"trusted_client_certificates": pems}}))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "incusos_hal",
            "save",
            "--config",
            str(config),
            "--state-dir",
            str(state),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    cert, key = (
        openssl_client_cert(base, "unused")
        if not trusted
        else (trusted[0], trusted[0].with_suffix(".key"))
    )
    # The socket's directory is open to all (the socket itself is 0600), so a test can
    # show what the peer check does for another user once the file mode lets them in.
    sockets = Path(tempfile.mkdtemp(prefix="ihal-api-"))
    sockets.chmod(0o755)
    return Server(base, state, target, sockets / "api.sock", free_port(), cert, key)


def check_rolled_back(part: dict[str, Any]) -> None:
    """What tests/guest_api.py recorded of its unconfirmed change, under real systemd
    (container or VM): applied, held (another change refused), then undone in full."""
    assert part["put_cut"]["status"] == 200, part["put_cut"]
    assert part["cut_after_s"] is not None, part["journal"]
    assert part["pending"]["configuration_in_process"] is True
    assert part["second_put"] == 409
    assert part["restored_after_s"] is not None, (part["addresses_end"], part["journal"])
    assert part["stored_restored"] is True
    assert "not confirmed in time" in part["journal"]
    # The state's address counts while cut off and once rolled back (upstream's "1
    # address" then "2 addresses"): the kernel's global addresses, no link-local.
    cut, restored = part["cut_state"], part["restored_state"]
    for reading in (cut, restored):
        assert reading["kernel"][0] == reading["kernel"][1], reading  # settled meanwhile
        assert reading["api"] == reading["kernel"][0], reading
    assert len(restored["api"]) > len(cut["api"]), (cut, restored)
    assert not any(a.startswith("fe80:") for a in restored["api"]), restored
    # A bad change refused with nothing applied, then a change confirmed in time stays
    # (upstream's last steps); the state's addresses counted after each.
    done = part["confirm"]
    assert done["bad_put"] == 400 and done["state_after_bad"] == done["state_before"], done
    assert done["put"] == 200 and done["applied_after_s"] is not None, done
    assert done["confirmed"] == 200, done
    assert done["confirm_again"]["status"] == 400, done
    assert done["confirm_again"]["body"]["error"] == (
        "no network configuration is pending a confirmation"
    )
    assert done["pending_after"] is False and done["kept"], done
    readings = ("state_before", "state_after_bad", "state_held", "state_after")
    for reading in (done[r] for r in readings):
        assert reading["kernel"][0] == reading["kernel"][1] == reading["api"], reading
    toggled = 1 if done["added_now"] else -1
    assert len(done["state_held"]["api"]) == len(done["state_before"]["api"]) + toggled, done
    assert done["state_after"] == done["state_held"], done
