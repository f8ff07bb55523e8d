"""The kernel section (/1.0/system/kernel): Incus's byte sizes, validation, the checks
against the machine (a built sysfs tree), what the renders read back as, what is skipped
at boot, and zram-generator reading the config it is given."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from incusos_hal.config import from_dict, parse_json, validate
from incusos_hal.config.bytesize import ByteSizeError, parse_byte_size
from incusos_hal.config.model import Config, Kernel, KernelMemory
from incusos_hal.config.validate import MAX_ZRAM_BYTES, validate_kernel
from incusos_hal.core.tree import File
from incusos_hal.hal import kernel as hal
from incusos_hal.render import kernel as render
from incusos_hal.sections import changes, owned, render_files
from incusos_hal.sections import kernel as section

ZRAM_GENERATOR = "/lib/systemd/system-generators/zram-generator"

FULL = {
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
        "passthrough": [{"vendor_id": "10de", "product_id": "1eb8", "pci_address": "0000:65:00.0"}],
        "sriov": [{"pci_address": "0000:3b:00.0", "vf_count": 8}],
    },
}


def kernel_config(raw: dict[str, object]) -> Config:
    return from_dict({"kernel": raw})


def unvalidated(raw: dict[str, object]) -> Config:
    """A document as a stored file may hold it after validation rules changed."""
    from incusos_hal.config.decode import decode

    errors: list[object] = []
    config = decode(Config, {"kernel": raw}, "", errors)  # type: ignore[arg-type]
    assert errors == []
    return config


# -- Incus's byte sizes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("", 0),
        ("0", 0),
        ("1", 1),
        ("1B", 1),
        ("12 bytes", 12),
        ("1kB", 1000),
        ("1MB", 10**6),
        ("3GB", 3 * 10**9),
        ("1TB", 10**12),
        ("1PB", 10**15),
        ("1EB", 10**18),
        ("1KiB", 1024),
        ("4GiB", 4 * 2**30),
        ("2TiB", 2 * 2**40),
        ("1PiB", 2**50),
        ("7EiB", 7 * 2**60),
        ("9223372036854775807", 2**63 - 1),
    ],
)
def test_byte_sizes_parse_as_incus_does(text: str, size: int) -> None:
    assert parse_byte_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("GiB", "Invalid value: GiB"),
        ("-1", "Invalid value: -1"),
        ("1.5GiB", "Invalid value: 1.5GiB"),
        ("4 GiB", "Invalid value: 4 GiB"),
        ("4gib", "Invalid value: 4gib"),
        ("4KB", "Invalid value: 4KB"),
        ("4Kib", "Invalid value: 4Kib"),
        ("\u0664GiB", "Invalid value: \u0664GiB"),  # an Arabic-Indic 4 is not an ASCII digit
        ("9223372036854775808", "Invalid integer: 9223372036854775808"),
        ("8EiB", "Invalid value: 8EiB (beyond"),  # Go would wrap to a negative size
    ],
)
def test_bad_byte_sizes_are_refused_with_incus_wording(text: str, message: str) -> None:
    with pytest.raises(ByteSizeError) as e:
        parse_byte_size(text)
    assert str(e.value).startswith(message)


def test_zram_size_is_bounded() -> None:
    ok = Kernel(memory=KernelMemory(zram_swap_size=f"{MAX_ZRAM_BYTES}"))
    too_big = Kernel(memory=KernelMemory(zram_swap_size=f"{MAX_ZRAM_BYTES + 1}"))
    assert validate_kernel(ok, "kernel") == []
    [error] = validate_kernel(too_big, "kernel")
    assert error.path == "kernel.memory.zram_swap_size" and "maximum" in error.message


def test_the_full_incusos_example_validates_and_round_trips() -> None:
    config = kernel_config(FULL)
    assert validate(config) == []
    assert config.kernel.pci is not None and config.kernel.pci.sriov[0].vf_count == 8
    # The API's JSON document reads back as the same value.
    from incusos_hal.config import dumps_json

    assert parse_json(dumps_json(config)) == config


# -- the machine: a built sysfs/procfs tree ---------------------------------------------


def build_machine(root: Path) -> str:
    devices = root / "sys/bus/pci/devices"
    for address, vendor, device, total in (
        ("0000:3b:00.0", "0x8086", "0x1572", "64"),
        ("0000:65:00.0", "0x10de", "0x1eb8", None),
        ("0000:00:1f.0", "0x8086", "0x a000", None),
    ):
        d = devices / address
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "device").write_text(device + "\n")
        if total is not None:
            (d / "sriov_totalvfs").write_text(total + "\n")
    cpufreq = root / "sys/devices/system/cpu/cpu0/cpufreq"
    cpufreq.mkdir(parents=True)
    (cpufreq / "scaling_available_governors").write_text("performance powersave\n")
    proc = root / "proc/sys/net/ipv4"
    proc.mkdir(parents=True)
    (proc / "tcp_available_congestion_control").write_text("reno cubic\n")
    return str(root)


def test_what_the_machine_has_passes(tmp_path: Path) -> None:
    root = build_machine(tmp_path)
    config = kernel_config(
        {
            "cpu": {"scaling_governor": "powersave"},
            "network": {"tcp_congestion_algorithm": "cubic"},
            "pci": {
                "passthrough": [
                    {"vendor_id": "10DE", "product_id": "1EB8", "pci_address": "0000:65:00.0"}
                ],
                "sriov": [{"pci_address": "0000:3b:00.0", "vf_count": 64}],
            },
        }
    )
    assert section.check(config, Config(), root) == []


def test_what_the_machine_cannot_honour_is_refused_naming_the_field(tmp_path: Path) -> None:
    root = build_machine(tmp_path)
    config = kernel_config(
        {
            "cpu": {"scaling_governor": "ondemand"},
            "network": {"tcp_congestion_algorithm": "bbr"},
            "pci": {
                "passthrough": [
                    {"vendor_id": "10de", "product_id": "1eb8", "pci_address": "0000:66:00.0"},
                    {"vendor_id": "8086", "product_id": "1572", "pci_address": "0000:65:00.0"},
                ],
                "sriov": [
                    {"pci_address": "0000:3b:00.0", "vf_count": 65},
                    {"pci_address": "0000:65:00.0", "vf_count": 1},
                    {"pci_address": "0000:5e:00.0", "vf_count": 1},
                ],
            },
        }
    )
    assert validate(config) == []
    assert [str(e) for e in section.check(config, Config(), root)] == [
        'kernel.pci.passthrough[0].pci_address: PCI device "0000:66:00.0" not found',
        'kernel.pci.passthrough[1].pci_address: PCI device "0000:65:00.0" is 10de:1eb8, '
        "not 8086:1572",
        'kernel.pci.sriov[0].vf_count: PCI device "0000:3b:00.0" supports at most 64 SR-IOV '
        "virtual functions",
        'kernel.pci.sriov[1].pci_address: PCI device "0000:65:00.0" doesn\'t support SR-IOV',
        'kernel.pci.sriov[2].pci_address: PCI device "0000:5e:00.0" not found',
        "kernel.cpu.scaling_governor: unsupported scaling governor, must be one of "
        "[performance powersave]",
        "kernel.network.tcp_congestion_algorithm: unsupported tcp_congestion_control value, "
        "must be one of [reno cubic]",
    ]


def test_a_machine_without_cpufreq_refuses_a_governor(tmp_path: Path) -> None:
    config = kernel_config({"cpu": {"scaling_governor": "performance"}})
    assert [str(e) for e in section.check(config, Config(), str(tmp_path))] == [
        "kernel.cpu.scaling_governor: CPU frequency scaling isn't available on this system"
    ]


def test_an_invalid_address_is_never_used_as_a_path(tmp_path: Path) -> None:
    (tmp_path / "sys/bus/pci/devices/../../../etc").mkdir(parents=True, exist_ok=True)
    config = unvalidated({"pci": {"sriov": [{"pci_address": "../../../etc", "vf_count": 1}]}})
    assert section.check(config, Config(), str(tmp_path)) == []  # validation's to refuse
    assert [e.path for e in validate(config)] == ["kernel.pci.sriov[0].pci_address"]


def test_zram_state_reads_disksize_and_mm_stat(tmp_path: Path) -> None:
    zram = tmp_path / "sys/block/zram0"
    zram.mkdir(parents=True)
    (zram / "disksize").write_text("4294967296\n")
    (zram / "mm_stat").write_text("   8192    2048    12288        0    12288        0 0 0 0\n")

    class Where:
        root = str(tmp_path)

    class Ctx:
        settings = Where()

    assert section.read_state(Ctx()) == {  # type: ignore[arg-type]
        "memory": {
            "zram_swap": {
                "disk_size": 4294967296,
                "incompressed_size": 8192,
                "compressed_size": 2048,
                "compression_ratio": 8192 / 12288,
                "total_memory_use": 12288,
            }
        }
    }
    (zram / "mm_stat").write_text("0 0 0 0 0 0 0 0 0\n")
    assert hal.zram_swap(str(tmp_path)) == hal.ZramSwap(4294967296, 0, 0, 0)
    assert hal.ZramSwap(1, 0, 0, 0).compression_ratio == 0.0
    (Ctx.settings.root) = str(tmp_path / "none")  # no zram0: no state
    assert section.read_state(Ctx()) == {}  # type: ignore[arg-type]


# -- renders read back as the stored values ---------------------------------------------


def read_sysctl_d(data: bytes) -> dict[str, str]:
    """sysctl.d(5): comments begin with # or ;, `key = value` with whitespace around both
    stripped, later lines win."""
    out: dict[str, str] = {}
    for line in data.decode().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep, line
        out[key.strip().replace("/", ".")] = value.strip()
    return out


def read_words(data: bytes) -> list[list[str]]:
    return [line.split() for line in data.decode().splitlines() if line.strip() and line[0] != "#"]


def read_ini(data: bytes) -> dict[str, dict[str, list[str]]]:
    """systemd.syntax(5), what udev and zram-generator read."""
    out: dict[str, dict[str, list[str]]] = {}
    section_name = ""
    for line in data.decode().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section_name = line[1:-1]
            out.setdefault(section_name, {})
            continue
        key, _, value = line.partition("=")
        out[section_name].setdefault(key.strip(), []).append(value.strip())
    return out


def zram_bytes(expression: str) -> int:
    """zram-generator's zram-size in MiB; what this renderer writes is N or N / 1048576."""
    number, _, divisor = expression.partition(" / ")
    mib = int(number) / int(divisor) if divisor else float(number)
    return int(mib * 1024.0 * 1024.0)


