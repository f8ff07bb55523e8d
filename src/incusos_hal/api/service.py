"""What the API does, apart from HTTP: read `{config, state}` objects, take a new
section through validate -> store -> apply, hold a network change until confirmed,
back up and restore the state dir.

A PUT is all-or-nothing. The new document is the stored one with the section replaced;
a document that does not validate is refused with every error, its field paths written
as the client sent them (`config.interfaces[0].hwaddr`), and nothing changes. A valid
one is stored atomically and applied; if applying fails, the previous document is
stored and applied again and the client gets the error. One change at a time: writes
hold a lock, and while a network change waits for its confirmation every other write
is refused with 409.

A network change's apply is bounded by its work (`Settings.apply_limit`, see
apply.TimeLimit). Out of time, the configure step stops between two file writes and puts
back what it touched; only once its thread has ended is the previous document stored
and applied again, and the client reads that the apply timed out after so many seconds.
config.last-good.toml follows only an apply systemd accepted (and, for a change held
for confirmation, only its confirmation).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..apply.deadline import Deadline, TimedOut, TimeLimit
from ..apply.systemd import ApplyError, Systemd
from ..config import Config, ConfigError, FieldError, from_dict, parse_toml, to_api, to_dict
from ..core.errors import Refusal
from ..core.files import atomic_write, describe_os_error
from ..core.watch import DirectoryWatch
from ..sections import SECTIONS, by_name, changes
from ..sections.base import Refused, Section
from ..services import Machine, ServiceError, SystemService
from ..services import supported as supported_services
from ..services.base import restore_files, saved_files
from ..state import store
from ..state.paths import FLAGS_FILE, UNCONFIRMED_FILE
from . import backup
from . import envelope as env

# The longest a network change is held for its confirmation, whatever the document says
# (a duration of hundreds of digits is an infinite float): a hold must end, and its
# seconds left must be a finite JSON number.
MAX_HOLD_SECONDS = 24 * 3600.0


class ApiError(Refusal):
    """The API refuses a request: answered with `status` and `message`."""


@dataclass(frozen=True, slots=True)
class Settings:
    state_dir: Path
    root: str = "/"  # where the HAL reads /sys, /proc, /dev, efivarfs
    target: str = "/"  # where the configure step writes
    live: bool = True  # may rename links and set the hostname
    tcti: str | None = None
    unit_dir: str | None = None
    # How long a network change may take to apply before it counts as failed.
    apply_limit: TimeLimit = field(default_factory=TimeLimit)
    # How long an update server may stay silent (connecting, or between two reads).
    update_read_timeout: float = 30.0


@dataclass
class Pending:
    """A network change applied but not yet confirmed."""

    previous: bytes | None
    deadline: float
    timer: asyncio.TimerHandle | None = None


def config_half(body: Any) -> dict[str, Any]:
    """The `config` half of a PUT body (IncusOS's `{config, state}` document; `state` is
    read-only and ignored), or the 400 that says what is wrong with the body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - {"config", "state"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown field (expected config, state)")
    section_raw = body.get("config", {})
    if not isinstance(section_raw, dict):
        raise ApiError(400, "config: must be an object")
    return section_raw


@dataclass
class Service:
    settings: Settings
    systemd: Systemd | None
    log: Callable[[str, str], None] = lambda level, message: None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: Pending | None = None
    on_config: Callable[[Config], None] = lambda config: None
    # Whether HTTPS is served (set by the application that serves it).
    listener_active: Callable[[], bool] = lambda: False
    _config: tuple[tuple[Any, ...], Config] | None = None
    _config_lock: threading.Lock = field(default_factory=threading.Lock)
    _watch: DirectoryWatch | None = None
    _unwatchable: bool = False
    _plain: bool = False
    _machine_id: str | None = None
    _sections: dict[str, tuple[Config, Any, str]] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, work: Any) -> None:
        """Run a coroutine in the background, holding it until it ends (the loop keeps
        only a weak reference to tasks)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reading ------------------------------------------------------------------------

    def config(self) -> Config:
        """The stored document (with the store's fallbacks), parsed once per version of
        the files: every request reads it (the peer check needs socket_uids).

        With an inotify watch on the state dir (core.watch), "unchanged" is one poll of
        an empty event queue, and any event there means read again (a rewrite in place
        within one timestamp tick can keep a file's inode, mtime and size). Without one
        (none to be had, the watch lost) or while either file is a link (a change through
        another name is not reported to the directory), the files' stat decides, as it
        did for every request before. The lock: a thread must not take the old document
        while another has drained the event but not yet parsed the new one."""
        with self._config_lock:
            reread = False
            watch = self._state_watch()
            if watch is not None and self._plain and self._config is not None:
                if not watch.changed():
                    return self._config[1]
                reread = True
            key, self._plain = _files_key(self.settings.state_dir)
            if reread or self._config is None or key != self._config[0]:
                self._config = (key, store.load(self.settings.state_dir).config)
            return self._config[1]

    def _state_watch(self) -> DirectoryWatch | None:
        if self._watch is None and not self._unwatchable:
            try:
                self._watch = DirectoryWatch(self.settings.state_dir)
            except OSError:  # no watch to be had: the files' stat decides, every call
                self._unwatchable = True
        return None if self._watch is None or self._watch.lost else self._watch

    def flags(self) -> dict[str, Any]:
        try:
            raw = json.loads(Path(self.settings.state_dir, FLAGS_FILE).read_bytes())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def set_flag(self, name: str, value: Any) -> None:
        flags = {**self.flags(), name: value}
        data = json.dumps(flags, indent=2, sort_keys=True).encode() + b"\n"
        atomic_write(Path(self.settings.state_dir, FLAGS_FILE), data, 0o600)

    def table_row(self, name: str) -> Section:
        row = by_name(name)
        if row is None:
            raise ApiError(404, f"no section {name!r}")
        return row

    def section(self, name: str, config: Config | None = None) -> tuple[Any, str]:
        """A section as API data (as IncusOS writes it: its non-omitempty fields always
        there) and its ETag, computed once per stored document."""
        config = config or self.config()
        cached = self._sections.get(name)
        if cached is None or cached[0] is not config:
            row = self.table_row(name)
            data = to_api(getattr(row.stored(config), row.attribute))
            cached = (config, data, env.etag(data))
            self._sections[name] = cached
        return cached[1], cached[2]

    # -- writing ------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.pending is not None:
            # IncusOS's words (its tests compare them); 409, not its 400: a conflict.
            raise ApiError(
                409,
                "a pending network configuration must first be confirmed before a new "
                "configuration can be applied",
            )

    def candidate(self, name: str, body: Any) -> Config:
        """The document a PUT of `body` to section `name` would store, validated."""
        section_raw = config_half(body)
        attribute = self.table_row(name).attribute
        raw = to_dict(self.config())
        raw[attribute] = section_raw
        try:
            return from_dict(raw)
        except ConfigError as e:
            raise ApiError(400, _client_paths(e.errors, attribute)) from None

    async def put_section(self, name: str, body: Any, if_match: str | None = None) -> None:
        """Validate, run the section's checks and its work before storing, store, apply;
        a change the section holds for confirmation is rolled back unless confirmed.

        `if_match` (the request's If-Match) is compared here, under the lock, with the
        section as stored at that moment: of concurrent PUTs carrying the same ETag exactly
        one wins, whatever the others await (the security section's keyslot sync runs in
        an executor) before they store."""
        row = self.table_row(name)
        async with self.lock:
            if not env.if_match_ok(if_match, self.section(name)[1]):
                raise ApiError(
                    412, "the resource changed since it was read (If-Match does not match its ETag)"
                )
            self._check_writable()
            config = self.candidate(name, body)
            current = self.config()
            problems = row.check(config, current, self.settings.root)
            if problems:
                raise ApiError(400, _client_paths(problems, row.attribute))
            previous = _read_current(self.settings.state_dir)
            if row.before_store is not None:
                try:
                    await row.before_store(self, config, current)
                except Refused as e:
                    raise ApiError(e.status, e.message) from None
            timeout = row.confirmation(config)
            config = row.stored(config)
            if timeout > 0:
                atomic_write(self._unconfirmed, previous or b"", 0o600)
            try:
                await self._store_and_apply(config, previous, mark_good=timeout <= 0)
            except BaseException:
                self._unconfirmed.unlink(missing_ok=True)
                raise
            if timeout > 0:
                self._hold(previous, timeout)

    # -- what a section may use of the service (sections.base.Context) ----------------

    def schedule(self, target: str) -> bool:
        """Start reboot.target or poweroff.target half a second from now, after the answer
        has gone out (the job takes this service down with the machine). False without
        systemd."""
        systemd = self.systemd
        if systemd is None:
            return False
        asyncio.get_running_loop().call_later(
            0.5, lambda: self.spawn(systemd.start(target, "replace-irreversibly"))
        )
        return True

    async def run_in_thread(self, work: Callable[[], Any]) -> Any:
        """Blocking work (the TPM, LUKS headers) off the event loop; a section's Refused
        comes through as it was raised."""
        return await asyncio.get_running_loop().run_in_executor(None, work)

    async def flush_dns(self) -> None:
        """resolved forgets every cached answer (IncusOS's `:flush-dns`), over D-Bus."""
        if self.systemd is None:
            raise ApiError(503, "this service runs without systemd (a scratch target)")
        try:
            await self.systemd.flush_dns_caches()
        except ApplyError as e:
            raise ApiError(500, str(e)) from None

    async def tpm_rebind(self) -> None:
        """IncusOS's tpm-rebind: re-seal the volumes the TPM no longer unseals, with the
        configured recovery keys to authorise it (see security.tpm_rebind)."""
        async with self.lock:
            self._check_writable()
            keys = self.config().security.encryption_recovery_keys
            await asyncio.get_running_loop().run_in_executor(None, self._tpm_rebind, keys)

    def _tpm_rebind(self, keys: tuple[str, ...]) -> None:
        from ..hal import tpm
        from ..security.rebind import RebindError, RebindRefused, tpm_rebind

        try:
            with tpm.open_tpm_if_any(self.settings.tcti) as handle:  # None: refused if needed
                done = tpm_rebind(self.settings.root, handle, keys)
        except RebindRefused as e:
            raise ApiError(409, str(e)) from None
        except RebindError as e:
            raise ApiError(500, str(e)) from None
        for volume in done.rebound:
            self.log(
                "info",
                f"volume {volume.volume}: TPM token re-sealed to PCRs "
                f"{','.join(map(str, volume.pcrs)) or 'none (signed)'} in keyslot "
                f"{volume.keyslot}; keyslot(s) {list(volume.removed)} removed",
            )
        for name, why in done.skipped.items():
            self.log("warning", f"volume {name}: not rebound, {why}")

    async def _store_and_apply(
        self, config: Config, previous: bytes | None, *, mark_good: bool = True
    ) -> None:
        store.save(self.settings.state_dir, config)
        try:
            await self.apply(limit=self.settings.apply_limit, mark_good=mark_good)
        except Exception as e:  # whatever failed, the previous document goes back
            # apply() returns only once its worker thread has ended: nothing still
            # writes the new document's files while the previous one is applied.
            self.log("error", f"applying the new configuration failed, rolling back: {_reason(e)}")
            _restore_current(self.settings.state_dir, previous)
            await self._reapply("the previous configuration")
            if isinstance(e, TimedOut):
                raise ApiError(500, f"{e}; previous configuration restored") from None
            raise ApiError(
                500,
                f"applying the configuration failed, previous one restored: {self._public(e)}",
            ) from None
        self.on_config(config)

    def _public(self, e: BaseException) -> str:
        """`e` for the client: an OSError without this machine's paths (the file as it
        is under the target, or its base name); the journal has the full text."""
        if isinstance(e, OSError):
            return describe_os_error(e, self.settings.target)
        return _reason(e)

    async def _reapply(self, what: str) -> None:
        """Apply what was just put back; a failure here is logged, the first one reported."""
        try:
            await self.apply()
        except Exception as e:  # logged; the caller reports the first failure
            self.log("error", f"re-applying {what} failed: {_reason(e)}")

    async def apply(self, *, limit: TimeLimit | None = None, mark_good: bool = True) -> None:
        """The configure step on the stored document, then systemd, within `limit`
        (none: as long as it takes); then, if asked, the document is the last good one.

        Returns or raises only once the configure step's thread has ended: out of time
        (TimedOut) its files are the previous ones again; cancelled, it is told to stop
        and waited for."""
        from ..apply.configure import configure

        s = self.settings
        deadline = Deadline(limit)
        work = asyncio.get_running_loop().run_in_executor(
            None,
            lambda: configure(
                state=s.state_dir,
                sys_root=s.root,
                target=s.target,
                live=s.live,
                unit_dir=s.unit_dir,
                deadline=deadline,
                mark_good=False,
                first_boot=False,
            ),
        )
        try:
            result = await asyncio.shield(work)
        except asyncio.CancelledError:
            # A thread cannot be stopped from outside: ask it to stop at its next step
            # (its files put back) and wait until it has, before anything else runs.
            deadline.cancel()
            await asyncio.wait({work})
            if not work.cancelled():
                work.exception()  # retrieved: it is the cancellation being reported
            raise
        if result.applied is None:
            raise ApplyError("; ".join(result.problems[-1:]) or "the configure step failed")
        if self.systemd is not None:
            # The section table names files as the machine sees them: under the target.
            def seen(paths: tuple[str, ...]) -> list[str]:
                return ["/" + os.path.relpath(p, s.target) for p in paths]

            todo = changes(seen(result.applied.written), seen(result.applied.removed))
            bound = asyncio.timeout(None if limit is None else max(0.0, deadline.remaining()))
            try:
                async with bound:
                    await self.systemd.daemon_reload()
                    if todo.reload_networkd:
                        await self.systemd.reload_networkd()
                    for unit in todo.stop:
                        await self.systemd.stop(unit)
                    for unit in todo.restart:
                        await self.systemd.restart(unit)
                    for unit in todo.start:
                        await self.systemd.start(unit, "replace")
            except TimeoutError:
                if bound.expired():
                    raise TimedOut(deadline.seconds) from None
                raise
        if mark_good and result.source == "config":
            self._mark_good(result.config)

    def _mark_good(self, config: Config) -> None:
        try:
            if store.mark_good(self.settings.state_dir, config):
                self.log("info", "recorded as the last good configuration")
                if self.settings.unit_dir is not None:
                    from ..boot.generator import refresh_cache

                    # generator.cache is keyed by both config files: the next boot's
                    # generator (and the configure step, whose cache names it) stays fast.
                    refresh_cache(self.settings.state_dir, self.settings.unit_dir)
        except OSError as e:  # the change is applied; only the fallback copy is stale
            self.log("warning", f"cannot record the last good configuration: {e}")

    # -- confirmation of a network change ----------------------------------------------

    def _hold(self, previous: bytes | None, timeout: float) -> None:
        if not timeout <= MAX_HOLD_SECONDS:  # NaN and infinity included
            self.log("warning", f"confirmation_timeout is held at {MAX_HOLD_SECONDS:g}s")
            timeout = MAX_HOLD_SECONDS
        loop = asyncio.get_running_loop()
        self.pending = Pending(previous, loop.time() + timeout)
        self.pending.timer = loop.call_later(timeout, lambda: self.spawn(self._expire()))
        self.log(
            "info", f"network change applied; rolled back unless confirmed within {timeout:g}s"
        )

    async def confirm(self) -> None:
        async with self.lock:
            if self.pending is None:
                raise ApiError(400, "no network configuration is pending a confirmation")
            if self.pending.timer is not None:
                self.pending.timer.cancel()
            self._unconfirmed.unlink(missing_ok=True)
            self.pending = None
            self.log("info", "network change confirmed")
            loaded = store.load(self.settings.state_dir)
            if loaded.source == "config":  # only now is the held change a good one
                self._mark_good(loaded.config)

    async def _expire(self) -> None:
        async with self.lock:
            pending = self.pending
            if pending is None:
                return
            self.log("warning", "network change not confirmed in time; restoring the previous one")
            _restore_current(self.settings.state_dir, pending.previous)
            await self._reapply("the previous network configuration")
            self._unconfirmed.unlink(missing_ok=True)
            # Only now: a client that sees no change in process sees the previous network.
            self.pending = None
            self.on_config(self.config())

    @property
    def _unconfirmed(self) -> Path:
        return Path(self.settings.state_dir, UNCONFIRMED_FILE)

    async def recover(self) -> None:
        """At start: a restore interrupted by a crash is completed (forward once its
        switch was committed, else discarded) and applied; a network change left
        unconfirmed by a service that stopped (or a machine that rebooted) before its
        deadline is rolled back now."""
        done, problems = backup.recover(self.settings.state_dir)
        for problem in problems:
            self.log("error", f"restore staging left as it is: {problem}")
        if done:
            async with self.lock:
                for what in done:
                    self.log("warning", what)
                await self._reapply("the state after an interrupted restore")
        try:
            previous = self._unconfirmed.read_bytes()
        except FileNotFoundError:
            return
        async with self.lock:
            self.log("warning", "a network change was never confirmed; restoring the previous one")
            _restore_current(self.settings.state_dir, previous or None)
            await self._reapply("the previous network configuration")
            self._unconfirmed.unlink(missing_ok=True)

    async def first_boot_recovery_key(self) -> None:
        """IncusOS's first boot: encrypted volumes and no recovery key in the config get
        one (security.firstboot), stored and shown as not yet retrieved. A machine whose
        volumes cannot be opened to add it is left as it is, and the journal says why."""
        from dataclasses import replace

        from ..security.firstboot import enroll_first_recovery_key, needs_recovery_key

        s = self.settings
        async with self.lock:
            config = self.config()
            try:
                if not needs_recovery_key(s.root, config.security.encryption_recovery_keys):
                    return
            except Exception as e:  # an unreadable sysfs or crypttab: never fatal either
                self.log("error", f"the encrypted volumes could not be listed: {_reason(e)}")
                return

            def work() -> str:
                from ..hal import tpm

                with tpm.open_tpm_if_any(s.tcti) as handle:
                    return enroll_first_recovery_key(s.root, handle)

            try:
                key = await self.run_in_thread(work)
            except Exception as e:  # RecoveryKeyError, OSError: never fatal to the service
                self.log("error", f"no recovery key could be enrolled: {_reason(e)}")
                return
            security = replace(config.security, encryption_recovery_keys=(key,))
            store.save(s.state_dir, replace(config, security=security))
            self.set_flag("encryption_recovery_keys_retrieved", False)
            self.log(
                "warning",
                "a recovery key was generated and enrolled on every encrypted "
                "volume: read it from /1.0/system/security, then POST :retrieved",
            )

    def store_first_boot(self) -> None:
        """At start, as the boot's configure step does: a machine with no network
        configured stores the default it runs, so GET returns it (IncusOS's first boot)."""
        from ..hal import net

        nics, _ = net.list_nics(self.settings.root)
        stored, _why = store.store_first_boot(self.settings.state_dir, nics)
        if stored is not None:
            self.log("info", "first boot: the default network stored")

    def pending_seconds(self) -> float | None:
        if self.pending is None:
            return None
        left = self.pending.deadline - asyncio.get_running_loop().time()
        return min(max(0.0, left), MAX_HOLD_SECONDS)

    # -- factory reset ------------------------------------------------------------------

    async def factory_reset(self, body: Any) -> bool:
        """IncusOS's `:factory-reset` (api/system_reset.go): any new seeds checked as
        first boot will check them (over the default document: the machine starts
        afresh), and only then: the seed written where first boot reads it (merged
        with the existing one unless `wipe_existing_seeds`), the TPM cleared and the
        first-boot partitions deleted (on the running system only, when its boot disk
        is laid out as an appliance's), the state dir emptied (IncusOS wipes the whole
        root partition: nothing of it is kept), a reboot scheduled. Returns whether one
        was (not on a scratch target). A bad seed is a 400 with nothing written or
        erased; a TPM that cannot be cleared a 500 with nothing erased."""
        from ..apply.reset import Machine, ResetRefused, factory_reset, parse_reset

        try:
            request = parse_reset(body)
        except ResetRefused as e:
            raise ApiError(400, str(e)) from None
        async with self.lock:
            self._check_writable()

            def work() -> None:
                s = self.settings
                machine = Machine(live=s.live, tcti=s.tcti)
                factory_reset(s.state_dir, s.root, request, self.log, machine)

            try:
                await self.run_in_thread(work)
            except ResetRefused as e:
                raise ApiError(e.status, str(e)) from None
            self._config = None
            self._sections.clear()
        if self.schedule("reboot.target"):
            return True
        self.log("warning", "factory reset done; no reboot on a scratch target")
        return False

    # -- backup and restore -------------------------------------------------------------

    def backup(self) -> bytes:
        """Refused (409) while a network change waits for its confirmation, as a restore
        is: the archive would hold a config.toml nobody confirmed, which a later restore
        would apply (and record as the last good one) as if it had been."""
        self._check_writable()
        return backup.create(self.settings.state_dir)

    def check_restore(self, data: bytes, skip: tuple[str, ...]) -> dict[str, bytes]:
        """The files a restore would write, checked whole; raises ApiError (400)."""
        unknown = sorted(set(skip) - set(backup.SKIP_OPTIONS))
        if unknown:
            known = ", ".join(backup.SKIP_OPTIONS)
            raise ApiError(400, f"skip: {unknown[0]!r} is not supported (known: {known})")
        try:
            archive = backup.read_archive(data)
        except backup.ArchiveError as e:
            raise ApiError(400, f"archive: {e}") from None
        files = dict(archive.files)
        restored = archive.config
        if skip:
            from ..config import dumps_toml
            from ..config.validate import validate

            restored = backup.keep_running(archive.config, self.config(), skip)
            problems = validate(restored)
            if problems:  # a kept MAC that clashes with an archived one, say
                raise ApiError(400, f"archive with skip={','.join(skip)}: {problems[0]}")
            files[store.CONFIG_FILE] = dumps_toml(restored)
        checks = self._restore_checks(restored, self.config())
        if checks:
            raise ApiError(400, f"archive: config.toml: {'; '.join(map(str, checks))}")
        return backup.with_running_keys(files, self.settings.state_dir, skip)

    def _restore_checks(self, restored: Config, running: Config) -> list[FieldError]:
        """The checks a PUT of each section makes, for every section the restore changes
        (one it leaves as it runs was taken already): against this machine, named by the
        document's paths (`security.encryption_recovery_keys`), as the archive has them."""
        problems: list[FieldError] = []
        for row in SECTIONS:
            if getattr(restored, row.attribute) != getattr(running, row.attribute):
                problems += row.check(restored, running, self.settings.root)
        return problems

    async def _before_store(
        self, new: Config, current: Config
    ) -> list[Callable[[], Awaitable[None]]]:
        """Each changed section's work before its document is stored (the volumes'
        recovery keys, as IncusOS's restore enrolls the archive's), all or nothing; the
        undo of each, for a restore that does not take."""
        undo: list[Callable[[], Awaitable[None]]] = []
        for row in SECTIONS:
            hook = row.before_store
            if hook is None or getattr(new, row.attribute) == getattr(current, row.attribute):
                continue
            try:
                await hook(self, new, current)
            except Refused as e:
                await _undo(undo, self.log)
                raise ApiError(e.status, e.message) from None
            except BaseException:
                await _undo(undo, self.log)
                raise
            undo.append(functools.partial(hook, self, current, new))
        return undo

    async def restore(
        self, files: dict[str, bytes], progress: Callable[[dict[str, Any]], None]
    ) -> None:
        """`files` (from check_restore) in place of the state dir's in one switch inside
        it (see backup.py), then applied; a failed apply switches the previous files
        back, byte for byte, and applies them again. Cancelled (the service stopping)
        after the switch, the staging directory stays: the next start keeps the
        restored state and applies it, as after a crash (`recover`)."""
        async with self.lock:
            self._check_writable()
            state_dir = self.settings.state_dir
            loop = asyncio.get_running_loop()
            current = self.config()
            restored = parse_toml(files[store.CONFIG_FILE])  # checked by check_restore
            undo = await self._before_store(restored, current)
            progress({"stage": "swapping"})
            try:
                stage = await loop.run_in_executor(None, backup.switch_in, state_dir, files)
            except BaseException as e:
                await _undo(undo, self.log)
                if isinstance(e, backup.ArchiveError):
                    raise ApiError(400, f"archive: {e}") from None
                raise
            progress({"stage": "applying"})
            try:
                await self.apply()
            except Exception as e:  # whatever failed, the previous state goes back
                backup.switch_back(state_dir, stage)
                backup.discard(stage)
                self.log("error", f"applying the restored state failed, rolling back: {e}")
                await _undo(undo, self.log)
                await self._reapply("the state from before the restore")
                raise ApiError(
                    500, f"applying the restored state failed, previous kept: {self._public(e)}"
                ) from None
            await loop.run_in_executor(None, backup.discard, stage)
            self.on_config(self.config())
            self.log("info", "state restored from a backup")

    # -- misc -------------------------------------------------------------------------

    # -- /1.0/services (services/) ------------------------------------------------------

    def system_service(self, name: str) -> SystemService:
        """A service this machine runs; any other name is a 404, as on IncusOS."""
        for row in supported_services():
            if row.name == name:
                return row
        raise ApiError(404, f"no service {name!r}")

    def machine(self) -> Machine:
        s = self.settings
        return Machine(root=s.root, target=s.target, live=s.live, log=self.log)

    def service_doc(self, name: str, config: Config | None = None) -> tuple[Any, str]:
        """A service's `config` half as API data, and its ETag."""
        row = self.system_service(name)
        data = to_api(row.config_of((config or self.config()).services))
        return data, env.etag(data)

    def service_candidate(self, row: SystemService, body: Any) -> Config:
        section_raw = config_half(body)
        raw = to_dict(self.config())
        raw.setdefault("services", {})[row.name] = section_raw
        try:
            return from_dict(raw)
        except ConfigError as e:
            raise ApiError(400, _client_paths(e.errors, f"services.{row.name}")) from None

    async def put_service(self, name: str, body: Any, if_match: str | None = None) -> None:
        """Validate, check against the machine, apply (stop what the stored document
        started, start what the new one asks for), then store. A failed apply puts back
        every file the service wrote and re-applies the stored document: nothing stored.
        An unchanged document is stored as it is and applied again by nothing (`:reset`
        reconnects)."""
        row = self.system_service(name)
        async with self.lock:
            if not env.if_match_ok(if_match, self.service_doc(name)[1]):
                raise ApiError(
                    412, "the resource changed since it was read (If-Match does not match its ETag)"
                )
            self._check_writable()
            config = self.service_candidate(row, body)
            current = self.config()
            old, new = row.config_of(current.services), row.config_of(config.services)
            problems = row.check(new, self.settings.root)
            if problems:
                raise ApiError(400, _client_paths(problems, f"services.{name}"))
            if old == new:
                return
            machine = self.machine()
            saved = saved_files(machine, row.files)
            try:
                await self.run_in_thread(lambda: row.apply(machine, old, new))
            except Exception as e:
                reason = e.message if isinstance(e, ServiceError) else self._public(e)
                self.log("error", f"the {name} service: applying failed, rolling back: {e}")
                restore_files(machine, saved)
                try:
                    await self.run_in_thread(lambda: row.apply(machine, new, old))
                except Exception as again:  # logged; the first failure is the answer
                    self.log("error", f"the {name} service: re-applying failed: {again}")
                raise ApiError(
                    500, f"applying the {name} service failed, previous one restored: {reason}"
                ) from None
            store.save(self.settings.state_dir, config)
            self._mark_good(config)
            self.on_config(config)

    async def reset_service(self, name: str) -> None:
        row = self.system_service(name)
        if row.reset is None:
            # IncusOS's words (a 500 there): a request this service does not take.
            raise ApiError(400, "reset isn't supported by this service")
        reset, config = row.reset, row.config_of(self.config().services)
        machine = self.machine()
        async with self.lock:
            try:
                await self.run_in_thread(lambda: reset(machine, config))
            except ServiceError as e:
                raise ApiError(e.status, e.message) from None

    async def start_services(self) -> None:
        """What IncusOS does at boot: start each enabled service (a failure is logged,
        the others still start)."""
        machine = self.machine()
        async with self.lock:
            services = self.config().services
            for row in supported_services():
                config = row.config_of(services)
                if not getattr(config, "enabled", False):
                    continue
                start = functools.partial(row.apply, machine, type(config)(), config)
                try:
                    await self.run_in_thread(start)
                except Exception as e:
                    self.log("error", f"the {row.name} service did not start: {e}")

    def environment(self) -> dict[str, Any]:
        root = self.settings.root
        if self._machine_id is None:  # fixed for the life of the boot
            self._machine_id = _read(Path(root, "etc/machine-id"))
        if root == "/":  # this machine: system calls, not files
            hostname = socket.gethostname()
            uptime = int(time.clock_gettime(time.CLOCK_BOOTTIME))
        else:
            hostname = _read(Path(root, "proc/sys/kernel/hostname"))
            uptime = int(float((_read(Path(root, "proc/uptime")) or "0").split()[0]))
        return {
            "hostname": hostname,
            "machine_id": self._machine_id,
            "os_name": "IncusOS-HAL",
            "os_version": __version__,
            "system_is_ready": True,
            "uptime": uptime,
        }


def _files_key(state_dir: Path) -> tuple[tuple[Any, ...], bool]:
    """What identifies a version of the two files, and whether both are plain (absent,
    or a regular file with no other name), so that a directory watch sees their changes."""
    out: list[Any] = []
    plain = True
    base = os.fspath(state_dir)
    for name in (store.CONFIG_FILE, store.LAST_GOOD_FILE):
        path = f"{base}/{name}"
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                plain = False
                st = os.stat(path)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out), plain


async def _undo(
    steps: list[Callable[[], Awaitable[None]]], log: Callable[[str, str], None]
) -> None:
    """Sections' work undone, last first; a failure is logged and the rest still run."""
    for step in reversed(steps):
        try:
            await step()
        except Exception as e:  # logged: the caller reports the first failure
            log("error", f"undoing a section's work failed: {_reason(e)}")


def _reason(e: BaseException) -> str:
    """An exception as a message that is never empty (str(TimeoutError()) is "")."""
    return str(e) or type(e).__name__


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_current(state_dir: Path) -> bytes | None:
    try:
        return Path(state_dir, store.CONFIG_FILE).read_bytes()
    except FileNotFoundError:
        return None


def _restore_current(state_dir: Path, previous: bytes | None) -> None:
    path = Path(state_dir, store.CONFIG_FILE)
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write(path, previous, 0o600)


def _client_paths(errors: list[FieldError], attribute: str) -> str:
    """Field paths as the client wrote them: `network.dns` -> `config.dns`, in the path
    and where a message names another field (`... already used by network.bonds[0]...`;
    only there: a value quoted in a message stays as it was)."""
    out = []
    other = re.compile(rf"(already used by ){re.escape(attribute)}(?=[.\[])")
    for err in errors:
        path = err.path
        if path == attribute or path.startswith((attribute + ".", attribute + "[")):
            path = "config" + path[len(attribute) :]
        out.append(str(FieldError(path, other.sub(r"\1config", err.message))))
    return "; ".join(out)


def ensure_state_dir(path: Path) -> None:
    """The state dir, made whole: a restore interrupted by a crash is completed or
    discarded before anything reads it (Service.recover says which and applies)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    backup.complete_switches(path)
