"""Semantic validation of a decoded Config: values, and rules across fields.

Every problem becomes a FieldError naming the field's path; all of them are collected, so
that an operator fixes a document in one round trip.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

from . import formats as fmt
from .bytesize import ByteSizeError, parse_byte_size
from .errors import FieldError, child
from .model import (
    BAUD_RATES,
    BOND_MODES,
    NVME_TRANSPORTS,
    PROVIDER_NAMES,
    PROXY_AUTH,
    REQUIRED_FOR_ONLINE,
    ROLES,
    SYSLOG_FORMATS,
    SYSLOG_PROTOCOLS,
    VLAN,
    WAKEONLAN_MODES,
    WEEKDAYS,
    Addressed,
    Bond,
    Config,
    Ethernet,
    Interface,
    Kernel,
    KernelMemory,
    KernelNetwork,
    KernelPassthrough,
    KernelSRIOV,
    Listener,
    Logging,
    Network,
    Provider,
    Proxy,
    ProxyServer,
    Security,
    ServiceISCSITarget,
    ServiceNVMETarget,
    Services,
    Storage,
    StoragePool,
    Update,
)

MIN_MTU, MAX_MTU, MIN_MTU_IPV6 = 68, 9000, 1280
DEFAULT_MTU = 1500
# Until an unconfirmed network change is confirmed or rolled back, every write answers
# 409: a day is ample to reconnect and confirm, and bounds how long a change that cut
# the machine off (the very case the timeout exists for) keeps it cut off.
MAX_CONFIRMATION_TIMEOUT_S = 24 * 3600
# Update checks: anything rarer than yearly is what "never" says, and a year stays far
# inside every timer's range.
MIN_CHECK_FREQUENCY_S, MAX_CHECK_FREQUENCY_S = 60, 365 * 24 * 3600
# Names the document gives things (proxy servers, the update channel): ASCII only, so
# that one name cannot look like another.
_NAME = re.compile(r"[A-Za-z0-9._-]+")


class _Collector:
    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def check(self, path: str, message: str | None) -> None:
        if message is not None:
            self.errors.append(FieldError(path, message))

    def each(self, path: str, values: Iterable[str], check: Callable[[str], str | None]) -> None:
        for i, value in enumerate(values):
            self.check(child(path, i), check(value))


def validate(config: Config) -> list[FieldError]:
    c = _Collector()
    _network(c, config.network, "network")
    _logging(c, config.logging, "logging")
    _update(c, config.update, "update")
    _provider(c, config.provider, "provider")
    _security(c, config.security, "security")
    _listener(c, config.listener, "listener")
    c.errors += validate_kernel(config.kernel, "kernel")
    c.errors += validate_services(config.services, "services")
    c.errors += validate_storage(config.storage, "storage")
    return c.errors


def _network(c: _Collector, net: Network, path: str) -> None:
    if net.confirmation_timeout:
        _confirmation_timeout(c, net, child(path, "confirmation_timeout"))
    if net.dns is not None:
        p = child(path, "dns")
        if net.dns.hostname:
            c.check(child(p, "hostname"), fmt.check_hostname(net.dns.hostname))
        if net.dns.domain:
            c.check(child(p, "domain"), fmt.check_dns_name(net.dns.domain))
        c.each(child(p, "nameservers"), net.dns.nameservers, fmt.check_nameserver)
        c.each(child(p, "search_domains"), net.dns.search_domains, fmt.check_search_domain)
    if net.time is not None:
        p = child(path, "time")
        c.each(child(p, "ntp_servers"), net.time.ntp_servers, fmt.check_host)
        if net.time.timezone:
            c.check(child(p, "timezone"), fmt.check_timezone(net.time.timezone))
    if net.proxy is not None:
        _proxy(c, net.proxy, child(path, "proxy"))
    claims = _Claims(c)
    mtus: dict[str, int] = {}
    for i, iface in enumerate(net.interfaces):
        _interface(c, claims, iface, child(child(path, "interfaces"), i))
        mtus[iface.name] = iface.mtu or DEFAULT_MTU
    for i, bond in enumerate(net.bonds):
        _bond(c, claims, bond, child(child(path, "bonds"), i))
        mtus[bond.name] = bond.mtu or DEFAULT_MTU
    _vlans(c, claims, net.vlans, mtus, child(path, "vlans"))


def _confirmation_timeout(c: _Collector, net: Network, where: str) -> None:
    timeout = net.confirmation_timeout
    # Beyond Go's range: reported as too long below.
    seconds = math.inf if timeout.beyond_range else timeout.seconds
    # IncusOS's words (its API tests compare them), after the field's path.
    if seconds is None:
        c.check(
            where,
            "invalid confirmation timeout provided: time: invalid duration "
            f"{fmt.show_go(timeout)} (e.g. 90s, 5m)",
        )
    elif seconds <= 0:
        c.check(where, "confirmation timeout must be greater than zero")
    elif seconds > MAX_CONFIRMATION_TIMEOUT_S:
        c.check(where, f"{fmt.show(timeout)} is longer than the maximum of 24h")


class _Claims:
    """Names and MAC addresses are each used once across interfaces, bonds and VLANs."""

    def __init__(self, c: _Collector) -> None:
        self.c = c
        self.names: dict[str, str] = {}
        self.hwaddrs: dict[str, str] = {}

    def name(self, name: str, where: str) -> None:
        if name in self.names:
            self.c.check(where, f"name {fmt.show(name)} is already used by {self.names[name]}")
        else:
            self.names[name] = where.rsplit(".", 1)[0]

    def hwaddr(self, hwaddr: str, where: str) -> None:
        key = hwaddr.lower()
        if key in self.hwaddrs:
            self.c.check(where, f"{fmt.show(hwaddr)} is already used by {self.hwaddrs[key]}")
        else:
            self.hwaddrs[key] = where


def _interface(c: _Collector, claims: _Claims, iface: Interface, p: str) -> None:
    _link(c, iface, p)
    claims.name(iface.name, child(p, "name"))
    if iface.hwaddr:
        claims.hwaddr(iface.hwaddr, child(p, "hwaddr"))


def _bond(c: _Collector, claims: _Claims, bond: Bond, p: str) -> None:
    _link(c, bond, p)
    claims.name(bond.name, child(p, "name"))
    if bond.mode not in BOND_MODES:
        c.check(child(p, "mode"), f"{fmt.show(bond.mode)} is not one of {', '.join(BOND_MODES)}")
    if not bond.members:
        c.check(child(p, "members"), "a bond needs at least one member")
    for j, member in enumerate(bond.members):
        where = child(child(p, "members"), j)
        message = fmt.check_hwaddr(member)
        c.check(where, message)
        if message is None:
            claims.hwaddr(member, where)


def _vlans(
    c: _Collector, claims: _Claims, vlans: tuple[VLAN, ...], mtus: dict[str, int], path: str
) -> None:
    vlan_ids: dict[tuple[str, int], str] = {}
    for i, vlan in enumerate(vlans):
        p = child(path, i)
        _vlan(c, vlan, p)
        claims.name(vlan.name, child(p, "name"))
        if vlan.parent not in mtus:
            c.check(child(p, "parent"), f"{fmt.show(vlan.parent)} is not an interface or bond name")
            continue
        key = (vlan.parent, vlan.id)
        if key in vlan_ids:
            c.check(
                child(p, "id"),
                f"VLAN {vlan.id} on {fmt.show(vlan.parent)} is already {vlan_ids[key]}",
            )
        vlan_ids[key] = p
        if vlan.mtu > mtus[vlan.parent]:
            c.check(
                child(p, "mtu"),
                f"{fmt.show_int(vlan.mtu)} exceeds the MTU of its parent {fmt.show(vlan.parent)} "
                f"({fmt.show_int(mtus[vlan.parent])})",
            )


def _link(c: _Collector, link: Interface | Bond, path: str) -> None:
    c.check(child(path, "name"), fmt.check_device_name(link.name))
    if isinstance(link, Interface) or link.hwaddr:
        c.check(child(path, "hwaddr"), fmt.check_hwaddr(link.hwaddr) if link.hwaddr else "required")
    _addressing(c, link, path)
    seen: set[int] = set()
    for i, tag in enumerate(link.vlan_tags):
        where = child(child(path, "vlan_tags"), i)
        if not 1 <= tag <= 4094:
            c.check(where, f"{fmt.show_int(tag)} is not a VLAN ID (1-4094)")
        elif tag in seen:
            c.check(where, f"VLAN {tag} is listed twice")
        seen.add(tag)
    if link.ethernet is not None:
        _ethernet(c, link.ethernet, child(path, "ethernet"))


def _vlan(c: _Collector, vlan: VLAN, path: str) -> None:
    c.check(child(path, "name"), fmt.check_device_name(vlan.name))
    if not 1 <= vlan.id <= 4094:
        c.check(child(path, "id"), f"{fmt.show_int(vlan.id)} is not a VLAN ID (1-4094)")
    _addressing(c, vlan, path)


def _addressing(c: _Collector, link: Addressed, path: str) -> None:
    addresses, routes, mtu = link.addresses, link.routes, link.mtu
    roles, required_for_online = link.roles, link.required_for_online
    c.each(child(path, "addresses"), addresses, fmt.check_address)
    seen: set[str] = set()
    for i, address in enumerate(addresses):
        if address in seen:
            c.check(child(child(path, "addresses"), i), f"{fmt.show(address)} is listed twice")
        seen.add(address)
    families = fmt.address_families(addresses)
    for i, route in enumerate(routes):
        p = child(child(path, "routes"), i)
        to_error = fmt.check_route_destination(route.to)
        via_error = fmt.check_route_gateway(route.via)
        c.check(child(p, "to"), to_error)
        c.check(child(p, "via"), via_error)
        if to_error is None and via_error is None:
            to_family = 6 if ":" in route.to else 4
            if fmt.gateway_family(route.via) != to_family:
                c.check(child(p, "via"), f"{fmt.show(route.via)} is not an IPv{to_family} gateway")
            elif to_family not in families:
                c.check(p, f"an IPv{to_family} route needs an IPv{to_family} address on this link")
    if mtu:
        if not MIN_MTU <= mtu <= MAX_MTU:
            c.check(
                child(path, "mtu"), f"{fmt.show_int(mtu)} is out of range ({MIN_MTU}-{MAX_MTU})"
            )
        elif mtu < MIN_MTU_IPV6 and 6 in families:
            c.check(child(path, "mtu"), f"{mtu} is below IPv6's minimum of {MIN_MTU_IPV6}")
    seen_roles: set[str] = set()
    for i, role in enumerate(roles):
        where = child(child(path, "roles"), i)
        if role not in ROLES:
            c.check(where, f"{fmt.show(role)} is not one of {', '.join(ROLES)}")
        elif role in seen_roles:
            c.check(where, f"role {fmt.show(role)} is listed twice")
        seen_roles.add(role)
    if required_for_online not in REQUIRED_FOR_ONLINE:
        allowed = ", ".join(v for v in REQUIRED_FOR_ONLINE if v)
        c.check(
            child(path, "required_for_online"),
            f"{fmt.show(required_for_online)} is not one of {allowed}",
        )


def _ethernet(c: _Collector, eth: Ethernet, path: str) -> None:
    for i, mode in enumerate(eth.wakeonlan_modes):
        if mode not in WAKEONLAN_MODES:
            c.check(
                child(child(path, "wakeonlan_modes"), i),
                f"{fmt.show(mode)} is not one of {', '.join(WAKEONLAN_MODES)}",
            )
    if eth.wakeonlan_modes and not eth.wakeonlan:
        c.check(child(path, "wakeonlan_modes"), "set, but wakeonlan is false")
    if eth.wakeonlan_password and not fmt.is_mac(eth.wakeonlan_password):
        # A secret: say what is wrong without repeating it.
        c.check(child(path, "wakeonlan_password"), "must be six hex bytes (xx:xx:xx:xx:xx:xx)")


def _proxy(c: _Collector, proxy: Proxy, path: str) -> None:
    servers_path = child(path, "servers")
    for name, server in proxy.servers.items():
        _proxy_server(c, name, server, child(servers_path, name))
    _proxy_rules(c, proxy, child(path, "rules"))


def _proxy_server(c: _Collector, name: str, server: ProxyServer, p: str) -> None:
    if name in ("direct", "none"):
        c.check(p, f"{fmt.show(name)} is reserved for rule targets")
    elif _NAME.fullmatch(name) is None:
        c.check(p, "server names use letters, digits, '.', '_' and '-'")
    c.check(child(p, "host"), _check_proxy_host(server.host))
    if server.auth not in PROXY_AUTH:
        c.check(child(p, "auth"), f"{fmt.show(server.auth)} is not one of {', '.join(PROXY_AUTH)}")
    elif server.auth == "kerberos":
        c.check(
            child(p, "auth"),
            "kerberos needs the local authenticating proxy, which this version does not "
            "provide yet",
        )
    elif server.auth == "basic":
        if not server.username:
            c.check(child(p, "username"), "required with auth basic")
        if not server.password:
            c.check(child(p, "password"), "required with auth basic")
    # Free text, percent-encoded into the proxy URL; still no control characters, so
    # that no file, log line or header ever carries one.
    if server.username and ":" in server.username:
        c.check(child(p, "username"), "must not contain ':' or line breaks")
    else:
        c.check(child(p, "username"), _free_text(server.username, "':' or line breaks"))
    c.check(child(p, "password"), _free_text(server.password, "line breaks"))
    c.check(child(p, "realm"), _free_text(server.realm, "line breaks"))


def _proxy_rules(c: _Collector, proxy: Proxy, rules_path: str) -> None:
    # Services are handed the proxy through the standard environment variables, which can
    # express "these destinations go direct, everything else through one proxy" and no
    # more. Rules beyond that need a local rules proxy (IncusOS runs kpx); refuse them
    # rather than route differently from what the operator wrote.
    catch_all: str | None = None
    for i, rule in enumerate(proxy.rules):
        p = child(rules_path, i)
        if catch_all is not None:
            c.check(p, f"unreachable: follows the catch-all rule {catch_all}")
            continue
        if rule.target not in proxy.servers and rule.target not in ("direct", "none"):
            c.check(
                child(p, "target"), f"{fmt.show(rule.target)} is not a server name, direct or none"
            )
        elif rule.target == "none":
            c.check(
                child(p, "target"),
                "blocking destinations needs the local rules proxy, which this version does "
                "not provide yet",
            )
        patterns = rule.destination.split("|")
        if rule.destination == "*":
            catch_all = p
        elif rule.target not in ("direct", "none"):
            c.check(
                child(p, "destination"),
                "sending only some destinations through a proxy needs the local rules proxy, "
                "which this version does not provide yet; use direct rules and one '*' rule",
            )
        else:
            for pattern in patterns:
                if no_proxy_entry(pattern) is None:
                    c.check(
                        child(p, "destination"),
                        f"{fmt.show(pattern)} is not a host, '*.domain', IP address or network",
                    )


def _free_text(value: str, forbidden: str) -> str | None:
    """None for text without control characters; else what is wrong, without the value."""
    if not fmt.has_control(value):
        return None
    if "\n" in value or "\r" in value:
        return f"must not contain {forbidden}"
    return "must not contain control characters"


def no_proxy_entry(pattern: str) -> str | None:
    """The `no_proxy` spelling of a rule destination, or None if it has none."""
    if pattern.startswith("*.") and fmt.is_dns_name(pattern[2:]):
        return pattern[1:]
    if fmt.is_dns_name(pattern) or fmt.is_ip(pattern):
        return pattern
    if "/" in pattern and fmt.check_route_destination(pattern) is None:
        return pattern
    return None


def _check_proxy_host(host: str) -> str | None:
    rest = host
    for scheme in ("http://", "https://"):
        if host.startswith(scheme):
            rest = host[len(scheme) :]
    if "@" in rest:
        return "must not contain credentials; use username and password"
    rest = rest.rstrip("/")
    if not rest or fmt.split_host_port(rest) is None:
        return f"{fmt.show(host)} is not host, host:port or http(s)://host:port"
    return None


def _logging(c: _Collector, logging: Logging, path: str) -> None:
    syslog, p = logging.syslog, child(path, "syslog")
    if syslog.address and fmt.split_host_port(syslog.address) is None:
        c.check(
            child(p, "address"),
            f"{fmt.show(syslog.address)} is not host, host:port, IPv4:port or [IPv6]:port",
        )
    if syslog.protocol and syslog.protocol not in SYSLOG_PROTOCOLS:
        c.check(
            child(p, "protocol"),
            f"{fmt.show(syslog.protocol)} is not one of {', '.join(SYSLOG_PROTOCOLS)}",
        )
    if syslog.log_format and syslog.log_format not in SYSLOG_FORMATS:
        c.check(
            child(p, "log_format"),
            f"{fmt.show(syslog.log_format)} is not one of {', '.join(SYSLOG_FORMATS)}",
        )


def _update(c: _Collector, update: Update, path: str) -> None:
    channel = update.channel
    if _NAME.fullmatch(channel) is None or len(channel) > 64:
        c.check(
            child(path, "channel"),
            f"{fmt.show(channel)} is not a channel name (e.g. stable, testing)",
        )
    if update.check_frequency != "never":
        frequency = update.check_frequency
        seconds = frequency.seconds
        if frequency.beyond_range:
            seconds = math.inf  # beyond Go's range: reported as too long below
        if seconds is None or seconds < MIN_CHECK_FREQUENCY_S:
            c.check(
                child(path, "check_frequency"),
                f"{fmt.show(update.check_frequency)} is not never or a duration of at least 1m",
            )
        elif seconds > MAX_CHECK_FREQUENCY_S:
            c.check(
                child(path, "check_frequency"),
                f"{fmt.show(update.check_frequency)} is longer than the maximum of 8760h "
                "(a year); use never",
            )
    for i, w in enumerate(update.maintenance_windows):
        p = child(child(path, "maintenance_windows"), i)
        for name, value, top in (
            ("start_hour", w.start_hour, 23),
            ("end_hour", w.end_hour, 23),
            ("start_minute", w.start_minute, 59),
            ("end_minute", w.end_minute, 59),
        ):
            if not 0 <= value <= top:
                c.check(child(p, name), f"{fmt.show_int(value)} is out of range (0-{top})")
        for name, day in (
            ("start_day_of_week", w.start_day_of_week),
            ("end_day_of_week", w.end_day_of_week),
        ):
            if day and day not in WEEKDAYS:
                c.check(child(p, name), f"{fmt.show(day)} is not one of {', '.join(WEEKDAYS)}")
        if bool(w.start_day_of_week) != bool(w.end_day_of_week):
            c.check(p, "give both start_day_of_week and end_day_of_week, or neither")
        elif (
            w.start_day_of_week
            and w.start_day_of_week == w.end_day_of_week
            and (w.end_hour, w.end_minute) < (w.start_hour, w.start_minute)
        ):
            c.check(p, "ends before it starts on the same day")


# The settings each provider reads (IncusOS's names where it has the provider); any other
# key is a typo that would otherwise be silently ignored.
PROVIDER_KEYS: dict[str, tuple[str, ...]] = {
    "images": ("server_url", "update_ca", "token", "signed_index"),
    "operations-center": ("server_url", "server_token", "server_certificate"),
    "local": ("path", "update_ca"),
}
MAX_PROVIDER_VALUE = 16384


def _provider(c: _Collector, provider: Provider, path: str) -> None:
    if provider.name not in PROVIDER_NAMES:
        # IncusOS's words for the empty name (internal/rest/api_system_provider.go).
        message = (
            "a provider name must be specified"
            if not provider.name
            else f"{fmt.show(provider.name)} is not one of {', '.join(PROVIDER_NAMES)}"
        )
        c.check(child(path, "name"), message)
        return
    known = PROVIDER_KEYS[provider.name]
    config_path = child(path, "config")
    for key, value in provider.config.items():
        p = child(config_path, key)
        if key not in known:
            c.check(p, f"unknown setting for {provider.name} (known: {', '.join(known)})")
            continue
        if len(value) > MAX_PROVIDER_VALUE:
            c.check(p, f"longer than {MAX_PROVIDER_VALUE} characters")
            continue
        if key in ("update_ca", "server_certificate"):
            c.check(p, fmt.check_ca_certificate(value) if value else None)
        elif not value.isprintable():
            # A token is a secret: say what is wrong without repeating it.
            c.check(p, "must be printable text without control characters")
        elif key == "server_url":
            c.check(p, _check_server_url(value))
        elif key == "path" and not value.startswith("/"):
            c.check(p, f"{fmt.show(value)} is not an absolute path")
        elif key == "signed_index" and value not in ("true", "false"):
            c.check(p, f"{fmt.show(value)} is not true or false")
    if provider.name == "local" and not provider.config.get("path"):
        c.check(child(config_path, "path"), "the local provider needs the directory to read")
    if provider.name == "operations-center" and not provider.config.get("server_url"):
        c.check(child(config_path, "server_url"), "operations-center needs its server's URL")
    if provider.config.get("signed_index") == "false" and not provider.config.get(
        "server_url", ""
    ).startswith("https://"):
        # IncusOS's rule: an unsigned index only over TLS.
        c.check(
            child(config_path, "signed_index"),
            "an unsigned index needs an https:// server_url",
        )


def _check_server_url(value: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as e:
        return f"{fmt.show(value)} is not a URL: {e}"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return f"{fmt.show(value)} is not an http:// or https:// URL"
    if parts.query or parts.fragment or parts.username or parts.password:
        return f"{fmt.show(value)} has a query, fragment or credentials"
    del port
    return None


def _security(c: _Collector, security: Security, path: str) -> None:
    keys = child(path, "encryption_recovery_keys")
    seen: set[str] = set()
    for i, key in enumerate(security.encryption_recovery_keys):
        # A secret: say what is wrong with it without repeating it.
        if key in seen:
            c.check(child(keys, i), "is the same as an earlier key")
        seen.add(key)
        c.check(child(keys, i), fmt.check_recovery_key(key))
    for i, pem in enumerate(security.custom_ca_certs):
        c.check(child(child(path, "custom_ca_certs"), i), fmt.check_ca_certificate(pem))


def _listener(c: _Collector, listener: Listener, path: str) -> None:
    if listener.listen_address:
        c.check(child(path, "listen_address"), fmt.check_listen_address(listener.listen_address))
    certs = child(path, "trusted_client_certificates")
    c.each(certs, listener.trusted_client_certificates, fmt.check_client_certificate)
    uids = child(path, "socket_uids")
    for i, uid in enumerate(listener.socket_uids):
        if not 0 < uid < 0xFFFFFFFF:
            c.check(
                child(uids, i),
                f"{fmt.show_int(uid)} is not a user id other than root (1..4294967294)",
            )


# The kernel section. Bounds keep every value inside what its sysctl or sysfs file takes
# (an int, or a u16 for a VF count) and far beyond any real machine.
MAX_HUGEPAGES = 1 << 24  # 32 TiB of 2 MiB pages
# tcp_rmem/tcp_wmem are "4096 65536 <max>": the max below the default makes no sense;
# rmem_max and wmem_max are ints.
MIN_BUFFER_SIZE, MAX_BUFFER_SIZE = 65536, 2**31 - 1
MAX_NETDEV_BACKLOG = 2**31 - 1
MAX_VF_COUNT = 65535
# zram-generator computes the size in floating point (MiB): exact up to 2^53 bytes.
MAX_ZRAM_BYTES = 2**53
# As sysfs names devices: a device number is 5 bits, a function 3.
PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")
PCI_ID = re.compile(r"[0-9a-fA-F]{4}")
MODULE_NAME = re.compile(r"[A-Za-z0-9_-]+")
# cpufreq governors, qdiscs and congestion algorithms: the kernel's own names.
KERNEL_NAME = re.compile(r"[a-z0-9_-]+")
CONSOLE_DEVICE = re.compile(r"tty[A-Za-z0-9]+")
MAX_NAME = 64


def check_pci_address(value: str) -> str | None:
    if PCI_ADDRESS.fullmatch(value) is None:
        return (
            f"{fmt.show(value)} is not a PCI address "
            "(domain:bus:device.function in lower-case hex, e.g. 0000:3b:00.0)"
        )
    return None


def zram_swap_bytes(value: str) -> int | str:
    """The zram size in bytes, or what is wrong with `value`."""
    try:
        size = parse_byte_size(value)
    except ByteSizeError:
        return f"{fmt.show(value)} is not a byte size (e.g. 4GiB, 512MB, 1073741824)"
    if size > MAX_ZRAM_BYTES:
        return f"{fmt.show(value)} is larger than the maximum of 8PiB"
    return size


def _kernel_name(value: str, what: str) -> str | None:
    if KERNEL_NAME.fullmatch(value) is None or len(value) > MAX_NAME:
        return f"{fmt.show(value)} is not {what} (lower-case letters, digits, '_' and '-')"
    return None


def validate_kernel(kernel: Kernel, path: str) -> list[FieldError]:
    """IncusOS's rules for SystemKernelConfig (its texts where it has them), plus the
    syntax every value needs to reach a file. Each error names one item, so the configure
    step can skip that item and apply the rest."""
    c = _Collector()
    _kernel_consoles(c, kernel, path)
    for i, module in enumerate(kernel.blacklist_modules):
        if MODULE_NAME.fullmatch(module) is None or len(module) > MAX_NAME:
            c.check(
                child(child(path, "blacklist_modules"), i),
                f"{fmt.show(module)} is not a module name (letters, digits, '_' and '-')",
            )
    if kernel.cpu is not None and kernel.cpu.scaling_governor:
        c.check(
            child(child(path, "cpu"), "scaling_governor"),
            _kernel_name(kernel.cpu.scaling_governor, "a cpufreq governor"),
        )
    if kernel.memory is not None:
        _kernel_memory(c, kernel.memory, child(path, "memory"))
    if kernel.network is not None:
        _kernel_network(c, kernel.network, child(path, "network"))
    if kernel.pci is not None:
        _kernel_passthrough(c, kernel.pci.passthrough, child(child(path, "pci"), "passthrough"))
        _kernel_sriov(c, kernel.pci.sriov, child(child(path, "pci"), "sriov"))
    return c.errors


def _kernel_consoles(c: _Collector, kernel: Kernel, path: str) -> None:
    devices: set[str] = set()
    for i, console in enumerate(kernel.console):
        p = child(child(path, "console"), i)
        if CONSOLE_DEVICE.fullmatch(console.device) is None or len(console.device) > 32:
            c.check(
                child(p, "device"),
                f"{fmt.show(console.device)} is not a console device (tty followed by letters "
                "and digits, e.g. ttyS0)",
            )
        elif console.device in devices:
            c.check(child(p, "device"), f"{fmt.show(console.device)} is listed twice")
        devices.add(console.device)
        if console.baud_rate and console.baud_rate not in BAUD_RATES:
            c.check(
                child(p, "baud_rate"),
                f"{fmt.show_int(console.baud_rate)} is not a standard rate "
                f"({', '.join(map(str, BAUD_RATES))})",
            )


def _kernel_memory(c: _Collector, memory: KernelMemory, p: str) -> None:
    hugepages = memory.persistent_hugepages
    if hugepages < 0:
        c.check(child(p, "persistent_hugepages"), "persistent hugepages count cannot be negative")
    elif hugepages > MAX_HUGEPAGES:
        c.check(
            child(p, "persistent_hugepages"),
            f"{fmt.show_int(hugepages)} is more than the maximum of {MAX_HUGEPAGES}",
        )
    size = zram_swap_bytes(memory.zram_swap_size)
    if isinstance(size, str):
        c.check(child(p, "zram_swap_size"), size)


def _kernel_network(c: _Collector, net: KernelNetwork, p: str) -> None:
    if net.buffer_size < 0:
        c.check(child(p, "buffer_size"), "buffer size cannot be negative")
    elif net.buffer_size and not MIN_BUFFER_SIZE <= net.buffer_size <= MAX_BUFFER_SIZE:
        c.check(
            child(p, "buffer_size"),
            f"{fmt.show_int(net.buffer_size)} is out of range "
            f"({MIN_BUFFER_SIZE}-{MAX_BUFFER_SIZE}, or 0 for the default)",
        )
    if net.netdev_max_backlog < 0:
        c.check(child(p, "netdev_max_backlog"), "netdev max backlog cannot be negative")
    elif net.netdev_max_backlog > MAX_NETDEV_BACKLOG:
        c.check(
            child(p, "netdev_max_backlog"),
            f"{fmt.show_int(net.netdev_max_backlog)} is more than the maximum of "
            f"{MAX_NETDEV_BACKLOG}",
        )
    if net.queuing_discipline:
        c.check(
            child(p, "queuing_discipline"),
            _kernel_name(net.queuing_discipline, "a queuing discipline"),
        )
    if net.tcp_congestion_algorithm:
        c.check(
            child(p, "tcp_congestion_algorithm"),
            _kernel_name(net.tcp_congestion_algorithm, "a TCP congestion algorithm"),
        )


def _kernel_passthrough(c: _Collector, devices: tuple[KernelPassthrough, ...], path: str) -> None:
    for i, dev in enumerate(devices):
        q = child(path, i)
        if PCI_ID.fullmatch(dev.vendor_id) is None:
            c.check(
                child(q, "vendor_id"),
                f"Vendor ID {fmt.show(dev.vendor_id)} is invalid (4 hex digits, e.g. 10de)",
            )
        if PCI_ID.fullmatch(dev.product_id) is None:
            c.check(
                child(q, "product_id"),
                f"Product ID {fmt.show(dev.product_id)} is invalid (4 hex digits, e.g. 1eb8)",
            )
        if dev.pci_address:
            c.check(child(q, "pci_address"), check_pci_address(dev.pci_address))


def _kernel_sriov(c: _Collector, devices: tuple[KernelSRIOV, ...], path: str) -> None:
    seen: dict[str, str] = {}
    for i, sriov in enumerate(devices):
        q = child(path, i)
        message = check_pci_address(sriov.pci_address)
        c.check(child(q, "pci_address"), message)
        if message is None:
            if sriov.pci_address in seen:
                c.check(
                    child(q, "pci_address"),
                    f"{fmt.show(sriov.pci_address)} is already {seen[sriov.pci_address]}",
                )
            seen.setdefault(sriov.pci_address, q)
        if sriov.vf_count < 0:
            c.check(child(q, "vf_count"), "SR-IOV virtual function count cannot be negative")
        elif sriov.vf_count > MAX_VF_COUNT:
            c.check(
                child(q, "vf_count"),
                f"{fmt.show_int(sriov.vf_count)} is more than a PCI device can have "
                f"({MAX_VF_COUNT})",
            )


# -- /1.0/services ---------------------------------------------------------------------

# NVMe Base Specification 2.0, 4.5 (NQN): "nqn." then the name, at most 223 bytes. Printable
# ASCII without blanks: the value is one argument and one word of /etc/nvme/discovery.conf.
NVME_NQN = re.compile(r"nqn\.[\x21-\x7e]{1,219}")
# Fibre Channel addresses as nvme-cli takes them (traddr, host_traddr).
FC_ADDRESS = re.compile(r"nn-0x[0-9a-f]{16}:pn-0x[0-9a-f]{16}")
# RFC 7143 6.2: iqn.yyyy-mm.<reversed domain>[:<unique>], eui.<16 hex>, naa.<16 or 32 hex>;
# iSCSI names are lower case (stringprep folds them) and at most 223 bytes.
ISCSI_NAME = re.compile(
    r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"
    r"(:[a-z0-9.:_-]+)?|eui\.[0-9a-f]{16}|naa\.([0-9a-f]{16}|[0-9a-f]{32})"
)
MAX_NAME_BYTES = 223
# A disk's WWN as udev names /dev/disk/by-id/wwn-<WWN>: NAA 64-bit or 128-bit, lower case.
WWN = re.compile(r"0x[0-9a-f]{16}([0-9a-f]{16})?")


def validate_services(services: Services, path: str) -> list[FieldError]:
    """IncusOS's service configs (incus-osd/api/service_*.go): every value reaches a
    command line or a file, so each is held to the syntax its tool reads."""
    c = _Collector()
    _nvme_targets(c, services.nvme.targets, child(child(path, "nvme"), "targets"))
    _iscsi_targets(c, services.iscsi.targets, child(child(path, "iscsi"), "targets"))
    seen: dict[str, str] = {}
    wwns = child(child(path, "multipath"), "wwns")
    for i, wwn in enumerate(services.multipath.wwns):
        where = child(wwns, i)
        if WWN.fullmatch(wwn) is None:
            c.check(where, f"{fmt.show(wwn)} is not a WWN (0x and 16 or 32 lower-case hex digits)")
        elif wwn in seen:
            c.check(where, f"{fmt.show(wwn)} is already {seen[wwn]}")
        seen.setdefault(wwn, where)
    return c.errors


def _port(value: int, *, required: bool) -> str | None:
    if value == 0 and not required:
        return None
    if not 0 < value < 65536:
        return f"{fmt.show_int(value)} is not a port (1-65535)"
    return None


def _nvme_targets(c: _Collector, targets: tuple[ServiceNVMETarget, ...], path: str) -> None:
    seen: dict[tuple[str, str, int, str], str] = {}
    for i, t in enumerate(targets):
        q = child(path, i)
        if t.transport not in NVME_TRANSPORTS:
            c.check(child(q, "transport"), f"{fmt.show(t.transport)} is not one of tcp, fc")
            continue
        if t.transport == "tcp":
            if not fmt.is_ip(t.address):
                c.check(child(q, "address"), f"{fmt.show(t.address)} is not an IP address")
            c.check(child(q, "port"), _port(t.port, required=True))
            if t.host_address:
                c.check(child(q, "host_address"), "only Fibre Channel targets take a host address")
        else:
            for name in ("address", "host_address"):
                value = getattr(t, name)
                if (value or name == "address") and FC_ADDRESS.fullmatch(value) is None:
                    c.check(
                        child(q, name),
                        f"{fmt.show(value)} is not a Fibre Channel address "
                        "(nn-0x<16 hex digits>:pn-0x<16 hex digits>)",
                    )
            if t.port:
                c.check(child(q, "port"), "Fibre Channel targets take no port")
        if t.nqn and (NVME_NQN.fullmatch(t.nqn) is None or len(t.nqn) > MAX_NAME_BYTES):
            c.check(
                child(q, "nqn"),
                f"{fmt.show(t.nqn)} is not an NVMe qualified name (nqn. and printable ASCII, "
                f"at most {MAX_NAME_BYTES} characters)",
            )
        key = (t.transport, t.address, t.port, t.nqn)
        if key in seen:
            c.check(q, f"the same target as {seen[key]}")
        seen.setdefault(key, q)


def _iscsi_targets(c: _Collector, targets: tuple[ServiceISCSITarget, ...], path: str) -> None:
    seen: dict[tuple[str, str, int], str] = {}
    for i, t in enumerate(targets):
        q = child(path, i)
        if ISCSI_NAME.fullmatch(t.target) is None or len(t.target) > MAX_NAME_BYTES:
            c.check(
                child(q, "target"),
                f"{fmt.show(t.target)} is not an iSCSI name (iqn.yyyy-mm.<domain>[:<name>], "
                "eui.<16 hex digits> or naa.<hex digits>, lower case)",
            )
        c.check(child(q, "address"), fmt.check_host(t.address))
        c.check(child(q, "port"), _port(t.port, required=False))
        key = (t.target, t.address, t.port or 3260)
        if key in seen:
            c.check(q, f"the same target as {seen[key]}")
        seen.setdefault(key, q)


# The storage section. A pool name as `zpool create` takes it and as a key file name can
# carry it (zpool.<name>.key): ZFS's own rule, ASCII only, minus its reserved words.
_POOL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,199}", re.ASCII)
_POOL_RESERVED = re.compile(r"(mirror|raidz|draid|spare).*|log|cache|special|dedup", re.ASCII)
# A device as the operator names it: a path under /dev, no spaces, commas or controls
# (it goes into zpool's argv and into error text). "" is a positional "take it offline".
_DEVICE = re.compile(r"/dev/[A-Za-z0-9_.:+@/=-]{1,240}", re.ASCII)
# special_small_blocks: ZFS takes a power of two up to 16 MiB (OpenZFS 2.3).
MAX_SPECIAL_SMALL_BLOCKS_KB = 16384


def check_pool_name(name: str) -> str | None:
    if not _POOL_NAME.fullmatch(name) or _POOL_RESERVED.fullmatch(name):
        return "a pool name: a letter, then letters, digits, _ . : - (not a ZFS reserved word)"
    return None


def check_device(path: str) -> str | None:
    if path == "":
        return None
    if not _DEVICE.fullmatch(path) or "/../" in path + "/" or "/./" in path + "/":
        return "a device path under /dev (e.g. /dev/disk/by-id/...)"
    return None


def validate_storage(storage: Storage, path: str) -> list[FieldError]:
    from .cron import CronError, parse_cron

    c = _Collector()
    try:
        parse_cron(storage.scrub_schedule)
    except CronError as e:
        c.check(child(path, "scrub_schedule"), str(e))
    names: dict[str, int] = {}
    for i, pool in enumerate(storage.pools):
        p = child(child(path, "pools"), i)
        c.check(child(p, "name"), check_pool_name(pool.name))
        if pool.name in names:
            c.check(child(p, "name"), f"pool {pool.name!r} is listed twice")
        names.setdefault(pool.name, i)
        _storage_pool(c, pool, p)
    return c.errors


def _storage_pool(c: _Collector, pool: StoragePool, p: str) -> None:
    from .model import POOL_TYPES

    if pool.type not in POOL_TYPES:
        c.check(child(p, "type"), f"unsupported pool type, must be one of {', '.join(POOL_TYPES)}")
    if pool.special is not None and pool.special.type not in POOL_TYPES:
        c.check(
            child(child(p, "special"), "type"),
            f"unsupported special device type, must be one of {', '.join(POOL_TYPES)}",
        )
    groups = [("devices", pool.devices), ("cache", pool.cache), ("log", pool.log)]
    if pool.special is not None:
        sp = pool.special
        kb = sp.special_small_blocks_size_in_kb
        if kb < 0 or kb > MAX_SPECIAL_SMALL_BLOCKS_KB or (kb & (kb - 1)):
            c.check(
                child(child(p, "special"), "special_small_blocks_size_in_kb"),
                f"0, or a power of two up to {MAX_SPECIAL_SMALL_BLOCKS_KB}",
            )
        groups.append(("special.devices", sp.devices))
    seen: dict[str, str] = {}
    for group, devices in groups:
        for j, dev in enumerate(devices):
            where = f"{p}.{group}[{j}]"
            problem = check_device(dev)
            c.check(where, problem)
            if problem is None and dev:
                if dev in seen:
                    c.check(where, f"device {dev} is already used by {seen[dev]}")
                seen.setdefault(dev, where)
