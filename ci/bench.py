"""ci/bench: each hot path against the tool a user would otherwise use, in one run.

Generator (boot critical path): incusos-hal-generator, with its cache (every boot after a
config change has been applied once) and without (the first boot after a hand edit),
against netplan's C generator (Debian's netplan.io) on the same network described both
ways: N NICs, each a bridge with DHCPv4 and SLAAC, matched by MAC. `incusos-hal render`
(the configure step's work: every networkd file) is listed too, since netplan's generator
writes the networkd files itself.

Boot path: what systemd runs before networkd starts, the generator and then the configure
unit's `incusos-hal configure --boot` (the unit's arguments, plus a scratch --target and
INCUSOS_HAL_ROOT for a built sysfs), against netplan's generator, which writes the same
networkd files. The NICs carry the `_p<mac>` names the .link files give them from the
second boot on; the target is a fresh tmpfs directory each run (at boot /run is an empty
tmpfs; these files live under it). Unchanged: config and NICs as the last boot saw them
(both caches hold). Changed: config.toml edited by hand since (both caches miss: the
generator's slow path, the configure step's full path, which writes the caches again).

Run alone with `--boot` (the generator and the boot path).

Inventory (`--inventory`, or all): `incusos-hal inventory` against `lshw -json` (the
whole machine) and its storage section against `lsblk -J -O`, beside the interpreter's
own start (`python3 -I [-S] -c pass`, the floor); then each CLI command's import time
(`--imports` alone).

Security (`--security`, or all), on one swtpm: seal + unseal of a secret under a PCR 7
policy through the HAL (in process, and in a fresh interpreter) against the tpm2-tools
pipeline (tpm2_createprimary, tpm2_create, tpm2_load, tpm2_unseal); the TCG event log
parsed and replayed, `incusos-hal eventlog --pcrs` against `tpm2_eventlog`.

API (`--api`, or all): `GET /1.0` and `GET /1.0/system/network` requests/s and p99 latency
from a bounded aiohttp client (16 in flight), over the unix socket and over mutual TLS,
against a bare aiohttp handler that returns the same bytes on the same transport (the
ceiling for any aiohttp service: what authentication, the envelope and reading the
state cost on top).

Starvation (`--starvation`, or all): an availability check rather than a speed one. The
service runs with an open-files limit of 1024 (systemd's default soft limit, which ~1,100
idle connections used to exhaust); 2,000 TCP connections that never start TLS are held,
then 2,000 unix connections from uid 65534; meanwhile authorised requests (root over the
unix socket, a trusted certificate over TLS) are timed, connect and handshake included.
Each must answer within 1 s (the issue's bound); the exit status says whether all did.

Update (`--update`, or all): one update check's network and trust work against the
commands a user would run: the signed index fetched from a loopback HTTPS server (a CA
made for the run, through TLS), its S/MIME signature verified, parsed, the latest
release for the channel picked and planned, and the OS file of the release downloaded
and its SHA-256 checked, in process (`update.providers.Images` + `index.plan` +
`fetch.download`, what the service runs), against `curl` + `openssl smime -verify` +
`curl` + `sha256sum`. Medians of BENCH_RUNS runs, and the ratio. Then how long an
application update keeps the application's API down (goal: <= 2 s), in the container rung
of tests/test_apps_system.py (Debian 13 booted by systemd-nspawn, the package installed):
ci/bench_apps_guest.py installs tests/guest_apps.py's application (a sysext whose unit
serves HTTP, answering its version) and updates it 5 times through `:check-update` while
a thread polls the application's endpoint every 10 ms; the downtime is from the old
version's last answer to the new version's first, as that client saw them. The updates
are spaced to stay under systemd's start rate limit for the unit (5 starts in 10 s).
Image (`--image` alone, not in all: four boots of the appliance image under TCG, tens of
minutes): seconds from qemu's start to the API answering over mutual TLS, first and later
boot, against the same image booted without the configure step (networkd on a static
default), as the issue's benchmark asks (goal: <= 1 s added to a later boot).
Storage (`--storage`, or all), in the ZFS VM guest (OpenZFS by DKMS, SeaBIOS) with NVMe,
SCSI and SATA disks and an encrypted mirror pool: `GET /1.0/system/storage` through the
unix socket against the commands IncusOS runs for the same answer (`lsblk -JMpdb`,
`smartctl -aj` per drive, `zpool status -jp --json-int`, `zfs get`/`zfs list` per pool).
Goal: ours in at most half their time.

VM rung (`--vm`, or all): time from starting qemu to the first command in the guest
(tests/vm.py), with KVM and with software emulation (TCG), same image and firmware; in
the guest, NVMe Identify Controller through the HAL (cffi, pure Python) against
`nvme id-ctrl -o json`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE / "tests"))
sys.path.insert(0, str(HERE / "src"))
from conftest import build_sysfs  # noqa: E402

VENV = Path(sys.prefix)
GENERATOR = VENV / "incusos-hal/systemd/system-generators/incusos-hal-generator"
# INCUSOS_HAL_BENCH_COMMAND: another install's `incusos-hal` (a branch's, in its own venv).
IHAL = Path(os.environ.get("INCUSOS_HAL_BENCH_COMMAND") or VENV / "bin/incusos-hal")
NETPLAN = Path("/usr/libexec/netplan/generate")
RUNS = int(os.environ.get("BENCH_RUNS", "40"))


def mac(i: int) -> str:
    return f"52:54:00:be:{i >> 8:02x}:{i & 0xFF:02x}"


def booted_name(i: int) -> str:
    """A NIC's name once the .link file the configure step wrote has named it."""
    return "_p" + mac(i).replace(":", "")


def toml_config(n: int, first_addresses: str = '["dhcp4", "slaac"]') -> str:
    toml = ["version = 1"]
    for i in range(n):
        toml += [
            "[[network.interfaces]]",
            f'name = "br{i}"',
            f'hwaddr = "{mac(i)}"',
            "addresses = " + (first_addresses if i == 0 else '["dhcp4", "slaac"]'),
            "",
        ]
    return "\n".join(toml)


