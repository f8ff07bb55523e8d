"""Every golden case renders exactly its expected tree; every error case fails validation
with exactly its expected lines and makes `render` write nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from golden import config_file, error_cases, manifest, render_case, render_cases, run_cli


@pytest.mark.parametrize("case", render_cases(), ids=lambda p: p.name)
def test_render_matches_golden(case: Path, tmp_path: Path) -> None:
    code, lines, files, stdout, stderr = render_case(case, tmp_path)
    expected = case / "expected"
    assert code == 0, stderr
    assert lines == (expected / "manifest.txt").read_text().splitlines()
    for rel, data in files.items():
        assert data == (expected / "files" / rel.lstrip("/")).read_bytes(), rel
    assert stdout == (expected / "stdout.txt").read_text()
    assert stderr == (expected / "warnings.txt").read_text()


@pytest.mark.parametrize("case", render_cases(), ids=lambda p: p.name)
def test_render_is_deterministic(case: Path, tmp_path: Path) -> None:
    first = render_case(case, tmp_path / "a")
    second = render_case(case, tmp_path / "b")
    assert first == second


@pytest.mark.parametrize("case", error_cases(), ids=lambda p: p.name)
def test_invalid_config_is_rejected_with_field_paths(case: Path, tmp_path: Path) -> None:
    config = config_file(case)
    code, stdout, stderr = run_cli(["validate", "--config", str(config)])
    assert code == 2
    assert stdout == ""
    assert stderr == (case / "expected-errors.txt").read_text()
    assert stderr.strip(), "an invalid document must say why"

    out = tmp_path / "out"
    code, _, render_stderr = run_cli(["render", "--config", str(config), "--out", str(out)])
    assert code == 2
    assert render_stderr == stderr
    assert not out.exists(), "render wrote something for an invalid config"


def test_every_case_has_expected_output() -> None:
    for case in render_cases():
        assert (case / "expected" / "manifest.txt").is_file(), case
        lines, _ = manifest(case / "expected" / "files")
        written = {line.split()[-1] for line in lines}
        listed = {
            line.split()[2]
            for line in (case / "expected/manifest.txt").read_text().splitlines()
            if line.startswith("f ")
        }
        assert written == listed, f"{case.name}: files/ and manifest.txt disagree"
    for case in error_cases():
        assert (case / "expected-errors.txt").is_file(), case
