"""Properties over generated documents (hypothesis):

- every valid config renders, deterministically, without raising;
- valid configs survive a round trip through TOML and JSON;
- anything else (arbitrary data, mutated documents, random bytes) gives ConfigError and
  never any other exception.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incusos_hal.config import (
    Config,
    ConfigError,
    dumps_json,
    dumps_toml,
    from_dict,
    parse_json,
    parse_toml,
)
from incusos_hal.hal.net import Nic
from incusos_hal.sections import render_files, render_units

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

macs = (
    st.binary(min_size=6, max_size=6)
    .filter(lambda b: any(b))
    .map(lambda b: ":".join(f"{x:02x}" for x in bytes([b[0] & 0xFE]) + b[1:]))
    .filter(lambda m: m != "00:00:00:00:00:00")
)
names = st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True).filter(
    lambda n: n not in ("lo", "all", "default")
)
ipv4 = st.tuples(
    st.integers(1, 223).filter(lambda o: o != 127),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 254),
).map(lambda t: ".".join(map(str, t)))
ipv6 = st.integers(1, 0xFFFF).map(lambda x: f"2001:db8:{x:x}::1")
v4_address = st.tuples(ipv4, st.integers(8, 30)).map(lambda t: f"{t[0]}/{t[1]}")
v6_address = st.tuples(ipv6, st.integers(48, 128)).map(lambda t: f"{t[0]}/{t[1]}")
address_lists = st.lists(
    st.one_of(st.sampled_from(["dhcp4", "dhcp6", "slaac"]), v4_address, v6_address),
    max_size=4,
    unique=True,
)
roles = st.lists(
    st.sampled_from(["management", "cluster", "instances", "storage"]), unique=True, max_size=4
)
online = st.sampled_from(["", "no", "any", "ipv4", "ipv6", "both"])
dns_names = st.from_regex(r"[a-z]{1,10}(\.[a-z]{2,6}){0,2}", fullmatch=True)


@st.composite
def link_fields(draw: st.DrawFn) -> dict[str, Any]:
    addresses = draw(address_lists)
    fields: dict[str, Any] = {"addresses": addresses}
    families = {6 if (a in ("dhcp6", "slaac") or ":" in a) else 4 for a in addresses}
    routes = []
    if 4 in families and draw(st.booleans()):
        routes.append({"to": "0.0.0.0/0", "via": draw(st.one_of(ipv4, st.just("dhcp4")))})
    if 6 in families and draw(st.booleans()):
        routes.append({"to": "::/0", "via": draw(st.one_of(ipv6, st.just("slaac")))})
    if routes:
        fields["routes"] = routes
    if draw(st.booleans()):
        fields["mtu"] = draw(st.integers(1280, 9000))
    fields["lldp"] = draw(st.booleans())
    fields["roles"] = draw(roles)
    fields["required_for_online"] = draw(online)
    return fields


@st.composite
def documents(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A valid document, and the MACs of the NICs it mentions."""
    device_names = draw(st.lists(names, min_size=0, max_size=6, unique=True))
    all_macs = draw(st.lists(macs, min_size=12, max_size=12, unique=True))
    n_ifaces = draw(st.integers(0, len(device_names)))
    interfaces, bonds, mtus = [], [], {}
    for i, name in enumerate(device_names[:n_ifaces]):
        iface = {"name": name, "hwaddr": all_macs[i], **draw(link_fields())}
        iface["vlan_tags"] = draw(st.lists(st.integers(1, 4094), unique=True, max_size=3))
        interfaces.append(iface)
        mtus[name] = iface.get("mtu", 1500)
    for j, name in enumerate(device_names[n_ifaces:]):
        members = all_macs[6 + j : 7 + j] if j < 6 else []
        if not members:
            break
        bond = {
            "name": name,
            "mode": draw(
                st.sampled_from(["802.3ad", "active-backup", "balance-xor", "balance-alb"])
            ),
            "members": members,
            **draw(link_fields()),
        }
        bonds.append(bond)
        mtus[name] = bond.get("mtu", 1500)
    vlans = []
    used: set[tuple[str, int]] = set()
    vlan_names = draw(st.lists(names, max_size=3, unique=True))
    for name in vlan_names:
        if not mtus or name in mtus:
            continue
        parent = draw(st.sampled_from(sorted(mtus)))
        vid = draw(st.integers(1, 4094))
        if (parent, vid) in used:
            continue
        used.add((parent, vid))
        fields = draw(link_fields())
        del fields["lldp"]  # a VLAN has no LLDP of its own
        fields["mtu"] = min(fields.get("mtu", 0), mtus[parent])
        if fields["mtu"] and fields["mtu"] < 1280:
            fields["mtu"] = 0
        vlans.append({"name": name, "parent": parent, "id": vid, **fields})
    network: dict[str, Any] = {"interfaces": interfaces, "bonds": bonds, "vlans": vlans}
    if draw(st.booleans()):
        hostname = draw(st.from_regex(r"[a-z][a-z0-9]{0,20}", fullmatch=True))
        network["dns"] = {
            "hostname": hostname,
            "domain": draw(dns_names),
            "nameservers": draw(st.lists(ipv4, max_size=2)),
            "search_domains": draw(st.lists(dns_names, max_size=2)),
            "dns_over_tls": draw(st.booleans()),
        }
    if draw(st.booleans()):
        network["time"] = {
            "ntp_servers": draw(st.lists(dns_names, max_size=3)),
            "timezone": draw(st.sampled_from(["UTC", "Europe/Berlin", ""])),
        }
    if draw(st.booleans()):
        network["proxy"] = {
            "servers": {
                "corp": {
                    "host": draw(dns_names) + ":3128",
                    "auth": draw(st.sampled_from(["anonymous", "basic"])),
                    "username": "u",
                    "password": draw(
                        st.text(
                            # Any text but control characters (refused: see
                            # test_injection.py), percent-encoded into the URL.
                            st.characters(
                                blacklist_characters="\u2028\u2029",
                                blacklist_categories=["Cc", "Cs"],
                            ),
                            min_size=1,
                        )
                    ),
                }
            },
            "rules": [
                {"destination": "*." + draw(dns_names), "target": "direct"},
                {"destination": "*", "target": "corp"},
            ],
        }
    doc: dict[str, Any] = {"version": 1, "network": network}
    if draw(st.booleans()):
        doc["logging"] = {
            "syslog": {
                "address": draw(st.one_of(ipv4, dns_names, ipv6.map(lambda a: f"[{a}]:514"))),
                "protocol": draw(st.sampled_from(["", "udp", "tcp", "tls", "dtls"])),
                "log_format": draw(st.sampled_from(["", "rfc5424", "rfc3339"])),
            }
        }
    mentioned = [i["hwaddr"] for i in interfaces] + [m for b in bonds for m in b["members"]]
    return doc, mentioned


