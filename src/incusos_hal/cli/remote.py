"""The API's client commands: remote, get, edit, confirm, tpm-rebind, backup, restore.

These run on any machine that can reach the API, so they import the standard library and
`api.client` only: never the server, the config model, the renderer or the HAL."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _remote(args: argparse.Namespace) -> dict[str, str]:
    from ..api.client import ClientError, load_remotes

    remotes = load_remotes()
    name = args.remote or os.environ.get("INCUSOS_HAL_REMOTE") or "local"
    if name not in remotes:
        raise ClientError(f"no remote {name!r} (incusos-hal remote list)")
    return remotes[name]


def client_command(func: Any) -> Any:
    """Run a client command; a ClientError is one line on stderr and exit 1."""

    def run(args: argparse.Namespace) -> int:
        from ..api.client import ClientError

        try:
            code: int = func(args)
        except ClientError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return code

    return run


def cmd_remote(args: argparse.Namespace) -> int:
    from ..api.client import ClientError, fetch_server_fingerprint, load_remotes, save_remotes

    remotes = load_remotes()
    if args.action == "list":
        for name, r in sorted(remotes.items()):
            print(f"{name}\t{r['url']}")
        return 0
    if args.action == "remove":
        if args.name not in remotes or args.name == "local":
            raise ClientError(f"no remote {args.name!r} to remove")
        del remotes[args.name]
        save_remotes(remotes)
        return 0
    if not args.name or not args.url:
        raise ClientError("remote add NAME URL")
    entry = {"url": args.url}
    if args.url.startswith("https://"):
        if not args.cert:
            raise ClientError("an https remote needs --cert (and --key): the client certificate")
        entry.update(cert=os.path.abspath(args.cert), key=os.path.abspath(args.key or args.cert))
        entry["server_fingerprint"] = fetch_server_fingerprint(args.url)
        print(f"server certificate fingerprint: {entry['server_fingerprint']}")
    remotes[args.name] = entry
    save_remotes(remotes)
    return 0


def _leaves(data: Any, path: str = "") -> list[tuple[str, str]]:
    """(field path, value) for every scalar in `data`, paths as the API's errors write them."""
    if isinstance(data, dict):
        if not data:
            return [(path, "{}")] if path else []
        return [row for k, v in data.items() for row in _leaves(v, f"{path}.{k}" if path else k)]
    if isinstance(data, list):
        if not data:
            return [(path, "[]")] if path else []
        return [row for i, v in enumerate(data) for row in _leaves(v, f"{path}[{i}]")]
    return [(path, json.dumps(data) if not isinstance(data, str) else data)]


def _print(data: Any, fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(data, indent=2))
        return
    if fmt == "table":
        rows = _leaves(data)
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            print(f"{key:{width}}  {value}" if key else value)
        return
    from ..core.yamlout import dumps

    sys.stdout.write(dumps(data))


def cmd_get(args: argparse.Namespace) -> int:
    from ..api.client import request

    reply = request(_remote(args), "GET", args.path)
    _print(reply.envelope()["metadata"], args.format)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """GET the object, edit its config (a file, or $EDITOR), PUT it with If-Match."""
    import subprocess
    import tempfile

    from ..api.client import ClientError, request

    remote = _remote(args)
    reply = request(remote, "GET", args.path)
    current = reply.envelope()["metadata"]
    if args.file:
        text = Path(args.file).read_text() if args.file != "-" else sys.stdin.read()
    else:
        with tempfile.NamedTemporaryFile("w+", suffix=".json", delete=False) as f:
            json.dump({"config": current.get("config", {})}, f, indent=2)
        editor = os.environ.get("EDITOR", "vi")
        subprocess.run([editor, f.name], check=True)
        text = Path(f.name).read_text()
        os.unlink(f.name)
    try:
        body = json.loads(text)
    except ValueError as e:
        raise ClientError(f"not JSON: {e}") from None
    headers = {"Content-Type": "application/json", "If-Match": reply.headers.get("etag", "*")}
    request(remote, "PUT", args.path, json.dumps(body).encode(), headers).envelope()
    return 0


def cmd_confirm(args: argparse.Namespace) -> int:
    from ..api.client import request

    request(_remote(args), "POST", "/1.0/system/network/:confirm").envelope()
    return 0


def cmd_tpm_rebind(args: argparse.Namespace) -> int:
    from ..api.client import request

    request(_remote(args), "POST", "/1.0/system/security/:tpm-rebind").envelope()
    print("volumes re-sealed to the TPM; the service reboots the machine to use them")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from ..api.client import request
    from ..core.files import atomic_write

    reply = request(_remote(args), "POST", "/1.0/system/:backup")
    if reply.status != 200:
        reply.envelope()
    atomic_write(args.file, reply.body, 0o600)  # recovery keys and the server's key
    print(f"wrote {args.file} ({len(reply.body)} bytes; it holds secrets)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from ..api.client import ClientError, request

    remote = _remote(args)
    query = f"?skip={','.join(args.skip)}" if args.skip else ""
    data = Path(args.file).read_bytes()
    op = request(remote, "POST", f"/1.0/system/:restore{query}", data).envelope()
    done = request(remote, "GET", f"{op['operation']}/wait?timeout=600").envelope()
    if done["metadata"]["status"] != "Success":
        raise ClientError(f"restore failed: {done['metadata']['err']}")
    print("restored")
    return 0


def cmd_update_check(args: argparse.Namespace) -> int:
    from ..api.client import ClientError, request

    remote = _remote(args)
    body = json.dumps({"os_only": bool(args.os_only)}).encode()
    path = f"/1.0/system/update/:check?trigger={args.trigger}"
    op = request(remote, "POST", path, body).envelope()
    done = request(remote, "GET", f"{op['operation']}/wait?timeout=3600").envelope()
    status = done["metadata"].get("metadata", {}).get("status", "")
    if done["metadata"]["status"] != "Success":
        raise ClientError(f"update check failed: {done['metadata']['err'] or status}")
    print(status)
    return 0
