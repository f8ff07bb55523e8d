"""`fibre_channel`, beside Incus's resources in its style: /sys/class/fc_host and
fc_remote_ports (scsi_transport_fc): WWNN/WWPN, port state and type, speed, fabric, and the
remote ports each host sees."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .sysfs import driver_of, listdir, pci_address_of, read, resolve


@dataclass
class FCRemotePort:
    id: str  # rport-H:B-R
    wwnn: str
    wwpn: str
    port_id: str
    port_state: str
    roles: str


@dataclass
class FCHost:
    id: str  # hostN
    wwnn: str
    wwpn: str
    port_id: str
    port_state: str
    port_type: str
    speed: str
    supported_speeds: str
    fabric_name: str
    symbolic_name: str
    driver: str
    pci_address: str
    remote_ports: list[FCRemotePort] = field(default_factory=list)


@dataclass
class FibreChannel:
    hosts: list[FCHost]
    total: int


def scan_fibre_channel(root: str | os.PathLike[str] = "/") -> FibreChannel:
    base = Path(root)
    hosts = []
    rports = base / "sys/class/fc_remote_ports"
    for name in listdir(base / "sys/class/fc_host"):
        fc = base / "sys/class/fc_host" / name
        device = resolve(fc / "device")
        # The HBA's driver is on its PCI function, the scsi host's parent.
        pci = pci_address_of(device) if device is not None else None
        driver = None
        if device is not None and pci:
            pci_dir = next((p for p in [device, *device.parents] if p.name == pci), None)
            driver = driver_of(base, pci_dir)[0] if pci_dir is not None else None
        host = FCHost(
            id=name,
            wwnn=read(fc / "node_name") or "",
            wwpn=read(fc / "port_name") or "",
            port_id=read(fc / "port_id") or "",
            port_state=read(fc / "port_state") or "",
            port_type=read(fc / "port_type") or "",
            speed=read(fc / "speed") or "",
            supported_speeds=read(fc / "supported_speeds") or "",
            fabric_name=read(fc / "fabric_name") or "",
            symbolic_name=read(fc / "symbolic_name") or "",
            driver=driver or "",
            pci_address=pci or "",
        )
        number = name.removeprefix("host")
        for rname in listdir(rports):
            if not rname.startswith(f"rport-{number}:"):
                continue
            rport = rports / rname
            host.remote_ports.append(
                FCRemotePort(
                    id=rname,
                    wwnn=read(rport / "node_name") or "",
                    wwpn=read(rport / "port_name") or "",
                    port_id=read(rport / "port_id") or "",
                    port_state=read(rport / "port_state") or "",
                    roles=read(rport / "roles") or "",
                )
            )
        hosts.append(host)
    hosts.sort(key=lambda h: int(h.id[4:]) if h.id[4:].isdigit() else 0)
    return FibreChannel(hosts=hosts, total=len(hosts))
