"""Checks and normalisers for the string formats the configuration uses.

Each `check_*` returns None when the value is fine, or a short message saying what is
wrong (without repeating secret values). Pure functions, no I/O.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
from typing import Any

# Every pattern here is used with fullmatch(): `$` also matches before a trailing newline,
# which is how a value once carried a second line into a rendered file.
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
# systemd's ifname_valid() (stricter than the kernel's dev_valid_name): 1-15 bytes of
# printable ASCII other than ':', '/' and '%'; not '.' or '..'.
_IFNAME = re.compile(r"[!-$&-.0-9;-~]{1,15}")
# Names this project gives links (bridges, bonds, VLANs). They end up in file names and
# in [Match] Name=, which takes shell globs ('*', '?', '[') and quotes: letters, digits,
# '_', '.' and '-' only, beginning with a letter or digit.
_DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A zone index in DNS=: networkd splits DNS= into words, unquoting and unescaping, so
# only the characters kernel names use in practice.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_TIMEZONE = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+){0,3}")
# What ipaddress may see: it accepts `%<anything>` after an IPv6 address (a zone index)
# and netmasks after '/', neither of which the files these values go into can take.
_IP_TEXT = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_PREFIX_LENGTH = re.compile(r"[0-9]{1,3}")
_PORT = re.compile(r"[0-9]{1,5}")
# C0, DEL, C1, line and paragraph separators, lone surrogates (not encodable as UTF-8).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Go's time.Duration is int64 nanoseconds: ParseDuration refuses anything longer.
GO_DURATION_MAX_SECONDS = (2**63 - 1) / 1e9
_GO_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_GO_DURATION = re.compile(f"(?:{_GO_DURATION_PART.pattern})+")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}

DYNAMIC_ADDRESSES = ("dhcp4", "dhcp6", "slaac")


def is_mac(value: str) -> bool:
    return _MAC.fullmatch(value) is not None


def is_ifname(value: str) -> bool:
    return _IFNAME.fullmatch(value) is not None and value not in (".", "..")


def has_control(value: str) -> bool:
    """Whether `value` holds a character no file or log line should carry as such."""
    return _CONTROL.search(value) is not None


def check_hwaddr(value: str) -> str | None:
    if is_mac(value):
        mac = bytes.fromhex(value.replace(":", ""))
        if mac[0] & 1:
            return "is a multicast MAC address"
        if mac == bytes(6):
            return "is the all-zero MAC address"
        return None
    if is_ifname(value):
        return None
    return f"{show(value)} is not a MAC address or an interface name"


def check_device_name(value: str) -> str | None:
    """A name for a bridge, bond or VLAN this project creates.

    As IncusOS: at most 13 characters (room for the `_b`/`_p` prefixes of the devices
    made around it) and no leading underscore, which marks those internal devices.
    """
    if not value:
        return "must not be empty"
    if value.startswith("_"):
        return "must not begin with an underscore (reserved for internal devices)"
    if len(value) > 13:
        return f"{show(value)} is longer than 13 characters"
    if _DEVICE_NAME.fullmatch(value) is None:
        return f"{show(value)} is not a valid interface name"
    if value in ("lo", "all", "default"):
        return f"{show(value)} is reserved by the kernel"
    return None


def check_address(value: str) -> str | None:
    """dhcp4 / dhcp6 / slaac, or a static address with its prefix length."""
    if value in DYNAMIC_ADDRESSES:
        return None
    if "/" not in value:
        return f"{show(value)} must be dhcp4, dhcp6, slaac or an address with a prefix length"
    address, _, prefix = value.partition("/")
    if not is_ip(address) or _PREFIX_LENGTH.fullmatch(prefix) is None:
        return f"{show(value)} is not an IP address with a prefix length"
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError:
        return f"{show(value)} is not an IP address with a prefix length"
    ip = iface.ip
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        return f"{show(value)} cannot be assigned to an interface"
    return None


def address_families(addresses: tuple[str, ...]) -> set[int]:
    families: set[int] = set()
    for a in addresses:
        if a == "dhcp4":
            families.add(4)
        elif a in ("dhcp6", "slaac"):
            families.add(6)
        else:
            with contextlib.suppress(ValueError):
                families.add(ipaddress.ip_interface(a).version)
    return families


def check_route_destination(value: str) -> str | None:
    if "/" not in value:
        return f"{show(value)} must be a network with a prefix length (0.0.0.0/0 for default)"
    address, _, prefix = value.partition("/")
    if not is_ip(address) or _PREFIX_LENGTH.fullmatch(prefix) is None:
        return f"{show(value)} is not a network with a prefix length"
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"{show(value)} is not a network with a prefix length"
    return None


def check_route_gateway(value: str) -> str | None:
    if value in ("dhcp4", "slaac") or is_ip(value):
        return None
    return f"{show(value)} must be an IP address, dhcp4 or slaac"


def gateway_family(value: str) -> int:
    if value == "dhcp4":
        return 4
    if value == "slaac":
        return 6
    return ipaddress.ip_address(value).version


def check_hostname(value: str) -> str | None:
    if _LABEL.fullmatch(value) is None:
        return f"{show(value)} is not a valid host name (letters, digits and '-', 1-63)"
    return None


def is_dns_name(value: str) -> bool:
    if not value or len(value) > 253:
        return False
    return all(_LABEL.fullmatch(label) for label in value.split("."))


def check_dns_name(value: str) -> str | None:
    if not is_dns_name(value):
        return f"{show(value)} is not a valid DNS name"
    return None


def is_ip(value: str) -> bool:
    """An IPv4 or IPv6 address, without a zone index."""
    if _IP_TEXT.fullmatch(value) is None:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def check_nameserver(value: str) -> str | None:
    """An IP address, optionally `%interface` after an IPv6 one and `#server-name` for
    DNS-over-TLS: the part of networkd's DNS= (ADDRESS[:PORT][%IFNAME][#NAME],
    systemd.network(5)) this project writes."""
    address, hash_sign, server_name = value.partition("#")
    address, percent, zone = address.partition("%")
    if not is_ip(address):
        return f"{show(value)} must be an IP address (networkd's DNS= takes no host names)"
    if percent and ":" not in address:
        return f"{show(value)}: a zone index ('%interface') is for IPv6 addresses only"
    if percent and (_ZONE.fullmatch(zone) is None or zone in (".", "..")):
        return f"{show(value)} has an invalid interface name after '%'"
    if hash_sign and not is_dns_name(server_name):
        return f"{show(value)} has an invalid TLS server name after '#'"
    return None


def check_search_domain(value: str) -> str | None:
    # A leading '~' makes a routing-only domain in resolved; '~.' routes everything.
    name = value[1:] if value.startswith("~") else value
    if name == "." and value.startswith("~"):
        return None
    return check_dns_name(name)


def check_listen_address(value: str) -> str | None:
    """host:port to listen on ([v6]:port for IPv6; a host of "" or "::" is every address)."""
    parsed = split_host_port(value)
    if parsed is None or parsed[1] is None:
        return f"{show(value)} is not host:port (e.g. 0.0.0.0:8443, [::]:8443)"
    host = parsed[0]
    if host and not is_ip(host) and check_host(host) is not None:
        return f"{show(value)}: {host!r} is not an IP address or host name"
    return None


def check_host(value: str) -> str | None:
    """A server given by IP address or DNS name (NTP servers)."""
    if is_ip(value) or is_dns_name(value):
        return None
    return f"{show(value)} is not an IP address or a DNS name"


def split_host_port(value: str) -> tuple[str, int | None] | None:
    """`host`, `host:port`, `[v6]:port` or a bare IPv6 address; None if malformed."""
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if not is_ip(host) or ":" not in host:
            return None
        if not rest:
            return host, None
        if not rest.startswith(":"):
            return None
        port_text = rest[1:]
    elif value.count(":") > 1:
        return (value, None) if is_ip(value) else None
    elif ":" in value:
        host, port_text = value.split(":", 1)
    else:
        host, port_text = value, ""
        if not (is_ip(host) or is_dns_name(host)):
            return None
        return host, None
    if not (is_ip(host) or is_dns_name(host)):
        return None
    if _PORT.fullmatch(port_text) is None or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


def check_timezone(value: str) -> str | None:
    if len(value) > 64 or _TIMEZONE.fullmatch(value) is None or ".." in value:
        return f"{show(value)} is not a time zone name (e.g. UTC, Europe/Berlin)"
    return None


class Duration(str):
    """A Go duration as IncusOS writes it ("90s", "1h30m", or "" for unset), kept as its
    text so documents read back as they were written; parsed once, when made:
    `seconds` (None when malformed or beyond Go's range) and `beyond_range` (spelled as a
    duration, but too long for Go's time.ParseDuration)."""

    seconds: float | None
    beyond_range: bool

    def __new__(cls, text: str) -> Duration:
        self = super().__new__(cls, text)
        self.seconds = parse_go_duration(text) if text else None
        self.beyond_range = self.seconds is None and bool(text) and is_go_duration_syntax(text)
        return self


def is_go_duration_syntax(value: str) -> bool:
    """Spelled as a Go duration, whatever its size (to tell "too long" from "malformed")."""
    text = value.lstrip("+-")
    return value in ("0", "+0", "-0") or (
        bool(text) and len(value) - len(text) <= 1 and _GO_DURATION.fullmatch(text) is not None
    )


def parse_go_duration(value: str) -> float | None:
    """Seconds in a Go duration string ("90s", "1h30m"); None if malformed or beyond
    what Go's time.ParseDuration takes (about 292 years), so never infinite or NaN."""
    if value in ("0", "+0", "-0"):
        return 0.0
    text = value.lstrip("+-")
    sign = -1.0 if value.startswith("-") else 1.0
    if not text or len(value) - len(text) > 1:  # Go takes one sign at most
        return None
    pos, total = 0, 0.0
    while pos < len(text):
        m = _GO_DURATION_PART.match(text, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        if not math.isfinite(total) or total > GO_DURATION_MAX_SECONDS:
            return None
        pos = m.end()
    return sign * total


def show(value: str) -> str:
    """A value quoted for an error message, shortened so a huge input stays one line
    (repr() escapes line breaks and other control characters)."""
    text = value if len(value) <= 64 else value[:61] + "..."
    return repr(text)


def show_go(value: str) -> str:
    """A value quoted as Go's %q would (double quotes), shortened as `show` does: for
    messages IncusOS writes with Go's quoting."""
    import json

    text = value if len(value) <= 64 else value[:61] + "..."
    return json.dumps(text)


def show_int(value: int) -> str:
    """An integer for an error message: TOML and JSON give Python's unbounded ints, and
    one of thousands of digits must neither fill the message nor hit str()'s limit."""
    if value.bit_length() <= 64:
        return str(value)
    digits = int(value.bit_length() * math.log10(2)) + 1
    return f"a {'negative ' if value < 0 else ''}number of about {digits} digits"


def check_recovery_key(key: str) -> str | None:
    """IncusOS's rules for an encryption recovery key (a passphrase): at least 15
    characters, one that is neither a letter nor a digit, and at least 5 different ones.
    systemd's generated recovery keys pass. The message never repeats the key."""
    if len(key) < 15:
        return "must be at least 15 characters long"
    if len(key) > 512:
        return "must be at most 512 characters long"
    if not any(not ch.isascii() or not ch.isalnum() for ch in key):
        return "must contain at least one special character"
    if len(set(key)) < 5:
        return "must contain at least 5 unique characters"
    if has_control(key):
        return "must not contain line breaks, NUL or other control characters"
    return None


# One PEM certificate as both readers take it: OpenSSL (cryptography) skips text around
# the armour, Python's ssl.PEM_cert_to_DER_cert (the trust store's fingerprints) needs the
# header first. So: nothing before the header, base64 lines, line breaks after the footer.
PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\r?\n([A-Za-z0-9+/=]+\r?\n)+-----END CERTIFICATE-----[\r\n]*"
)


def _load_certificate(pem: str) -> tuple[Any, str | None]:
    if len(pem) > 64 * 1024:
        return None, "is larger than 64 KiB"
    if PEM_CERTIFICATE.fullmatch(pem) is None:
        return None, "is not one PEM certificate (-----BEGIN CERTIFICATE----- ... -----END ...)"
    # Imported here: validating a config without certificates (the generator at boot)
    # does not pay for loading an X.509 library.
    import binascii
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        der = cert.public_bytes(Encoding.DER)
    except ValueError:
        return None, "is not a valid X.509 certificate"
    try:
        same = ssl.PEM_cert_to_DER_cert(pem) == der
    except (ValueError, binascii.Error):
        same = False
    if not same:
        # The two readers would see different certificates (stray padding, say).
        return None, "is not a canonical PEM encoding of one certificate"
    return cert, None


def check_client_certificate(pem: str) -> str | None:
    """One PEM X.509 certificate, as a TLS client presents it."""
    return _load_certificate(pem)[1]


def check_ca_certificate(pem: str) -> str | None:
    """One PEM certificate that can act as a CA."""
    from cryptography import x509

    cert, problem = _load_certificate(pem)
    if problem is not None:
        return problem
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None  # version 1 and many private CAs carry no extensions
    except ValueError:
        return "has malformed extensions"
    if not constraints.ca:
        return "is not a CA certificate (basicConstraints CA:FALSE)"
    return None