@pytest.mark.parametrize("zram", ["4GiB", "1500MB", "1", "4095", "12345 bytes", "2TB", "8PiB"])
def test_renders_read_back_as_exactly_the_stored_values(zram: str) -> None:
    raw = dict(FULL, memory={"persistent_hugepages": 16, "zram_swap_size": zram})
    config = kernel_config(raw)
    assert validate(config) == []
    rendered = render.render_kernel(config.kernel)
    assert rendered.warnings == ()
    files = {
        path: entry.content for path, entry in rendered.files.items() if isinstance(entry, File)
    }
    k = config.kernel
    assert k.memory is not None and k.network is not None and k.pci is not None
    size = str(k.network.buffer_size)
    assert read_sysctl_d(files[render.SYSCTL_FILE]) == {
        "vm.nr_hugepages": str(k.memory.persistent_hugepages),
        "net.ipv4.tcp_rmem": f"4096 65536 {size}",
        "net.ipv4.tcp_wmem": f"4096 65536 {size}",
        "net.core.rmem_max": size,
        "net.core.wmem_max": size,
        "net.core.netdev_max_backlog": str(k.network.netdev_max_backlog),
        "net.ipv4.tcp_mtu_probing": "1",
        "net.core.default_qdisc": k.network.queuing_discipline,
        "net.ipv4.tcp_congestion_control": k.network.tcp_congestion_algorithm,
    }
    assert read_words(files[render.BLACKLIST_FILE]) == [
        ["blacklist", m] for m in k.blacklist_modules
    ]
    [[options, module, ids]] = read_words(files[render.PASSTHROUGH_FILE])
    assert (options, module) == ("options", "vfio-pci")
    assert ids == "ids=" + ",".join(f"{d.vendor_id}:{d.product_id}" for d in k.pci.passthrough)
    assert read_words(files[render.MODULES_LOAD_FILE]) == [["vfio-pci"]]
    zram_conf = read_ini(files[render.ZRAM_FILE])
    assert zram_conf == {
        "zram0": {
            "zram-size": [zram_conf["zram0"]["zram-size"][0]],
            "compression-algorithm": ["zstd"],
            "swap-priority": ["100"],
        }
    }
    assert zram_bytes(zram_conf["zram0"]["zram-size"][0]) == parse_byte_size(zram)
    sriov = k.pci.sriov[0]
    link = read_ini(files[render.sriov_link_path(sriov.pci_address)])
    assert link["Match"] == {"Path": [f"pci-{sriov.pci_address}"]}
    assert link["Link"]["SR-IOVVirtualFunctions"] == [str(sriov.vf_count)]
    # The PF keeps the names 99-default.link would have given it.
    default_link = read_ini(Path("/usr/lib/systemd/network/99-default.link").read_bytes())
    for key, values in default_link["Link"].items():
        assert link["Link"][key] == values


