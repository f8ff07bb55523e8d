"""The command line contract: exit codes, where output goes, what is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from incusos_hal.state import store

from conftest import build_sysfs
from golden import run_cli

SRC = str(Path(__file__).resolve().parent.parent / "src")
VALID = b'[[network.interfaces]]\nname = "up"\nhwaddr = "52:54:00:0a:00:01"\n'


def test_validate_accepts_and_is_silent(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_bytes(VALID)
    assert run_cli(["validate", "--config", str(tmp_path / "c.toml")]) == (0, "", "")


def test_validate_reads_json_by_extension(tmp_path: Path) -> None:
    doc = {"network": {"interfaces": [{"name": "up", "hwaddr": "52:54:00:0a:00:01"}]}}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    assert run_cli(["validate", "--config", str(tmp_path / "c.json")])[0] == 0
    (tmp_path / "c.toml").write_text(json.dumps(doc))  # JSON is not TOML
    code, _, err = run_cli(["validate", "--config", str(tmp_path / "c.toml")])
    assert code == 2 and "not valid TOML" in err


def test_validate_missing_file(tmp_path: Path) -> None:
    code, _, err = run_cli(["validate", "--config", str(tmp_path / "nope.toml")])
    assert code == 2 and "cannot read" in err


def test_save_stores_atomically_and_refuses_invalid(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (tmp_path / "good.toml").write_bytes(VALID)
    (tmp_path / "bad.toml").write_bytes(b"[network]\nmtu = 1\n")
    assert (
        run_cli(["save", "--config", str(tmp_path / "good.toml"), "--state-dir", str(state)])[0]
        == 0
    )
    stored = (state / store.CONFIG_FILE).read_bytes()
    code, _, err = run_cli(
        ["save", "--config", str(tmp_path / "bad.toml"), "--state-dir", str(state)]
    )
    assert code == 2 and "network.mtu: unknown key" in err
    assert (state / store.CONFIG_FILE).read_bytes() == stored, "a rejected save changed state"
    assert sorted(p.name for p in state.iterdir()) == [store.CONFIG_FILE, "generator.cache"]


def test_render_without_config_uses_the_stored_one_with_fallback(tmp_path: Path) -> None:
    root = build_sysfs(tmp_path / "root", [{"name": "eth0", "hwaddr": "52:54:00:0a:00:01"}])
    state = tmp_path / "state"
    state.mkdir()
    (state / store.CONFIG_FILE).write_bytes(b"broken [")
    code, out, err = run_cli(
        ["render", "--root", str(root), "--out", str(tmp_path / "o"), "--state-dir", str(state)]
    )
    assert code == 0
    assert "not valid TOML" in err  # said why it fell back ...
    assert "/run/systemd/network/10-incusos-bridge-eth0.network" in out  # ... to the default


def test_environment_reroots_reads(tmp_path: Path) -> None:
    root = build_sysfs(tmp_path / "root", [{"name": "enx1", "hwaddr": "52:54:00:0a:00:09"}])
    env = dict(
        os.environ, INCUSOS_HAL_ROOT=str(root), INCUSOS_HAL_STATE_DIR=str(tmp_path), PYTHONPATH=SRC
    )
    proc = subprocess.run(
        [sys.executable, "-m", "incusos_hal", "render", "--out", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "rename enx1 -> _p5254000a0009" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "incusos_hal", "inventory", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(proc.stdout)["network"]["cards"][0]["ports"][0]["id"] == "enx1"


def test_configure_boot_mode_never_fails(tmp_path: Path) -> None:
    root = build_sysfs(tmp_path / "root", [{"name": "eth0", "hwaddr": "52:54:00:0a:00:01"}])
    state = tmp_path / "state"
    state.mkdir()
    (state / store.CONFIG_FILE).write_bytes(b"\x00\x01 garbage")
    target = tmp_path / "target"
    target.write_text("a file: nothing can be written under it")
    env = dict(
        os.environ, INCUSOS_HAL_ROOT=str(root), INCUSOS_HAL_STATE_DIR=str(state), PYTHONPATH=SRC
    )
    argv = [sys.executable, "-m", "incusos_hal", "configure", "--target", str(target)]
    boot = subprocess.run([*argv, "--boot"], env=env, capture_output=True, text=True, check=False)
    assert boot.returncode == 0, boot.stderr
    assert "not valid TOML" in boot.stderr
    assert "writing the configuration failed" in boot.stderr
    runtime = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert runtime.returncode == 1


def test_documented_examples_are_valid() -> None:
    examples = sorted((Path(__file__).parent.parent / "docs/examples").glob("*.toml"))
    assert examples
    for example in examples:
        assert run_cli(["validate", "--config", str(example)]) == (0, "", ""), example
