"""Applications as system extensions: install, update, remove, restart, and their data.

An application is one sysext image, /var/lib/extensions/NAME.raw, merged over /usr by
systemd-sysext. Its image's extension-release.NAME names the units to run
(INCUSOS_HAL_UNITS="a.service b.service"); its data lives in /var/lib/incusos-apps/NAME.
What is installed, at which version, is recorded in the state dir (applications.json).

The input is always a verified image (`VerifiedImage`: the updates side's download,
checked against the signed index); `install_verified` checks its hash once more, then:
place the image atomically, refresh the extensions through the system manager
(systemd-sysext.service's reload, in the host's mount namespace), reload units, and
start (install) or restart (update) the application's units. A refresh that fails puts
the previous image back and refreshes again: a bad image never replaces a good one.

One primary application (IncusOS's: incus, migration-manager, operations-center): a
second is refused, the primary cannot be removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ..config.seed import PRIMARY_APPLICATIONS
from ..core.errors import Refusal
from ..core.files import atomic_write
from ..hal import sysext, sysupdate
from ..hal.sysext import ImageError, VerifiedImage
from ..state.paths import APPLICATIONS_FILE, WANTED_APPLICATIONS

# One order for the checker and the installer (systemd-sysupdate's, the UAPI version
# format's): an update the checker takes as newer is one the installer installs.
from ..update.index import compare_versions
from .systemd import ApplyError

PRIMARY = frozenset(PRIMARY_APPLICATIONS)
DATA_DIR = "var/lib/incusos-apps"
SYSEXT_UNIT = "systemd-sysext.service"
UNIT = re.compile(r"[A-Za-z0-9:_.\\@-]{1,250}\.(service|socket|timer|path)", re.ASCII)


class AppError(Refusal):
    """An application request is refused (status, message)."""


class Units(Protocol):
    """What the manager asks of the system manager."""

    async def daemon_reload(self) -> None: ...
    async def restart(self, unit: str) -> None: ...
    async def start(self, unit: str, mode: str) -> None: ...
    async def stop(self, unit: str) -> None: ...
    async def reload_or_restart(self, unit: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Installed:
    name: str
    version: str
    units: tuple[str, ...]
    sha256: str
    initialized: bool = True
    last_restored: str = ""
    # (version, sha256) of each version kept on disk, as verified when it was installed
    kept: tuple[tuple[str, str], ...] = ()


def _units(release: dict[str, str], app: str) -> tuple[str, ...]:
    """The units an application asks to be started and restarted with it: only its own,
    named after it (`APP.service`, `APP-lxcfs.service`, `APP@x.service`), as IncusOS's
    applications' units are. An image cannot have the service restart or stop a unit of
    the host (`systemd-networkd.service`) or of another application."""
    words = tuple(release.get("INCUSOS_HAL_UNITS", "").split())
    for word in words:
        if not UNIT.fullmatch(word):
            raise AppError(
                400, f"extension-release: INCUSOS_HAL_UNITS: {word!r} is not a unit name"
            )
        stem = word.rsplit(".", 1)[0]
        if stem != app and not stem.startswith((f"{app}-", f"{app}@")):
            raise AppError(
                400,
                f"extension-release: INCUSOS_HAL_UNITS: {word!r} is not one of the "
                f"application's own units (named {app}, {app}-* or {app}@*)",
            )
    return words


@dataclass
class Applications:
    state_dir: Path
    root: str
    units: Units | None
    lock: asyncio.Lock

    # -- the record -------------------------------------------------------------------

    def wanted(self) -> list[str]:
        """The applications the install seed listed (apply/seed.py), valid names only: a
        damaged file asks for nothing."""
        try:
            doc = json.loads((self.state_dir / WANTED_APPLICATIONS).read_text())
        except (OSError, ValueError):
            return []
        names = doc if isinstance(doc, list) else []
        return [n for n in names if isinstance(n, str) and sysext.NAME.fullmatch(n)]

    def _unwant(self, name: str) -> None:
        """`name` off the seed's wanted list: removed by the user, it is not for the
        update checker to install again."""
        wanted = self.wanted()
        if name in wanted:
            wanted.remove(name)
            data = (json.dumps(wanted) + "\n").encode()
            atomic_write(self.state_dir / WANTED_APPLICATIONS, data, 0o600)

    def installed(self) -> dict[str, Installed]:
        try:
            doc = json.loads((self.state_dir / APPLICATIONS_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise AppError(500, f"{APPLICATIONS_FILE} cannot be read: {e}") from None
        return {
            name: Installed(
                name,
                str(a["version"]),
                tuple(a.get("units", ())),
                str(a.get("sha256", "")),
                bool(a.get("initialized", True)),
                str(a.get("last_restored", "")),
                tuple(sorted((str(v), str(d)) for v, d in (a.get("kept") or {}).items())),
            )
            for name, a in doc.items()
        }

    def _save(self, apps: dict[str, Installed]) -> None:
        doc = {
            n: {
                "version": a.version,
                "units": list(a.units),
                "sha256": a.sha256,
                "initialized": a.initialized,
                **({"last_restored": a.last_restored} if a.last_restored else {}),
                **({"kept": dict(a.kept)} if a.kept else {}),
            }
            for n, a in sorted(apps.items())
        }
        atomic_write(
            self.state_dir / APPLICATIONS_FILE, (json.dumps(doc, indent=1) + "\n").encode(), 0o600
        )

    def get(self, name: str) -> Installed:
        app = self.installed().get(name)
        if app is None:
            raise AppError(404, "Not Found")
        return app

    def data_dir(self, name: str) -> Path:
        return Path(self.root) / DATA_DIR / sysext.check_name(name)

    def _systemd(self) -> Units:
        if self.units is None:
            raise AppError(503, "this service runs without systemd (a scratch target)")
        return self.units

    async def _thread(self, work: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, work)

    # -- install and update -------------------------------------------------------------

    async def install_verified(self, image: VerifiedImage, *, new: bool) -> Installed:
        """THE interface the updates side calls: application `image.name` at
        `image.version`, verified at `image.path`. `new`: an install (refused if it is
        installed, or a second primary); else an update of an installed one (refused
        unless newer). Returns what is installed afterwards."""
        sysext.check_name(image.name)
        async with self.lock:
            apps = self.installed()
            current = apps.get(image.name)
            if new:
                if current is not None:
                    raise AppError(409, "Conflict")
                if image.name in PRIMARY and any(n in PRIMARY for n in apps):
                    raise AppError(400, "a primary application is already installed")
            else:
                if current is None:
                    raise AppError(404, "Not Found")
                if compare_versions(image.version, current.version) <= 0:
                    raise AppError(
                        400,
                        f"version {image.version} is not newer than the installed "
                        f"{current.version}",
                    )
            self._systemd()  # without a system manager: refused before anything is written
            await self._thread(lambda: self._check_image(image))
            kept_before = set(sysext.versions(self.root, image.name))
            verified = dict(current.kept) if current else {}
            if current is not None and current.sha256:
                verified.setdefault(current.version, current.sha256)
            verified[image.version] = image.sha256.lower()

            def keep() -> None:
                if current is not None:
                    sysext.adopt(self.root, image.name, current.version)
                sysext.keep(self.root, image.name, image.version, image.path, image.sha256)

            try:
                await self._thread(keep)
            except ImageError as e:
                raise AppError(400, str(e)) from None
            except OSError as e:
                raise AppError(500, f"the image cannot be kept: {e.strerror or e}") from None
            # Kept: this version and the one it replaced (`switch_version` goes back).
            stays = {image.version} | ({current.version} if current else set())
            record = Installed(
                image.name,
                image.version,
                (),
                image.sha256,
                kept=tuple(sorted((v, d) for v, d in verified.items() if v in stays)),
            )
            try:
                record = await self._merge(apps, record)
            except AppError:
                if image.version not in kept_before:
                    sysext.version_path(self.root, image.name, image.version).unlink(
                        missing_ok=True
                    )
                raise
            await self._start_or_restart(record, current, new=new)
            await self._thread(lambda: sysext.forget(self.root, image.name, stays))
            return record

    async def _merge(self, apps: dict[str, Installed], record: Installed) -> Installed:
        """Link kept version `record.version` as the application's image, have
        systemd-sysext merge it, reload units, and save `record` with the units the merged
        extension-release names. Any step refused: the link put back, the extensions
        merged and units reloaded again, nothing saved, so what ran before is what is
        linked, merged and recorded (400 for a refused image, else 500)."""
        name = record.name
        systemd = self._systemd()
        previous = await self._thread(lambda: sysext.link(self.root, name, record.version))
        stage = "systemd-sysext refused the image"
        try:
            await systemd.reload_or_restart(SYSEXT_UNIT)
            release = sysext.release(self.root, name)
            if release is None:
                raise AppError(400, f"the image carries no extension-release.{name} once merged")
            record = replace(record, units=_units(release, name))
            stage = "the system manager did not reload its units"
            await systemd.daemon_reload()
            stage = "the application's record cannot be saved"

            def save() -> None:
                self.data_dir(name).mkdir(parents=True, exist_ok=True, mode=0o755)
                self._save({**apps, name: record})

            await self._thread(save)
        except (ApplyError, AppError, OSError) as e:
            await self._thread(lambda: sysext.point(self.root, name, previous))
            with contextlib.suppress(ApplyError):  # the first error is the one to report
                await systemd.reload_or_restart(SYSEXT_UNIT)
                await systemd.daemon_reload()
            if isinstance(e, AppError):
                raise
            status = 400 if isinstance(e, ApplyError) and "sysext" in stage else 500
            raise AppError(status, f"{stage}: {e}") from None
        apps[name] = record
        return record

    async def _start_or_restart(
        self, record: Installed, current: Installed | None, *, new: bool
    ) -> None:
        systemd = self._systemd()
        for unit in record.units:
            if new:
                await systemd.start(unit, "replace")
            else:
                await systemd.restart(unit)
        # A version that no longer ships a unit the old one ran: stop it.
        if current is not None:
            for unit in set(current.units) - set(record.units):
                await systemd.stop(unit)

    def available_versions(self, app: Installed) -> list[str]:
        """The versions of `app` kept on disk, oldest first (the installed one included,
        also when it was placed before versions were kept)."""
        found = set(sysext.versions(self.root, app.name)) | {app.version}
        return sorted(found, key=functools.cmp_to_key(compare_versions))

    async def switch_version(self, name: str, version: str) -> Installed:
        """IncusOS's :switch-version: run kept version `version` of `name`, or ("") the
        one before the installed one; merged, its units restarted. IncusOS's refusals
        (400) for a version not kept and for nothing to go back to. A kept image is run
        only while its bytes are the ones verified when it was installed. Switching to the
        recorded version links it again if the link says otherwise (a repair)."""
        async with self.lock:
            apps = self.installed()
            current = apps.get(name)
            if current is None:
                raise AppError(404, "Not Found")
            available = self.available_versions(current)
            if len(available) == 1:
                raise AppError(
                    400,
                    "only one version of the application is available locally, cannot "
                    "switch to a different version",
                )
            if not version:
                at = available.index(current.version)
                if at == 0:
                    raise AppError(
                        400,
                        "cannot rollback application as no earlier version is available locally",
                    )
                version = available[at - 1]
            elif version not in available:
                raise AppError(
                    400,
                    f"cannot switch application to version '{version}' because it does not "
                    "exist locally",
                )
            path = sysext.version_path(self.root, name, version)
            if version == current.version and sysext.linked(self.root, name) == str(path):
                return current
            verified = dict(current.kept).get(version) or (
                current.sha256 if version == current.version else ""
            )
            try:
                await self._thread(lambda: sysext.adopt(self.root, name, current.version))
                digest = await self._thread(lambda: sysext.sha256(path))
            except OSError as e:
                raise AppError(500, f"the kept image cannot be read: {e.strerror or e}") from None
            if not verified or digest != verified.lower():
                raise AppError(
                    400,
                    f"the kept image of version '{version}' is not the one verified when it "
                    "was installed",
                )
            self._systemd()
            record = replace(current, version=version, sha256=digest)
            record = await self._merge(apps, record)
            await self._start_or_restart(record, current, new=False)
            return record

    def _check_image(self, image: VerifiedImage) -> None:
        try:
            sysext.check_format(image.path)
            digest = sysext.sha256(image.path)
        except OSError as e:
            raise AppError(400, f"the image cannot be read: {e.strerror}") from None
        except ImageError as e:
            raise AppError(400, str(e)) from None
        if digest != image.sha256.lower():
            raise AppError(400, "the image's sha256 is not the one it was verified with")

    # -- the other actions --------------------------------------------------------------

    async def remove(self, name: str) -> None:
        async with self.lock:
            apps = self.installed()
            app = apps.get(name)
            if app is None:
                raise AppError(404, "Not Found")
            if name in PRIMARY:
                raise AppError(500, "cannot remove a primary application")
            systemd = self._systemd()
            for unit in app.units:
                await systemd.stop(unit)
            await self._thread(lambda: sysext.wipe_data(self.data_dir(name)))
            await self._thread(lambda: sysext.remove(self.root, name))
            await systemd.reload_or_restart(SYSEXT_UNIT)
            await systemd.daemon_reload()
            del apps[name]
            self._save(apps)
            self._unwant(name)

    async def restart(self, name: str) -> None:
        app = self.get(name)
        systemd = self._systemd()
        for unit in app.units:
            await systemd.restart(unit)

    async def factory_reset(self, name: str) -> None:
        """The application's data wiped, its units restarted on an empty directory."""
        async with self.lock:
            app = self.get(name)
            systemd = self._systemd()
            for unit in app.units:
                await systemd.stop(unit)
            await self._thread(lambda: sysext.wipe_data(self.data_dir(name)))
            for unit in app.units:
                await systemd.start(unit, "replace")

    async def backup(self, name: str) -> bytes:
        self.get(name)
        data: bytes = await self._thread(lambda: sysext.backup_data(self.data_dir(name)))
        return data

    async def restore(self, name: str, archive: bytes) -> None:
        """Checked and unpacked first (a bad archive is a 400 and nothing stops), then
        swapped in with the units stopped, and the units started again."""
        async with self.lock:
            apps = self.installed()
            app = apps.get(name)
            if app is None:
                raise AppError(404, "Not Found")
            systemd = self._systemd()
            data_dir = self.data_dir(name)
            try:
                staging = await self._thread(lambda: sysext.unpack_data(data_dir, archive))
            except ImageError as e:
                raise AppError(400, str(e)) from None
            for unit in app.units:
                await systemd.stop(unit)
            try:
                await self._thread(lambda: sysext.swap_data(data_dir, staging))
            finally:
                for unit in app.units:
                    await systemd.start(unit, "replace")
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            apps[name] = replace(app, last_restored=stamp)
            self._save(apps)


