"""Apply a stored config to the running machine, through systemd's own D-Bus API.

The sequence for a change: the configure step (the same one that runs at boot) writes
the daemons' files all-or-nothing; then systemd re-runs the generators
(`Manager.Reload`, what `systemctl daemon-reload` asks), networkd re-reads its files
(`org.freedesktop.network1.Manager.Reload`, what `networkctl reload` asks), and each
daemon whose drop-in changed is restarted, waiting for its job to finish (JobRemoved)
and failing on any result but "done". No `systemctl` subprocess: a bus call reports a
failure as a typed error, and waits on the job, not on a pipe.

Which daemon a changed file concerns is the section table's to say
(`incusos_hal.sections.changes`), as a pure function testable without a bus.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

# How often a job still without a result is looked at: one whose object is gone ended
# with a JobRemoved signal this connection never got. The unit's own limit
# (TimeoutStartSec=) and the apply's deadline bound a job (a trust store rebuild took
# 150 s under TCG, past the 90 s this once was); an apply without a deadline (a
# rollback, a restore) still gives up after JOB_LIMIT_SECONDS, so a unit that never
# ends cannot hold the service's write lock for good.
JOB_POLL_SECONDS = 30.0
JOB_LIMIT_SECONDS = 900.0
METHOD_CALL_TIMEOUT_S = 300


class ApplyError(RuntimeError):
    """systemd refused or failed a step; the message says which."""


class Systemd(Protocol):
    async def daemon_reload(self) -> None: ...
    async def reload_networkd(self) -> None: ...
    async def restart(self, unit: str) -> None: ...
    async def start(self, unit: str, mode: str) -> None: ...
    async def stop(self, unit: str) -> None: ...
    async def reload_or_restart(self, unit: str) -> None: ...
    async def active_state(self, unit: str) -> str: ...
    async def flush_dns_caches(self) -> None: ...


def _proxies() -> tuple[Any, Any, Any, Any, Any]:
    """sdbus interface classes, built on first use (importing sdbus costs start-up)."""
    from sdbus import (
        DbusInterfaceCommonAsync,
        dbus_method_async,
        dbus_property_async,
        dbus_signal_async,
    )

    class Manager(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Manager"):
        @dbus_method_async()
        async def subscribe(self) -> None:
            raise NotImplementedError

        @dbus_method_async()
        async def reload(self) -> None:
            raise NotImplementedError

        @dbus_method_async("ss", "o")
        async def restart_unit(self, name: str, mode: str) -> str:
            raise NotImplementedError

        @dbus_method_async("ss", "o")
        async def start_unit(self, name: str, mode: str) -> str:
            raise NotImplementedError

        @dbus_method_async("ss", "o")
        async def stop_unit(self, name: str, mode: str) -> str:
            raise NotImplementedError

        @dbus_method_async("ss", "o")
        async def reload_or_restart_unit(self, name: str, mode: str) -> str:
            raise NotImplementedError

        @dbus_method_async("s", "o")
        async def load_unit(self, name: str) -> str:
            raise NotImplementedError

        @dbus_signal_async("uoss")
        def job_removed(self) -> tuple[int, str, str, str]:
            raise NotImplementedError

    class Job(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Job"):
        @dbus_property_async("s")
        def state(self) -> str:
            raise NotImplementedError

    class Unit(DbusInterfaceCommonAsync, interface_name="org.freedesktop.systemd1.Unit"):
        @dbus_property_async("s")
        def active_state(self) -> str:
            raise NotImplementedError

    class Network(DbusInterfaceCommonAsync, interface_name="org.freedesktop.network1.Manager"):
        @dbus_method_async()
        async def reload(self) -> None:
            raise NotImplementedError

    class Resolve(DbusInterfaceCommonAsync, interface_name="org.freedesktop.resolve1.Manager"):
        @dbus_method_async()
        async def flush_caches(self) -> None:
            raise NotImplementedError

    return Manager, Unit, Network, Resolve, Job


class SdbusSystemd:
    """The system manager, networkd and resolved on the system bus.

    The connection is opened inside the service's event loop (`connect`, at start) and
    processed from then on: a bus opened before the loop runs is never read, and
    dbus-daemon drops a connection that does not finish authenticating in time. A call
    that finds the connection gone (dbus-daemon restarted, say) reconnects once."""

    def __init__(self) -> None:
        classes = _proxies()
        (
            self._manager_class,
            self._unit_class,
            self._network_class,
            self._resolve_class,
            self._job_class,
        ) = classes
        self._bus: Any = None
        self._subscribed = False

    async def connect(self) -> None:
        import sdbus

        self._bus = sdbus.sd_bus_open_system()
        # sd-bus's default of 25 s per call is shorter than a daemon-reload can take (all
        # generators re-run: over 25 s on a loaded machine, the VM rung under TCG), and a
        # reload given up on is a change half applied. Calls that start jobs return at
        # once; the apply's own time limit (deadline.py) still bounds the whole change.
        self._bus.method_call_timeout_usec = METHOD_CALL_TIMEOUT_S * 1_000_000
        self._manager = self._manager_class.new_proxy(
            "org.freedesktop.systemd1", "/org/freedesktop/systemd1", self._bus
        )
        self._network = self._network_class.new_proxy(
            "org.freedesktop.network1", "/org/freedesktop/network1", self._bus
        )
        self._resolve = self._resolve_class.new_proxy(
            "org.freedesktop.resolve1", "/org/freedesktop/resolve1", self._bus
        )
        self._subscribed = False
        # One round trip now: the connection authenticates while the loop runs.
        await self._manager.subscribe()
        self._subscribed = True

    async def daemon_reload(self) -> None:
        await self._call("daemon-reload", lambda: self._manager.reload())

    async def reload_networkd(self) -> None:
        await self._call("networkd reload", lambda: self._network.reload())

    async def flush_dns_caches(self) -> None:
        """resolved drops every cached answer (what `resolvectl flush-caches` asks)."""
        await self._call("flush DNS caches", lambda: self._resolve.flush_caches())

    async def restart(self, unit: str) -> None:
        await self._job(f"restart {unit}", lambda: self._manager.restart_unit(unit, "replace"))

    async def start(self, unit: str, mode: str) -> None:
        await self._job(f"start {unit}", lambda: self._manager.start_unit(unit, mode))

    async def stop(self, unit: str) -> None:
        await self._job(f"stop {unit}", lambda: self._manager.stop_unit(unit, "replace"))

    async def reload_or_restart(self, unit: str) -> None:
        """Reload an active unit, start an inactive one (systemd-sysext.service's reload
        is `systemd-sysext refresh`)."""
        await self._job(
            f"reload-or-restart {unit}",
            lambda: self._manager.reload_or_restart_unit(unit, "replace"),
        )

    async def active_state(self, unit: str) -> str:
        path = await self._call(f"load {unit}", lambda: self._manager.load_unit(unit))
        proxy = self._unit_class.new_proxy("org.freedesktop.systemd1", path, self._bus)
        state: str = await proxy.active_state.get_async()
        return state

    async def _job_exists(self, what: str, path: str) -> bool:
        from sdbus import DbusUnknownObjectError, SdBusBaseError

        proxy = self._job_class.new_proxy("org.freedesktop.systemd1", path, self._bus)
        try:
            await proxy.state.get_async()
        except DbusUnknownObjectError:
            return False
        except SdBusBaseError as e:  # the bus itself: the job's fate is not known
            raise ApplyError(f"{what}: its job cannot be looked up: {e}") from None
        return True

    async def _call(self, what: str, make: Any) -> Any:
        """`make()`'s call, its failures as ApplyError; reconnects once if the bus is gone."""
        from sdbus import DbusFailedError, SdBusBaseError, SdBusLibraryError

        for attempt in (1, 2):
            try:
                if self._bus is None:
                    await self.connect()
                return await make()
            except (SdBusLibraryError, ConnectionError) as e:
                # The connection itself failed (ENOTCONN, ECONNRESET...): a fresh one.
                self._bus = None
                if attempt == 2:
                    raise ApplyError(f"{what}: the system bus: {e}") from None
            except DbusFailedError as e:
                raise ApplyError(f"{what}: {e.args[0] if e.args else type(e).__name__}") from None
            except SdBusBaseError as e:
                raise ApplyError(f"{what}: {type(e).__name__}: {e}") from None
        raise AssertionError("unreachable")

    async def _job(self, what: str, submit: Any) -> None:
        if not self._subscribed:
            await self._call("subscribe", lambda: self._manager.subscribe())
            self._subscribed = True
        results: dict[str, str] = {}
        arrived = asyncio.Event()
        job_path = ""

        async def listen() -> None:
            async for _id, path, _unit, result in self._manager.job_removed.catch():
                results[path] = result
                if path == job_path:
                    arrived.set()

        # Listen before submitting: a quick job can end before the call returns.
        listener = asyncio.get_running_loop().create_task(listen())
        try:
            await asyncio.sleep(0)
            job_path = await self._call(what, submit)
            waited = 0.0
            while job_path not in results:
                if waited >= JOB_LIMIT_SECONDS:
                    raise ApplyError(f"{what}: no result in {JOB_LIMIT_SECONDS:.0f} s")
                try:
                    await asyncio.wait_for(arrived.wait(), JOB_POLL_SECONDS)
                except TimeoutError:
                    waited += JOB_POLL_SECONDS
                    if not await self._job_exists(what, job_path) and job_path not in results:
                        raise ApplyError(f"{what}: the job ended, its result never came") from None
        finally:
            listener.cancel()
        if results[job_path] != "done":
            raise ApplyError(f"{what}: job {results[job_path]}")