def test_an_empty_kernel_section_writes_nothing() -> None:
    assert render.render_kernel(Kernel()).files == {}
    # A memory table writes vm.nr_hugepages (as IncusOS does); a zero zram size: no zram.
    files = render.render_kernel(kernel_config({"memory": {"zram_swap_size": "0"}}).kernel).files
    assert list(files) == [render.SYSCTL_FILE]
    assert read_sysctl_d(files[render.SYSCTL_FILE].content) == {"vm.nr_hugepages": "0"}  # type: ignore[union-attr]


def test_at_boot_a_bad_item_is_skipped_with_a_warning_and_the_rest_applies() -> None:
    # A stored document no longer valid (another version wrote it, or a hand): the
    # configure step never fails the boot over it.
    raw = dict(
        FULL,
        blacklist_modules=["nouveau", "bad name"],
        memory={"persistent_hugepages": -1, "zram_swap_size": "4GiB"},
        pci={
            "passthrough": [{"vendor_id": "zzzz", "product_id": "1eb8"}],
            "sriov": [
                {"pci_address": "0000:3b:00.0", "vf_count": -2},
                {"pci_address": "0000:3b:00.1", "vf_count": 4},
            ],
        },
    )
    config = unvalidated(raw)
    plan = render_files(config, ())
    assert sorted(w for w in plan.warnings if w.startswith("kernel.")) == [
        "kernel.blacklist_modules[1]: 'bad name' is not a module name (letters, digits, '_' "
        "and '-'); skipped, the rest applies",
        "kernel.memory.persistent_hugepages: persistent hugepages count cannot be negative; "
        "skipped, the rest applies",
        "kernel.pci.passthrough[0].vendor_id: Vendor ID 'zzzz' is invalid (4 hex digits, e.g. "
        "10de); skipped, the rest applies",
        "kernel.pci.sriov[0].vf_count: SR-IOV virtual function count cannot be negative; "
        "skipped, the rest applies",
    ]
    files = {p: e.content for p, e in plan.files.items() if isinstance(e, File)}
    sysctls = read_sysctl_d(files[render.SYSCTL_FILE])
    assert "vm.nr_hugepages" not in sysctls and sysctls["net.ipv4.tcp_congestion_control"] == "bbr"
    assert read_words(files[render.BLACKLIST_FILE]) == [["blacklist", "nouveau"]]
    assert render.PASSTHROUGH_FILE not in files and render.MODULES_LOAD_FILE not in files
    assert render.sriov_link_path("0000:3b:00.0") not in files
    assert render.sriov_link_path("0000:3b:00.1") in files
    assert render.ZRAM_FILE in files and render.GOVERNOR_FILE in files