def write_inputs(work: Path, n: int) -> None:
    yaml = ["network:", "  version: 2", "  renderer: networkd", "  ethernets:"]
    for i in range(n):
        yaml += [
            f"    eth{i}:",
            f'      match: {{macaddress: "{mac(i)}"}}',
            f"      set-name: p{i}",
            "      dhcp4: false",
        ]
    yaml.append("  bridges:")
    for i in range(n):
        yaml += [
            f"    br{i}:",
            f"      interfaces: [eth{i}]",
            "      dhcp4: true",
            "      accept-ra: true",
            f'      macaddress: "{mac(i)}"',
        ]
    netplan = work / "netplan/etc/netplan/50-bench.yaml"
    netplan.parent.mkdir(parents=True)
    netplan.write_text("\n".join(yaml) + "\n")
    netplan.chmod(0o600)

    config = work / "config.toml"
    config.write_text(toml_config(n))
    unit_dir = re.search(r'unit_dir="([^"]+)"', GENERATOR.read_text())
    assert unit_dir, GENERATOR
    for state, cached in (("state-cached", True), ("state-uncached", False)):
        subprocess.run(
            [
                str(IHAL),
                "save",
                "--config",
                str(config),
                "--state-dir",
                str(work / state),
                "--unit-dir",
                unit_dir.group(1),
            ],
            check=True,
            capture_output=True,
        )
        if not cached:
            (work / state / "generator.cache").unlink()
    build_sysfs(work / "sys", [{"name": f"eth{i}", "hwaddr": mac(i)} for i in range(n)])
    build_sysfs(work / "booted", [{"name": booted_name(i), "hwaddr": mac(i)} for i in range(n)])


def configure_command(work: Path, state: str, target: Path) -> str:
    """The configure unit's ExecStart= (units/incusos-hal-configure.service.in), re-rooted."""
    unit_dir = re.search(r'unit_dir="([^"]+)"', GENERATOR.read_text())
    assert unit_dir, GENERATOR
    return (
        f"env INCUSOS_HAL_ROOT={work}/booted INCUSOS_HAL_STATE_DIR={work}/{state} {IHAL} "
        f"configure --boot --unit-dir={unit_dir.group(1)} --target={target}"
    )


def write_boot_states(work: Path, scratch: Path, n: int) -> None:
    """state-cached after one boot (configure's full path ran: both caches hold); and
    state-edited: that, with config.toml then edited by hand (one bridge drops SLAAC)."""
    run = configure_command(work, "state-cached", scratch / "first")
    subprocess.run(run.split(), check=True, capture_output=True)
    assert (work / "state-cached/configure.cache").is_file(), "the full path wrote no cache"
    shutil.copytree(work / "state-cached", work / "state-edited-template", symlinks=True)
    edited = work / "state-edited-template/config.toml"
    edited.write_text(toml_config(n, '["dhcp4"]'))


def tmpfs_dir() -> str:
    """A tmpfs to write the configure step's target in, as /run is at boot."""
    for candidate in ("/dev/shm", "/run"):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    raise SystemExit("ci/bench: no writable tmpfs (/dev/shm or /run) for the boot path")


def hyperfine(
    work: Path, commands: dict[str, tuple[str, str]]
) -> dict[str, tuple[float, float, float]]:
    """name -> (command, prepare); returns name -> (median ms, stddev ms, CPU ms).

    Medians: on a shared VM a burst of noise moves a mean more than a median. CPU time
    (user + system) is what the process itself spent, less sensitive to the neighbours."""
    out = work / "hyperfine.json"
    args = ["hyperfine", "-N", "--warmup", "5", "--runs", str(RUNS), "--export-json", str(out)]
    for _, (_, prepare) in commands.items():
        args += ["--prepare", prepare]
    args += [cmd for cmd, _ in commands.values()]
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"ci/bench: hyperfine failed:\n{proc.stderr[-3000:]}")
    results = json.loads(out.read_text())["results"]
    return {
        name: (r["median"] * 1000, r["stddev"] * 1000, (r["user"] + r["system"]) * 1000)
        for name, r in zip(commands, results, strict=True)
    }


def vm_rung() -> None:
    """Time to first guest command, KVM against TCG (a KVM that cannot run the guest is
    reported with the error it gave); and, in the guest, NVMe identify through the HAL
    against nvme-cli."""
    import json as _json

    import vm

    print("\nVM rung: qemu start to the first command in the guest (Debian 13, SeaBIOS)")
    with tempfile.TemporaryDirectory(prefix="ihal-bench-vm-", dir="/var/tmp") as tmp:
        guest = vm.build(Path(tmp), lambda root: None)
        guest.nvme = vm.DEFAULT_NVME
        shutil.copy(HERE / "ci/bench_guest.py", guest.probe_dir / "bench_guest.py")
        command = {"command": {"argv": ["python3", "/probe/bench_guest.py"]}}
        nvme_result = None
        for accelerator, limit in (("kvm", 120), ("tcg", 900)):
            guest.accelerator = accelerator
            try:
                result = guest.boot(["command"], command, timeout=limit)
            except AssertionError as e:
                console = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", str(e))  # terminal codes
                why = next(
                    (line.strip() for line in console.splitlines() if "KVM" in line),
                    f"no result within {limit}s",
                )
                print(f"  {accelerator}: did not boot: {why}")
                continue
            print(
                f"  {accelerator}: {result.first_command or float('nan'):6.1f} s to first command,"
                f" {result.seconds:6.1f} s to power-off"
            )
            ran = result.result["command"]
            if ran.get("rc") == 0 and nvme_result is None:
                nvme_result = _json.loads(ran["out"].strip().splitlines()[-1])
            elif ran.get("rc") != 0:
                print(f"  guest benchmark failed: {ran.get('err', '')[-500:]}")
    if nvme_result:
        tool = nvme_result["nvme-cli"]
        print("\nNVMe Identify Controller in the guest (software-emulated CPU), per call")
        for name in ("cffi", "python"):
            speedup = tool / nvme_result[name]
            print(f"  {name:10} {nvme_result[name] * 1e6:10.1f} us   {speedup:7.1f}x faster")
        print(f"  {'nvme-cli':10} {tool * 1e6:10.1f} us   (the reference)")


