"""`/1.0/system/kernel`: sysctls, blacklisted modules, PCI passthrough, SR-IOV, zram swap,
the cpufreq governor and consoles (IncusOS's SystemKernel), rendered as systemd's own
configuration files (render/kernel.py) by the configure step.

A PUT is refused (400, naming the field) for what this machine cannot honour: a PCI
address that is not there, more VFs than the device has, a governor or congestion
algorithm the kernel does not offer. At boot the configure step skips an item that no
longer validates, with a warning, and applies the rest.

What takes effect when (docs/incusos-differences.md, "kernel"):
  sysctl.d          systemd-sysctl.service is restarted: at once.
  zram-generator    after daemon-reload, systemd-zram-setup@zram0.service is restarted
                    and dev-zram0.swap started; a removed file stops both.
  modprobe.d        nothing to restart: modprobe reads it when a module is next loaded
                    (a blacklist or vfio-pci's ids= take effect at the next boot).
  .link (SR-IOV)    udev applies .link files when the device appears: at the next boot.
                    Triggering "add" on a running NIC re-runs its renaming and policies
                    under the network section's feet, which is riskier than waiting.
  tmpfiles.d        the governor is written by systemd-tmpfiles at the next boot;
                    restarting systemd-tmpfiles-setup at runtime would also clean /tmp.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..config.errors import FieldError
from ..core.files import Owned
from ..render.kernel import (
    BLACKLIST_FILE,
    GOVERNOR_FILE,
    MODULES_LOAD_FILE,
    PASSTHROUGH_FILE,
    SRIOV_PREFIX,
    SYSCTL_FILE,
    ZRAM_DEVICE,
    ZRAM_FILE,
    render_kernel,
)
from ..render.networkd import NETWORK_DIR
from .base import Context, Reload, Rendered, Section

if TYPE_CHECKING:
    from ..config.model import Config
    from ..hal.net import Nic


ZRAM_SETUP_UNIT = f"systemd-zram-setup@{ZRAM_DEVICE}.service"
ZRAM_SWAP_UNIT = f"dev-{ZRAM_DEVICE}.swap"


def files(config: Config, nics: tuple[Nic, ...]) -> Rendered:
    rendered = render_kernel(config.kernel)
    return Rendered(rendered.files, warnings=rendered.warnings)


def check(new: Config, current: Config, root: str) -> list[FieldError]:
    """What this machine cannot honour, in IncusOS's words where it has them. Only
    values that passed validation get here, so an address is a name, never a path."""
    from ..config.validate import PCI_ADDRESS
    from ..hal import kernel as hal

    errors: list[FieldError] = []
    kernel = new.kernel
    pci = kernel.pci
    if pci is not None:
        for i, dev in enumerate(pci.passthrough):
            where = f"kernel.pci.passthrough[{i}].pci_address"
            address = dev.pci_address
            if not address or PCI_ADDRESS.fullmatch(address) is None:
                continue
            if not hal.pci_device_exists(root, address):
                errors.append(FieldError(where, f'PCI device "{address}" not found'))
                continue
            ids = hal.pci_ids(root, address)
            wanted = (dev.vendor_id.lower(), dev.product_id.lower())
            if ids is not None and ids != wanted:
                errors.append(
                    FieldError(
                        where,
                        f'PCI device "{address}" is {ids[0]}:{ids[1]}, not {wanted[0]}:{wanted[1]}',
                    )
                )
        for i, sriov in enumerate(pci.sriov):
            p = f"kernel.pci.sriov[{i}]"
            address = sriov.pci_address
            if PCI_ADDRESS.fullmatch(address) is None:
                continue
            if not hal.pci_device_exists(root, address):
                errors.append(FieldError(f"{p}.pci_address", f'PCI device "{address}" not found'))
                continue
            total = hal.sriov_total_vfs(root, address)
            if total is None:
                errors.append(
                    FieldError(
                        f"{p}.pci_address", f'PCI device "{address}" doesn\'t support SR-IOV'
                    )
                )
            elif sriov.vf_count > total:
                errors.append(
                    FieldError(
                        f"{p}.vf_count",
                        f'PCI device "{address}" supports at most {total} SR-IOV virtual functions',
                    )
                )
    if kernel.cpu is not None and kernel.cpu.scaling_governor:
        where = "kernel.cpu.scaling_governor"
        governors = hal.scaling_governors(root)
        if governors is None:
            errors.append(FieldError(where, "CPU frequency scaling isn't available on this system"))
        elif kernel.cpu.scaling_governor not in governors:
            errors.append(
                FieldError(
                    where, f"unsupported scaling governor, must be one of [{' '.join(governors)}]"
                )
            )
    if kernel.network is not None and kernel.network.tcp_congestion_algorithm:
        where = "kernel.network.tcp_congestion_algorithm"
        algorithms = hal.tcp_congestion_algorithms(root)
        if algorithms is None:
            errors.append(FieldError(where, "this kernel does not say which algorithms it offers"))
        elif kernel.network.tcp_congestion_algorithm not in algorithms:
            errors.append(
                FieldError(
                    where,
                    "unsupported tcp_congestion_control value, must be one of "
                    f"[{' '.join(algorithms)}]",
                )
            )
    return errors


def read_state(ctx: Context) -> Any:
    from ..hal import kernel as hal

    zram = hal.zram_swap(ctx.settings.root)
    if zram is None:
        return {}
    return {
        "memory": {
            "zram_swap": {
                "disk_size": zram.disk_size,
                # sic: IncusOS's JSON key.
                "incompressed_size": zram.original_size,
                "compressed_size": zram.compressed_size,
                "compression_ratio": zram.compression_ratio,
                "total_memory_use": zram.total_memory_use,
            }
        }
    }


def _named(*paths: str) -> Owned:
    names = {os.path.basename(p) for p in paths}
    return Owned(os.path.dirname(paths[0]), lambda name: name in names)


SECTION = Section(
    name="kernel",
    attribute="kernel",
    summary="sysctls, modules, PCI passthrough, SR-IOV, zram swap, CPU governor, consoles",
    read_state=read_state,
    check=check,
    files=files,
    owns=(
        _named(SYSCTL_FILE),
        _named(BLACKLIST_FILE, PASSTHROUGH_FILE),
        _named(MODULES_LOAD_FILE),
        # Also the distribution's default (Debian's zram-generator package enables zram0):
        # swap in RAM only when the document asks for it, as on IncusOS.
        _named(ZRAM_FILE),
        _named(GOVERNOR_FILE),
        Owned(NETWORK_DIR, lambda name: name.startswith(SRIOV_PREFIX)),
    ),
    # zram: restarting the setup unit resizes the device and restarts a running swap
    # (its generated swap unit is BindsTo= it), but never starts one that was not
    # running; so the swap unit is started after. Once the file is gone the generator
    # writes no swap unit: the swap is turned off first (with no unit of its own left,
    # nothing ties it to the setup unit), then the device reset.
    reloads=(
        Reload(SYSCTL_FILE, "systemd-sysctl.service"),
        Reload(ZRAM_FILE, ZRAM_SETUP_UNIT, on="written"),
        Reload(ZRAM_FILE, ZRAM_SWAP_UNIT, how="start", on="written"),
        Reload(ZRAM_FILE, ZRAM_SWAP_UNIT, how="stop", on="removed"),
        Reload(ZRAM_FILE, ZRAM_SETUP_UNIT, how="stop", on="removed"),
    ),
)
