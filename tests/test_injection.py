"""No value may change the meaning of a rendered file (issue 13, part 1).

Every string field of every section (found by walking the dataclass model, so a new field
is covered without touching this file) gets control characters and the separators of the
files it may reach. Each document is either refused with an error naming that field, or
accepted, and then every rendered INI file and the proxy environment file read back, with
readers that follow systemd's own rules (conf-parser.c and env-file.c), to exactly the
sections and values the renderer meant to write. The same attacks go through the real
API, `:restore`'s archive check, and systemd-analyze verify.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import re
import ssl
import subprocess
import tarfile
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from incusos_hal import sections
from incusos_hal.api import backup
from incusos_hal.config import Config, ConfigError, dumps_json, from_dict, model
from incusos_hal.config import formats as fmt
from incusos_hal.config.errors import child
from incusos_hal.hal.net import Nic
from incusos_hal.render import ini as ini_module
from incusos_hal.render import networkd, system, units
from incusos_hal.render.ini import UnsafeTextError, env_file, ini

import apiserver
from conftest import require_tool

# -- readers that follow systemd's parsers --------------------------------------------------------

WHITESPACE = " \t\n\r"


def read_ini(data: bytes) -> list[tuple[str, list[tuple[str, str]]]]:
    """Sections as systemd's conf-parser.c sees them: lines end at LF, CR or NUL; a line
    ending in an unescaped backslash continues on the next (the backslash becomes a
    space); lines are stripped; `#`/`;` begin comments; key and value split at the first
    `=` and are stripped."""
    text = data.decode("utf-8")  # systemd refuses invalid UTF-8
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    continuation = ""
    for raw in re.split(r"\r\n|\r|\n|\0", text):
        if continuation and raw.lstrip(WHITESPACE)[:1] in ("#", ";"):
            continue
        line = continuation + raw
        escaped = False
        for ch in line:
            escaped = not escaped if ch == "\\" else False
        if escaped:
            continuation = line[:-1] + " "
            continue
        continuation = ""
        line = line.strip(WHITESPACE)
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            assert line.endswith("]"), line
            sections.append((line[1:-1], []))
            continue
        key, eq, value = line.partition("=")
        assert eq and key.strip(WHITESPACE), f"systemd ignores the line {line!r}"
        assert sections, f"assignment outside a section: {line!r}"
        sections[-1][1].append((key.strip(WHITESPACE), value.strip(WHITESPACE)))
    assert not continuation, "the file ends inside a continuation line"
    return sections


def read_env(data: bytes) -> list[tuple[str, str]]:
    """Assignments as systemd's env-file.c (EnvironmentFile=) reads them."""
    text = data.decode("utf-8")
    out: list[tuple[str, str]] = []
    state, key, value = "pre_key", "", ""
    trailing_ws: int | None = None

    def push() -> None:
        out.append((key.rstrip(WHITESPACE), value))

    for c in text:
        if state == "pre_key":
            if c in "#;":
                state = "comment"
            elif c not in WHITESPACE:
                state, key = "key", c
        elif state == "key":
            if c in "\n\r":
                state, key = "pre_key", ""
            elif c == "=":
                state, value, trailing_ws = "pre_value", "", None
            else:
                key += c
        elif state == "pre_value":
            if c in "\n\r":
                push()
                state, key, value = "pre_key", "", ""
            elif c == "'":
                state = "single"
            elif c == '"':
                state = "double"
            elif c == "\\":
                state = "escape"
            elif c not in WHITESPACE:
                state, value = "value", value + c
        elif state == "value":
            if c in "\n\r":
                if trailing_ws is not None:
                    value = value[:trailing_ws]
                push()
                state, key, value, trailing_ws = "pre_key", "", "", None
            elif c == "\\":
                state, trailing_ws = "escape", None
            else:
                if c not in WHITESPACE:
                    trailing_ws = None
                elif trailing_ws is None:
                    trailing_ws = len(value)
                value += c
        elif state == "escape":
            state = "value"
            if c not in "\n\r":
                value += c
        elif state == "single":
            if c == "'":
                state = "pre_value"
            else:
                value += c
        elif state == "double":
            if c == '"':
                state = "pre_value"
            elif c == "\\":
                state = "double_escape"
            else:
                value += c
        elif state == "double_escape":
            state = "double"
            value += c if c in '"\\`$' else ("" if c == "\n" else "\\" + c)
        elif state == "comment" and c in "\n\r":
            state = "pre_key"
    assert state in ("pre_key", "comment"), f"the file ends inside an assignment ({state})"
    return out