def storage_vs_tools() -> None:
    """GET /1.0/system/storage against IncusOS's commands, in the ZFS guest (one boot)."""
    import vm

    print("\nStorage in the ZFS guest (software-emulated CPU), per answer")
    with tempfile.TemporaryDirectory(prefix="ihal-bench-zfs-", dir="/var/tmp") as tmp:
        guest = vm.build(Path(tmp), vm.no_network, size="4G", zfs=True)
        guest.nvme = vm.DEFAULT_NVME
        guest.disks = [
            *(vm.Disk(f"bench{i}", 256) for i in range(1, 4)),
            vm.Disk("benchsata", 256, "sata"),
        ]
        shutil.copy(HERE / "ci/bench_storage_guest.py", guest.probe_dir / "bench_storage.py")
        command = {"command": {"argv": ["python3", "/probe/bench_storage.py", "10"]}}
        result = guest.boot(["command"], command, timeout=1800)
    ran = result.result["command"]
    if ran.get("rc") != 0:
        print(f"  guest benchmark failed: {(ran.get('err', '') + ran.get('out', ''))[-800:]}")
        return
    got = json.loads(ran["out"].strip().splitlines()[-1])
    if got["get_status"] != 200 or got["api_pools"] != got["pools"]:
        print(
            f"  GET /1.0/system/storage answered {got['get_status']} with {got['api_pools']}"
            f" pools ({got['pools']} in zpool status): no like-for-like comparison"
        )
    ratio = got["api"] / got["reference"]
    print(f"  {'incusos-hal GET':24} {got['api'] * 1e3:9.1f} ms")
    print(
        f"  {'IncusOS commands':24} {got['reference'] * 1e3:9.1f} ms"
        f"   ({got['drives']} drives, {got['pools']} pools)"
    )
    print(f"  ratio {ratio:.2f}x their time  {_goal_at_most(ratio, 0.5)}")
    # SMART from smartctl is reused for a minute (hal/smart.py): the GETs above after the
    # first reuse it; this is the first GET of a minute, every drive asked afresh.
    if got.get("cold", -1) > 0:
        cold = got["cold"] / got["reference"]
        print(
            f"  {'same, smartctl afresh':24} {got['cold'] * 1e3:9.1f} ms"
            f"   ({cold:.2f}x; in the service's interpreter, no HTTP)"
        )
    else:
        print("  the state with smartctl afresh could not be timed in the guest")
    profile = ran.get("err", "").strip()
    if profile:
        print("  where one GET's time goes (cProfile in the guest, smartctl's answers reused):")
        for line in profile.splitlines()[-40:]:
            print(f"    {line[:150]}")


def inventory_vs_tools() -> None:
    """The whole inventory against lshw, the storage section against lsblk, beside the
    interpreter's own start, in one hyperfine run; then the scan in process."""
    print("\nInventory on this machine, hyperfine median of runs; ratio to the reference")
    python = _script_python()
    with tempfile.TemporaryDirectory(prefix="ihal-bench-inv-") as tmp:
        times = hyperfine(
            Path(tmp),
            {
                "full": (f"{IHAL} inventory --format json", "true"),
                "lshw": ("lshw -json -quiet", "true"),
                "storage": (f"{IHAL} inventory --format json storage", "true"),
                "lsblk": ("lsblk -J -O", "true"),
                "python -I": (f"{python} -I -c pass", "true"),
                "python -IS": (f"{python} -IS -c pass", "true"),
            },
        )
    for title, ours, ref, goal in (
        ("full inventory", "full", "lshw", 0.5),
        ("storage section", "storage", "lsblk", 3.0),
    ):
        (m_ours, _, c_ours), (m_ref, _, c_ref) = times[ours], times[ref]
        print(
            f"  {title:16} incusos-hal {m_ours:7.1f} ms   {ref:6} {m_ref:7.1f} ms"
            f"   ratio {m_ours / m_ref:5.2f}x wall, {c_ours / c_ref:5.2f}x CPU"
            f"  {_goal_at_most(m_ours / m_ref, goal)}"
        )
    for name in ("python -I", "python -IS"):
        median, _, cpu = times[name]
        lshw, lsblk = median / times["lshw"][0], median / times["lsblk"][0]
        print(
            f"  floor: {name:8} -c pass {median:7.1f} ms   ratio to lshw {lshw:5.2f}x,"
            f" to lsblk {lsblk:5.2f}x   (CPU {cpu:5.1f} ms)"
        )
    from incusos_hal import inventory

    # A library user (the API service, a migration tool) pays no interpreter start.
    for title, sections, reference, goal in (
        ("full inventory", (), "lshw", 0.1),
        ("storage section", ("storage",), "lsblk", None),
    ):
        inventory.scan("/", sections)  # warm: imports and the .ids text
        calls = []
        for _ in range(max(RUNS, 20)):
            started = time.perf_counter()
            inventory.scan("/", sections)
            calls.append((time.perf_counter() - started) * 1000)
        ms = statistics.median(calls)
        ref = times[reference][0]
        note = f"  {_goal_at_most(ms / ref, goal)}" if goal is not None else ""
        print(
            f"  in-process {title:16} {ms:7.1f} ms   ratio {ms / ref:5.2f}x {reference}"
            f" (median of {len(calls)} calls){note}"
        )


def _goal_at_most(ratio: float, goal: float) -> str:
    """The issue's goal for a ratio (at most `goal` x the reference), and whether it is met."""
    return f"(goal <= {goal:g}x: {'met' if ratio <= goal else 'NOT met'})"


