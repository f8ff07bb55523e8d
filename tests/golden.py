"""Golden cases: one directory per case under tests/golden/, as netplan's and
zram-generator's test suites do.

    tests/golden/<case>/config.toml | config.json   the input document
    tests/golden/<case>/nics.json                    the machine's NICs (a sysfs tree is
                                                     built from it)
    tests/golden/<case>/expected/manifest.txt        every path written: type, mode, target
    tests/golden/<case>/expected/files/...           the content of every file written
    tests/golden/<case>/expected/stdout.txt          renames and paths the CLI prints
    tests/golden/<case>/expected/warnings.txt        what it warned about (may be empty)

    tests/golden/errors/<case>/config.toml | .json   an invalid document
    tests/golden/errors/<case>/expected-errors.txt   the exact lines `validate` prints

    tests/fixtures/<tree>/                           a recorded or built machine
    tests/fixtures/<tree>/inventory.json             what `inventory.scan` gives for it

`python tests/golden.py --regen` (ci/regen-golden) rewrites every expected output from
the current code, for review with `git diff`.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from incusos_hal import cli, inventory  # noqa: E402

from conftest import build_sysfs, load_nics  # noqa: E402

STATE_DIR = "/var/lib/incusos-hal"


FIXTURES = HERE / "fixtures"
# Incus's sections and this project's additions: everything a tree is scanned for.
SECTIONS = (*inventory.INCUS_SECTIONS, "nvme", "tpm", "secure_boot", "fibre_channel", "multipath")


def fixture_trees() -> list[Path]:
    """Recorded machines: a directory with its note and a sysfs. (eventlogs/ and security/
    hold TPM and efivarfs recordings, not whole machines.)"""
    return sorted(
        p for p in FIXTURES.iterdir() if (p / "NOTE.md").exists() and (p / "sys").is_dir()
    )


def scan_tree(tree: Path) -> str:
    import json

    return json.dumps(inventory.scan(tree, SECTIONS), indent=1, sort_keys=False) + "\n"


def render_cases() -> list[Path]:
    return sorted(p for p in GOLDEN.iterdir() if p.is_dir() and p.name != "errors")


def error_cases() -> list[Path]:
    return sorted(p for p in (GOLDEN / "errors").iterdir() if p.is_dir())


def config_file(case: Path) -> Path:
    for name in ("config.toml", "config.json"):
        if (case / name).exists():
            return case / name
    raise FileNotFoundError(f"{case}: no config.toml or config.json")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def manifest(tree: Path) -> tuple[list[str], dict[str, bytes]]:
    lines: list[str] = []
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for name in sorted(filenames + [d for d in dirnames if Path(dirpath, d).is_symlink()]):
            path = Path(dirpath, name)
            rel = "/" + str(path.relative_to(tree))
            if path.is_symlink():
                lines.append(f"l {rel} -> {os.readlink(path)}")
            else:
                mode = stat.S_IMODE(path.lstat().st_mode)
                lines.append(f"f {mode:04o} {rel}")
                files[rel] = path.read_bytes()
    return sorted(lines), files


def render_case(case: Path, work: Path) -> tuple[int, list[str], dict[str, bytes], str, str]:
    root = build_sysfs(work / "root", load_nics(case / "nics.json"))
    out = work / "out"
    code, stdout, stderr = run_cli(
        [
            "render",
            "--config",
            str(config_file(case)),
            "--root",
            str(root),
            "--out",
            str(out),
            "--state-dir",
            STATE_DIR,
        ]
    )
    lines, files = manifest(out) if out.exists() else ([], {})
    return code, lines, files, stdout, stderr


def regen() -> None:
    for case in render_cases():
        with tempfile.TemporaryDirectory() as tmp:
            code, lines, files, stdout, stderr = render_case(case, Path(tmp))
        if code != 0:
            raise SystemExit(f"{case.name}: render exited {code}: {stderr}")
        expected = case / "expected"
        shutil.rmtree(expected, ignore_errors=True)
        (expected / "files").mkdir(parents=True)
        (expected / "manifest.txt").write_text("".join(line + "\n" for line in lines))
        (expected / "stdout.txt").write_text(stdout)
        (expected / "warnings.txt").write_text(stderr)
        for rel, data in files.items():
            target = expected / "files" / rel.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        print(f"regenerated {case.relative_to(HERE.parent)}")
    for case in error_cases():
        code, _, stderr = run_cli(["validate", "--config", str(config_file(case))])
        if code != 2:
            raise SystemExit(f"{case.name}: validate exited {code}, expected 2")
        (case / "expected-errors.txt").write_text(stderr)
        print(f"regenerated {case.relative_to(HERE.parent)}")
    for tree in fixture_trees():
        (tree / "inventory.json").write_text(scan_tree(tree))
        print(f"regenerated {tree.relative_to(HERE.parent)}/inventory.json")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regen"]:
        raise SystemExit("usage: tests/golden.py --regen")
    regen()