# -- the writers refuse, naming the key -----------------------------------------------------------

BAD_VALUES = [
    "a\nb", "a\rb", "a\0b", "a\tb", "a\x1bb", "a\x7fb", "a\x85b", "a\u2028b", "a\u2029b",
    "a\ud800", " a", "a ", "a\\", "a\n[Route]",
]  # fmt: skip


@pytest.mark.parametrize("value", BAD_VALUES, ids=repr)
def test_ini_writer_refuses_values_that_would_not_read_back(value: str) -> None:
    secret = value.replace("a", "s3cr3t")
    with pytest.raises(UnsafeTextError, match=r"\[Network\] DNS=") as e:
        ini([("Network", [("DNS", secret)])])
    assert "s3cr3t" not in str(e.value)  # a value may be a secret: never repeated


@pytest.mark.parametrize(
    ("section", "key"), [("Net work", "DNS"), ("A]", "DNS"), ("", "DNS"), ("Network", "D=NS"),
                         ("Network", "#DNS"), ("Network", "DNS\n"), ("Network", "")],
)  # fmt: skip
def test_ini_writer_refuses_section_and_key_names(section: str, key: str) -> None:
    with pytest.raises(UnsafeTextError):
        ini([(section, [(key, "x")])])


def test_ini_writer_refuses_specifiers_in_unit_files_only() -> None:
    assert read_ini(ini([("Unit", [("SourcePath", "/a%b")])])) == [
        ("Unit", [("SourcePath", "/a%b")])
    ]
    with pytest.raises(UnsafeTextError, match="specifier"):
        ini([("Unit", [("SourcePath", "/a%b")])], specifiers=True)


def test_ini_round_trips_what_it_accepts() -> None:
    sections = [
        ("Network", [("Address", "192.0.2.1/24"), ("DNS", "fe80::1%eth0#x.example"), ("A", "")]),
        ("Empty", []),
        ("Route", [("Gateway", "a=b;c#d[e]f\\g"), ("Destination", "ünï cödé")]),
    ]
    data = ini(sections, header="two\nlines")
    assert read_ini(data) == [s for s in sections if s[1]]


@pytest.mark.parametrize(
    "value", [*BAD_VALUES, "a b", 'a"b', "a'b", "a$b", "a`b", "a#b", "a;b", "a\\b", "a*b"],
    ids=repr,
)  # fmt: skip
def test_env_writer_refuses_what_systemd_or_a_shell_would_read_differently(value: str) -> None:
    with pytest.raises(UnsafeTextError, match=r"^http_proxy=") as e:
        env_file([("http_proxy", value.replace("a", "s3cr3t"))])
    assert "s3cr3t" not in str(e.value)
    with pytest.raises(UnsafeTextError):
        env_file([("LD_PRELOAD\nX", "a")])


def test_env_file_round_trips_urls() -> None:
    entries = [("http_proxy", "http://u%40x:p%20%25@[2001:db8::1]:3128"), ("no_proxy", "a,.b,::1")]
    assert read_env(env_file(entries, header="h")) == entries


def test_network_file_names_come_from_validated_values_only() -> None:
    bad = model.Network(interfaces=(model.Interface(name="a/../../x", hwaddr="52:54:00:00:00:01"),))
    with pytest.raises(UnsafeTextError, match="file name"):
        networkd.render_networkd(bad)
    trailing = model.Network(interfaces=(model.Interface(name="up", hwaddr="52:54:00:00:00:01\n"),))
    with pytest.raises(UnsafeTextError):
        networkd.render_networkd(trailing)


# -- numbers and durations ------------------------------------------------------------------------