def _script_python() -> str:
    """The interpreter the installed command's #! line names (with its flags)."""
    first = IHAL.read_text().split("\n", 1)[0]
    return first[2:].strip() if first.startswith("#!") else sys.executable


# Each command as a user or a boot script runs it; {work}, {config}, {log} and {fixture}
# are filled in. `serve` is not among them: it does not exit.
COMMANDS = (
    ("validate", "validate --config {config}"),
    ("render", "render --config {config} --out {work}/render"),
    ("save", "save --config {config} --state-dir {work}/state"),
    ("configure --boot", "configure --boot --state-dir {work}/state --target {work}/target"),
    ("inventory", "inventory --format json"),
    ("inventory storage", "inventory --format json storage"),
    ("survey", "survey"),
    ("eventlog", "eventlog {log}"),
    ("eventlog --pcrs", "eventlog --pcrs {log}"),
    ("security", "security --root {fixture} --tcti swtpm:host=127.0.0.1,port=1"),
    ("remote list", "remote list"),
    ("get (no server)", "get /1.0 --remote nowhere"),
)


def import_times() -> None:
    """Each command's imports beyond the interpreter's (`-X importtime`: the sum of the
    self times of the modules `python -c pass` does not load), median of runs, with the
    heaviest top-level imports."""
    runs = max(3, min(RUNS, 7))
    print(f"\nCLI import time, beyond the interpreter's own; median of {runs} runs")
    python = _script_python().split()[0]
    env_base = dict(os.environ)
    env_base.pop("PYTHONDONTWRITEBYTECODE", None)

    def trace(args: list[str], env: dict[str, str]) -> dict[str, tuple[int, int, int]]:
        err = subprocess.run(
            [python, "-X", "importtime", *args], capture_output=True, text=True, env=env
        ).stderr
        rows = re.findall(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)$", err, re.M)
        return {name: (int(own), int(cum), len(indent)) for own, cum, indent, name in rows}

    baseline = set(trace(["-c", "pass"], env_base))
    with tempfile.TemporaryDirectory(prefix="ihal-bench-imports-") as tmp:
        work = Path(tmp)
        (work / "target").mkdir()
        config = work / "config.toml"
        config.write_text(
            'version = 1\n[[network.interfaces]]\nname = "br0"\n'
            'hwaddr = "52:54:00:be:00:01"\naddresses = ["dhcp4", "slaac"]\n'
        )
        fill = {
            "work": str(work),
            "config": str(config),
            "log": str(HERE / "tests/fixtures/eventlogs/crypto_agile_eventlog"),
            "fixture": str(HERE / "tests/fixtures/ci-host"),
        }
        env = dict(env_base, XDG_CONFIG_HOME=str(work / "xdg"))
        subprocess.run(
            [str(IHAL), "save", "--config", str(config), "--state-dir", str(work / "state")],
            check=True,
            capture_output=True,
            env=env,
        )
        for label, command in COMMANDS:
            argv = command.format(**fill).split()
            totals, heaviest = [], {}
            for _ in range(runs):
                rows = trace([str(IHAL), *argv], env)
                extra = {n: r for n, r in rows.items() if n not in baseline}
                totals.append(sum(own for own, _, _ in extra.values()) / 1000)
                for name, (_, cum, indent) in extra.items():
                    if indent == 0:
                        heaviest.setdefault(name, []).append(cum / 1000)
            top = sorted(heaviest.items(), key=lambda kv: -statistics.median(kv[1]))[:4]
            named = ", ".join(f"{n} {statistics.median(v):.1f}" for n, v in top)
            print(f"  {label:18} {statistics.median(totals):6.1f} ms   heaviest: {named}")


# Without a resource manager (swtpm over TCP, as here) each tool leaves the objects it
# loaded in the TPM, which has three slots: a user flushes them after every step (what
# tpm2-abrmd or the kernel's /dev/tpmrm0 would do for them).
TOOLS_SEAL = """set -e
cd "$1"
tpm2_createprimary -Q -C o -G ecc -c primary.ctx
tpm2_flushcontext -t
tpm2_create -Q -C primary.ctx -L policy.bin -i secret -u sealed.pub -r sealed.priv
tpm2_flushcontext -t
tpm2_load -Q -C primary.ctx -u sealed.pub -r sealed.priv -c sealed.ctx
tpm2_flushcontext -t
tpm2_unseal -c sealed.ctx -p pcr:sha256:7 > unsealed
tpm2_flushcontext -t
tpm2_flushcontext -s
cmp -s secret unsealed
"""


def _goal(ratio: float, goal: float) -> str:
    """The issue's goal for a ratio (x faster than the reference), and whether it is met."""
    return f"(goal >= {goal:g}x: {'met' if ratio >= goal else 'NOT met'})"


