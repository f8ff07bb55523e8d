"""Where updates come from (IncusOS's providers, lxc/incus-os incus-osd/internal/providers),
behind one small Protocol:

    images             an update server: `<server_url>/index.sjson` (S/MIME, verified
                       against the update CA) or, over HTTPS only and when asked for,
                       `index.json`; files at `<server_url>/<version>/<filename>`.
                       Optional registration with a token (POST <server_url>/register).
    local              a directory laid out the same way (air-gapped machines): its
                       index.sjson must verify against the update CA; files are copied.
    operations-center  Operations Center's provisioning API: registration with a token
                       (POST /1.0/provisioning/servers?token=...), the update list
                       (GET /1.0/provisioning/updates?recursion=1) and each update's files
                       (GET .../updates/<uuid>/files, .../files/<filename>), over TLS
                       pinned to the server's certificate when one is configured.

A provider answers "what is the latest release for this channel and architecture" with
an index.Release whose files carry sizes and hashes from a source it trusts (a signature,
or the pinned TLS of an Operations Center), and fetches one of those files to a path,
verified. Nothing here decides what to install: that is the checker's plan.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from ..config.model import Provider as ProviderConfig
from . import fetch, index, smime
from .fetch import FetchError, Transport

# A verified index is reused for this long by scheduled checks (IncusOS: an hour); a
# check an operator asks for always fetches again.
CACHE_SECONDS = 3600.0
MAX_API_BYTES = 4 << 20
_UPDATE_ID = re.compile(r"[A-Za-z0-9-]{1,64}", re.ASCII)


class ProviderError(Exception):
    """A provider that could not answer: the reason, safe to show."""


class Unsupported(ProviderError):
    """IncusOS's "registration unsupported" / "deregistration unsupported"."""


@dataclass(frozen=True, slots=True)
class Machine:
    """What a provider may say about this machine when it registers."""

    hostname: str
    machine_id: str
    connection_url: str = ""