def test_durations_are_finite_and_bounded() -> None:
    assert fmt.parse_go_duration("1" * 400 + "s") is None
    assert fmt.parse_go_duration("2562047h47m16.854775807s") is not None  # Go's maximum
    assert fmt.parse_go_duration("2562048h") is None
    assert fmt.parse_go_duration("1.5h") == 5400.0
    for field, value in [
        ("confirmation_timeout", "1" * 400 + "s"),
        ("confirmation_timeout", "25h"),
    ]:
        with pytest.raises(ConfigError, match=f"network.{field}: "):
            from_dict({"network": {field: value}})
    assert from_dict({"network": {"confirmation_timeout": "24h"}})
    with pytest.raises(ConfigError, match=r"update\.check_frequency: .* maximum"):
        from_dict({"update": {"check_frequency": "8761h"}})


@pytest.mark.parametrize(
    "value", [10**400, -(10**400), 2**64, -1], ids=["huge", "-huge", "2^64", "-1"]
)
def test_huge_integers_are_refused_in_every_int_field(value: int) -> None:
    for path, doc in int_slots(base_document()):
        mutated = copy.deepcopy(doc)
        set_at(mutated, path, value)
        where = slot_path(path)
        try:
            config = from_dict(mutated)
        except ConfigError as e:
            assert any(err.path == where for err in e.errors), (where, e.errors)
            assert all(len(str(err)) < 300 for err in e.errors)
        else:  # accepted: it must still render and serialise
            json.loads(dumps_json(config))
            sections.render_files(config, NICS)


# -- the document every attack starts from --------------------------------------------------------


def make_pem(ca: bool) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


CA_PEM = make_pem(ca=True)
CLIENT_PEM = make_pem(ca=False)

NICS = (
    Nic(name="eth0", hwaddr="52:54:00:0a:00:01", physical=True),
    Nic(name="eth1", hwaddr="52:54:00:0a:00:02", physical=True),
    Nic(name="eth3", hwaddr="52:54:00:0a:00:03", physical=True),
    Nic(name="eth4", hwaddr="52:54:00:0a:00:04", physical=True),
)


