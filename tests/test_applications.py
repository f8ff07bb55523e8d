"""Applications as system extensions and the A/B transfer definitions, without booting:
the checks every outside input passes (names, versions, images, archives, the local
source's hashes), the definitions as shipped and as rendered, the boot counter's names,
and /1.0/applications served for real (a scratch server: no systemd, so installs are
refused with 503 and nothing is written). Under real systemd: tests/test_apps_system.py;
against a real A/B disk: tests/test_sysupdate.py."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from incusos_hal.api.applications import local_source
from incusos_hal.apply.applications import Installed, VerifiedImage, state_document
from incusos_hal.hal import sysext, sysupdate
from incusos_hal.update.index import compare_versions

import apiserver
from conftest import REPO, require_tool

SHIPPED = REPO / "sysupdate"


def test_shipped_definitions_protect_the_running_version_and_count_boots() -> None:
    names = sorted(p.name for p in SHIPPED.glob("*.transfer"))
    assert names == [
        "10-usr-verity-sig.transfer",
        "11-usr-verity.transfer",
        "12-usr.transfer",
        "20-uki.transfer",
    ]
    for name in names:
        text = (SHIPPED / name).read_text()
        assert "ProtectVersion=%A" in text, name
    types = {
        n: next(
            line.split("=", 1)[1]
            for line in (SHIPPED / n).read_text().splitlines()
            if line.startswith("MatchPartitionType=")
        )
        for n in names[:3]
    }
    assert types == {
        "10-usr-verity-sig.transfer": "usr-verity-sig",
        "11-usr-verity.transfer": "usr-verity",
        "12-usr.transfer": "usr",
    }
    uki = (SHIPPED / "20-uki.transfer").read_text()
    assert "TriesLeft=3" in uki and "TriesDone=0" in uki and "PathRelativeTo=boot" in uki


def test_meson_installs_every_definition() -> None:
    meson = (REPO / "meson.build").read_text()
    for p in SHIPPED.glob("*.transfer"):
        assert f"'sysupdate/{p.name}'" in meson, p.name
    assert "lib/sysupdate.d" in meson


def test_render_sets_the_source_and_only_a_partition_targets_device() -> None:
    usr = (SHIPPED / "12-usr.transfer").read_text()
    out = sysupdate.render_definitions(usr, "/srv/updates", "/dev/loop3")
    assert "Path=/srv/updates/" in out and "Path=/dev/loop3" in out
    assert "Path=auto" not in out and "MatchPattern=%M_@v.usr-%a.@u.raw" in out
    uki = (SHIPPED / "20-uki.transfer").read_text()
    out = sysupdate.render_definitions(uki, "/srv/updates/", "/dev/loop3")
    assert "Path=/EFI/Linux" in out and "/dev/loop3" not in out


@pytest.mark.parametrize("path", ["relative/dir", "/srv/a\nPath=/etc", "/srv/a\\", "/srv/\x1b[0m"])
def test_render_refuses_a_path_that_would_change_the_definition(path: str) -> None:
    with pytest.raises(ValueError, match="source directory: must be an absolute path"):
        sysupdate.render_definitions("[Source]\nPath=/x/\n", path)


@pytest.mark.parametrize(
    "version", ["", "1_2", "1+2", "1.", ".1", "-1", "x" * 37, "1 2", "é", "1.usr-2", "1.efi2"]
)
def test_versions_that_cannot_stand_in_a_label_are_refused(version: str) -> None:
    with pytest.raises(ValueError, match="version: "):
        sysupdate.check_version(version)


@pytest.mark.parametrize("version", ["0.1.0", "202511281200", "2", "1.2~rc1", "x" * 36])
def test_the_images_own_versions_are_versions(version: str) -> None:
    # meson's version is the image's IMAGE_VERSION (mkosi --image-version); IncusOS's
    # are timestamps.
    assert sysupdate.check_version(version) == version


def test_a_version_must_leave_its_longest_label_within_36_units() -> None:
    # incusos-hal_VERSION_verity_sig: 23 units around the version, 13 left.
    assert sysupdate.check_version("0.1.0.1", image_id="incusos-hal") == "0.1.0.1"
    assert sysupdate.check_version("2025112812001", image_id="incusos-hal")
    with pytest.raises(ValueError, match=r"longer than the 13 characters .* incusos-hal"):
        sysupdate.check_version("20251128120000", image_id="incusos-hal")
    # IncusOS's own ID leaves 17 (IncusOS_202511281200_verity_sig is 31).
    assert sysupdate.check_version("20251128120000", image_id="IncusOS")


def test_stage_refuses_before_running_anything(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="version"):
        sysupdate.stage(str(tmp_path), "2+0", shipped=str(SHIPPED), runtime_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("incusos_2+3.efi", ("incusos_2", 3, 0)),
        ("incusos_2+2-1.efi", ("incusos_2", 2, 1)),
        ("incusos_2+0-3.efi", ("incusos_2", 0, 3)),
        ("incusos_1.efi", ("incusos_1", -1, -1)),
        ("loader.conf", ("loader.conf", -1, -1)),
    ],
)
def test_boot_counter_in_an_entry_name(entry: str, parsed: tuple[str, int, int]) -> None:
    assert sysupdate.parse_entry(entry) == parsed


def _booted_machine(tmp_path: Path) -> None:
    (tmp_path / "usr/lib").mkdir(parents=True)
    (tmp_path / "usr/lib/os-release").write_text('ID=debian\nIMAGE_ID=incusos\nIMAGE_VERSION="2"\n')
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cmdline").write_text("console=ttyS0 usrhash=abc123 ro\n")
    efivars = tmp_path / "sys/firmware/efi/efivars"
    efivars.mkdir(parents=True)
    var = efivars / f"LoaderEntrySelected-{sysupdate.LOADER_GUID}"
    var.write_bytes(b"\x06\0\0\0" + "incusos_2+2-1.efi\0".encode("utf-16-le"))


def test_booted_reads_version_usrhash_and_the_selected_entry(tmp_path: Path) -> None:
    _booted_machine(tmp_path)
    assert sysupdate.booted(str(tmp_path)) == sysupdate.Booted(
        "2", "abc123", "incusos_2+2-1.efi", 2, 1
    )


def test_the_update_state_says_which_slot_runs(tmp_path: Path) -> None:
    root = tmp_path / "machine"
    _booted_machine(root)
    (tmp_path / "srv").mkdir()
    api = apiserver.make(tmp_path / "srv", [])
    api.root = root
    api.start()
    try:
        r = api.curl("GET", "/1.0/system/update")
        assert r.status == 200, r.json
        assert r.json["metadata"]["state"]["booted"] == {
            "version": "2",
            "usr_hash": "abc123",
            "entry": "incusos_2+2-1.efi",
            "tries_left": 2,
            "tries_done": 1,
        }
    finally:
        api.stop()


@pytest.mark.parametrize("name", ["", "A", "-x", ".x", "x/y", "x" * 64, "x_y", "../x"])
def test_application_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="name: "):
        sysext.check_name(name)


def test_only_images_of_a_known_format_are_taken(tmp_path: Path) -> None:
    bad = tmp_path / "bad.raw"
    bad.write_bytes(b"\0" * 8192)
    with pytest.raises(sysext.ImageError, match="neither a GPT disk image, erofs nor squashfs"):
        sysext.check_format(bad)
    squash = tmp_path / "s.raw"
    squash.write_bytes(b"hsqs" + b"\0" * 8192)
    assert sysext.check_format(squash) == "squashfs"
    erofs = tmp_path / "e.raw"
    erofs.write_bytes(b"\0" * 1024 + (0xE0F5E1E2).to_bytes(4, "little") + b"\0" * 4096)
    assert sysext.check_format(erofs) == "erofs"


def test_versions_compare_by_their_numbers() -> None:
    assert compare_versions("202511041800", "202511041601") == 1
    assert compare_versions("1.10", "1.9") == 1
    assert compare_versions("2", "2") == 0
    assert compare_versions("1", "2") == -1


def test_state_document_has_incusos_keys() -> None:
    doc = state_document(Installed("hello", "2", ("hello.service",), "00"), ["1", "2"])
    assert doc == {
        "state": {
            "is_primary": False,
            "initialized": True,
            "friendly_version": "2",
            "version": "2",
            "available_versions": ["1", "2"],
        },
        "config": {},
    }
    assert state_document(Installed("incus", "1", (), ""), ["1"])["state"]["is_primary"] is True


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buf.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (_member("../escape"), "outside the data directory"),
        (_member("/etc/passwd"), "outside the data directory"),
        (_member("link", tarfile.SYMTYPE, "/etc/shadow"), "not a file or a directory"),
        (_member("dev", tarfile.CHRTYPE), "not a file or a directory"),
    ],
)
def test_a_bad_data_archive_leaves_the_data_as_it_was(
    tmp_path: Path, member: tarfile.TarInfo, message: str
) -> None:
    data = tmp_path / "hello"
    data.mkdir()
    (data / "counter").write_text("7")
    archive = _tar([(_member("ok"), b"fine"), (member, b"x")])
    with pytest.raises(sysext.ImageError, match=message):
        sysext.restore_data(data, archive)
    assert [p.name for p in tmp_path.iterdir()] == ["hello"]
    assert (data / "counter").read_text() == "7"
    with pytest.raises(sysext.ImageError, match="cannot be read"):
        sysext.restore_data(data, b"not a tar archive at all")
    assert (data / "counter").read_text() == "7"


def test_data_backup_restore_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "hello"
    (data / "sub").mkdir(parents=True)
    (data / "counter").write_text("7")
    (data / "sub/x").write_text("y")
    archive = sysext.backup_data(data)
    sysext.wipe_data(data)
    assert data.is_dir() and list(data.iterdir()) == []
    sysext.restore_data(data, archive)
    assert (data / "counter").read_text() == "7" and (data / "sub/x").read_text() == "y"


def test_local_source_offers_only_listed_hashes_and_the_newest(tmp_path: Path) -> None:
    images = {"hello_1.raw": b"one", "hello_10.raw": b"ten", "hello_9.raw": b"nine"}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "other_99.raw").write_bytes(b"o")
    sums = "".join(
        f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in images.items() if n != "hello_10.raw"
    )
    (tmp_path / "SHA256SUMS").write_text(sums + "garbage line\n")
    found = asyncio.run(local_source(tmp_path)("hello"))
    assert found is not None and (found.version, found.path.name) == ("9", "hello_9.raw")
    assert found.sha256 == hashlib.sha256(b"nine").hexdigest()
    assert asyncio.run(local_source(tmp_path)("other")) is None
    assert asyncio.run(local_source(tmp_path / "none")("hello")) is None


# -- the API, served for real ------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[apiserver.Server]:
    require_tool("openssl", "curl")
    srv = apiserver.make(tmp_path, [])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _post(api: apiserver.Server, path: str, body: object) -> apiserver.Result:
    return api.curl(
        "POST", path, "-H", "Content-Type: application/json", body=json.dumps(body).encode()
    )


def test_applications_api_refusals(api: apiserver.Server) -> None:
    r = api.curl("GET", "/1.0/applications")
    assert r.status == 200 and r.json["metadata"] == [], r.body
    r = _post(api, "/1.0/applications", {})
    assert r.status == 400 and r.json["error"] == "missing application name", r.body
    r = _post(api, "/1.0/applications", {"name": "../etc"})
    assert r.status == 400 and "not an application name" in r.json["error"], r.body
    r = _post(api, "/1.0/applications", {"name": "hello"})
    assert r.status == 400 and "no image of it is available" in r.json["error"], r.body
    r = _post(api, "/1.0/applications", ["name"])
    assert r.status == 400 and "must be a JSON object" in r.json["error"], r.body
    for path in ("/1.0/applications/hello", "/1.0/applications/..%2Fx"):
        assert api.curl("GET", path).status == 404, path
    for action in ("restart", "remove", "factory-reset", "backup", "restore", "check-update"):
        r = _post(api, f"/1.0/applications/hello/:{action}", {})
        assert r.status == 404, (action, r.body)
    assert not (api.state / "applications.json").exists()


def test_install_without_systemd_writes_nothing(api: apiserver.Server, tmp_path: Path) -> None:
    source = api.state / "updates/applications"
    source.mkdir(parents=True)
    image = source / "hello_1.raw"
    image.write_bytes(b"hsqs" + b"\0" * 4096)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    (source / "SHA256SUMS").write_text(f"{digest}  hello_1.raw\n")
    r = _post(api, "/1.0/applications", {"name": "hello"})
    assert r.status == 503 and "without systemd" in r.json["error"], r.body
    assert not (api.target / "var/lib/extensions").exists()
    assert not (api.state / "applications.json").exists()


def test_update_handoff_refusal_reaches_the_checker_and_writes_nothing(tmp_path: Path) -> None:
    """The checker's thread hands over a verified image; without a system manager the
    install is refused, the refusal is raised in the checker's thread, nothing is
    placed; called on the event loop's own thread it refuses (it would deadlock)."""
    from incusos_hal.apply.applications import AppError, Applications, UpdateHandoff

    image = tmp_path / "hello.raw"
    image.write_bytes(b"hsqs" + b"\0" * 4096)

    async def main() -> None:
        apps = Applications(tmp_path / "state", str(tmp_path / "root"), None, asyncio.Lock())
        handoff = UpdateHandoff(apps, asyncio.get_running_loop())
        assert handoff.applications() == {}
        with pytest.raises(AppError, match="without systemd"):
            await asyncio.to_thread(handoff.application_ready, "hello", "1", image, digest)
        with pytest.raises(RuntimeError, match="worker thread"):
            handoff.application_ready("hello", "1", image, digest)

    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    asyncio.run(main())
    assert not (tmp_path / "root").exists() and not (tmp_path / "state").exists()


