"""Both ways of installing: `meson install` puts the generator and unit where systemd looks;
`pip install .` in a fresh venv gives a working `incusos-hal`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from incusos_hal import __version__

from conftest import REPO, require_tool

pytestmark = pytest.mark.install


def pkgconfig(variable: str) -> str:
    return subprocess.run(
        ["pkg-config", f"--variable={variable}", "systemd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_meson_lists_every_module_and_the_version() -> None:
    text = (REPO / "meson.build").read_text()
    listed: set[str] = set()
    for subdir, body in re.findall(r"'([a-z_]*)': \[([^\]]*)\]", text):
        for name in re.findall(r"'([^']+\.py)'", body):
            listed.add(f"{subdir}/{name}" if subdir else name)
    package = REPO / "src/incusos_hal"
    present = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    assert listed == present, f"meson.build misses {present - listed}, lists {listed - present}"
    assert f"version: '{__version__}'" in text


def test_meson_install_places_generator_and_unit_for_systemd(tmp_path: Path) -> None:
    require_tool("meson", "ninja", "pkg-config")
    build, dest = tmp_path / "build", tmp_path / "dest"
    subprocess.run(
        ["meson", "setup", "--prefix=/usr", str(build), str(REPO)], check=True, capture_output=True
    )
    subprocess.run(
        ["meson", "install", "-C", str(build), "--destdir", str(dest)],
        check=True,
        capture_output=True,
    )
    generator_dir = pkgconfig("systemdsystemgeneratordir")
    unit_dir = pkgconfig("systemdsystemunitdir")
    # The directory is one systemd searches (pkg-config's own list of them).
    assert generator_dir in pkgconfig("systemd_system_generator_path").split(":")
    generator = dest / generator_dir.lstrip("/") / "incusos-hal-generator"
    unit = dest / unit_dir.lstrip("/") / "incusos-hal-configure.service"
    assert generator.is_file() and os.access(generator, os.X_OK)
    assert unit.is_file()
    script = generator.read_text()
    assert script.startswith("#!/usr/bin/python3 -IS\n")  # one #! argument
    assert f'unit_dir="{unit_dir}"' in script and f'version="{__version__}"' in script
    assert "ExecStart=/usr/bin/incusos-hal configure --boot" in unit.read_text()
    for name, command in (
        ("incusos-hal-zfs-import.service", "storage import"),
        ("incusos-hal-scrub.service", "storage scrub"),
    ):
        text = (dest / unit_dir.lstrip("/") / name).read_text()
        assert f"ExecStart=/usr/bin/incusos-hal {command}\n" in text and "@" not in text, name
    # The vendor drop-in that resets a zram device left initialized before setting it up.
    reset = dest / unit_dir.lstrip("/") / "systemd-zram-setup@.service.d/50-incusos-hal-reset.conf"
    assert (
        "ExecStartPre=-/usr/lib/systemd/system-generators/zram-generator --reset-device '%i'"
        in (reset.read_text())
    )
    assert os.access(dest / "usr/bin/incusos-hal", os.X_OK)
    modules = list(dest.glob("usr/lib/python3*/*-packages/incusos_hal/config/model.py"))
    assert modules, "the package was not installed where Debian's python3 finds it"


def test_pip_install_in_a_fresh_venv(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.setdefault(
        "PIP_CACHE_DIR",
        str(Path(os.environ.get("INCUSOS_HAL_CACHE") or "/var/cache/incusos-hal") / "pip"),
    )
    proc = subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", str(REPO)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    version = subprocess.run(
        [str(venv / "bin/incusos-hal"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == __version__
    config = tmp_path / "c.toml"
    config.write_text('[[network.interfaces]]\nname = "up"\nhwaddr = "zz:zz"\n')
    bad = subprocess.run(
        [str(venv / "bin/incusos-hal"), "validate", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "network.interfaces[0].hwaddr" in bad.stderr
    # In a wheel the generator and unit are data under the environment's prefix.
    generator = venv / "incusos-hal/systemd/system-generators/incusos-hal-generator"
    assert (venv / "incusos-hal/systemd/system/incusos-hal-configure.service").is_file()
    # ... and the generator finds the package without `site`, taking its cache path.
    state = tmp_path / "state"
    config.write_text('[[network.interfaces]]\nname = "up"\nhwaddr = "52:54:00:0a:00:01"\n')
    unit_dir = "/usr/lib/systemd/system"
    subprocess.run(
        [
            str(venv / "bin/incusos-hal"),
            "save",
            "--config",
            str(config),
            "--state-dir",
            str(state),
            "--unit-dir",
            unit_dir,
        ],
        check=True,
    )
    traced = subprocess.run(
        [
            str(venv / "bin/python"),
            "-IS",
            "-X",
            "importtime",
            str(generator),
            str(tmp_path / "n"),
            str(tmp_path / "e"),
            str(tmp_path / "l"),
        ],
        env={"INCUSOS_HAL_STATE_DIR": str(state)},
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines()}
    assert "incusos_hal.boot.fast" in imported
    assert not {"site", "incusos_hal.boot.generator"} & imported
    assert (tmp_path / "n/sysinit.target.wants/incusos-hal-configure.service").is_symlink()