def base_document() -> dict[str, Any]:
    """A valid document holding every string field of the model at least once."""
    link_routes = [
        {"to": "0.0.0.0/0", "via": "192.0.2.1"},
        {"to": "2001:db8:1::/48", "via": "2001:db8::1"},
    ]
    return {
        "version": 1,
        "network": {
            "confirmation_timeout": "90s",
            "dns": {
                "hostname": "host1",
                "domain": "example.com",
                "nameservers": ["192.0.2.53", "fe80::53%uplink#dns.example.com"],
                "search_domains": ["example.com", "~corp.example"],
                "dns_over_tls": True,
            },
            "time": {
                "ntp_servers": ["ntp.example.com", "192.0.2.123"],
                "timezone": "Europe/Berlin",
            },
            "proxy": {
                "servers": {
                    "corp": {
                        "host": "http://proxy.example.com:3128",
                        "auth": "basic",
                        "username": "user",
                        "password": "pass word",
                        "realm": "EXAMPLE.COM",
                    }
                },
                "rules": [
                    {"destination": "*.example.com|192.0.2.0/24", "target": "direct"},
                    {"destination": "*", "target": "corp"},
                ],
            },
            "interfaces": [
                {
                    "name": "uplink",
                    "hwaddr": "52:54:00:0a:00:01",
                    "addresses": ["192.0.2.10/24", "2001:db8::10/64", "dhcp4", "slaac"],
                    "routes": link_routes,
                    "mtu": 1500,
                    "lldp": True,
                    "roles": ["management"],
                    "vlan_tags": [10],
                    "required_for_online": "any",
                    "ethernet": {
                        "wakeonlan": True,
                        "wakeonlan_modes": ["magic", "secureon"],
                        "wakeonlan_password": "00:11:22:33:44:55",
                    },
                },
                {"name": "lan", "hwaddr": "eth1", "addresses": ["dhcp6"]},
            ],
            "bonds": [
                {
                    "name": "san",
                    "mode": "802.3ad",
                    "members": ["52:54:00:0a:00:03", "eth4"],
                    "hwaddr": "52:54:00:0a:00:05",
                    "addresses": ["10.0.0.2/24"],
                    "mtu": 9000,
                    "roles": ["storage"],
                    "vlan_tags": [20],
                    "required_for_online": "ipv4",
                }
            ],
            "vlans": [
                {
                    "name": "v100",
                    "parent": "uplink",
                    "id": 100,
                    "addresses": ["198.51.100.2/24"],
                    "routes": [{"to": "203.0.113.0/24", "via": "198.51.100.1"}],
                    "mtu": 1400,
                    "roles": ["cluster"],
                    "required_for_online": "no",
                }
            ],
        },
        "logging": {
            "syslog": {
                "address": "[2001:db8::514]:6514",
                "protocol": "tls",
                "log_format": "rfc3339",
            }
        },
        "update": {
            "channel": "stable",
            "check_frequency": "6h",
            "maintenance_windows": [
                {
                    "start_hour": 1,
                    "start_minute": 0,
                    "end_hour": 3,
                    "end_minute": 30,
                    "start_day_of_week": "Sunday",
                    "end_day_of_week": "Sunday",
                }
            ],
        },
        "security": {
            "encryption_recovery_keys": ["correct-horse-battery-staple"],
            "custom_ca_certs": [CA_PEM],
        },
        "listener": {
            "listen_address": "0.0.0.0:8443",
            "trusted_client_certificates": [CLIENT_PEM],
            "socket_uids": [1000],
        },
        "kernel": {
            "console": [{"device": "ttyS0", "baud_rate": 115200}],
            "blacklist_modules": ["nouveau"],
            "cpu": {"scaling_governor": "performance"},
            "memory": {"persistent_hugepages": 16, "zram_swap_size": "4GiB"},
            "network": {
                "buffer_size": 16777216,
                "netdev_max_backlog": 5000,
                "queuing_discipline": "fq",
                "tcp_congestion_algorithm": "bbr",
                "tcp_mtu_probing": True,
            },
            "pci": {
                "passthrough": [
                    {"vendor_id": "10de", "product_id": "1eb8", "pci_address": "0000:65:00.0"}
                ],
                "sriov": [{"pci_address": "0000:3b:00.0", "vf_count": 8}],
            },
        },
        "storage": {
            "scrub_schedule": "0 4 * * 0",
            "pools": [
                {
                    "name": "tank",
                    "type": "zfs-raid1",
                    "devices": ["/dev/disk/by-id/ata-a", "/dev/disk/by-id/ata-b"],
                    "cache": ["/dev/disk/by-id/nvme-c"],
                    "log": ["/dev/disk/by-id/nvme-d"],
                    "special": {
                        "type": "zfs-raid0",
                        "special_small_blocks_size_in_kb": 64,
                        "devices": ["/dev/disk/by-id/nvme-e"],
                    },
                }
            ],
        },
        "provider": {
            "name": "images",
            "config": {"server_url": "https://images.example.org", "token": "t0ken"},
        },
        "services": {
            "nvme": {
                "enabled": False,
                "targets": [
                    {
                        "transport": "tcp",
                        "address": "192.0.2.10",
                        "port": 4420,
                        "nqn": "nqn.2014-08.org.example:target",
                    },
                    {
                        "transport": "fc",
                        "address": "nn-0x20000025b5000001:pn-0x20000025b5000002",
                        "host_address": "nn-0x20000025b5000003:pn-0x20000025b5000004",
                        "port": 0,
                    },
                ],
            },
            "iscsi": {
                "enabled": False,
                "targets": [
                    {
                        "target": "iqn.2004-10.org.example:disk",
                        "address": "192.0.2.11",
                        "port": 3260,
                    }
                ],
            },
            "multipath": {"enabled": False, "wwns": ["0x5000c500a1b2c3d4"]},
        },
    }


# -- walking the model ----------------------------------------------------------------------------

Path_ = tuple[str | int | tuple[str], ...]  # a ("key",) element marks a mapping's key