def test_writers_refuse_what_would_read_back_differently() -> None:
    with pytest.raises(render.UnsafeTextError):
        render.sysctl_conf([("vm.nr_hugepages", "1\nkernel.modprobe = /tmp/x")])
    with pytest.raises(render.UnsafeTextError):
        render.sysctl_conf([("vm.nr_hugepages", " 1")])
    with pytest.raises(render.UnsafeTextError):
        render.sysctl_conf([("-vm.nr_hugepages", "1")])
    with pytest.raises(render.UnsafeTextError):
        render.word_lines([("blacklist", "a#b")])
    with pytest.raises(render.UnsafeTextError):
        render.word_lines([("install", "x y")])
    with pytest.raises(render.UnsafeTextError):
        render.zram_conf("zram0", [("zram-size", "1\n[zram1]")])


def test_owned_files_and_what_systemd_does_when_they_change() -> None:
    rules = owned()
    for path in (
        render.SYSCTL_FILE,
        render.BLACKLIST_FILE,
        render.PASSTHROUGH_FILE,
        render.MODULES_LOAD_FILE,
        render.ZRAM_FILE,
        render.GOVERNOR_FILE,
        render.sriov_link_path("0000:3b:00.0"),
    ):
        directory, name = os.path.split(path)
        assert any(r.directory == directory and r.match(name) for r in rules), path
    todo = changes([render.SYSCTL_FILE, render.ZRAM_FILE, render.BLACKLIST_FILE])
    assert todo.restart == ("systemd-sysctl.service", "systemd-zram-setup@zram0.service")
    # Restarting the setup unit never starts a swap that was not running.
    assert todo.start == ("dev-zram0.swap",) and todo.stop == ()
    assert not todo.reload_networkd
    # The file gone: no swap unit is generated any more, so the swap goes off first
    # (nothing ties it to the setup unit then), then the device is reset.
    gone = changes([], [render.ZRAM_FILE])
    assert gone.stop == ("dev-zram0.swap", "systemd-zram-setup@zram0.service")
    assert gone.restart == gone.start == ()
    assert changes([], [render.SYSCTL_FILE]).restart == ("systemd-sysctl.service",)


