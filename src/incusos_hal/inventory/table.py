"""Human tables for `incusos-hal inventory` on a terminal: one per section, the columns
an operator looks for first. JSON and YAML carry everything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Rows = list[list[str]]


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(rows: Rows) -> str:
    if len(rows) == 1:
        return "(none)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _cpu(s: dict[str, Any]) -> Rows:
    rows = [["SOCKET", "NAME", "CORES", "THREADS", "MHZ"]]
    for sock in s["sockets"]:
        threads = sum(len(c["threads"]) for c in sock["cores"])
        rows.append(
            [
                str(sock["socket"]),
                sock.get("name", ""),
                str(len(sock["cores"])),
                str(threads),
                str(sock.get("frequency", "")),
            ]
        )
    return rows


def _memory(s: dict[str, Any]) -> Rows:
    rows = [["NODE", "TOTAL", "USED", "HUGEPAGES"]]
    rows.append(["all", _size(s["total"]), _size(s["used"]), _size(s["hugepages_total"])])
    for node in s.get("nodes", []):
        rows.append(
            [
                str(node["numa_node"]),
                _size(node["total"]),
                _size(node["used"]),
                _size(node["hugepages_total"]),
            ]
        )
    return rows


def _network(s: dict[str, Any]) -> Rows:
    rows = [["PORT", "MAC", "DRIVER", "PCI", "LINK", "SPEED"]]
    for card in s["cards"]:
        for port in card.get("ports", []):
            speed = port.get("link_speed")
            rows.append(
                [
                    port["id"],
                    port.get("address", ""),
                    card.get("driver", ""),
                    card.get("pci_address", card.get("usb_address", "")),
                    "up" if port["link_detected"] else "down",
                    f"{speed} Mb/s" if speed else "",
                ]
            )
    return rows


def _storage(s: dict[str, Any]) -> Rows:
    rows = [["DISK", "TYPE", "SIZE", "MODEL", "SERIAL", "WWN", "PARTITIONS"]]
    for d in s["disks"]:
        rows.append(
            [
                d["id"],
                d.get("type", ""),
                _size(d["size"]),
                d.get("model", ""),
                d.get("serial", ""),
                d.get("wwn", ""),
                str(len(d["partitions"])),
            ]
        )
    return rows


def _nvme(s: dict[str, Any]) -> Rows:
    rows = [["CONTROLLER", "TRANSPORT", "ADDRESS", "SERIAL", "MODEL", "STATE", "NAMESPACES"]]
    for sub in s["subsystems"]:
        for c in sub["controllers"]:
            rows.append(
                [
                    c["id"],
                    c["transport"],
                    c["address"],
                    c["serial"],
                    c["model"],
                    c["state"],
                    " ".join(n["id"] for n in c["namespaces"]),
                ]
            )
    return rows


def _pci(s: dict[str, Any]) -> Rows:
    rows = [["ADDRESS", "DRIVER", "VENDOR", "PRODUCT"]]
    for d in s["devices"]:
        rows.append(
            [
                d["pci_address"],
                d["driver"],
                d["vendor"] or d["vendor_id"],
                d["product"] or d["product_id"],
            ]
        )
    return rows


def _usb(s: dict[str, Any]) -> Rows:
    rows = [["BUS:DEV", "ID", "VENDOR", "PRODUCT", "MBIT/S"]]
    for d in s["devices"]:
        rows.append(
            [
                f"{d['bus_address']}:{d['device_address']}",
                f"{d['vendor_id']}:{d['product_id']}",
                d["vendor"],
                d["product"],
                f"{d['speed']:g}",
            ]
        )
    return rows


def _serial(s: dict[str, Any]) -> Rows:
    rows = [["ID", "DEVICE", "DRIVER", "VENDOR", "PRODUCT"]]
    for d in s["devices"]:
        rows.append([d["id"], d["device"], d["driver"], d["vendor"], d["product"]])
    return rows


def _gpu(s: dict[str, Any]) -> Rows:
    rows = [["PCI", "DRIVER", "VENDOR", "PRODUCT", "DRM"]]
    for c in s["cards"]:
        drm = c.get("drm") or {}
        rows.append(
            [
                c.get("pci_address", ""),
                c.get("driver", ""),
                c.get("vendor", ""),
                c.get("product", ""),
                drm.get("card_name", ""),
            ]
        )
    return rows


def _pairs(s: dict[str, Any], prefix: str = "") -> Rows:
    rows = [["FIELD", "VALUE"]] if not prefix else []
    for key, value in s.items():
        if isinstance(value, dict):
            rows += _pairs(value, f"{prefix}{key}.")
        elif isinstance(value, list):
            rows.append([prefix + key, ", ".join(str(v) for v in value)])
        else:
            rows.append([prefix + key, "" if value is None else str(value)])
    return rows


TABLES: dict[str, Callable[[dict[str, Any]], Rows]] = {
    "cpu": _cpu,
    "memory": _memory,
    "gpu": _gpu,
    "network": _network,
    "storage": _storage,
    "usb": _usb,
    "pci": _pci,
    "serial": _serial,
    "nvme": _nvme,
}


def table(name: str, section: dict[str, Any]) -> str:
    return render(TABLES.get(name, _pairs)(section))