def _walk(
    tp: Any, raw: Any, path: Path_, want: Callable[[Any], bool], out: list[Path_], seen: set[str]
) -> None:
    """Every place in `raw` whose model type `want` accepts; `seen` gets "Class.field"."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if want(tp):
        out.append(path)
    elif origin is tuple:
        for i, item in enumerate(raw):
            _walk(typing.get_args(tp)[0], item, (*path, i), want, out, seen)
    elif origin is Mapping:
        key_type, value_type = typing.get_args(tp)
        for key, value in raw.items():
            if want(key_type):
                out.append((*path, (key,)))
            _walk(value_type, value, (*path, key), want, out, seen)
    elif dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, vars(model))
        for f in dataclasses.fields(tp):
            if f.name in raw:
                before = len(out)
                _walk(hints[f.name], raw[f.name], (*path, f.name), want, out, seen)
                if len(out) > before:
                    seen.add(f"{tp.__name__}.{f.name}")


def _model_fields(want: Callable[[Any], bool]) -> set[str]:
    """Every "Class.field" of the model that holds a wanted type somewhere below it."""
    found: set[str] = set()

    def holds(tp: Any) -> bool:
        args = typing.get_args(tp)
        if want(tp):
            return True
        if typing.get_origin(tp) is Mapping:
            return want(args[0]) or holds(args[1])
        if args:
            return any(holds(a) for a in args if a is not type(None) and a is not Ellipsis)
        return False

    for cls in _reachable(Config):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls, vars(model))
            for f in dataclasses.fields(cls):
                tp = hints[f.name]
                if holds(tp) and not dataclasses.is_dataclass(_strip_optional(tp)):
                    found.add(f"{cls.__name__}.{f.name}")
    return found


def _reachable(cls: type) -> list[type]:
    """The model's classes a document can hold, from `cls` down (not its bases alone)."""
    out: list[type] = []
    pending = [cls]
    while pending:
        current = pending.pop()
        if current in out:
            continue
        out.append(current)
        hints = typing.get_type_hints(current, vars(model))
        for f in dataclasses.fields(current):
            stack = [hints[f.name]]
            while stack:
                tp = stack.pop()
                if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                    pending.append(tp)
                stack += [a for a in typing.get_args(tp) if a is not Ellipsis]
    return out


