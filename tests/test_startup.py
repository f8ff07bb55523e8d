"""The start-up budget of the commands people and boot scripts run: what each imports
beyond the interpreter's own start (`python -X importtime`), run for real against a
real server, a recorded machine, a stored config and an event log. No timing is
asserted; a broken budget names the heaviest imports that broke it.

What a command must not import is what it has no use for: the API's client no server,
config, renderer or HAL; `validate` no renderer or HAL; the inventory no config,
renderer, argparse or typing, and its storage section no ioctls; `seed check` no API,
inventory or security policy (cryptography only to parse the client certificates the
seed carries); `eventlog --pcrs` only
the event log's records; the configure step no API, inventory or TPM. None of the others
loads aiohttp, cryptography, pyroute2 (the configure step renames links through netlink
only on a live run), tpm2_pytss or sdbus.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import apiserver
from conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests/fixtures"
GUEST_LOG = FIXTURES / "vm-guest/sys/kernel/security/tpm0/binary_bios_measurements"
SEED_CASE = REPO / "tests/seed/valid-all/input"

HEAVY = ("aiohttp", "cryptography", "pyroute2", "tpm2_pytss", "sdbus")
SERVER = ("incusos_hal.api.server", "incusos_hal.api.service", "incusos_hal.api.state")
RENDER = ("incusos_hal.render", "incusos_hal.apply", "incusos_hal.sections")
NOT_INVENTORY = ("incusos_hal.config", "incusos_hal.state", "argparse", "typing")
IOCTLS = ("incusos_hal.hal", "incusos_hal._native", "ctypes", "socket")
OTHER_SECTIONS = tuple(
    f"incusos_hal.inventory.{s}"
    for s in ("cpu", "memory", "gpu", "network", "usb", "pci", "system", "load", "serial", "nvme")
)
NOT_NETWORK = ("incusos_hal.hal.net", "incusos_hal.hal.netlink", "socket")  # ioctls need an fd
NOT_PCRS = ("argparse", "json", "pathlib", "dataclasses", "typing", "re")


@dataclass(frozen=True)
class Budget:
    argv: tuple[str, ...]
    ran: str  # a module the command's work imports: proof it got that far
    never: tuple[str, ...]  # packages (with their submodules) or modules it must not load
    code: int = 0
    root: str = str(FIXTURES / "ci-host")  # INCUSOS_HAL_ROOT: a recorded machine, or this one


# Modules from sys.modules at exit (importlib.import_module, which the CLI and the
# inventory use to load a command's module, is not seen by -X importtime), weighed by
# -X importtime's cumulative figure where it has one.
PROGRAM = """import sys
code = 0
try:
    from incusos_hal.cli import main

    code = main()
finally:
    sys.stderr.write("\\nmodules: " + " ".join(sorted(sys.modules)) + "\\n")
sys.exit(code)
"""
# The interpreter's own: what is imported when nothing is.
NOTHING = 'import sys; sys.stderr.write("\\nmodules: " + " ".join(sorted(sys.modules)))'


def imported(argv: list[str], env: dict[str, str]) -> tuple[int, dict[str, int], str]:
    """(exit status, module -> cumulative import time in us or 0, stderr) of
    `incusos-hal ARGV` run as the installed script runs it: main() from incusos_hal.cli."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PROGRAM, *argv],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": os.environ["PATH"], **env},
        check=False,
    )
    return proc.returncode, _weighed(proc.stderr), proc.stderr


def _weighed(stderr: str) -> dict[str, int]:
    found = re.findall(r"^modules: (.*)$", stderr, re.M)
    assert found, stderr[-2000:]
    times = {
        name: int(cumulative)
        for cumulative, name in re.findall(
            r"^import time:\s+\d+ \|\s+(\d+) \| *(\S+)$", stderr, re.M
        )
    }
    return {name: times.get(name, 0) for name in found[-1].split()}


def check(budget: Budget, env: dict[str, str]) -> None:
    baseline = _baseline()
    code, ours, err = imported(list(budget.argv), env)
    assert code == budget.code, f"{budget.argv}: exit {code}\n{err[-2000:]}"
    assert budget.ran in ours, f"{budget.argv} did not get to {budget.ran}\n{err[-2000:]}"
    extra = set(ours) - set(baseline)
    banned = [
        name
        for name in extra
        if any(name == never or name.startswith(never + ".") for never in budget.never)
    ]
    heaviest = sorted(extra, key=lambda name: -ours[name])[:12]
    assert not banned, (
        f"`incusos-hal {' '.join(budget.argv)}` imports {sorted(banned)}; its heaviest "
        f"imports (cumulative us): {[(name, ours[name]) for name in heaviest]}"
    )


_BASELINE: dict[str, int] = {}


def _baseline() -> dict[str, int]:
    """What the interpreter imports for nothing at all (site, encodings, ...)."""
    if not _BASELINE:
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", NOTHING],
            capture_output=True,
            text=True,
            check=True,
            env={"PATH": os.environ["PATH"]},
        ).stderr
        _BASELINE.update(_weighed(err))
    return _BASELINE


