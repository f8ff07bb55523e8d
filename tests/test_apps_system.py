"""Applications as system extensions under real systemd: a Debian 13 container boots
with the package installed; the probe (tests/guest_apps.py) builds erofs sysext images
and drives /1.0/applications on the socket-activated, hardened incusos-hal.service,
which places images in /var/lib/extensions and has systemd-sysext.service refresh them.

systemd-sysext needs loop devices: nspawn gives a container none, so the host's loop
nodes are bound in (without them: "Failed to read metadata for image hello: No such
file or directory")."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Any

import pytest

import nspawn
from conftest import require_root, require_tool

pytestmark = pytest.mark.nspawn

LOOP_CTL_ADD = 0x4C80


def _loop_nodes(spare: int = 8) -> list[str]:
    """The host's loop device nodes, with `spare` more made free ones (LOOP_CTL_ADD) so
    that LOOP_CTL_GET_FREE in the container returns a node it has."""
    existing = sorted(
        (p for p in Path("/dev").glob("loop[0-9]*") if p.name[4:].isdigit()),
        key=lambda p: int(p.name[4:]),
    )
    top = int(existing[-1].name[4:]) if existing else -1
    fd = os.open("/dev/loop-control", os.O_RDWR)
    try:
        for n in range(top + 1, top + 1 + spare):
            with contextlib.suppress(OSError):  # taken meanwhile: fine
                fcntl.ioctl(fd, LOOP_CTL_ADD, n)
    finally:
        os.close(fd)
    # Whole devices only (a partition node of someone's disk is no use to sysext).
    nodes = [p for p in Path("/dev").glob("loop[0-9]*") if p.name[4:].isdigit()]
    return ["/dev/loop-control", *map(str, nodes)]


def boot(merged: Path, probe_dir: Path, machine: str) -> tuple[int, str]:
    """Boot the container until its probe powers it off (600 s at most), the probe's
    directory at /probe and the loop nodes sysext needs bound in: (exit status, console)."""
    cmd = [
        "systemd-nspawn", "-q", "--register=no", "--keep-unit", "--boot",
        "--private-network", "--timezone=off", "--resolv-conf=off",
        f"--machine={machine}", "-D", str(merged), f"--bind={probe_dir}:/probe",
        *(f"--bind={node}" for node in _loop_nodes()),
    ]  # fmt: skip
    env = dict(os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
    return nspawn.run_logged(cmd, probe_dir / "console.log", 600, env=env)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_root()
    require_tool("debootstrap", "systemd-nspawn", "mount")
    work = tmp_path_factory.mktemp("apps-system")
    root = nspawn.rootfs("container-apps", nspawn.APPS_PACKAGES)
    package = nspawn.install_layer(root, work / "package")
    probe_dir = work / "probe"
    with nspawn.overlay([package, root], work / "machine") as merged:
        nspawn.install_probe(
            merged,
            nspawn.PROBE_UNIT,
            probe_dir,
            (Path(__file__).parent / "guest_apps.py").read_text(),
        )
        code, console = boot(merged, probe_dir, f"ihal-{secrets.token_hex(3)}")
    result_file = probe_dir / "result.json"
    assert result_file.exists(), f"no result (nspawn exit {code}): {console[-6000:]}"
    result: dict[str, Any] = json.loads(result_file.read_text())
    assert "crashed" not in result, result
    result["exit"] = code
    result["console_end"] = console[-2000:]
    return result


def _meta(answer: dict[str, Any]) -> Any:
    return answer["body"]["metadata"]


def test_install_runs_the_apps_unit(probe: dict[str, Any]) -> None:
    assert _meta(probe["list_empty"]) == [], probe["list_empty"]
    assert probe["install"]["status"] == 200, (probe["install"], probe["journal"])
    assert probe["install_again"]["status"] == 409, probe["install_again"]
    assert _meta(probe["list"]) == ["/1.0/applications/hello"]
    state = _meta(probe["get1"])["state"]
    assert state["version"] == "1" and state["initialized"] is True, state
    assert state["is_primary"] is False
    assert probe["answered1_after_s"] is not None, probe["journal"]
    assert probe["answer1"].startswith("hello 1 "), probe["answer1"]
    assert "hello" in probe["sysext_status"], probe["sysext_status"]


def test_update_restarts_the_unit_with_the_new_version(probe: dict[str, Any]) -> None:
    update = probe["update"]
    assert update["answer"]["status"] == 200, (update, probe["journal"])
    assert probe["pid2"] not in ("", "0", probe["pid_before_update"]), probe
    assert probe["answer2"] == f"hello 2 {probe['pid2']}", probe["answer2"]
    assert _meta(probe["get2"])["state"]["version"] == "2"
    print(
        f"\napplication update: the app's endpoint was down {update['down_s']:.3f} s "
        f"({update['polls']} polls); the API call took {update['call_s']:.3f} s"
    )


def test_refused_updates_change_nothing(probe: dict[str, Any]) -> None:
    bad = probe["bad"]
    assert bad["tampered"]["status"] == 400, bad["tampered"]
    assert "sha256" in bad["tampered"]["body"]["error"], bad["tampered"]
    assert bad["not_an_image"]["status"] == 400, bad["not_an_image"]
    assert "neither a GPT disk image" in bad["not_an_image"]["body"]["error"]
    assert bad["refused_by_sysext"]["status"] == 400, (bad["refused_by_sysext"], probe["journal"])
    assert bad["image_unchanged"], bad
    assert bad["pid_after"] == probe["pid_before_update"], bad
    assert bad["answer_after"].startswith("hello 1 "), bad
    assert _meta(bad["get_after"])["state"]["version"] == "1"


def test_data_backup_factory_reset_restore(probe: dict[str, Any]) -> None:
    assert probe["backup"]["status"] == 200 and probe["backup_len"] > 0, probe["backup"]
    assert probe["reset"]["status"] == 200 and probe["note_after_reset"] is False
    assert probe["restore"]["status"] == 200, probe["restore"]
    assert probe["note_after_restore"] == "kept"
    assert probe["restore_bad"]["status"] == 400, probe["restore_bad"]
    assert probe["note_after_bad_restore"] is True
    assert "last_restored" in _meta(probe["get_restored"])["state"]
    assert probe["answered_after_restore_s"] is not None


def test_restart_gives_a_new_process(probe: dict[str, Any]) -> None:
    assert probe["restart"]["status"] == 200
    assert probe["pid_restarted"] not in ("", "0", probe["pid2"]), probe


def test_one_primary_application(probe: dict[str, Any]) -> None:
    assert probe["primary"]["status"] == 200, (probe["primary"], probe["journal"])
    second = probe["second_primary"]
    assert second["status"] == 400, second
    assert second["body"]["error"] == "a primary application is already installed"
    removed = probe["remove_primary"]
    assert removed["status"] == 500, removed
    assert removed["body"]["error"] == "cannot remove a primary application"
    assert _meta(probe["list_two"]) == ["/1.0/applications/hello", "/1.0/applications/incus"]
    assert _meta(probe["get_primary"])["state"]["is_primary"] is True


def test_remove_takes_image_unit_and_data_away(probe: dict[str, Any]) -> None:
    assert probe["remove"]["status"] == 200, (probe["remove"], probe["journal"])
    assert _meta(probe["list_after_remove"]) == ["/1.0/applications/incus"]
    assert probe["image_gone"] and probe["release_gone"], probe
    assert probe["unit_after_remove"].split() in (["not-found", "inactive"],), probe
    assert probe["data_after_remove"] == [], probe["data_after_remove"]
    assert probe["exit"] != -signal.SIGKILL, probe["console_end"]


def test_switch_version_runs_the_kept_version_and_back(probe: dict[str, Any]) -> None:
    """IncusOS's :switch-version under real systemd-sysext: with no version named, the
    one the update replaced (kept on disk) is merged and its unit answers; a version not
    kept is refused; the newer one named comes back."""
    assert probe["switch_back"]["status"] == 200, (probe["switch_back"], probe["journal"])
    assert probe["switched_back_after_s"] is not None, probe["journal"]
    state = _meta(probe["get_switched"])["state"]
    assert (state["version"], state["available_versions"]) == ("1", ["1", "2"]), state
    unknown = probe["switch_unknown"]
    assert unknown["status"] == 400, unknown
    assert "'7' because it does not exist locally" in unknown["body"]["error"], unknown
    assert probe["switch_forward"]["status"] == 200, probe["switch_forward"]
    assert probe["switched_forward_after_s"] is not None, probe["journal"]
    assert probe["kept_versions"] == ["1.raw", "2.raw"], probe["kept_versions"]
    assert probe["extension_link"] == "/var/lib/incusos-extensions/hello/2.raw"
    assert probe["versions_gone"], "removing the application removes its kept versions"