def _strip_optional(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp


def _is_str(tp: Any) -> bool:
    """Text in the document: plain strings, enumerations (Literal) and durations."""
    if typing.get_origin(tp) is typing.Literal:
        return True
    return tp is str or (isinstance(tp, type) and issubclass(tp, str))


def _is_int(tp: Any) -> bool:
    return tp is int


def string_slots(doc: dict[str, Any]) -> tuple[list[Path_], set[str]]:
    out: list[Path_] = []
    seen: set[str] = set()
    _walk(Config, doc, (), _is_str, out, seen)
    return out, seen


def int_slots(doc: dict[str, Any]) -> list[tuple[Path_, dict[str, Any]]]:
    out: list[Path_] = []
    _walk(Config, doc, (), _is_int, out, set())
    return [(p, doc) for p in out if p != ("version",)]  # version: migrate's own check


def get_at(doc: Any, path: Path_) -> Any:
    for step in path:
        if isinstance(step, tuple):
            return step[0]
        doc = doc[step]
    return doc


def set_at(doc: Any, path: Path_, value: Any) -> Path_:
    """Sets the value (or renames the key) at `path`; the path of the result."""
    for step in path[:-1]:
        doc = doc[step]
    last = path[-1]
    if isinstance(last, tuple):
        doc[value] = doc.pop(last[0])
        return (*path[:-1], (value,))
    doc[last] = value
    return path


def slot_path(path: Path_) -> str:
    out = ""
    for step in path:
        out = child(out, step[0] if isinstance(step, tuple) else step)
    return out


def test_base_document_holds_every_string_and_int_field_of_the_model() -> None:
    _, seen = string_slots(base_document())
    assert _model_fields(_is_str) - seen == set(), "add these fields to base_document()"
    ints: set[str] = set()
    _walk(Config, base_document(), (), _is_int, [], ints)
    assert _model_fields(_is_int) - ints == set(), "add these fields to base_document()"
    config = from_dict(base_document())
    assert sections.render_files(config, NICS).files


# -- the attack -----------------------------------------------------------------------------------

ATTACK_CHARS = [
    "\n", "\r", "\0", "\t", "\x0b", "\x1b", "\x7f", "\x85", "\u2028", "\ud800",
    "[", "]", "=", "%", "\\", "#", ";", '"', "'", " ", "$", "`", "*", "/", ":", "@", "|", ",",
]  # fmt: skip
PAYLOADS = [
    "\n", "\r\n", "\nAddress=203.0.113.66/32", "\n[Route]\nGateway=203.0.113.1",
    "\nLD_PRELOAD=/tmp/x.so", "%eth0", "%eth 0", "%\n", "%a\nDNS=1.1.1.1", "\\", " ", "%n%i",
]  # fmt: skip
attacks = st.one_of(
    st.text(st.sampled_from(ATTACK_CHARS), min_size=1, max_size=4), st.sampled_from(PAYLOADS)
)


@st.composite
def attacked(draw: st.DrawFn) -> tuple[dict[str, Any], Path_, str]:
    doc = base_document()
    slots, _ = string_slots(doc)
    path = draw(st.sampled_from(slots))
    original = get_at(doc, path)
    attack = draw(attacks)
    how = draw(st.sampled_from(["suffix", "prefix", "insert", "replace"]))
    if how == "suffix":
        value = original + attack
    elif how == "prefix":
        value = attack + original
    elif how == "replace":
        value = attack
    else:
        at = draw(st.integers(0, len(original)))
        value = original[:at] + attack + original[at:]
    return doc, set_at(doc, path, value), value


INI_VALUE = re.compile(r"[^\s\\\"']*( [^\s\\\"']+)*")


def check_rendered(config: Config) -> None:
    """Render everything this config makes; every INI and env file reads back exactly."""
    written: list[tuple[str, Any, bytes]] = []
    real_ini, real_env = ini_module.ini, ini_module.env_file

    def recording_ini(sections: Any, **kwargs: Any) -> bytes:
        data = real_ini(sections, **kwargs)
        written.append(("ini", list(sections), data))
        return data

    def recording_env(entries: Any, **kwargs: Any) -> bytes:
        data = real_env(entries, **kwargs)
        written.append(("env", list(entries), data))
        return data

    with pytest.MonkeyPatch.context() as mp:
        for module in (networkd, system, units):
            mp.setattr(module, "ini", recording_ini)
        mp.setattr(system, "env_file", recording_env)
        plan = sections.render_files(config, NICS)
        source = "/var/lib/incusos-hal/config.toml"
        tree = sections.render_units(config, source=source, unit_dir="/u")
    assert written
    for kind, intended, data in written:
        if kind == "ini":
            assert read_ini(data) == [s for s in intended if s[1]]
            for _, entries in intended:
                for key, value in entries:
                    # Values networkd splits into words (Domains=, NTP=, WakeOnLan=) or
                    # unquotes: single spaces between words, no quotes or backslashes.
                    assert INI_VALUE.fullmatch(value), (key, value)
        else:
            assert read_env(data) == intended
    for path in [*plan.files, *tree]:
        assert re.fullmatch(r"/?[A-Za-z0-9_./+-]+", path) and ".." not in path.split("/"), path
    for pem in (*config.listener.trusted_client_certificates, *config.security.custom_ca_certs):
        der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
        assert ssl.PEM_cert_to_DER_cert(pem) == der  # the trust store loads what is stored


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attacked())
def test_every_string_field_refuses_or_renders_exactly(
    case: tuple[dict[str, Any], Path_, str],
) -> None:
    doc, path, value = case
    where = slot_path(path)
    try:
        config = from_dict(doc)
    except ConfigError as e:
        assert any(err.path == where for err in e.errors), (where, value, e.errors)
        for err in e.errors:  # one line each, whatever the value held
            assert not fmt.has_control(str(err)), err
        return
    assert get_at(json.loads(dumps_json(config)), path) == value  # stored as sent
    check_rendered(config)