def test_an_image_swapped_after_its_check_is_refused(tmp_path: Path) -> None:
    """The installer holds the image to the hash the update checker verified (handed
    over with it), not to a hash of whatever is on disk at install time."""
    from incusos_hal.apply.applications import AppError, Applications, VerifiedImage

    image = tmp_path / "hello.raw"
    image.write_bytes(b"hsqs" + b"\0" * 4096)
    verified = hashlib.sha256(image.read_bytes()).hexdigest()
    apps = Applications(tmp_path / "state", str(tmp_path / "root"), None, asyncio.Lock())
    apps._check_image(VerifiedImage("hello", "1", image, verified))  # the file as checked
    image.write_bytes(b"hsqs" + b"\1" * 4096)  # swapped after the check
    with pytest.raises(AppError, match="not the one it was verified with") as refused:
        apps._check_image(VerifiedImage("hello", "1", image, verified))
    assert refused.value.status == 400


@pytest.mark.parametrize(("root", "target", "plugged"), [("/", "/", True), ("/", "/t", False)])
def test_the_service_plugs_the_installers_into_the_update_checker_only_on_this_machine(
    tmp_path: Path, root: str, target: str, plugged: bool
) -> None:
    """A live service hands verified updates to the A/B writer and the applications; a
    re-rooted one keeps the default, which installs nothing."""
    from types import SimpleNamespace

    from aiohttp import web

    from incusos_hal.api.applications import plug_into_updates
    from incusos_hal.api.http import SERVICE_KEY
    from incusos_hal.apply.applications import UpdateHandoff
    from incusos_hal.update import handoff

    app = web.Application()
    settings = SimpleNamespace(state_dir=tmp_path, root=root, target=target)
    app[SERVICE_KEY] = SimpleNamespace(settings=settings, systemd=None)  # type: ignore[assignment]
    before = handoff.current()
    try:
        asyncio.run(plug_into_updates(app))
        assert isinstance(handoff.current(), UpdateHandoff) is plugged
    finally:
        handoff.use(before)