def test_zram_generator_reads_the_rendered_config(tmp_path: Path) -> None:
    if not Path(ZRAM_GENERATOR).exists():
        pytest.fail(f"needs {ZRAM_GENERATOR}; run ci/setup as root (systemd-zram-generator)")
    config = kernel_config({"memory": {"zram_swap_size": "1500MB"}})
    rendered = render.render_kernel(config.kernel)
    root = tmp_path / "root"
    for path, entry in rendered.files.items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        assert isinstance(entry, File)
        target.write_bytes(entry.content)
    (root / "proc").mkdir()
    (root / "proc/meminfo").write_text("MemTotal:        8013220 kB\n")
    out = tmp_path / "out"
    out.mkdir()
    # Generator mode only: it writes units into `out`. (--setup-device would act on
    # this machine's /sys/block/zram0 whatever the root says.)
    run = subprocess.run(
        [ZRAM_GENERATOR, str(out)],
        env=dict(os.environ, ZRAM_GENERATOR_ROOT=str(root)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    swap = read_ini((out / "dev-zram0.swap").read_bytes())
    assert swap["Swap"]["What"] == ["/dev/zram0"]
    assert swap["Swap"]["Priority"] == ["100"]
    assert (out / "swap.target.wants/dev-zram0.swap").is_symlink()


def test_a_file_two_rules_own_comes_back_after_a_failed_apply(tmp_path: Path) -> None:
    # The SR-IOV .link files lie among networkd's, which the network section owns too.
    from incusos_hal.core.files import Owned, apply_tree, owned_paths

    link = tmp_path / render.sriov_link_path("0000:3b:00.0").lstrip("/")
    link.parent.mkdir(parents=True)
    link.write_bytes(b"old\n")
    rules = [
        Owned("/run/systemd/network", lambda n: n.startswith("10-incusos-")),
        Owned("/run/systemd/network", lambda n: n.startswith(render.SRIOV_PREFIX)),
    ]
    # Listed twice, it would be snapshotted again after its removal (as absent).
    assert owned_paths(tmp_path, rules) == [link]
    calls = 0

    def fail_at_the_end() -> None:  # before the removal, then after it: fail there
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("deadline")

    with pytest.raises(RuntimeError):
        apply_tree(tmp_path, {}, rules, check=fail_at_the_end)
    assert link.read_bytes() == b"old\n"


class JobLog:
    """What the service asks of systemd, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def daemon_reload(self) -> None:
        self.calls.append("daemon-reload")

    async def reload_networkd(self) -> None:
        self.calls.append("networkd reload")

    async def restart(self, unit: str) -> None:
        self.calls.append(f"restart {unit}")

    async def start(self, unit: str, mode: str) -> None:
        self.calls.append(f"start {unit}")

    async def stop(self, unit: str) -> None:
        self.calls.append(f"stop {unit}")

    async def active_state(self, unit: str) -> str:
        return "active"


def test_a_put_starts_and_a_removal_stops_the_zram_swap(tmp_path: Path) -> None:
    """The first zram size starts the swap (a restart of the setup unit alone would
    leave it off: the VM rung saw that); a new size restarts the device and its swap; no
    size turns the swap off, then resets the device."""
    import asyncio

    from incusos_hal.api.service import Service, Settings, ensure_state_dir

    state = tmp_path / "state"
    ensure_state_dir(state)
    (tmp_path / "target").mkdir()
    systemd = JobLog()
    service = Service(
        Settings(state_dir=state, target=str(tmp_path / "target"), live=False), systemd
    )
    setup, swap = "systemd-zram-setup@zram0.service", "dev-zram0.swap"

    def put(size: str) -> list[str]:
        systemd.calls.clear()
        body = {"config": {"memory": {"persistent_hugepages": 0, "zram_swap_size": size}}}
        asyncio.run(service.put_section("kernel", body))
        return systemd.calls

    # The first apply writes the network section's first-boot files and the sysctls.
    assert "restart systemd-sysctl.service" in put("")
    assert put("64MiB") == ["daemon-reload", f"restart {setup}", f"start {swap}"]
    assert put("128MiB") == ["daemon-reload", f"restart {setup}", f"start {swap}"]
    assert put("") == ["daemon-reload", f"stop {swap}", f"stop {setup}"]
