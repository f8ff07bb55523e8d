"""The typed configuration document.

Field names follow IncusOS's API objects (lxc/incus-os, incus-osd/api/system_network.go,
system_logging.go, system_update.go) so that a document written for IncusOS reads the same
here. Empty values mean "not set", exactly as IncusOS's `omitempty` JSON does; defaults
that depend on the machine (MTU 1500, required_for_online "any") are applied when
rendering, not stored.

Every class is a frozen, slotted dataclass: a Config is a value, safe to share between the
API handlers and the renderer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

CURRENT_VERSION = 1

ROLES = ("management", "cluster", "instances", "storage")
BOND_MODES = (
    "balance-rr",
    "active-backup",
    "balance-xor",
    "broadcast",
    "802.3ad",
    "balance-tlb",
    "balance-alb",
)
REQUIRED_FOR_ONLINE = ("", "no", "any", "ipv4", "ipv6", "both")
WAKEONLAN_MODES = ("phy", "unicast", "multicast", "broadcast", "arp", "magic", "secureon")
PROXY_AUTH = ("anonymous", "basic", "kerberos")
SYSLOG_PROTOCOLS = ("udp", "tcp", "tls", "dtls")
SYSLOG_FORMATS = ("rfc5424", "rfc3339")
WEEKDAYS = ("Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")

# Names of keys IncusOS knows that this version recognises but cannot honour yet.
# Rejecting them by name beats silently dropping a firewall rule.
UNSUPPORTED_KEYS: Mapping[str, str] = {
    "firewall_rules": "ingress firewall rules are not supported by this version",
    "strict_hwaddr": "strict hardware address filtering is not supported by this version",
    "wireguard": "WireGuard interfaces are not supported by this version",
}


@dataclass(frozen=True, slots=True)
class Route:
    to: str
    via: str


@dataclass(frozen=True, slots=True)
class Ethernet:
    disable_energy_efficient: bool = False
    disable_gro: bool = False
    disable_gso: bool = False
    disable_ipv4_tso: bool = False
    disable_ipv6_tso: bool = False
    wakeonlan: bool = False
    wakeonlan_modes: tuple[str, ...] = ()
    # A SecureOn password: a secret, never repeated in errors or logs.
    wakeonlan_password: str = ""


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    # A MAC address, or an interface name resolved to its MAC on the running machine.
    hwaddr: str
    addresses: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    mtu: int = 0
    lldp: bool = False
    roles: tuple[str, ...] = ()
    vlan_tags: tuple[int, ...] = ()
    required_for_online: str = ""
    ethernet: Ethernet | None = None


@dataclass(frozen=True, slots=True)
class Bond:
    name: str
    mode: str
    # MAC addresses (or interface names, resolved like Interface.hwaddr).
    members: tuple[str, ...] = ()
    # The bond's own MAC; empty means the first member's (switches reject the
    # machine-id derived MAC networkd would otherwise pick).
    hwaddr: str = ""
    addresses: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    mtu: int = 0
    lldp: bool = False
    roles: tuple[str, ...] = ()
    vlan_tags: tuple[int, ...] = ()
    required_for_online: str = ""
    ethernet: Ethernet | None = None


@dataclass(frozen=True, slots=True)
class VLAN:
    name: str
    parent: str
    id: int
    addresses: tuple[str, ...] = ()
    routes: tuple[Route, ...] = ()
    mtu: int = 0
    roles: tuple[str, ...] = ()
    required_for_online: str = ""


@dataclass(frozen=True, slots=True)
class DNS:
    hostname: str = ""
    domain: str = ""
    nameservers: tuple[str, ...] = ()
    search_domains: tuple[str, ...] = ()
    dns_over_tls: bool = False


@dataclass(frozen=True, slots=True)
class Time:
    ntp_servers: tuple[str, ...] = ()
    timezone: str = ""


@dataclass(frozen=True, slots=True)
class ProxyServer:
    host: str
    auth: str
    use_tls: bool = False
    username: str = ""
    password: str = ""
    realm: str = ""


@dataclass(frozen=True, slots=True)
class ProxyRule:
    destination: str
    target: str


@dataclass(frozen=True, slots=True)
class Proxy:
    servers: Mapping[str, ProxyServer] = field(default_factory=dict)
    rules: tuple[ProxyRule, ...] = ()


@dataclass(frozen=True, slots=True)
class Network:
    confirmation_timeout: str = ""
    dns: DNS | None = None
    time: Time | None = None
    proxy: Proxy | None = None
    interfaces: tuple[Interface, ...] = ()
    bonds: tuple[Bond, ...] = ()
    vlans: tuple[VLAN, ...] = ()

    @property
    def has_devices(self) -> bool:
        return bool(self.interfaces or self.bonds or self.vlans)


@dataclass(frozen=True, slots=True)
class Syslog:
    address: str = ""
    protocol: str = ""
    log_format: str = ""


@dataclass(frozen=True, slots=True)
class Logging:
    syslog: Syslog = Syslog()


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    start_hour: int = 0
    start_minute: int = 0
    end_hour: int = 0
    end_minute: int = 0
    start_day_of_week: str = ""
    end_day_of_week: str = ""


@dataclass(frozen=True, slots=True)
class Update:
    channel: str = "stable"
    check_frequency: str = "6h"
    auto_reboot: bool = False
    maintenance_windows: tuple[MaintenanceWindow, ...] = ()


# Sections whose schema lands with their own issues (storage, services).
# They exist so that the document's shape is stable; any key in them is rejected.
@dataclass(frozen=True, slots=True)
class Storage:
    pass


@dataclass(frozen=True, slots=True)
class Security:
    """IncusOS's SystemSecurityConfig. The recovery keys are secrets: the stored document
    is mode 0600, and no error or log line repeats one."""

    encryption_recovery_keys: tuple[str, ...] = ()
    # PEM certificates the machine trusts beyond the system's CA bundle.
    custom_ca_certs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Services:
    pass


@dataclass(frozen=True, slots=True)
class Listener:
    """Who may reach the API. IncusOS's SystemFallbackListenerConfig (listen_address,
    trusted_client_certificates), plus the users the unix socket admits besides root."""

    # host:port for HTTPS with client certificates; empty: the unix socket only.
    listen_address: str = ""
    # PEM client certificates; a client is trusted when its certificate's SHA-256
    # fingerprint is one of these certificates' fingerprints.
    trusted_client_certificates: tuple[str, ...] = ()
    # uids (other than 0) whose processes may use the unix socket.
    socket_uids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    version: int = CURRENT_VERSION
    network: Network = Network()
    logging: Logging = Logging()
    update: Update = Update()
    storage: Storage = Storage()
    security: Security = Security()
    services: Services = Services()
    listener: Listener = Listener()