def security_vs_tools() -> None:
    from incusos_hal.hal import eventlog, tpm

    from conftest import _free_port

    for tool in ("swtpm", "tpm2_createprimary", "tpm2_eventlog"):
        if shutil.which(tool) is None:
            raise SystemExit(f"ci/bench: {tool} is missing; run ci/setup as root")
    with tempfile.TemporaryDirectory(prefix="ihal-bench-tpm-") as tmp:
        work = Path(tmp)
        port = _free_port()
        swtpm = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={work}",
                "--flags",
                "startup-clear",
            ],
        )
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        env = dict(os.environ, TPM2TOOLS_TCTI=tcti)
        try:
            time.sleep(0.5)
            (work / "secret").write_bytes(os.urandom(32))
            subprocess.run(
                [
                    "tpm2_createpolicy",
                    "-Q",
                    "--policy-pcr",
                    "-l",
                    "sha256:7",
                    "-L",
                    str(work / "policy.bin"),
                ],
                env=env,
                check=True,
            )
            (work / "seal.sh").write_text(TOOLS_SEAL)
            secret = (work / "secret").read_bytes()
            n = 30
            with tpm.open_tpm(tcti) as t:
                policy = t.current_policy("sha256", [7])
                t.unseal_sealed(t.seal(secret, policy))  # warm: the SRK exists
                started = time.perf_counter()
                for _ in range(n):
                    assert t.unseal_sealed(t.seal(secret, policy)) == secret
                ours = (time.perf_counter() - started) / n * 1000
            fresh = (
                f'{sys.executable} -c "from incusos_hal.hal import tpm\n'
                f"with tpm.open_tpm('{tcti}') as t:\n"
                f"    p = t.current_policy('sha256', [7])\n"
                f"    t.unseal_sealed(t.seal(b'x' * 32, p))\""
            )
            times = hyperfine(
                work,
                {
                    "tools": (f"env TPM2TOOLS_TCTI={tcti} bash {work}/seal.sh {work}", "true"),
                    "fresh": (fresh, "true"),
                    # The floors a fresh interpreter stands on: starting, and loading the TSS.
                    "python": (f"{sys.executable} -I -c pass", "true"),
                    "tss": (f"{sys.executable} -I -c 'import tpm2_pytss'", "true"),
                },
            )
        finally:
            swtpm.terminate()
            swtpm.wait()
    tools_ms, fresh_ms = times["tools"][0], times["fresh"][0]
    print("\nTPM seal + unseal under a PCR 7 policy, swtpm over TCP; ratio to tpm2-tools")
    print(f"  {'tpm2-tools pipeline (4 commands)':40} {tools_ms:8.1f} ms   (the reference)")
    print(
        f"  {'HAL, in process':40} {ours:8.2f} ms   {tools_ms / ours:6.1f}x faster "
        f"{_goal(tools_ms / ours, 30)}"
    )
    print(
        f"  {'HAL, fresh interpreter per seal':40} {fresh_ms:8.1f} ms   "
        f"{tools_ms / fresh_ms:6.1f}x faster {_goal(tools_ms / fresh_ms, 1.5)}"
    )
    for name, title in (
        ("python", "floor: python3 -I -c pass"),
        ("tss", "floor: + import tpm2_pytss"),
    ):
        print(f"  {title:40} {times[name][0]:8.1f} ms   {tools_ms / times[name][0]:6.1f}x")

    print("\nEvent log parse + replay of every bank; ratio to tpm2_eventlog")
    logs = [
        HERE / "tests/fixtures/security/secureboot/binary_bios_measurements",
        HERE / "tests/fixtures/eventlogs/ubuntu_2104_shielded_vm_no_secure_boot_eventlog",
    ]
    with tempfile.TemporaryDirectory(prefix="ihal-bench-log-") as tmp:
        for log in logs:
            raw = log.read_bytes()
            started = time.perf_counter()
            for _ in range(200):
                parsed = eventlog.parse(raw)
                for bank in parsed.banks:
                    eventlog.replay(parsed, bank)
            in_process = (time.perf_counter() - started) / 200 * 1000
            times = hyperfine(
                Path(tmp),
                {
                    "tool": (f"tpm2_eventlog {log}", "true"),
                    "cli": (f"{IHAL} eventlog --pcrs {log}", "true"),
                    "python": (f"{sys.executable} -I -c pass", "true"),
                    "python -S": (f"{sys.executable} -I -S -c pass", "true"),
                },
            )
            tool_ms, cli_ms = times["tool"][0], times["cli"][0]
            print(f"  {log.name[:40]:40} ({len(raw) // 1024} KiB)")
            print(f"    {'tpm2_eventlog':36} {tool_ms:8.2f} ms   (the reference)")
            print(
                f"    {'incusos-hal eventlog --pcrs':36} {cli_ms:8.2f} ms   "
                f"{tool_ms / cli_ms:6.2f}x faster {_goal(tool_ms / cli_ms, 1.0)}"
            )
            for name in ("python", "python -S"):
                title = f"floor: python3 -I{' -S' if name.endswith('S') else ''} -c pass"
                print(f"    {title:36} {times[name][0]:8.2f} ms   {tool_ms / times[name][0]:6.2f}x")
            print(
                f"    {'HAL in process':36} {in_process:8.2f} ms   "
                f"{tool_ms / in_process:6.1f}x faster"
            )