@pytest.mark.parametrize(
    ("units", "refused"),
    [
        ("hello.service", None),
        ("hello.socket hello-lxcfs.service hello@one.service", None),
        ("systemd-networkd.service", "'systemd-networkd.service' is not one of"),
        ("hello.service other.service", "'other.service' is not one of"),
        ("helloworld.service", "'helloworld.service' is not one of"),
        ("hello.service ../x.service", "'../x.service' is not a unit name"),
    ],
)
def test_an_application_names_only_its_own_units(units: str, refused: str | None) -> None:
    """What an image's extension-release asks the service to start, restart and stop:
    its own units, never the host's or another application's."""
    from incusos_hal.apply.applications import AppError, _units

    release = {"ID": "_any", "INCUSOS_HAL_UNITS": units}
    if refused is None:
        assert _units(release, "hello") == tuple(units.split())
    else:
        with pytest.raises(AppError, match=refused) as e:
            _units(release, "hello")
        assert e.value.status == 400


class _NoteUnits:
    """The system manager calls remove() makes, noted (no systemd on the host)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def daemon_reload(self) -> None:
        self.calls.append("daemon-reload")

    async def restart(self, unit: str) -> None:
        self.calls.append(f"restart {unit}")

    async def start(self, unit: str, mode: str) -> None:
        self.calls.append(f"start {unit}")

    async def stop(self, unit: str) -> None:
        self.calls.append(f"stop {unit}")

    async def reload_or_restart(self, unit: str) -> None:
        self.calls.append(f"reload-or-restart {unit}")


def test_a_removed_seed_application_is_not_installed_again(tmp_path: Path) -> None:
    """The install seed's applications are wanted until installed; one the user removes
    afterwards is not handed to the update checker again (IncusOS reads the seed's list
    only while nothing is installed): the next check would reinstall it."""
    from incusos_hal.apply.applications import Applications, UpdateHandoff

    state = tmp_path / "state"
    state.mkdir()
    (state / "applications.wanted.json").write_text('["incus", "hello", "later"]\n')
    record = {"version": "1", "units": ["hello.service"], "sha256": "", "initialized": True}
    (state / "applications.json").write_text(
        json.dumps({"incus": {**record, "units": []}, "hello": record})
    )
    units = _NoteUnits()

    async def main() -> dict[str, str]:
        apps = Applications(state, str(tmp_path / "root"), units, asyncio.Lock())
        handoff = UpdateHandoff(apps, asyncio.get_running_loop())
        assert handoff.applications() == {"incus": "1", "hello": "1", "later": ""}
        await apps.remove("hello")
        return handoff.applications()

    assert asyncio.run(main()) == {"incus": "1", "later": ""}
    assert "stop hello.service" in units.calls


class _MergingUnits(_NoteUnits):
    """systemd-sysext's part, as far as the manager sees it: a refresh merges what
    /var/lib/extensions/hello.raw links to (its extension-release appears), and refuses
    an image that says BAD. The real merge is the container rung's (test_apps_system)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root
        self.fail_reload = False

    async def daemon_reload(self) -> None:
        from incusos_hal.apply.systemd import ApplyError

        await super().daemon_reload()
        if self.fail_reload:
            self.fail_reload = False  # once: the put-back's reload succeeds
            raise ApplyError("daemon-reload: timed out")

    async def reload_or_restart(self, unit: str) -> None:
        from incusos_hal.apply.systemd import ApplyError

        link = self.root / "var/lib/extensions/hello.raw"
        data = link.read_bytes() if link.exists() else b""
        self.calls.append(f"refresh {data[4:12].rstrip(bytes(1)).decode()}")
        if b"BAD" in data:
            raise ApplyError("systemd-sysext: refused")
        release = self.root / "usr/lib/extension-release.d/extension-release.hello"
        release.parent.mkdir(parents=True, exist_ok=True)
        release.write_text("ID=_any\nINCUSOS_HAL_UNITS=hello.service\n")


