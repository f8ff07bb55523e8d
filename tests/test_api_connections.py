"""Concurrency, against a real `incusos-hal serve`: concurrent PUTs with one If-Match
have one winner.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from incusos_hal.hal import luks

import apiserver
from conftest import require_tool


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    require_tool("openssl", "curl")
    d = tmp_path_factory.mktemp("certs")
    return {name: apiserver.openssl_client_cert(d, name) for name in ("trusted", "stranger")}


# -- If-Match: one winner -----------------------------------------------------------------

CONCURRENT_PUTS = 12
FIRST_KEY = "first-recovery-key!"


def section_body(section: str, i: int, srv: apiserver.Server) -> dict[str, Any]:
    """The i-th of the concurrent PUTs' bodies for `section`: each different."""
    if section == "network":
        nic = {"name": f"up{i}", "hwaddr": f"52:54:00:12:34:{i:02x}", "addresses": ["dhcp4"]}
        return {"interfaces": [nic]}
    if section == "logging":
        return {"syslog": {"address": f"192.0.2.{i + 1}", "protocol": "udp"}}
    if section == "update":
        return {"check_frequency": f"{i + 1}h"}
    if section == "security":
        return {"encryption_recovery_keys": [f"a-Long-enough-key-{i:02}!"]}
    assert section == "fallback-listener"
    return {"trusted_client_certificates": [srv.cert.read_text()], "socket_uids": [1000 + i]}


async def concurrent_puts(
    socket_path: Path, path: str, bodies: list[dict[str, Any]], etag: str
) -> list[int]:
    """Every PUT sent at once, each on its own connection; their statuses in order."""
    connector = aiohttp.UnixConnector(path=str(socket_path), limit=0)
    timeout = aiohttp.ClientTimeout(total=900)  # every loser waits for the keyslot sync
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def put(body: dict[str, Any]) -> int:
            headers = {"If-Match": etag, "Content-Type": "application/json"}
            async with session.put(
                f"http://ihal{path}", data=json.dumps({"config": body}), headers=headers
            ) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(put(b) for b in bodies)))


SECTIONS = ["network", "logging", "update", "security", "fallback-listener"]


@pytest.mark.parametrize("section", SECTIONS)
def test_concurrent_puts_with_one_if_match_have_exactly_one_winner(
    tmp_path: Path, certs: dict[str, tuple[Path, Path]], section: str
) -> None:
    """Security's PUT changes the volumes' keyslots (in an executor, seconds with real
    key derivation) before it stores: the root here has two LUKS2 volumes, so the PUTs
    that lose the race are still waiting while the winner works."""
    (tmp_path / "api").mkdir()
    srv = apiserver.make(tmp_path / "api", [certs["trusted"][0]])
    images: list[Path] = []
    if section == "security":
        from test_security import two_volumes

        srv.root, images = two_volumes(tmp_path, FIRST_KEY)
    srv.start()
    try:
        path = f"/1.0/system/{section}"
        if section == "security":
            first = {"config": {"encryption_recovery_keys": [FIRST_KEY]}}
            assert srv.put(path, first).status == 200
        etag = srv.curl("GET", path).headers["etag"]
        bodies = [section_body(section, i, srv) for i in range(CONCURRENT_PUTS)]
        statuses = asyncio.run(concurrent_puts(srv.socket, path, bodies, etag))
        assert sorted(statuses) == [200] + [412] * (CONCURRENT_PUTS - 1), statuses
        winner = bodies[statuses.index(200)]
        stored = srv.curl("GET", path).json["metadata"]["config"]
        assert {k: stored[k] for k in winner} == winner
        # The next PUT needs the winner's ETag.
        assert srv.put(path, {"config": winner}, "-H", f"If-Match: {etag}").status == 412
        for image in images:  # one keyslot each: the winner's key, no loser's
            assert len(luks.header(image).keyslots) == 1
            assert luks.opens(image, winner["encryption_recovery_keys"][0])
    finally:
        srv.stop()