BARE_SERVER = """
import asyncio, json, ssl, sys
from aiohttp import web
bodies = json.loads(open(sys.argv[1]).read())
async def main():
    app = web.Application()
    for path, body in bodies.items():
        data = body.encode()
        async def handler(request, data=data):
            return web.Response(body=data, content_type="application/json")
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, sys.argv[2]).start()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=sys.argv[6])
    await web.TCPSite(runner, "127.0.0.1", int(sys.argv[3]), ssl_context=ctx).start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _load(url: str, connector_factory: Any, requests_: int, in_flight: int) -> tuple[float, float]:
    """(requests/s, p99 ms) for `requests_` GETs of `url`, `in_flight` at a time."""
    import asyncio

    import aiohttp

    async def run() -> tuple[float, float]:
        latencies: list[float] = []
        async with aiohttp.ClientSession(connector=connector_factory()) as session:
            for _ in range(50):  # warm: connections open, caches filled
                async with session.get(url) as r:
                    await r.read()
            queue = iter(range(requests_))

            async def worker() -> None:
                for _ in queue:
                    t0 = time.perf_counter()
                    async with session.get(url) as r:
                        await r.read()
                        assert r.status == 200, r.status
                    latencies.append(time.perf_counter() - t0)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            elapsed = time.perf_counter() - started
        latencies.sort()
        return requests_ / elapsed, latencies[int(len(latencies) * 0.99)] * 1000

    return asyncio.run(run())


def api_vs_bare() -> None:
    import ssl

    import aiohttp

    import apiserver

    n = int(os.environ.get("BENCH_API_REQUESTS", "3000"))
    with tempfile.TemporaryDirectory(prefix="ihal-bench-api-") as tmp:
        work = Path(tmp)
        cert, key = apiserver.openssl_client_cert(work, "client")
        (work / "srv").mkdir()
        ours = apiserver.make(work / "srv", [cert])
        ours.start()
        bare_proc = None
        try:
            paths = ["/1.0", "/1.0/system/network"]
            bodies = {p: ours.curl("GET", p).body.decode() for p in paths}
            (work / "bodies.json").write_text(json.dumps(bodies))
            bare_sock, bare_port = work / "bare.sock", apiserver.free_port()
            bare_proc = subprocess.Popen(
                [sys.executable, "-c", BARE_SERVER, str(work / "bodies.json"), str(bare_sock),
                 str(bare_port), str(ours.state / "server.crt"), str(ours.state / "server.key"),
                 str(cert)],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            assert bare_proc.stdout is not None and bare_proc.stdout.readline().startswith(b"ready")

            def tls() -> aiohttp.TCPConnector:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.load_cert_chain(cert, key)
                return aiohttp.TCPConnector(ssl=ctx, limit=16)

            print(
                f"\nAPI: requests/s and p99 over {n} GETs, 16 in flight; ratio to a bare aiohttp "
                "handler returning the same bytes on the same transport"
            )

            def unix(path: Path) -> Any:
                return lambda: aiohttp.UnixConnector(path=str(path), limit=16)

            targets = {
                "unix": (("http://ihal", unix(ours.socket)), ("http://ihal", unix(bare_sock))),
                "mTLS": (
                    (f"https://127.0.0.1:{ours.port}", tls),
                    (f"https://127.0.0.1:{bare_port}", tls),
                ),
            }
            for transport, ((ours_url, ours_conn), (bare_url, bare_conn)) in targets.items():
                for path in paths:
                    r_ours, p_ours = _load(ours_url + path, ours_conn, n, 16)
                    r_bare, p_bare = _load(bare_url + path, bare_conn, n, 16)
                    print(
                        f"  {transport:5} GET {path:22} incusos-hal {r_ours:7.0f}/s "
                        f"p99 {p_ours:6.1f} ms | bare {r_bare:7.0f}/s p99 {p_bare:6.1f} ms"
                        f" | {r_ours / r_bare:4.2f}x of bare"
                    )
        finally:
            ours.stop()
            if bare_proc is not None:
                bare_proc.terminate()
                bare_proc.wait()


def starvation_check() -> bool:
    """True if every authorised request answered within the bound while idle peers that
    never authenticate were held."""
    import apiserver
    import starvation

    peers, bound, nofile, rounds = 2000, 1.0, 1024, 10
    starvation.raise_nofile(peers + 1000)
    ok = True
    with tempfile.TemporaryDirectory(prefix="ihal-bench-starve-") as tmp:
        work = Path(tmp)
        cert, key = apiserver.openssl_client_cert(work, "client")
        (work / "srv").mkdir()
        srv = apiserver.make(work / "srv", [cert])
        srv.nofile = (nofile, nofile)
        srv.start()
        try:
            assert srv.process is not None
            # The file mode loosened, as an admin might: uid 65534 reaches the peer check.
            os.chmod(srv.socket, 0o666)  # noqa: S103
            ctx = starvation.tls_client(cert, key, srv.state / "server.crt")

            def measure(label: str) -> None:
                nonlocal ok
                assert srv.process is not None
                for transport, call in (
                    ("unix", lambda: starvation.timed_unix(srv.socket)),
                    ("mTLS", lambda: starvation.timed_tls(srv.port, ctx)),
                ):
                    results = [call() for _ in range(rounds)]
                    times = sorted(t for _, t in results)
                    good = all(s == 200 for s, _ in results) and times[-1] < bound
                    ok &= good
                    median, worst = times[len(times) // 2] * 1000, times[-1] * 1000
                    verdict = "ok" if good else f"OVER {bound:g} s"
                    fds = starvation.open_fds(srv.process.pid)
                    print(
                        f"  {label:30} {transport:5} median {median:7.1f} ms  max {worst:7.1f} ms"
                        f"  {verdict}  (server fds {fds})"
                    )

            print(
                f"\nStarvation: authorised requests while idle unauthenticated peers are held "
                f"(server RLIMIT_NOFILE {nofile}; {rounds} requests each, connect included)"
            )
            measure("nothing held")
            with starvation.idle_tcp(srv.port, peers) as held_tcp:
                measure(f"{len(held_tcp)} idle TCP, no TLS started")
            with starvation.idle_unix_as(65534, srv.socket, peers) as opened:
                measure(f"{opened} idle unix, uid 65534")
        finally:
            srv.stop()
        floods = [line for line in srv.log if "Too many open files" in line]
        if floods:
            ok = False
            print(f"  the service logged 'Too many open files' {len(floods)} times")
    return ok


def boot_vs_netplan() -> None:
    """The generator, the configure step and the boot path (both) against netplan's."""
    for tool in (NETPLAN, GENERATOR, IHAL):
        if not tool.exists():
            raise SystemExit(f"ci/bench: {tool} is missing; run ci/setup as root")
    print(f"Generator wall time, hyperfine median +/- sd of {RUNS} runs; ratio to netplan's")
    for n in (4, 64):
        with tempfile.TemporaryDirectory(prefix="ihal-bench-") as tmp:
            work = Path(tmp)
            write_inputs(work, n)
            # At boot the configure step writes to /run, a tmpfs: so does it here.
            scratch = Path(tempfile.mkdtemp(prefix="ihal-bench-run-", dir=tmpfs_dir()))
            g = f"{work}/g"
            edited = f"{work}/state-edited"
            commands = {
                "netplan generate (C)": (
                    f"env {NETPLAN} --root-dir {work}/netplan",
                    f"rm -rf {work}/netplan/run",
                ),
                # The floor any Python generator stands on: the interpreter starting.
                "python3 -IS -c pass (interpreter alone)": (
                    f"env {sys.executable} -IS -c pass",
                    "true",
                ),
                "incusos-hal-generator, cached": (
                    f"env INCUSOS_HAL_STATE_DIR={work}/state-cached {GENERATOR} {g}/n {g}/e {g}/l",
                    f"rm -rf {g}",
                ),
                "incusos-hal-generator, uncached": (
                    f"env INCUSOS_HAL_STATE_DIR={work}/state-uncached {GENERATOR} "
                    f"{g}/n {g}/e {g}/l",
                    f"rm -rf {g}",
                ),
                "incusos-hal render (all networkd files)": (
                    f"env INCUSOS_HAL_ROOT={work}/sys {IHAL} render --config {work}/config.toml "
                    f"--out {work}/r",
                    f"rm -rf {work}/r",
                ),
                "configure --boot, unchanged (cached)": (
                    configure_command(work, "state-cached", scratch / "t"),
                    f"rm -rf {scratch}/t",
                ),
                "generator, config edited (slow path)": (
                    f"env INCUSOS_HAL_STATE_DIR={edited} {GENERATOR} {g}/n {g}/e {g}/l",
                    f"sh -c 'rm -rf {g} {edited} && cp -a {work}/state-edited-template {edited}'",
                ),
                "configure --boot, config edited (full)": (
                    configure_command(work, "state-edited", scratch / "t"),
                    f"sh -c 'rm -rf {scratch}/t {edited} && "
                    f"cp -a {work}/state-edited-template {edited}'",
                ),
            }
            try:
                write_boot_states(work, scratch, n)
                times = hyperfine(work, commands)
            finally:
                shutil.rmtree(scratch)
        base, _, base_cpu = times["netplan generate (C)"]
        print(f"\n{n} NICs{'':37} wall (median +/- sd)   ratio    CPU (user+sys)   ratio")
        for name, (median, sd, cpu) in times.items():
            print(
                f"  {name:42} {median:7.1f} +/- {sd:4.1f} ms  {median / base:5.2f}x"
                f"   {cpu:7.1f} ms  {cpu / base_cpu:5.2f}x"
            )
        for title, generator, configure, goal in (
            (
                "unchanged",
                "incusos-hal-generator, cached",
                "configure --boot, unchanged (cached)",
                1,
            ),
            (
                "config edited",
                "generator, config edited (slow path)",
                "configure --boot, config edited (full)",
                3,
            ),
        ):
            wall = times[generator][0] + times[configure][0]
            cpu = times[generator][2] + times[configure][2]
            verdict = "met" if wall / base <= goal else "NOT met"
            print(
                f"  boot path, {n} NICs, {title + ':':15} generator + configure {wall:7.1f} ms, "
                f"netplan {base:6.1f} ms: {wall / base:5.2f}x wall (goal <= {goal}x: {verdict}),"
                f" {cpu / base_cpu:5.2f}x CPU"
            )


