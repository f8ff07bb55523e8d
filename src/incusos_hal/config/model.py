"""The typed configuration document.

Field names follow IncusOS's API objects (lxc/incus-os, incus-osd/api/system_network.go,
system_logging.go, system_update.go) so that a document written for IncusOS reads the same
here. Empty values mean "not set", exactly as IncusOS's `omitempty` JSON does; defaults
that depend on the machine (MTU 1500, required_for_online "any") are applied when
rendering, not stored.

Every class is a frozen, slotted dataclass: a Config is a value, safe to share between the
API handlers and the renderer. Enumerations are `Literal` types (the OpenAPI description
lists their values); every field carries its help text (`Annotated[..., Help(...)]`),
which docs/api.md shows; durations are `Duration`s, parsed once when decoded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

from .formats import Duration

CURRENT_VERSION = 1
# Immutable values, shared as defaults.
UNSET_DURATION = Duration("")
DEFAULT_CHECK_FREQUENCY = Duration("6h")


@dataclass(frozen=True, slots=True)
class Help:
    """A field's help text, for the OpenAPI description and docs/api.md."""

    text: str


@dataclass(frozen=True, slots=True)
class Always:
    """Marks a field IncusOS's JSON has without `omitempty`: the API always emits it, even
    empty (`syslog.address: ""`), where other fields are left out when empty. The stored
    TOML stays compact either way (see config.to_api and config.to_dict)."""


ALWAYS = Always()