CLASSIC = [
    (("network", "dns", "nameservers", 0), "192.0.2.53\nDNS=203.0.113.66"),
    (("network", "dns", "nameservers", 1), "fe80::53%up link#dns.example.com"),
    (("network", "dns", "nameservers", 1), "fe80::53%up\\link"),
    (("network", "dns", "search_domains", 0), "example.com\n[Route]"),
    (("network", "dns", "domain"), "example.com\n"),
    (("network", "dns", "hostname"), "host1\n"),
    (("network", "time", "ntp_servers", 0), "ntp.example.com\n"),
    (("network", "time", "timezone"), "UTC\n"),
    (("network", "interfaces", 0, "hwaddr"), "52:54:00:0a:00:01\n"),
    (("network", "interfaces", 0, "addresses", 0), "fe80::1%x\nAddress=203.0.113.66/64"),
    (("network", "interfaces", 0, "addresses", 0), "192.0.2.10/255.255.255.0"),
    (("network", "interfaces", 0, "routes", 0, "via"), "fe80::1%eth0"),
    (("network", "interfaces", 0, "routes", 1, "to"), "2001:db8:1::%a/48"),
    (("network", "bonds", 0, "name"), "san*"),
    (("network", "interfaces", 0, "ethernet", "wakeonlan_password"), "00:11:22:33:44:55\n"),
    (("network", "proxy", "servers", "corp", "host"), "proxy.example.com:3128\nLD_PRELOAD=/x"),
    (("network", "proxy", "servers", "corp", "username"), "u\x00"),
    (("network", "proxy", "rules", 0, "destination"), "example.com\nLD_PRELOAD=/x"),
    (("logging", "syslog", "address"), "192.0.2.9:514\n"),
    (("logging", "syslog", "address"), "192.0.2.9:²"),
    (("listener", "listen_address"), "0.0.0.0:8443\n"),
    (("listener", "listen_address"), "[fe80::1%eth0]:8443"),
    (("listener", "trusted_client_certificates", 0), " " + CLIENT_PEM),
    (("security", "custom_ca_certs", 0), "\n" + CA_PEM),
    (("update", "channel"), "stäble"),
]


# Ids from the field path and position, not the value: some values are certificates made
# at import, which differ between pytest-xdist's workers.
CLASSIC_IDS = [f"{i}-{'.'.join(map(str, c[0]))}" for i, c in enumerate(CLASSIC)]


@pytest.mark.parametrize(("path", "value"), CLASSIC, ids=CLASSIC_IDS)
def test_classic_injections_are_refused_naming_the_field(path: Path_, value: str) -> None:
    doc = base_document()
    set_at(doc, path, value)
    with pytest.raises(ConfigError) as e:
        from_dict(doc)
    assert [err.path for err in e.value.errors] == [slot_path(path)], e.value.errors


def test_a_zone_index_that_names_an_interface_is_accepted_and_renders() -> None:
    config = from_dict(base_document())
    assert "fe80::53%uplink#dns.example.com" in config.network.dns.nameservers  # type: ignore[union-attr]
    check_rendered(config)


# -- restore and the generator's drop-ins under systemd -------------------------------------------


def test_restore_refuses_an_archive_whose_config_carries_an_injection() -> None:
    toml = b'[network.dns]\nnameservers = ["192.0.2.53\\nDNS=203.0.113.66"]\n'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("config.toml")
        info.size = len(toml)
        tar.addfile(info, io.BytesIO(toml))
    with pytest.raises(backup.ArchiveError, match=r"network\.dns\.nameservers\[0\]"):
        backup.read_archive(gzip.compress(buf.getvalue()))


