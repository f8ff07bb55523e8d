"""Review of the update providers against hostile or awkward input: what a provider
sends to a server is what was configured, nothing more, and never repeated in an error."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from incusos_hal.config.model import Provider
from incusos_hal.update import fetch, providers
from updateserver import PKI, FakeOperationsCenter, make_pki

from conftest import require_tool


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    require_tool("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


def operations_center(pki: PKI, url: str, token: str, tmp_path: Path) -> providers.OperationsCenter:
    server_pem = (pki.directory / "server.pem").read_text()
    config = {"server_url": url, "server_token": token, "server_certificate": server_pem}
    return providers.OperationsCenter(
        providers.Inputs(
            config=Provider("operations-center", config),
            transport=fetch.Transport(read_timeout=5, deadline=10),
            cache_dir=tmp_path / "cache",
            now=lambda: datetime.datetime.now(datetime.UTC),
        )
    )


@pytest.mark.parametrize("token", ["se cret-1", "secret&name=other", "secret#frag", "a+b%2F=c"])
def test_operations_center_token_reaches_the_server_as_it_is(
    pki: PKI, tmp_path: Path, token: str
) -> None:
    # The validator lets any printable token through (a space, & # % + =): it must reach
    # Operations Center as that one query value, neither cut, nor split into other
    # parameters, nor refused by the HTTP client with the token in its message.
    fake = FakeOperationsCenter(pki, token, [], {})
    try:
        oc = operations_center(pki, fake.url, token, tmp_path)
        oc.register(providers.Machine("host", "0" * 32))
        assert len(fake.registered) == 1
    finally:
        fake.close()


def test_operations_center_wrong_token_never_repeated(pki: PKI, tmp_path: Path) -> None:
    fake = FakeOperationsCenter(pki, "the-right-one", [], {})
    try:
        oc = operations_center(pki, fake.url, "wrong secret 7", tmp_path)
        with pytest.raises(providers.ProviderError) as e:
            oc.register(providers.Machine("host", "0" * 32))
        assert "secret" not in str(e.value)
        assert fake.registered == []
    finally:
        fake.close()


def test_invalid_url_error_never_repeats_the_query() -> None:
    with pytest.raises(fetch.FetchError) as e:
        fetch.get(fetch.Transport(read_timeout=2, deadline=2), "http://127.0.0.1:9/x?k=a b", 100)
    assert "k=a" not in str(e.value) and "not a valid URL" in str(e.value)


@pytest.mark.parametrize("version", ["..", ".", "-1", "_"])
def test_a_version_that_is_not_a_name_is_refused(version: str) -> None:
    # A version becomes a directory (updates/<kind>/<name>/<version>: `..` is its
    # parent, shared by every version, and a Secure Boot step removes its directory
    # whole) and a URL path segment (<server_url>/../<file>).
    from incusos_hal.update import index

    files = [{"filename": "a.raw", "sha256": "a" * 64, "size": 1, "type": "application"}]
    raw = json.dumps({"updates": [{"version": version, "channels": ["stable"], "files": files}]})
    with pytest.raises(index.BadIndex, match="is not a version"):
        index.parse_index(raw.encode())


@pytest.mark.parametrize("uuid", ["", "é1", "٣"])
def test_operations_center_update_id_not_ascii_is_a_provider_error(
    pki: PKI, tmp_path: Path, uuid: str
) -> None:
    # str.isalnum() holds for "é" and Arabic digits: such an id reached http.client,
    # whose UnicodeEncodeError no caller expects (the check died without a status).
    fake = FakeOperationsCenter(pki, "t", [{"uuid": uuid, "version": "2", "channels": []}], {})
    try:
        oc = operations_center(pki, fake.url, "t", tmp_path)
        with pytest.raises(providers.ProviderError, match="not an identifier"):
            oc.latest("", "x86_64", "1", fresh=True)
    finally:
        fake.close()