def _image(tmp_path: Path, version: str, mark: bytes = b"") -> VerifiedImage:
    path = tmp_path / f"hello_{version}.raw"
    path.write_bytes(b"hsqs" + f"v{version}".encode().ljust(8, b"\0") + mark + bytes(4096))
    return VerifiedImage("hello", version, path, hashlib.sha256(path.read_bytes()).hexdigest())


def test_versions_are_kept_and_switched_as_incusos_switches_them(tmp_path: Path) -> None:
    """An update keeps the version it replaced (also one placed before versions were
    kept: a file, not a link); :switch-version goes back to it, or to a named kept
    version, with IncusOS's refusals; a third version forgets the oldest; a version
    systemd-sysext refuses leaves the link and the record as they were."""
    from incusos_hal.apply.applications import AppError, Applications
    from incusos_hal.hal import sysext

    root, state = tmp_path / "root", tmp_path / "state"
    state.mkdir()
    first = _image(tmp_path, "1")
    (state / "applications.json").write_text(
        json.dumps({"hello": {"version": "1", "units": ["hello.service"], "sha256": first.sha256}})
    )
    legacy = root / "var/lib/extensions/hello.raw"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(first.path.read_bytes())
    units = _MergingUnits(root)

    async def main() -> dict[str, Any]:
        apps = Applications(state, str(root), units, asyncio.Lock())
        seen: dict[str, Any] = {}
        with pytest.raises(AppError, match="only one version") as one:
            await apps.switch_version("hello", "")
        seen["only_one"] = one.value.status
        await apps.install_verified(_image(tmp_path, "2"), new=False)
        seen["after_update"] = apps.available_versions(apps.get("hello"))
        seen["link_2"] = os.readlink(legacy)
        await apps.switch_version("hello", "")
        seen["back"] = apps.get("hello").version
        with pytest.raises(AppError, match="no earlier version") as earliest:
            await apps.switch_version("hello", "")
        seen["earliest"] = earliest.value.status
        with pytest.raises(AppError, match="'9' because it does not exist locally"):
            await apps.switch_version("hello", "9")
        await apps.switch_version("hello", "2")
        seen["forward"] = (apps.get("hello").version, legacy.read_bytes()[4:6])
        await apps.install_verified(_image(tmp_path, "3"), new=False)
        seen["after_third"] = apps.available_versions(apps.get("hello"))
        before = (os.readlink(legacy), (state / "applications.json").read_bytes())
        # Version 2 kept, but changed on disk since its install: never run.
        kept_2 = sysext.version_path(str(root), "hello", "2")
        kept_2.write_bytes(kept_2.read_bytes() + b"changed")
        with pytest.raises(AppError, match="not the one verified when it was installed"):
            await apps.switch_version("hello", "2")
        # An image whose hash is not the one verified is never kept.
        with pytest.raises(AppError, match="not the one it was verified with"):
            bad = _image(tmp_path, "4")
            await apps.install_verified(VerifiedImage("hello", "4", bad.path, "0" * 64), new=False)
        # systemd-sysext refuses version 4: linked back, merged again, nothing recorded.
        with pytest.raises(AppError, match="systemd-sysext refused"):
            await apps.install_verified(_image(tmp_path, "4", b"BAD"), new=False)
        # The system manager's reload fails after the merge: the same.
        units.fail_reload = True
        with pytest.raises(AppError, match="did not reload its units") as reload:
            await apps.install_verified(_image(tmp_path, "5"), new=False)
        units.fail_reload = False
        seen["reload_status"] = reload.value.status
        seen["unchanged"] = (os.readlink(legacy), (state / "applications.json").read_bytes())
        seen["before"] = before
        seen["after_refused"] = sorted(sysext.versions(str(root), "hello"))
        seen["merged_last"] = units.calls[-2:]
        # A link that disagrees with the record (a crash between the two): switching to
        # the recorded version links and merges it again.
        sysext.point(str(root), "hello", str(kept_2))
        await apps.switch_version("hello", "3")
        seen["repaired"] = (os.readlink(legacy), units.calls[-3:])
        return seen

    seen = asyncio.run(main())
    assert (seen["only_one"], seen["earliest"]) == (400, 400)
    assert seen["after_update"] == ["1", "2"]
    assert seen["link_2"] == str(root / "var/lib/incusos-extensions/hello/2.raw")
    assert seen["back"] == "1"
    assert seen["forward"] == ("2", b"v2")
    assert seen["after_third"] == ["2", "3"]
    assert seen["unchanged"] == seen["before"]
    assert seen["after_refused"] == ["2", "3"]
    assert seen["reload_status"] == 500
    assert seen["merged_last"] == ["refresh v3", "daemon-reload"]  # what ran, merged again
    link_3 = str(root / "var/lib/incusos-extensions/hello/3.raw")
    assert seen["repaired"] == (link_3, ["refresh v3", "daemon-reload", "restart hello.service"])
    assert json.loads((state / "applications.json").read_text())["hello"]["version"] == "3"
    # Each switch restarted the unit on the version it merged.
    assert [c for c in units.calls if c.startswith(("refresh", "restart"))][:8] == [
        "refresh v2",
        "restart hello.service",
        "refresh v1",
        "restart hello.service",
        "refresh v2",
        "restart hello.service",
        "refresh v3",
        "restart hello.service",
    ]