@st.composite
def nic_lists(draw: st.DrawFn, mentioned: list[str]) -> tuple[Nic, ...]:
    present = draw(st.lists(st.sampled_from(mentioned), unique=True)) if mentioned else []
    extra = draw(st.lists(macs, max_size=3, unique=True))
    nics = []
    for i, mac in enumerate(present + [m for m in extra if m not in present]):
        nics.append(Nic(name=f"eth{i}", hwaddr=mac, physical=draw(st.booleans())))
    return tuple(nics)


@SETTINGS
@given(st.data())
def test_valid_configs_render_deterministically(data: st.DataObject) -> None:
    doc, mentioned = data.draw(documents())
    config = from_dict(doc)
    nics = data.draw(nic_lists(mentioned))
    first = render_files(config, nics)
    second = render_files(from_dict(copy.deepcopy(doc)), nics)
    assert first == second
    units = render_units(config, source="/s/config.toml", unit_dir="/u")
    assert units == render_units(config, source="/s/config.toml", unit_dir="/u")
    for path in first.files:
        assert path.startswith("/") and ".." not in path.split("/")


@SETTINGS
@given(documents())
def test_valid_configs_round_trip(doc_and_macs: tuple[dict[str, Any], list[str]]) -> None:
    config = from_dict(doc_and_macs[0])
    assert parse_toml(dumps_toml(config)) == config
    assert parse_json(dumps_json(config)) == config


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)


def _expect_config_or_error(make: Any) -> None:
    try:
        result = make()
    except ConfigError as e:
        assert e.errors and all(str(err) for err in e.errors)
    else:
        assert isinstance(result, Config)


@SETTINGS
@given(json_values)
def test_arbitrary_data_gives_config_error_only(raw: Any) -> None:
    _expect_config_or_error(lambda: from_dict(raw))
    _expect_config_or_error(lambda: from_dict({"network": raw, "logging": raw}))


@SETTINGS
@given(st.data())
def test_mutated_documents_give_config_error_only(data: st.DataObject) -> None:
    doc, _ = data.draw(documents())
    node: Any = doc
    # Walk to a random container and replace or add one random value.
    for _ in range(data.draw(st.integers(0, 4))):
        if isinstance(node, dict) and node:
            key = data.draw(st.sampled_from(sorted(node)))
            if not isinstance(node[key], dict | list) or not node[key]:
                break
            node = node[key]
        elif isinstance(node, list) and node:
            nxt = node[data.draw(st.integers(0, len(node) - 1))]
            if not isinstance(nxt, dict | list) or not nxt:
                break
            node = nxt
    value = data.draw(json_values)
    if isinstance(node, dict):
        node[data.draw(st.sampled_from([*sorted(node), "junk"]))] = value
    elif isinstance(node, list):
        node.append(value)
    _expect_config_or_error(lambda: from_dict(doc))
    _expect_config_or_error(lambda: parse_json(json.dumps(doc)))


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_give_config_error_only(data: bytes) -> None:
    _expect_config_or_error(lambda: parse_toml(data))
    _expect_config_or_error(lambda: parse_json(data))