def test_systemd_analyze_verify_accepts_the_generator_drop_ins(tmp_path: Path) -> None:
    require_tool("systemd-analyze")
    doc = base_document()
    server = doc["network"]["proxy"]["servers"]["corp"]
    server["password"] = "%n%i $X \\ \"'#;[]= %%"
    server["username"] = "%u;#"
    config = from_dict(doc)
    check_rendered(config)
    # A source path with a specifier in it is refused, not expanded.
    with pytest.raises(UnsafeTextError, match="specifier"):
        sections.render_units(config, source="/var/lib/%n/config.toml", unit_dir="/u")
    tree = sections.render_units(
        config, source="/var/lib/incusos-hal/config.toml", unit_dir="/usr/lib/systemd/system"
    )
    units_dir = tmp_path / "units"
    dropins = [p for p in tree if p.endswith(".conf")]
    assert "service.d/50-incusos-hal-proxy.conf" in dropins
    for rel in dropins:
        target = units_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(tree[rel].content)  # type: ignore[union-attr]
    checked = sorted({p.split(".d/")[0] for p in dropins if not p.startswith("service.d/")})
    assert checked
    for unit in checked:
        # This host has no netlogd or resolved: a plain unit of that name carries the
        # drop-in, which is what is checked here.
        if not any(
            Path(d, unit).exists() for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
        ):
            if unit.endswith(".timer"):  # ours, not installed on this host
                (units_dir / unit).write_text("[Timer]\nOnBootSec=2min\n")
                service = unit.removesuffix(".timer") + ".service"
                (units_dir / service).write_text("[Service]\nExecStart=/bin/true\n")
            else:
                (units_dir / unit).write_text("[Service]\nExecStart=/bin/true\n")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *checked],
        env={"SYSTEMD_UNIT_PATH": f"{units_dir}:", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        capture_output=True,
        text=True,
        check=False,
    )
    ours = [line for line in done.stderr.splitlines() if str(units_dir) in line]
    assert done.returncode == 0 and not ours, done.stderr
    # And the check would see a broken drop-in (the test can fail).
    (units_dir / dropins[0]).write_text("[Unit]\nWants=a.service\\\n[Service]\nBogus=1\n")
    broken = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", dropins[0].split(".d/")[0]],
        env={"SYSTEMD_UNIT_PATH": f"{units_dir}:", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert str(units_dir) in broken.stderr, broken.stderr


# -- the same attacks through the real API --------------------------------------------------------

SECTION_OF = {
    "network": "network",
    "logging": "logging",
    "update": "update",
    "security": "security",
    "listener": "fallback-listener",
}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[apiserver.Server]:
    require_tool("openssl", "curl")
    cert, _ = apiserver.openssl_client_cert(tmp_path, "trusted")
    (tmp_path / "srv").mkdir()
    srv = apiserver.make(tmp_path / "srv", [cert])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def state_digest(state: Path) -> dict[str, str]:
    return {
        str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(state.rglob("*"))
        if p.is_file()
    }


API_ATTACKS = [
    *CLASSIC,
    (("network", "dns", "nameservers", 0), "192.0.2.53\ud800"),
    (("network", "confirmation_timeout"), "1" * 400 + "s"),
    (("update", "check_frequency"), "9" * 400 + "h"),
]


def test_api_puts_with_injections_answer_400_naming_the_field(api: apiserver.Server) -> None:
    assert api.put("/1.0/system/network", {"config": {"interfaces": []}}).status == 200
    target_before = sorted(str(p) for p in api.target.rglob("*"))
    before = state_digest(api.state)
    for path, value in API_ATTACKS:
        doc = base_document()
        set_at(doc, path, value)
        section = str(path[0])
        where = "config" + slot_path(path)[len(section) :]
        r = api.put(f"/1.0/system/{SECTION_OF[section]}", {"config": doc[section]})
        assert r.status == 400, (path, value, r.status, r.body[:300])
        assert where in r.json["error"], (where, r.json["error"])
        assert state_digest(api.state) == before, (path, value)
    assert sorted(str(p) for p in api.target.rglob("*")) == target_before
    # The service still answers, and reads back the last good document (the time zone
    # filled in as IncusOS serves and stores it).
    config = api.curl("GET", "/1.0/system/network").json["metadata"]["config"]
    assert config == {"time": {"timezone": "UTC"}}