def state_document(app: Installed, available: list[str]) -> dict[str, Any]:
    """IncusOS's Application: {"state": ApplicationState, "config": {}}; every state key
    is always present but last_restored (omitempty). `available`: the versions kept."""
    state: dict[str, Any] = {
        "is_primary": app.name in PRIMARY,
        "initialized": app.initialized,
        "friendly_version": app.version,
        "version": app.version,
        "available_versions": available,
    }
    if app.last_restored:
        state["last_restored"] = app.last_restored
    return {"state": state, "config": {}}


# An application image source: the updates side's provider. Given a name, the newest
# verified image it has (None: it has none).
Source = Callable[[str], Awaitable[VerifiedImage | None]]


@dataclass
class UpdateHandoff:
    """The update checker's hand-off, by shape (the updates side's `update.handoff.
    Handoff`: applications(), application_ready(), os_ready()), called from the
    checker's worker thread once a download is verified against the signed index.

    application_ready installs or updates through `install_verified` on the service's
    event loop; os_ready writes the OS files into the inactive slot with
    systemd-sysupdate (hal/sysupdate.stage) and says a reboot would run them."""

    apps: Applications
    loop: asyncio.AbstractEventLoop

    def applications(self) -> dict[str, str]:
        """The installed applications' versions, and "" for each the install seed asked
        for that is not installed yet (the checker then installs it)."""
        installed = {name: app.version for name, app in self.apps.installed().items()}
        return {**dict.fromkeys(self.apps.wanted(), ""), **installed}

    def application_ready(self, name: str, version: str, path: Path, sha256: str) -> None:
        self._off_loop()
        # `sha256` is the hash the checker verified (from the signed index); the install
        # holds the file to it, so a file swapped after the check is refused.
        image = VerifiedImage(name, version, path, sha256)
        new = name not in self.apps.installed()
        work = self.apps.install_verified(image, new=new)
        asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def os_ready(self, version: str, path: Path) -> bool:
        self._off_loop()
        sysupdate.stage(str(path), version)
        return True

    def _off_loop(self) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return
        if running is self.loop:
            raise RuntimeError("the update hand-off must be called from a worker thread")