def test_switch_version_over_the_api_refuses_bad_bodies(api: apiserver.Server) -> None:
    record = {"version": "1", "units": ["hello.service"], "sha256": ""}
    (api.state / "applications.json").write_text(json.dumps({"hello": record}))

    def refusals(cases: tuple[tuple[str, bytes, int, str], ...]) -> None:
        before = (api.state / "applications.json").read_bytes()
        for name, body, status, words in cases:
            r = api.curl("POST", f"/1.0/applications/{name}/:switch-version", body=body)
            assert (r.status, words in r.json["error"]) == (status, True), r.body
        assert (api.state / "applications.json").read_bytes() == before

    refusals(
        (
            ("hello", b'{"version": 2}', 400, "version: expected a string"),
            ("hello", b'{"versoin": "2"}', 400, "unknown field 'versoin'"),
            ("hello", b"[]", 400, "must be a JSON object"),
            ("hello", b"", 400, "only one version of the application is available locally"),
            ("other", b"{}", 404, "Not Found"),
        )
    )
    # Two versions kept: a version not among them, a path, and a kept image whose bytes
    # are not the ones verified at its install are refused before anything is touched.
    kept = api.target / "var/lib/incusos-extensions/hello"
    kept.mkdir(parents=True)
    for version in ("1", "2"):
        (kept / f"{version}.raw").write_bytes(b"hsqs" + version.encode() * 100)
    verified = {"1": "0" * 64, "2": "0" * 64}
    (api.state / "applications.json").write_text(
        json.dumps({"hello": {**record, "kept": verified}})
    )
    refusals(
        (
            ("hello", b'{"version": "../../x"}', 400, "'../../x' because it does not exist"),
            ("hello", b'{"version": "3"}', 400, "'3' because it does not exist locally"),
            ("hello", b'{"version": "2"}', 400, "not the one verified when it was installed"),
            ("hello", b"", 400, "no earlier version is available locally"),
        )
    )
    assert not (api.target / "var/lib/extensions").exists()
