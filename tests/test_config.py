"""The document: both input shapes, the version hook, round trips, secrets."""

from __future__ import annotations

import json

import pytest

from incusos_hal.config import (
    Config,
    ConfigError,
    dumps_json,
    dumps_toml,
    from_dict,
    parse_json,
    parse_toml,
    versions,
)
from incusos_hal.config.model import Bond, Interface, Route

TOML = b"""
version = 1
[[network.interfaces]]
name = "uplink"
hwaddr = "52:54:00:0a:00:01"
addresses = ["dhcp4", "192.0.2.10/24"]
routes = [{ to = "0.0.0.0/0", via = "192.0.2.1" }]
[[network.bonds]]
name = "san"
mode = "802.3ad"
members = ["52:54:00:0a:00:02", "enp7s0"]
[logging.syslog]
address = "192.0.2.99"
"""

JSON = {
    "version": 1,
    "network": {
        "interfaces": [
            {
                "name": "uplink",
                "hwaddr": "52:54:00:0a:00:01",
                "addresses": ["dhcp4", "192.0.2.10/24"],
                "routes": [{"to": "0.0.0.0/0", "via": "192.0.2.1"}],
                "mtu": 0,
                "lldp": False,
                "roles": None,
                "vlan_tags": [],
            }
        ],
        "bonds": [{"name": "san", "mode": "802.3ad", "members": ["52:54:00:0a:00:02", "enp7s0"]}],
        "vlans": None,
        "dns": None,
    },
    "logging": {"syslog": {"address": "192.0.2.99", "protocol": "", "log_format": ""}},
}


def test_toml_and_api_json_load_the_same_model() -> None:
    from_toml = parse_toml(TOML)
    from_json = parse_json(json.dumps(JSON))
    assert from_toml == from_json
    assert from_toml.network.interfaces == (
        Interface(
            name="uplink",
            hwaddr="52:54:00:0a:00:01",
            addresses=("dhcp4", "192.0.2.10/24"),
            routes=(Route(to="0.0.0.0/0", via="192.0.2.1"),),
        ),
    )
    assert from_toml.network.bonds == (
        Bond(name="san", mode="802.3ad", members=("52:54:00:0a:00:02", "enp7s0")),
    )


def test_round_trip_through_toml_and_json() -> None:
    config = parse_toml(TOML)
    assert parse_toml(dumps_toml(config)) == config
    assert parse_json(dumps_json(config)) == config
    assert parse_json(dumps_json(config, omit_defaults=False)) == config


def test_stored_toml_omits_defaults_but_keeps_version() -> None:
    text = dumps_toml(Config()).decode()
    assert text.strip() == "version = 1"


def test_empty_document_is_the_default() -> None:
    assert parse_toml(b"") == Config()
    assert parse_json(b"{}") == Config()


def test_version_may_be_a_string_as_in_incusos_seeds() -> None:
    assert parse_json(b'{"version": "1"}') == Config()


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_toml(b'[[network.interfaces]]\nname = "_x"\nhwaddr = "nope:"\nmtu = 1\n')
    paths = [e.path for e in exc.value.errors]
    assert paths == [
        "network.interfaces[0].name",
        "network.interfaces[0].hwaddr",
        "network.interfaces[0].mtu",
    ]


def test_migration_hook_upgrades_older_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    """A version-2 world: documents at version 1 go through MIGRATIONS[1]."""
    monkeypatch.setattr("incusos_hal.config.model.CURRENT_VERSION", 2)

    def v1_to_v2(doc: dict[str, object]) -> dict[str, object]:
        doc = dict(doc)
        doc["network"] = {"interfaces": [{"name": "old", "hwaddr": "52:54:00:0a:00:01"}]}
        return doc

    monkeypatch.setitem(versions.MIGRATIONS, 1, v1_to_v2)
    config = from_dict({"version": 1})
    assert config.version == 2
    assert config.network.interfaces[0].name == "old"
    with pytest.raises(ConfigError, match="newer incusos-hal"):
        from_dict({"version": 3})


@pytest.mark.parametrize("bad", [True, 1.5, "one", None, [1]])
def test_version_must_be_an_integer(bad: object) -> None:
    if bad is None:  # null means "not set": the current version
        assert from_dict({"version": bad}).version == 1
        return
    with pytest.raises(ConfigError, match=r"^version: "):
        from_dict({"version": bad})


def test_booleans_are_not_integers_and_floats_are_not_integers() -> None:
    for raw in (True, 1500.0):
        with pytest.raises(ConfigError, match="mtu: expected an integer"):
            from_dict(
                {
                    "network": {
                        "interfaces": [{"name": "a", "hwaddr": "52:54:00:0a:00:01", "mtu": raw}]
                    }
                }
            )


def test_secrets_never_appear_in_errors() -> None:
    secret = "hunter2-very-secret"
    docs = [
        {
            "network": {
                "proxy": {
                    "servers": {
                        "p": {
                            "host": f"http://u:{secret}@h",
                            "auth": "basic",
                            "username": "u",
                            "password": "x",
                        }
                    }
                }
            }
        },
        {
            "network": {
                "proxy": {
                    "servers": {
                        "p": {
                            "host": "h",
                            "auth": "basic",
                            "username": "u",
                            "password": secret + "\n",
                        }
                    }
                }
            }
        },
        {
            "network": {
                "interfaces": [
                    {
                        "name": "a",
                        "hwaddr": "52:54:00:0a:00:01",
                        "ethernet": {"wakeonlan_password": secret},
                    }
                ]
            }
        },
    ]
    for doc in docs:
        with pytest.raises(ConfigError) as exc:
            from_dict(doc)
        assert secret not in str(exc.value)


def test_huge_documents_are_refused() -> None:
    with pytest.raises(ConfigError, match="larger than"):
        parse_toml(b"#" * (2 << 20))


def test_deeply_nested_json_is_an_error_not_a_crash() -> None:
    with pytest.raises(ConfigError):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