class UpdateSource(Protocol):
    name: str

    def register(self, machine: Machine) -> None: ...
    def deregister(self) -> None: ...
    def latest(
        self, channel: str, architecture: str, running: str, *, fresh: bool
    ) -> index.Release | None: ...
    def fetch(
        self,
        release: index.Release,
        file: index.UpdateFile,
        dest: Path,
        progress: fetch.Progress | None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything a provider is built from: its config, the transport (proxy, CAs,
    bounds), where it may cache, and the clock (an input, for tests)."""

    config: ProviderConfig
    transport: Transport
    cache_dir: Path
    now: Callable[[], datetime.datetime]
    client_cert: tuple[Path, Path] | None = None  # operations-center's TLS client identity


def load(inputs: Inputs) -> UpdateSource:
    name = inputs.config.name
    if name == "images":
        return Images(inputs)
    if name == "local":
        return Local(inputs)
    if name == "operations-center":
        return OperationsCenter(inputs)
    raise ProviderError(f"unknown provider {name!r}")


def _ca(settings: Mapping[str, str]) -> str:
    ca = settings.get("update_ca", "")
    if not ca:
        raise ProviderError(
            "no update CA configured (provider.config.update_ca): the index cannot be verified"
        )
    return ca


# -- the index cache ------------------------------------------------------------------------


def _cache_read(inputs: Inputs, key: str) -> tuple[float, str, bytes] | None:
    path = inputs.cache_dir / "index.cache.json"
    try:
        doc = json.loads(path.read_bytes())
        if doc.get("key") != key:
            return None
        return float(doc["fetched"]), str(doc.get("etag", "")), str(doc["content"]).encode()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_write(inputs: Inputs, key: str, etag: str, content: bytes) -> None:
    from ..core.files import atomic_write

    inputs.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {
        "key": key,
        "fetched": inputs.now().timestamp(),
        "etag": etag,
        "content": content.decode(),
    }
    atomic_write(inputs.cache_dir / "index.cache.json", json.dumps(doc).encode(), 0o600)


# -- images ---------------------------------------------------------------------------------


def _download(
    transport: Transport,
    url: str,
    file: index.UpdateFile,
    dest: Path,
    progress: fetch.Progress | None,
) -> None:
    """One file of a release, held to the size and SHA-256 the signed index gives it."""
    try:
        fetch.download(transport, url, dest, sha256=file.sha256, size=file.size, progress=progress)
    except FetchError as e:
        raise ProviderError(str(e)) from None


class Images:
    name = "images"

    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self.settings = inputs.config.config
        self.server = self.settings.get("server_url", "https://images.linuxcontainers.org/os")
        self.server = self.server.rstrip("/")
        self.signed = self.settings.get("signed_index", "true") != "false"

    def register(self, machine: Machine) -> None:
        token = self.settings.get("token", "")
        if not token:
            raise Unsupported("registration unsupported")
        body = json.dumps({"token": token, "machine_id": machine.machine_id}).encode()
        status, answer = _get(
            self.inputs.transport,
            f"{self.server}/register",
            method="POST",
            body=body,
            headers={"Content-Type": "application/json"},
        )
        if status == 400:
            raise ProviderError(answer.decode(errors="replace")[:200])
        if status != 200:
            raise ProviderError(f"bad HTTP response code for registration: {status}")

    def deregister(self) -> None:
        return None  # IncusOS: the images provider forgets locally

    def latest(
        self, channel: str, architecture: str, running: str, *, fresh: bool
    ) -> index.Release | None:
        content = self._index(fresh)
        return index.latest(index.parse_index(content), channel, architecture, running)

    def _index(self, fresh: bool) -> bytes:
        name = "index.sjson" if self.signed else "index.json"
        url = f"{self.server}/{name}"
        key = hashlib.sha256(f"{url}\n{self.settings.get('update_ca', '')}".encode()).hexdigest()
        cached = _cache_read(self.inputs, key)
        age = self.inputs.now().timestamp() - cached[0] if cached else None
        if cached and not fresh and age is not None and 0 <= age < CACHE_SECONDS:
            return cached[2]
        headers = {"If-None-Match": cached[1]} if cached and cached[1] else {}
        try:
            conn_status, body, etag = _get_with_etag(self.inputs.transport, url, headers)
        except FetchError as e:
            raise ProviderError(str(e)) from None
        if conn_status == 304 and cached:
            _cache_write(self.inputs, key, cached[1], cached[2])
            return cached[2]
        if conn_status != 200:
            raise ProviderError(f"{fetch.safe_url(url)}: HTTP {conn_status}")
        if self.signed:
            try:
                content = smime.verify(body, _ca(self.settings))
            except smime.BadSignature as e:
                raise ProviderError(str(e)) from None
        else:
            content = body
        index.parse_index(content)  # a bad document is never cached
        _cache_write(self.inputs, key, etag, content)
        return content

    def fetch(
        self,
        release: index.Release,
        file: index.UpdateFile,
        dest: Path,
        progress: fetch.Progress | None,
    ) -> None:
        url = f"{self.server}/{release.version}/{file.filename}"
        _download(self.inputs.transport, url, file, dest, progress)


def _get(
    transport: Transport,
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    try:
        return fetch.get(transport, url, MAX_API_BYTES, method=method, body=body, headers=headers)
    except FetchError as e:
        raise ProviderError(str(e)) from None


def _get_with_etag(
    transport: Transport, url: str, headers: dict[str, str]
) -> tuple[int, bytes, str]:
    status, body, answer_headers = fetch.get_full(
        transport, url, 2 * index.MAX_INDEX_BYTES, headers=headers
    )
    return status, body, answer_headers.get("etag", "")


# -- local ----------------------------------------------------------------------------------


class Local:
    name = "local"

    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self.settings = inputs.config.config
        self.root = Path(self.settings.get("path", "/nonexistent"))

    def register(self, machine: Machine) -> None:
        raise Unsupported("registration unsupported")

    def deregister(self) -> None:
        return None

    def latest(
        self, channel: str, architecture: str, running: str, *, fresh: bool
    ) -> index.Release | None:
        path = self.root / "index.sjson"
        try:
            with open(path, "rb") as f:
                signed = f.read(2 * index.MAX_INDEX_BYTES + 1)
        except OSError as e:
            raise ProviderError(f"{path}: {e.strerror}") from None
        try:
            content = smime.verify(signed, _ca(self.settings))
        except smime.BadSignature as e:
            raise ProviderError(str(e)) from None
        return index.latest(index.parse_index(content), channel, architecture, running)

    def fetch(
        self,
        release: index.Release,
        file: index.UpdateFile,
        dest: Path,
        progress: fetch.Progress | None,
    ) -> None:
        source = self.root / release.version / file.filename
        part = dest.with_name(dest.name + ".part")
        h = hashlib.sha256()
        copied = 0
        try:
            with open(source, "rb") as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    copied += len(chunk)
                    if copied > file.size:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    if progress is not None:
                        progress(copied, file.size)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise ProviderError(f"{source}: {e.strerror}") from None
        if copied != file.size or h.hexdigest() != file.sha256:
            part.unlink(missing_ok=True)
            what = "size" if copied != file.size else "SHA-256"
            raise ProviderError(f"{file.basename}: {what} differs from the signed index's")
        os.replace(part, dest)


# -- operations-center ----------------------------------------------------------------------


class OperationsCenter:
    name = "operations-center"

    def __init__(self, inputs: Inputs) -> None:
        self.inputs = inputs
        self.settings = inputs.config.config
        server = self.settings.get("server_url", "")
        if not server:
            raise ProviderError("operations-center needs provider.config.server_url")
        self.server = server.rstrip("/")
        pinned = self.settings.get("server_certificate", "")
        transport = inputs.transport
        if pinned:
            # The server's own certificate is the only anchor (IncusOS pins it too).
            transport = replace(transport, extra_cas=(pinned,), use_system_store=False)
        self.transport = replace(transport, client_cert=inputs.client_cert)

    def _api(self, method: str, path: str, body: Any = None) -> Any:
        shown = path.split("?", 1)[0]  # the registration token rides in the query
        data = None if body is None else json.dumps(body).encode()
        status, answer = _get(
            self.transport,
            self.server + path,
            method=method,
            body=data,
            headers={"Content-Type": "application/json"} if data is not None else None,
        )
        try:
            doc = json.loads(answer)
        except ValueError:
            raise ProviderError(f"{shown}: not an API answer (HTTP {status})") from None
        if not isinstance(doc, dict):
            raise ProviderError(f"{shown}: not an API answer (HTTP {status})")
        if doc.get("type") != "sync" or doc.get("status_code") != 200 or status != 200:
            error = doc.get("error") if isinstance(doc.get("error"), str) else ""
            raise ProviderError(f"{shown}: HTTP {status} {error}"[:300].strip())
        return doc.get("metadata")

    def register(self, machine: Machine) -> None:
        token = self.settings.get("server_token", "")
        request = {
            "name": machine.hostname,
            "connection_url": machine.connection_url,
            "machine_id": machine.machine_id,
        }
        path = "/1.0/provisioning/servers"
        # Quoted whole: a token is any printable text (a space, & # % +), and it must
        # reach Operations Center as one query value, never split or cut.
        path += f"?token={quote(token, safe='')}" if token else "/:self_register"
        self._api("POST", path, request)

    def deregister(self) -> None:
        raise Unsupported("deregistration unsupported")

    def refresh(self, connection_url: str, cause: str) -> None:
        """Tell Operations Center what changed (IncusOS's RefreshRegister)."""
        self._api(
            "PUT",
            "/1.0/provisioning/servers/:self",
            {"connection_url": connection_url, "cause": cause},
        )

    def latest(
        self, channel: str, architecture: str, running: str, *, fresh: bool
    ) -> index.Release | None:
        updates = self._api("GET", "/1.0/provisioning/updates?recursion=1")
        if not isinstance(updates, list):
            raise ProviderError("the update list is not a list")
        for i, raw in enumerate(updates):
            if not isinstance(raw, dict):
                raise ProviderError(f"updates[{i}]: expected an object")
            uuid = raw.get("uuid")
            channels = raw.get("channels") or []
            version = raw.get("version")
            # ASCII and not empty: it becomes a URL path segment (str.isalnum() holds
            # for "é", which http.client cannot send).
            if not isinstance(uuid, str) or _UPDATE_ID.fullmatch(uuid) is None:
                raise ProviderError(f"updates[{i}].uuid: not an identifier")
            if channel and channel not in channels and version != running:
                continue
            files = self._api("GET", f"/1.0/provisioning/updates/{uuid}/files")
            try:
                releases = index.parse_index(
                    json.dumps({"updates": [{**raw, "files": files, "url": uuid}]}).encode()
                )
            except index.BadIndex as e:
                raise ProviderError(f"Operations Center's update {uuid}: {e}") from None
            return index.latest(releases, "", architecture, running)
        return None

    def fetch(
        self,
        release: index.Release,
        file: index.UpdateFile,
        dest: Path,
        progress: fetch.Progress | None,
    ) -> None:
        url = f"{self.server}/1.0/provisioning/updates/{release.url}/files/{file.filename}"
        _download(self.transport, url, file, dest, progress)