def test_get_through_the_client_loads_no_server(tmp_path: Path) -> None:
    require_tool("openssl", "curl")
    cert, _ = apiserver.openssl_client_cert(tmp_path, "trusted")
    (tmp_path / "srv").mkdir()
    server = apiserver.make(tmp_path / "srv", [cert])
    server.start()
    try:
        env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "INCUSOS_HAL_REMOTE": "here"}
        code, _, err = imported(["remote", "add", "here", f"unix://{server.socket}"], env)
        assert code == 0, err
        never = (*HEAVY, *SERVER, *RENDER, "incusos_hal.config", "incusos_hal.hal")
        # state.paths (the file names, standard library only) is allowed; the store is not.
        never += ("incusos_hal.inventory", "incusos_hal.state.store", "incusos_hal.state.switch")
        check(Budget(("get", "/1.0", "--format", "json"), "incusos_hal.api.client", never), env)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "budget",
    [
        Budget(
            ("validate", "--config", str(REPO / "tests/golden/bond-lacp-vlans/config.toml")),
            "incusos_hal.config.validate",
            (*HEAVY, *SERVER, *RENDER, "incusos_hal.hal", "incusos_hal.inventory"),
        ),
        Budget(  # this machine, live: its NICs asked through ethtool's ioctls
            ("inventory", "--format", "json"),
            "incusos_hal.inventory.serial",
            (*HEAVY, *SERVER, *RENDER, *NOT_INVENTORY, *NOT_NETWORK),
            root="/",
        ),
        Budget(
            ("inventory", "storage"),
            "incusos_hal.inventory.storage",
            (*HEAVY, *SERVER, *RENDER, *NOT_INVENTORY, *IOCTLS, *OTHER_SECTIONS),
        ),
        Budget(  # as first boot checks it, against a recorded machine; applies nothing
            ("seed", "check", "--root", str(FIXTURES / "ci-host"), str(SEED_CASE)),
            "incusos_hal.config.seed",
            # cryptography it needs: the seed's client certificates must parse
            (
                *(h for h in HEAVY if h != "cryptography"),
                *SERVER,
                "incusos_hal.api",
                "incusos_hal.inventory",
                "incusos_hal.security",
            ),
        ),
        Budget(
            ("eventlog", "--pcrs", str(GUEST_LOG)),
            "incusos_hal.hal.eventrecords",
            (*HEAVY, *SERVER, *RENDER, "incusos_hal.config", "incusos_hal.inventory", *NOT_PCRS),
        ),
    ],
    ids=lambda b: " ".join(b.argv[:2]),
)
def test_command_imports_only_what_it_needs(budget: Budget) -> None:
    check(budget, {"INCUSOS_HAL_ROOT": budget.root})


def test_configure_boot_loads_no_api_inventory_or_tpm(tmp_path: Path) -> None:
    """A re-rooted boot-mode run (a recorded machine, a scratch target): it renders and
    writes, and never reaches for the API, the inventory or the TPM."""
    state, target = tmp_path / "state", tmp_path / "target"
    state.mkdir(mode=0o700)
    target.mkdir()
    config = REPO / "tests/golden/bond-lacp-vlans/config.toml"
    code, _, err = imported(["save", "--config", str(config), "--state-dir", str(state)], {})
    assert code == 0, err
    never = (*HEAVY, *SERVER, "incusos_hal.api", "incusos_hal.inventory")
    never += ("incusos_hal.security", "incusos_hal.hal.tpm", "incusos_hal.hal.eventlog")
    # No cache yet, so this is the full path; it skips the parser too (argparse and its
    # gettext are a tenth of the path's imports).
    never += ("argparse",)
    argv = ("configure", "--boot", "--state-dir", str(state), "--target", str(target))
    check(
        Budget(argv, "incusos_hal.apply.configure", never),
        {"INCUSOS_HAL_ROOT": str(FIXTURES / "ci-host")},
    )
    assert any(target.rglob("*.network")), "the configure step wrote nothing"


# What ci/bench times as "HAL, fresh interpreter per seal": no command seals on its own (the
# API's tpm-rebind does, in the server), so the budget is on the code path itself.
SEAL_PROGRAM = """import sys
from incusos_hal.hal import tpm

with tpm.open_tpm(sys.argv[1]) as t:
    policy = t.current_policy("sha256", [7])
    assert t.unseal_sealed(t.seal(b"x" * 32, policy)) == b"x" * 32
sys.stderr.write("\\nmodules: " + " ".join(sorted(sys.modules)) + "\\n")
"""


def test_seal_and_unseal_in_a_fresh_interpreter_load_no_tss(swtpm: str) -> None:
    """The fast path (hal.tpmwire over _native.tss): neither tpm2_pytss nor cryptography
    is imported, once the TPM has its SRK (a fresh TPM gets it through tpm2-pytss); nor
    cffi's C parser (the declarations are pre-parsed), nor what only a signer needs (the
    PCR signature code and its event log, json), nor typing, pathlib or dataclasses (with
    inspect, most of what the path imported)."""
    from incusos_hal.hal import tpm

    with tpm.open_tpm(swtpm) as t:
        t.srk()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", SEAL_PROGRAM, swtpm],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "src"), "PATH": os.environ["PATH"]},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = _weighed(proc.stderr)
    assert "incusos_hal._native.tss" in ours, "the fast path was not taken"
    extra = set(ours) - set(_baseline())
    never = (*HEAVY, *SERVER, *RENDER, "incusos_hal.config", "incusos_hal.inventory")
    never += ("cffi", "pycparser", "incusos_hal.hal.pcrsig", "incusos_hal.hal.eventlog")
    never += ("json", "typing", "pathlib", "dataclasses", "inspect")
    banned = [n for n in extra if any(n == b or n.startswith(b + ".") for b in never)]
    heaviest = sorted(extra, key=lambda name: -ours[name])[:12]
    assert not banned, (
        f"sealing imports {sorted(banned)}; its heaviest imports (cumulative us): "
        f"{[(name, ours[name]) for name in heaviest]}"
    )