Role = Literal["management", "cluster", "instances", "storage"]
BondMode = Literal[
    "balance-rr",
    "active-backup",
    "balance-xor",
    "broadcast",
    "802.3ad",
    "balance-tlb",
    "balance-alb",
]
RequiredForOnline = Literal["", "no", "any", "ipv4", "ipv6", "both"]
WakeOnLanMode = Literal["phy", "unicast", "multicast", "broadcast", "arp", "magic", "secureon"]
ProxyAuth = Literal["anonymous", "basic", "kerberos"]
SyslogProtocol = Literal["", "udp", "tcp", "tls", "dtls"]
SyslogFormat = Literal["", "rfc5424", "rfc3339"]
ProviderName = Literal["images", "operations-center", "local"]
Weekday = Literal["", "Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]

ROLES: tuple[str, ...] = get_args(Role)
BOND_MODES: tuple[str, ...] = get_args(BondMode)
REQUIRED_FOR_ONLINE: tuple[str, ...] = get_args(RequiredForOnline)
WAKEONLAN_MODES: tuple[str, ...] = get_args(WakeOnLanMode)
PROXY_AUTH: tuple[str, ...] = get_args(ProxyAuth)
SYSLOG_PROTOCOLS: tuple[str, ...] = get_args(SyslogProtocol)[1:]
SYSLOG_FORMATS: tuple[str, ...] = get_args(SyslogFormat)[1:]
WEEKDAYS: tuple[str, ...] = get_args(Weekday)[1:]
PROVIDER_NAMES: tuple[str, ...] = get_args(ProviderName)

# Names of keys IncusOS knows that this version recognises but cannot honour yet.
# Rejecting them by name beats silently dropping a firewall rule.
UNSUPPORTED_KEYS: Mapping[str, str] = {
    "firewall_rules": "ingress firewall rules are not supported by this version",
    "strict_hwaddr": "strict hardware address filtering is not supported by this version",
    "wireguard": "WireGuard interfaces are not supported by this version",
}


@dataclass(frozen=True, slots=True)
class Route:
    to: Annotated[
        str, Help("destination network with its prefix length (0.0.0.0/0: default)"), ALWAYS
    ]
    via: Annotated[str, Help("gateway address, or dhcp4 / slaac for the one those provide"), ALWAYS]


@dataclass(frozen=True, slots=True)
class Ethernet:
    disable_energy_efficient: Annotated[bool, Help("turn Energy-Efficient Ethernet off")] = False
    disable_gro: Annotated[bool, Help("turn generic receive offload off")] = False
    disable_gso: Annotated[bool, Help("turn generic segmentation offload off")] = False
    disable_ipv4_tso: Annotated[bool, Help("turn TCP segmentation offload off for IPv4")] = False
    disable_ipv6_tso: Annotated[bool, Help("turn TCP segmentation offload off for IPv6")] = False
    wakeonlan: Annotated[bool, Help("wake the machine on LAN activity")] = False
    wakeonlan_modes: Annotated[
        tuple[WakeOnLanMode, ...], Help("what wakes it (default: magic packets)")
    ] = ()
    # A SecureOn password: a secret, never repeated in errors or logs.
    wakeonlan_password: Annotated[
        str, Help("SecureOn password, six hex bytes (a secret: never echoed)")
    ] = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Addressed:
    """What every link the operator configures has: addresses, routes, MTU, roles, and
    whether the machine waits for it to come online."""

    addresses: Annotated[
        tuple[str, ...], Help("dhcp4, dhcp6, slaac, or static addresses with prefix length")
    ] = ()
    routes: Annotated[tuple[Route, ...], Help("static routes through this link")] = ()
    mtu: Annotated[int, Help("MTU in bytes (68-9000); 0: 1500")] = 0
    roles: Annotated[tuple[Role, ...], Help("what the link carries")] = ()
    required_for_online: Annotated[
        RequiredForOnline,
        Help("which addresses network-online waits for (default: any)"),
    ] = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Port(Addressed):
    """A link with a bridge of its own for instances: a NIC or a bond."""

    lldp: Annotated[bool, Help("send and receive LLDP on it (on a bond: on its members)")] = False
    vlan_tags: Annotated[
        tuple[int, ...], Help("VLAN IDs (1-4094) the bridge passes to instances")
    ] = ()
    ethernet: Annotated[Ethernet | None, Help("offloads and wake-on-LAN")] = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Interface(Port):
    name: Annotated[str, Help("the bridge's name (at most 13 characters)"), ALWAYS]
    # A MAC address, or an interface name resolved to its MAC on the running machine.
    hwaddr: Annotated[
        str, Help("the NIC's MAC address, or its kernel name to resolve at boot"), ALWAYS
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class Bond(Port):
    name: Annotated[str, Help("the bridge's name (at most 13 characters)"), ALWAYS]
    mode: Annotated[BondMode, Help("the bonding mode (802.3ad: LACP)"), ALWAYS]
    # MAC addresses (or interface names, resolved like Interface.hwaddr).
    members: Annotated[tuple[str, ...], Help("the members' MAC addresses (or kernel names)")] = ()
    # The bond's own MAC; empty means the first member's (switches reject the
    # machine-id derived MAC networkd would otherwise pick).
    hwaddr: Annotated[str, Help("the bond's MAC address (default: its first member's)")] = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class VLAN(Addressed):
    name: Annotated[str, Help("the VLAN device's name (at most 13 characters)"), ALWAYS]
    parent: Annotated[str, Help("the interface or bond it is tagged on"), ALWAYS]
    id: Annotated[int, Help("the VLAN ID (1-4094)"), ALWAYS]


@dataclass(frozen=True, slots=True)
class DNS:
    hostname: Annotated[str, Help("the machine's host name"), ALWAYS] = ""
    domain: Annotated[str, Help("its DNS domain"), ALWAYS] = ""
    nameservers: Annotated[
        tuple[str, ...], Help("DNS servers: IP addresses, optionally #name for DNS over TLS")
    ] = ()
    search_domains: Annotated[
        tuple[str, ...], Help("domains to search; ~domain routes only that domain")
    ] = ()
    dns_over_tls: Annotated[bool, Help("use DNS over TLS with the name servers")] = False


@dataclass(frozen=True, slots=True)
class Time:
    ntp_servers: Annotated[tuple[str, ...], Help("NTP servers by address or name")] = ()
    timezone: Annotated[str, Help("an IANA time zone, e.g. Europe/Berlin (default UTC)")] = ""


@dataclass(frozen=True, slots=True)
class ProxyServer:
    host: Annotated[str, Help("host, host:port or http(s)://host:port"), ALWAYS]
    auth: Annotated[ProxyAuth, Help("anonymous, basic, or kerberos"), ALWAYS]
    use_tls: Annotated[bool, Help("reach the proxy over TLS"), ALWAYS] = False
    username: Annotated[str, Help("for basic authentication")] = ""
    password: Annotated[str, Help("for basic authentication (a secret)")] = ""
    realm: Annotated[str, Help("the Kerberos realm")] = ""


@dataclass(frozen=True, slots=True)
class ProxyRule:
    destination: Annotated[
        str, Help("hosts, *.domains, addresses or networks, |-separated; *: all"), ALWAYS
    ]
    target: Annotated[str, Help("a server's name, direct, or none"), ALWAYS]


@dataclass(frozen=True, slots=True)
class Proxy:
    servers: Annotated[Mapping[str, ProxyServer], Help("proxy servers by name")] = field(
        default_factory=dict
    )
    rules: Annotated[tuple[ProxyRule, ...], Help("where each destination goes, in order")] = ()


@dataclass(frozen=True, slots=True)
class Network:
    confirmation_timeout: Annotated[
        Duration, Help("roll the change back unless confirmed within this (e.g. 2m)")
    ] = UNSET_DURATION
    dns: Annotated[DNS | None, Help("host name, domain and name servers")] = None
    time: Annotated[Time | None, Help("NTP servers and time zone")] = None
    proxy: Annotated[Proxy | None, Help("the HTTP(S) proxy the machine's services use")] = None
    interfaces: Annotated[tuple[Interface, ...], Help("NICs, each with a bridge")] = ()
    bonds: Annotated[tuple[Bond, ...], Help("bonds of NICs, each with a bridge")] = ()
    vlans: Annotated[tuple[VLAN, ...], Help("VLANs on the machine itself")] = ()

    def __post_init__(self) -> None:
        # Made from plain text in code too: the duration is parsed here, once.
        value: object = self.confirmation_timeout
        if not isinstance(value, Duration):
            object.__setattr__(self, "confirmation_timeout", Duration(str(value)))

    @property
    def has_devices(self) -> bool:
        return bool(self.interfaces or self.bonds or self.vlans)


@dataclass(frozen=True, slots=True)
class Syslog:
    address: Annotated[str, Help("host, host:port, IPv4:port or [IPv6]:port"), ALWAYS] = ""
    protocol: Annotated[SyslogProtocol, Help("udp (default), tcp, tls or dtls"), ALWAYS] = ""
    log_format: Annotated[SyslogFormat, Help("rfc5424 (default) or rfc3339"), ALWAYS] = ""


@dataclass(frozen=True, slots=True)
class Logging:
    syslog: Annotated[Syslog, Help("a remote syslog server"), ALWAYS] = Syslog()


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    start_hour: Annotated[int, Help("0-23"), ALWAYS] = 0
    start_minute: Annotated[int, Help("0-59"), ALWAYS] = 0
    end_hour: Annotated[int, Help("0-23"), ALWAYS] = 0
    end_minute: Annotated[int, Help("0-59"), ALWAYS] = 0
    start_day_of_week: Annotated[Weekday, Help("Sunday...Saturday; empty: every day")] = ""
    end_day_of_week: Annotated[Weekday, Help("Sunday...Saturday; empty: every day")] = ""


@dataclass(frozen=True, slots=True)
class Update:
    channel: Annotated[str, Help("the update channel (stable, testing)"), ALWAYS] = "stable"
    check_frequency: Annotated[
        Duration, Help("how often to check: a duration of at least 1m, or never"), ALWAYS
    ] = DEFAULT_CHECK_FREQUENCY
    auto_reboot: Annotated[bool, Help("reboot into a new OS version on its own"), ALWAYS] = False
    maintenance_windows: Annotated[
        tuple[MaintenanceWindow, ...], Help("when updates may be applied (default: any time)")
    ] = ()

    def __post_init__(self) -> None:
        value: object = self.check_frequency
        if not isinstance(value, Duration):
            object.__setattr__(self, "check_frequency", Duration(str(value)))


@dataclass(frozen=True, slots=True)
class Provider:
    """IncusOS's SystemProviderConfig: where updates come from."""

    name: Annotated[ProviderName, Help("images, operations-center or local"), ALWAYS] = "images"
    config: Annotated[
        Mapping[str, str],
        Help(
            "the provider's settings: images: server_url, update_ca, token, signed_index; "
            "operations-center: server_url, server_token, server_certificate; "
            "local: path, update_ca"
        ),
    ] = field(default_factory=dict)


# Sections whose schema lands with their own issues (storage, services).
# They exist so that the document's shape is stable; any key in them is rejected.
PoolType = Literal["zfs-raid0", "zfs-raid1", "zfs-raid10", "zfs-raidz1", "zfs-raidz2", "zfs-raidz3"]
POOL_TYPES: tuple[str, ...] = get_args(PoolType)
DEFAULT_SCRUB_SCHEDULE = "0 4 * * 0"


@dataclass(frozen=True, slots=True)
class StoragePoolSpecial:
    """IncusOS's SystemStoragePoolSpecial: the special vdev for metadata and small blocks."""

    type: Annotated[PoolType, Help("the special vdev's layout"), ALWAYS]
    special_small_blocks_size_in_kb: Annotated[
        int, Help("blocks up to this size (KiB, a power of two) go to the special vdev"), ALWAYS
    ] = 0
    devices: Annotated[tuple[str, ...], Help("its devices"), ALWAYS] = ()


@dataclass(frozen=True, slots=True)
class StoragePool:
    """IncusOS's SystemStoragePool (its configuration half). Device lists are positional:
    an empty entry takes that device offline, a different one replaces it, extra ones
    are added; a list never shrinks."""

    name: Annotated[str, Help("the pool's name (cannot change)"), ALWAYS]
    type: Annotated[PoolType, Help("the pool's layout (cannot change, but raid0 -> raid1)"), ALWAYS]
    allow_mixed_dev_sizes: Annotated[
        bool, Help("allow devices of different sizes when creating the pool")
    ] = False
    devices: Annotated[tuple[str, ...], Help("data devices, positional"), ALWAYS] = ()
    cache: Annotated[tuple[str, ...], Help("L2ARC cache devices, positional")] = ()
    log: Annotated[tuple[str, ...], Help("ZIL log devices (mirrored when several)")] = ()
    special: Annotated[StoragePoolSpecial | None, Help("the special vdev")] = None


@dataclass(frozen=True, slots=True)
class Storage:
    """IncusOS's SystemStorageConfig. `pools` is a request, never stored (as on IncusOS):
    the pools themselves are the truth, shown in the state."""

    scrub_schedule: Annotated[
        str, Help("when every pool is scrubbed: cron, five fields"), ALWAYS
    ] = DEFAULT_SCRUB_SCHEDULE
    pools: Annotated[tuple[StoragePool, ...], Help("pools to create or change")] = ()


@dataclass(frozen=True, slots=True)
class Security:
    """IncusOS's SystemSecurityConfig. The recovery keys are secrets: the stored document
    is mode 0600, and no error or log line repeats one."""

    encryption_recovery_keys: Annotated[
        tuple[str, ...], Help("passphrases that open every encrypted volume (secrets)"), ALWAYS
    ] = ()
    # PEM certificates the machine trusts beyond the system's CA bundle.
    custom_ca_certs: Annotated[
        tuple[str, ...], Help("PEM CA certificates trusted beyond the system's bundle")
    ] = ()


NVMeTransport = Literal["tcp", "fc"]
NVME_TRANSPORTS: tuple[str, ...] = get_args(NVMeTransport)


@dataclass(frozen=True, slots=True)
class ServiceNVMETarget:
    """IncusOS's ServiceNVMETarget (incus-osd/api/service_nvme.go)."""

    transport: Annotated[NVMeTransport, Help("tcp or fc"), ALWAYS]
    address: Annotated[
        str, Help("tcp: the target's IP address; fc: nn-0x<WWNN>:pn-0x<WWPN>"), ALWAYS
    ]
    port: Annotated[int, Help("tcp: the target's port (discovery: 8009, I/O: 4420)"), ALWAYS] = 0
    host_address: Annotated[
        str, Help("fc: the local port to connect from (nn-0x..:pn-0x..); empty: every one")
    ] = ""
    nqn: Annotated[
        str, Help("connect to this subsystem NQN directly instead of through discovery")
    ] = ""


@dataclass(frozen=True, slots=True)
class ServiceNVMEConfig:
    enabled: Annotated[bool, Help("connect to the targets (NVMe over TCP or FC)"), ALWAYS] = False
    targets: Annotated[tuple[ServiceNVMETarget, ...], Help("the NVMe targets"), ALWAYS] = ()


@dataclass(frozen=True, slots=True)
class ServiceISCSITarget:
    """IncusOS's ServiceISCSITarget (incus-osd/api/service_iscsi.go)."""

    target: Annotated[str, Help("the target's iSCSI name (iqn..., eui..., naa...)"), ALWAYS]
    address: Annotated[str, Help("the portal's IP address or DNS name"), ALWAYS]
    port: Annotated[int, Help("the portal's port; 0: iSCSI's 3260"), ALWAYS] = 0


@dataclass(frozen=True, slots=True)
class ServiceISCSIConfig:
    enabled: Annotated[bool, Help("run iscsid and log in to the targets"), ALWAYS] = False
    targets: Annotated[tuple[ServiceISCSITarget, ...], Help("the iSCSI targets"), ALWAYS] = ()


@dataclass(frozen=True, slots=True)
class ServiceMultipathConfig:
    """IncusOS's ServiceMultipathConfig (incus-osd/api/service_multipath.go)."""

    enabled: Annotated[bool, Help("run multipathd for the WWNs below"), ALWAYS] = False
    wwns: Annotated[
        tuple[str, ...], Help("the disks' WWNs as /dev/disk/by-id names them (0x5abc...)"), ALWAYS
    ] = ()


@dataclass(frozen=True, slots=True)
class Services:
    """The `config` halves of /1.0/services/<name> (IncusOS keeps them in its state)."""

    nvme: Annotated[ServiceNVMEConfig, Help("/1.0/services/nvme")] = ServiceNVMEConfig()
    iscsi: Annotated[ServiceISCSIConfig, Help("/1.0/services/iscsi")] = ServiceISCSIConfig()
    multipath: Annotated[ServiceMultipathConfig, Help("/1.0/services/multipath")] = (
        ServiceMultipathConfig()
    )


@dataclass(frozen=True, slots=True)
class Listener:
    """Who may reach the API. IncusOS's SystemFallbackListenerConfig (listen_address,
    trusted_client_certificates), plus the users the unix socket admits besides root."""

    # host:port for HTTPS with client certificates; empty: the unix socket only.
    listen_address: Annotated[
        str, Help("host:port for HTTPS with client certificates; empty: the socket only")
    ] = ""
    # PEM client certificates; a client is trusted when its certificate's SHA-256
    # fingerprint is one of these certificates' fingerprints.
    trusted_client_certificates: Annotated[
        tuple[str, ...], Help("PEM client certificates admitted over HTTPS")
    ] = ()
    # uids (other than 0) whose processes may use the unix socket.
    socket_uids: Annotated[
        tuple[int, ...], Help("users besides root that may use the unix socket")
    ] = ()


# /1.0/system/kernel: IncusOS's SystemKernelConfig (incus-osd/api/system_kernel.go).
# Names and omitempty-ness as there; checks against the machine (a PCI address that is
# not there) are the section's (sections/kernel.py).
# The rates termios names (stty takes these and no others above 38400).
BAUD_RATES: tuple[int, ...] = (
    1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class KernelConsole:
    device: Annotated[str, Help("a console device, e.g. ttyS0 or tty0"), ALWAYS]
    baud_rate: Annotated[int, Help("its speed (a standard rate, e.g. 115200); 0: as it is")] = 0


@dataclass(frozen=True, slots=True)
class KernelCPU:
    scaling_governor: Annotated[
        str, Help("the cpufreq governor for every CPU (one the machine offers)")
    ] = ""


@dataclass(frozen=True, slots=True)
class KernelMemory:
    persistent_hugepages: Annotated[
        int, Help("huge pages reserved at boot (vm.nr_hugepages)"), ALWAYS
    ] = 0
    zram_swap_size: Annotated[
        str, Help("compressed swap in RAM, e.g. 4GiB or 512MB; empty or 0: none"), ALWAYS
    ] = ""


@dataclass(frozen=True, slots=True)
class KernelNetwork:
    buffer_size: Annotated[
        int, Help("the largest TCP/socket buffer in bytes (tcp_rmem/wmem, rmem/wmem_max)")
    ] = 0
    netdev_max_backlog: Annotated[
        int, Help("packets queued per CPU before the kernel drops (default 1000)")
    ] = 0
    queuing_discipline: Annotated[str, Help("the default qdisc, e.g. fq or fq_codel")] = ""
    tcp_congestion_algorithm: Annotated[
        str, Help("TCP congestion control, one the kernel offers (e.g. bbr, cubic)")
    ] = ""
    tcp_mtu_probing: Annotated[bool, Help("probe the path MTU when ICMP is blocked")] = False


@dataclass(frozen=True, slots=True)
class KernelPassthrough:
    vendor_id: Annotated[str, Help("PCI vendor ID, 4 hex digits (e.g. 10de)"), ALWAYS]
    product_id: Annotated[str, Help("PCI device ID, 4 hex digits (e.g. 1eb8)"), ALWAYS]
    pci_address: Annotated[
        str, Help("one such device's address (0000:65:00.0), checked to carry these IDs")
    ] = ""


@dataclass(frozen=True, slots=True)
class KernelSRIOV:
    pci_address: Annotated[str, Help("the physical function's PCI address (0000:3b:00.0)"), ALWAYS]
    vf_count: Annotated[int, Help("virtual functions to create (0: none)"), ALWAYS] = 0


@dataclass(frozen=True, slots=True)
class KernelPCI:
    passthrough: Annotated[
        tuple[KernelPassthrough, ...], Help("devices handed to vfio-pci for passthrough")
    ] = ()
    sriov: Annotated[tuple[KernelSRIOV, ...], Help("SR-IOV virtual functions per device")] = ()


@dataclass(frozen=True, slots=True)
class Kernel:
    console: Annotated[tuple[KernelConsole, ...], Help("serial and virtual consoles")] = ()
    blacklist_modules: Annotated[
        tuple[str, ...], Help("kernel modules never to load (e.g. nouveau)")
    ] = ()
    cpu: Annotated[KernelCPU | None, Help("CPU frequency scaling")] = None
    memory: Annotated[KernelMemory | None, Help("huge pages and zram swap")] = None
    network: Annotated[KernelNetwork | None, Help("network sysctls")] = None
    pci: Annotated[KernelPCI | None, Help("PCI passthrough and SR-IOV")] = None


@dataclass(frozen=True, slots=True)
class Config:
    version: Annotated[int, Help("the document's version")] = CURRENT_VERSION
    network: Annotated[Network, Help("/1.0/system/network")] = Network()
    logging: Annotated[Logging, Help("/1.0/system/logging")] = Logging()
    update: Annotated[Update, Help("/1.0/system/update")] = Update()
    provider: Annotated[Provider, Help("/1.0/system/provider")] = Provider()
    storage: Annotated[Storage, Help("/1.0/system/storage")] = Storage()
    security: Annotated[Security, Help("/1.0/system/security")] = Security()
    services: Annotated[Services, Help("/1.0/services")] = Services()
    listener: Annotated[Listener, Help("/1.0/system/fallback-listener")] = Listener()
    kernel: Annotated[Kernel, Help("/1.0/system/kernel")] = Kernel()


# -- the install seed (lxc/incus-os incus-osd/api/seed/*.go) --------------------------
# Seed files that are not API sections: read from the seed at first boot, never stored.
# `version` is read by config.seed for every file alike.

SortOrder = Literal["", "smallest", "largest"]


@dataclass(frozen=True, slots=True)
class InstallSeedTarget:
    """Which disk to install to; the selectors are AND'ed."""

    bus: Annotated[str, Help("the disk's bus (NVME, SCSI, USB...), case-insensitive")] = ""
    id: Annotated[str, Help("a substring of the disk's /dev/disk/by-id name")] = ""
    max_size: Annotated[str, Help("the largest disk to pick (1TiB)")] = ""
    min_size: Annotated[str, Help("the smallest disk to pick (100GiB)")] = ""
    sort_order: Annotated[SortOrder, Help("several match: pick the smallest or largest")] = ""


@dataclass(frozen=True, slots=True)
class InstallSeedSecurity:
    """Degraded security IncusOS allows when asked (one of the two at most)."""

    missing_tpm: Annotated[bool, Help("no TPM: allow a software TPM")] = False
    missing_secure_boot: Annotated[bool, Help("Secure Boot disabled: allow it")] = False


@dataclass(frozen=True, slots=True)
class InstallSeed:
    force_install: Annotated[bool, Help("install over a disk that has partitions")] = False
    force_install_confirmation: Annotated[
        str, Help("the installed system's confirmation value")
    ] = ""
    force_reboot: Annotated[bool, Help("reboot once installed")] = False
    security: Annotated[InstallSeedSecurity | None, Help("degraded security")] = None
    target: Annotated[InstallSeedTarget | None, Help("the target disk's selectors")] = None


@dataclass(frozen=True, slots=True)
class ApplicationSeed:
    name: Annotated[str, Help("the application's name")]


@dataclass(frozen=True, slots=True)
class ApplicationsSeed:
    applications: Annotated[tuple[ApplicationSeed, ...], Help("what to install")] = ()