def update_vs_tools() -> None:
    import datetime
    import hashlib

    from incusos_hal.config.model import Provider
    from incusos_hal.update import fetch, index, providers
    from updateserver import UpdateServer, make_pki, os_files, release

    runs = max(5, RUNS // 2)
    with tempfile.TemporaryDirectory(prefix="ihal-bench-update-") as tmp:
        work = Path(tmp)
        (work / "pki").mkdir()
        pki = make_pki(work / "pki")
        server = UpdateServer(pki)
        try:
            releases = []
            for i in range(50):
                version = str(300 - i)
                files = os_files(version) if i == 0 else {f"f{version}": b"x"}
                if i == 0:  # an incompressible 16 MB /usr image, as a real one is
                    usr_name = next(n for n in files if "usr-x86-64.raw" in n)
                    files[usr_name] = os.urandom(16 << 20)
                rel = release(version, ["stable"], files)
                if i:
                    rel["files"][0]["type"] = "update-usr"
                releases.append((rel, files))
            server.publish(pki, releases)
            usr = next(f for f in releases[0][0]["files"] if f["type"] == "update-usr")
            transport = fetch.Transport(extra_cas=(pki.ca,), use_system_store=False)
            inputs = providers.Inputs(
                config=Provider("images", {"server_url": server.url, "update_ca": pki.ca}),
                transport=transport,
                cache_dir=work / "cache",
                now=lambda: datetime.datetime.now(datetime.UTC),
            )

            def ours() -> None:
                source = providers.Images(inputs)
                latest = source.latest("stable", "x86_64", "100", fresh=True)
                made = index.plan(latest, os_version="100", os_only=True)
                file = next(f for f in made.steps[0].files if f.type == "update-usr")
                dest = work / "ours.bin"
                dest.unlink(missing_ok=True)
                assert latest is not None
                source.fetch(latest, file, dest, None)

            ca = work / "pki/ca.pem"
            url = f"{server.url}/300/{usr['filename']}"
            script = (
                f"curl -sf --cacert {ca} {server.url}/index.sjson | openssl smime -verify "
                f"-CAfile {ca} -no-CApath -no-CAstore -binary >/dev/null 2>&1 && "
                f"curl -sf --cacert {ca} -o {work}/tools.bin {url} && "
                f"echo '{usr['sha256']}  {work}/tools.bin' | sha256sum -c --quiet -"
            )

            def tools() -> None:
                subprocess.run(["bash", "-c", script], check=True)

            timings: dict[str, list[float]] = {"ours": [], "tools": []}
            for _ in range(runs):
                for name, run in (("ours", ours), ("tools", tools)):
                    started = time.perf_counter()
                    run()
                    timings[name].append((time.perf_counter() - started) * 1000)
            digest = hashlib.sha256((work / "ours.bin").read_bytes()).hexdigest()
            assert digest == usr["sha256"]
        finally:
            server.close()
    ours_ms, tools_ms = (statistics.median(timings[k]) for k in ("ours", "tools"))
    size = usr["size"] / 1e6
    print(f"update check: index of 50 releases, OS file of {size:.1f} MB, {runs} runs (median)")
    print(f"  incusos-hal (fetch, verify, parse, plan, download, sha256): {ours_ms:8.1f} ms")
    print(f"  curl + openssl smime -verify + curl + sha256sum:           {tools_ms:8.1f} ms")
    print(f"  ratio (ours / tools): {ours_ms / tools_ms:.2f}")
    app_update_downtime()


def app_update_downtime(updates: int = 5, goal: float = 2.0) -> None:
    """An application updated `updates` times in the container rung, its endpoint polled
    from inside the container meanwhile (ci/bench_apps_guest.py): seconds from the old
    version's last answer to the new one's first, median and max; the goal holds for
    every update (the max)."""
    from test_apps_system import boot

    import nspawn

    with tempfile.TemporaryDirectory(prefix="ihal-bench-apps-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        root = nspawn.rootfs("container-apps", nspawn.APPS_PACKAGES)
        package = nspawn.install_layer(root, work / "package")
        probe_dir = work / "probe"
        with nspawn.overlay([package, root], work / "machine") as merged:
            guest = (HERE / "ci/bench_apps_guest.py").read_text()
            nspawn.install_probe(merged, nspawn.PROBE_UNIT, probe_dir, guest)
            shutil.copy(HERE / "tests/guest_apps.py", probe_dir / "guest_apps.py")
            (probe_dir / "updates").write_text(f"{updates}\n")
            code, console = boot(merged, probe_dir, f"ihal-bench-{os.getpid()}")
        result = probe_dir / "result.json"
        got = json.loads(result.read_text()) if result.exists() else None
    if got is None or "error" in got:
        why = got["error"] if got else f"no result (nspawn exit {code}): {console[-1500:]}"
        print(f"application update: could not be measured: {why[-1500:]}")
        if got and got.get("journal"):
            print(f"  journal: {got['journal'][-1500:]}")
        return
    verdict = "met" if got["max_s"] <= goal else "NOT met"
    print(
        f"application update: API down median {got['median_s']:.2f} s, max {got['max_s']:.2f} s"
        f" over {got['updates']} updates (goal <= {goal:g} s: {verdict})"
    )
    print(
        f"  (container, endpoint polled every {got['interval_s'] * 1e3:g} ms from inside:"
        f" old version's last answer to the new one's first; each {_seconds(got['down_s'])};"
        f" :check-update answered in {_seconds(got['call_s'])}; updates at least"
        f" {got['spacing_s']:.1f} s apart, under the unit's start rate limit)"
    )
    if max(got["longest_silence_s"]) > got["max_s"] + 1e-9 or any(got["old_after_new"]):
        print(
            f"  longest silence {_seconds(got['longest_silence_s'])},"
            f" old version answering after the new {got['old_after_new']}"
        )


def _seconds(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


def image_boots() -> None:
    """The appliance image under qemu (TCG here), OVMF Secure Boot and swtpm: seconds from
    qemu's start to GET /1.0 answering over mutual TLS, first boot (repart, encryption,
    the recovery key) and a later boot, with the OS layer and without it (the configure
    step skipped, networkd on a static DHCP default: tests/image.py WITHOUT_OS_LAYER)."""
    import image
    from apiserver import free_port, openssl_client_cert

    built = image.build()
    results: dict[str, list[float | None]] = {}
    for name, extra in (("with the OS layer", {}), ("without it", image.WITHOUT_OS_LAYER)):
        work = Path(tempfile.mkdtemp(prefix="ihal-bench-image-", dir="/var/tmp"))
        try:
            cert, key = openssl_client_cert(work, "bench")
            config = (
                '[listener]\nlisten_address = "[::]:8443"\n'
                f"trusted_client_certificates = [{json.dumps(cert.read_text())}]\n"
            )
            port = free_port()
            machine = image.Machine(
                work,
                built,
                api_port=port,
                credentials={"incusos-hal.config.toml": config, **extra},
            )
            ctx = image.api_client(cert, key)
            times: list[float | None] = []
            for boot in ("first", "later"):
                with machine.running(work / f"console-{boot}.log") as proc:
                    seconds = image.wait_for_api(port, ctx, proc, time.monotonic(), 1800)
                    times.append(seconds)
                    if seconds is not None:
                        image.power_off(port, ctx, proc)
            results[name] = times
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("image boots (TCG), qemu start to GET /1.0 over mutual TLS:")
    for name, (first, later) in results.items():
        shown = [f"{t:6.1f} s" if t is not None else "  never" for t in (first, later)]
        print(f"  {name:18} first boot {shown[0]}, later boot {shown[1]}")
    mine, bare = results["with the OS layer"][1], results["without it"][1]
    if mine is not None and bare is not None:
        verdict = "met" if mine - bare <= 1.0 else "NOT met"
        print(f"  the OS layer adds {mine - bare:+.1f} s to a later boot (goal <= 1 s: {verdict})")


def main() -> None:
    only = sys.argv[1:]
    if only == ["--update"]:
        update_vs_tools()
        return
    if only == ["--image"]:
        image_boots()
        return
    if only == ["--api"]:
        api_vs_bare()
        return
    if only == ["--security"]:
        security_vs_tools()
        return
    if only == ["--storage"]:
        storage_vs_tools()
        return
    if only == ["--vm"]:
        vm_rung()
        return
    if only == ["--starvation"]:
        if not starvation_check():
            raise SystemExit(1)
        return
    if only == ["--inventory"]:
        inventory_vs_tools()
        import_times()
        return
    if only == ["--imports"]:
        import_times()
        return
    if only == ["--boot"]:
        boot_vs_netplan()
        return
    boot_vs_netplan()
    inventory_vs_tools()
    import_times()
    security_vs_tools()
    api_vs_bare()
    update_vs_tools()
    starved = not starvation_check()
    vm_rung()
    storage_vs_tools()
    if starved:
        raise SystemExit("ci/bench: an authorised request took over 1 s while peers were held")


if __name__ == "__main__":
    main()
