"""One update check (IncusOS's Checker, lxc/incus-os incus-osd/internal/update): ask the
provider for the latest release on the channel, plan, then fetch and hand on in order:
Secure Boot certificates, applications, the OS.

`check(inputs, ...)` is the whole check; the clock is `inputs.now` (an input), the
machine is read under `inputs.root`, and every outcome is written to the update state
(`update.json` in the state directory) that `GET /1.0/system/update` shows, in IncusOS's
words where it has them:

    last_check     when the last check started (RFC 3339; IncusOS's zero time before)
    status         what happened, saying why when something was refused
    needs_reboot   an installed update waits for a reboot (recorded with the boot's id:
                   once the machine has rebooted, it is false again)

A scheduled check (the timer) outside every maintenance window does nothing but say so;
a check an operator asks for, and the boot check, run at any time (IncusOS too). A file
is handed on only once it is complete and its size and SHA-256 equal the signed index's:
a failure leaves nothing for an installer, and the running system and its config
untouched.
"""

from __future__ import annotations

import datetime
import gzip
import json
import os
import platform
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..config.model import Config
from ..core.files import atomic_write
from ..hal import sysupdate
from ..render.system import proxy_choice, proxy_url
from ..state.paths import SERVER_CERT, SERVER_KEY, UPDATE_STATE_FILE, UPDATES_DIR
from . import fetch, handoff, index, providers, windows
from . import secureboot as sbupdate

ZERO_TIME = "0001-01-01T00:00:00Z"
Trigger = Literal["user", "boot", "timer"]
Progress = Callable[[dict[str, Any]], None]
_RUNNING = threading.Lock()


class Busy(Exception):
    """Another check is running."""


@dataclass(frozen=True, slots=True)
class UpdateState:
    last_check: str = ZERO_TIME
    status: str = ""
    needs_reboot: bool = False
    secureboot_version: str = ""
    staged: Mapping[str, Any] = field(default_factory=dict)
    boot_id: str = ""  # the boot needs_reboot was set in

    def api(self) -> dict[str, Any]:
        """IncusOS's SystemUpdateState."""
        return {
            "last_check": self.last_check,
            "status": self.status,
            "needs_reboot": self.needs_reboot,
        }


def boot_id(root: Path | str) -> str:
    try:
        return Path(root, "proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_state(state_dir: Path | str, root: Path | str = "/") -> UpdateState:
    """The stored state; a reboot asked for in an earlier boot has happened since."""
    try:
        doc = json.loads(Path(state_dir, UPDATE_STATE_FILE).read_bytes())
        state = UpdateState(
            str(doc.get("last_check", ZERO_TIME)),
            str(doc.get("status", "")),
            bool(doc.get("needs_reboot", False)),
            str(doc.get("secureboot_version", "")),
            dict(doc.get("staged", {})),
            str(doc.get("boot_id", "")),
        )
    except (OSError, ValueError, TypeError, AttributeError):
        return UpdateState()
    if state.needs_reboot and state.boot_id != boot_id(root):
        state = replace(state, needs_reboot=False)
    return state


def write_state(state_dir: Path | str, state: UpdateState) -> None:
    doc = {
        "last_check": state.last_check,
        "status": state.status,
        "needs_reboot": state.needs_reboot,
        "secureboot_version": state.secureboot_version,
        "staged": dict(state.staged),
        "boot_id": state.boot_id,
    }
    data = json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write(Path(state_dir, UPDATE_STATE_FILE), data, 0o600)


def running_version(root: Path | str) -> str:
    """os-release's IMAGE_VERSION (what mkosi and systemd-sysupdate write)."""
    for name in ("usr/lib/os-release", "etc/os-release"):
        try:
            text = Path(root, name).read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "IMAGE_VERSION":
                return value.strip().strip("'\"")
    return ""


def transport(config: Config, state_dir: Path | str, **bounds: float) -> fetch.Transport:
    """The network section's proxy and the security section's custom CAs."""
    proxy: str | None = None
    no_proxy: tuple[str, ...] = ()
    if config.network.proxy is not None:
        server, direct = proxy_choice(config.network.proxy)
        if server is not None:
            proxy = proxy_url(config.network.proxy, server)
            no_proxy = ("localhost", "127.0.0.1", "::1", *direct)
    return fetch.Transport(
        proxy=proxy,
        no_proxy=no_proxy,
        extra_cas=tuple(config.security.custom_ca_certs),
        **bounds,  # type: ignore[arg-type]
    )


@dataclass(frozen=True, slots=True)
class Inputs:
    config: Config
    state_dir: Path
    root: str
    now: Callable[[], datetime.datetime]
    architecture: str = field(default_factory=platform.machine)
    bounds: Mapping[str, float] = field(default_factory=dict)  # Transport's timeouts
    tcti: str | None = None  # the TPM, for re-sealing volumes after a Secure Boot update

    def provider_inputs(self) -> providers.Inputs:
        cert, key = self.state_dir / SERVER_CERT, self.state_dir / SERVER_KEY
        return providers.Inputs(
            config=self.config.provider,
            transport=transport(self.config, self.state_dir, **self.bounds),
            cache_dir=self.state_dir / UPDATES_DIR,
            now=self.now,
            client_cert=(cert, key) if cert.exists() and key.exists() else None,
        )


def _stamp(now: datetime.datetime) -> str:
    return now.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def running() -> bool:
    return _RUNNING.locked()


def reserve() -> bool:
    """Take the one check slot now (False: a check is running); `check(...,
    reserved=True)` then runs in it and frees it. The API reserves before it answers, so
    a second request is refused at once rather than racing the first one's thread."""
    return _RUNNING.acquire(blocking=False)


def check(
    inputs: Inputs,
    trigger: Trigger,
    *,
    os_only: bool = False,
    progress: Progress | None = None,
    installers: handoff.Handoff | None = None,
    reserved: bool = False,
) -> UpdateState:
    """Run one check; Busy if one is running already."""
    if not reserved and not reserve():
        raise Busy("an update check is already running")
    try:
        return _check(inputs, trigger, os_only, progress or (lambda _: None), installers)
    except Exception as e:
        # A bug, not a refused update: the state must not say "Running update check"
        # for ever. The trace goes to the caller (the service logs it).
        try:
            failed = replace(
                read_state(inputs.state_dir, inputs.root),
                status=f"Failed to check for updates: internal error ({type(e).__name__})",
            )
            write_state(inputs.state_dir, failed)
        except OSError:
            pass
        raise
    finally:
        _RUNNING.release()


def _check(
    inputs: Inputs,
    trigger: Trigger,
    os_only: bool,
    progress: Progress,
    installers: handoff.Handoff | None,
) -> UpdateState:
    installers = installers or handoff.current()
    state = read_state(inputs.state_dir, inputs.root)
    now = inputs.now()
    update = inputs.config.update

    def save(status: str, **changes: Any) -> UpdateState:
        nonlocal state
        state = UpdateState(
            changes.get("last_check", state.last_check),
            status,
            changes.get("needs_reboot", state.needs_reboot),
            changes.get("secureboot_version", state.secureboot_version),
            changes.get("staged", state.staged),
            boot_id(inputs.root),
        )
        write_state(inputs.state_dir, state)
        progress({"status": status})
        return state

    if trigger == "timer" and not windows.inside(update.maintenance_windows, now):
        # IncusOS's words.
        return save(
            "Skipping update check outside of maintenance window(s)", last_check=_stamp(now)
        )
    save("Running update check", last_check=_stamp(now))
    try:
        source = providers.load(inputs.provider_inputs())
        release = source.latest(
            update.channel,
            inputs.architecture,
            running_version(inputs.root),
            fresh=trigger == "user",
        )
    except (providers.ProviderError, index.BadIndex, fetch.FetchError) as e:
        return save(f"Failed to check for updates: {e}")
    sb_state = _secureboot_state(inputs.root)
    applications = dict(installers.applications())
    staged_os = str(state.staged.get("os", {}).get("version", ""))
    made = index.plan(
        release,
        os_version=running_version(inputs.root),
        staged_os=staged_os,
        secureboot_version=state.secureboot_version,
        applications=applications,
        os_only=os_only,
        secureboot=sb_state,
    )
    notes = list(made.refused)
    staged = dict(state.staged)
    needs_reboot = state.needs_reboot
    os_updated = ""
    for step in made.steps:
        what = {"secureboot": "Secure Boot key", "application": "application", "os": "OS"}[
            step.kind
        ]
        progress({"step": step.kind, "name": step.name, "version": step.version})
        refusal = _unwritable(inputs, step)
        if refusal:
            return save(
                f"Failed to apply the {what} update {step.version}: {refusal}",
                staged=staged,
                needs_reboot=needs_reboot,
            )
        try:
            directory, digests = _fetch_step(inputs, source, release, step, progress)
        except (providers.ProviderError, fetch.FetchError, OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return save(
                f"Failed to check for {what} updates: {reason}",
                staged=staged,
                needs_reboot=needs_reboot,
            )
        try:
            if step.kind == "secureboot":
                applied, message = _secureboot(inputs, directory)
                shutil.rmtree(directory, ignore_errors=True)
                if message:
                    notes.append(message)
                if applied:
                    needs_reboot = True
                else:
                    save(state.status, secureboot_version=step.version)
            elif step.kind == "application":
                path = directory / f"{step.name}.raw"
                if path.name not in digests:
                    raise ValueError(f"the release has no {path.name}")
                installers.application_ready(step.name, step.version, path, digests[path.name])
                apps = dict(staged.get("applications", {}))
                apps[step.name] = {"version": step.version, "path": str(path)}
                staged["applications"] = apps
            else:
                if installers.os_ready(step.version, directory):
                    needs_reboot = True
                    os_updated = step.version
                staged["os"] = {"version": step.version, "path": str(directory)}
        except (sbupdate.BadUpdate, OSError, ValueError, RuntimeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return save(
                f"Failed to apply the {what} update {step.version}: {reason}",
                staged=staged,
                needs_reboot=needs_reboot,
            )
    if os_updated:
        status = f"The OS has been updated to version {os_updated}"
    elif "os" in staged and staged["os"].get("version") != staged_os:
        status = f"OS update {staged['os']['version']} downloaded and verified"
    else:
        status = "Update check completed"  # IncusOS's words
    if notes:
        status += "; " + "; ".join(notes)
    return save(status, staged=staged, needs_reboot=needs_reboot)


def _unwritable(inputs: Inputs, step: index.Step) -> str:
    """Why the A/B writer would refuse an OS step's version ("" if it would not): told
    before the download, as systemd-sysupdate would tell it only after hours of it, and
    once it had emptied the inactive slot (the fallback version)."""
    if step.kind != "os":
        return ""
    try:
        sysupdate.check_version(step.version, image_id=sysupdate.image_id(inputs.root))
    except ValueError as e:
        return str(e)
    return ""


def _secureboot_state(root: str) -> bool:
    from ..hal import secureboot as sb

    try:
        return sb.state(root).secure_boot
    except (OSError, ValueError):
        return False


def _fetch_step(
    inputs: Inputs,
    source: providers.UpdateSource,
    release: index.Release | None,
    step: index.Step,
    progress: Progress,
) -> tuple[Path, dict[str, str]]:
    """Every file of `step`, verified, in a directory of its own (`.gz` expanded), and
    each file's SHA-256 as verified: the index's, or for an expanded `.gz` the hash of
    the stream expanded from the verified file (so an installer can hold the file it
    is handed to what was checked, rather than to what happens to be on disk)."""
    assert release is not None
    name = step.name or step.kind
    directory = inputs.state_dir / UPDATES_DIR / step.kind / name / step.version
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    total = sum(f.size for f in step.files)
    done = 0
    digests: dict[str, str] = {}
    for file in step.files:
        dest = directory / file.basename

        def report(have: int, size: int, before: int = done) -> None:
            progress({"progress": f"{(before + have) * 100 // max(total, 1)}%"})

        if not _verified(dest, file):
            source.fetch(release, file, dest, report)
        done += file.size
        if dest.name.endswith(".gz"):
            expanded = dest.with_name(dest.name[: -len(".gz")])
            digests[expanded.name] = _gunzip(dest, expanded)
        else:
            digests[dest.name] = file.sha256.lower()
    return directory, digests


def _verified(path: Path, file: index.UpdateFile) -> bool:
    """A file fetched by an earlier check (kept until handed on)."""
    import hashlib

    try:
        if path.stat().st_size != file.size:
            return False
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest() == file.sha256
    except OSError:
        return False


# What expanding an update must leave free where the state directory is: the journal,
# the applications' data and the rest of the machine keep working.
EXPAND_RESERVE = 512 << 20


def _expansion_limit(directory: Path) -> int:
    """The most a `.gz` may expand to in `directory`: the index's bound on a file, and
    the free space less EXPAND_RESERVE."""
    fs = os.statvfs(directory)
    return max(0, min(index.MAX_FILE_SIZE, fs.f_bavail * fs.f_frsize - EXPAND_RESERVE))


def _gunzip(source: Path, dest: Path) -> str:
    """Expand a verified `.gz`, bounded (a small file must not fill the disk); the
    SHA-256 of what was expanded."""
    import hashlib
    import zlib

    part = dest.with_name(dest.name + ".part")
    limit = _expansion_limit(dest.parent)
    written = 0
    digest = hashlib.sha256()
    try:
        with gzip.open(source, "rb") as src, open(part, "wb") as out:
            while True:
                try:
                    chunk = src.read(1 << 20)
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                    raise ValueError(f"{source.name}: not a gzip file ({e})") from None
                if not chunk:
                    break
                written += len(chunk)
                if written > limit:
                    raise ValueError(
                        f"{source.name} expands beyond {limit} bytes (the bound on an update "
                        f"file, or the free space less {EXPAND_RESERVE >> 20} MiB kept free)"
                    )
                digest.update(chunk)
                out.write(chunk)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise ValueError(f"{source.name} cannot be expanded: {e.strerror or e}") from None
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return digest.hexdigest()


def _secureboot(inputs: Inputs, directory: Path) -> tuple[bool, str]:
    """Plan the archive in `directory` against the machine; write the first update and
    re-seal the volumes bound to PCR 7 to the value it will have at the next boot (see
    security.reseal). (applied, a note for the status)."""
    root = inputs.root
    archives = sorted(directory.glob("*.tar"))
    if not archives:
        raise sbupdate.BadUpdate("no Secure Boot update archive in the release")
    updates = sbupdate.read_archive(archives[0].read_bytes())
    made = sbupdate.plan(updates, sbupdate.current_variables(root), sbupdate.boot_images(root))
    notes = list(made.refused)
    if not made.steps:
        return False, "; ".join(notes)
    resealed = _write_and_reseal(inputs, made.steps[0])
    return True, "; ".join([*notes, resealed] if resealed else notes)


def _write_and_reseal(inputs: Inputs, step: sbupdate.AuthUpdate) -> str:
    """Write `step`, the volumes bound to PCR 7 re-sealed for the next boot around it
    (IncusOS's appendEFIVarUpdate): what would stop the re-seal is found before the
    write, which is then refused (BadUpdate), nothing changed. A note for the status."""
    from contextlib import ExitStack

    from ..hal import tpm
    from ..security import reseal
    from ..security.rebind import RebindError, RebindRefused

    root = inputs.root
    keys = inputs.config.security.encryption_recovery_keys
    with ExitStack() as stack:
        handle = None
        if reseal.tpm_bound(root):  # else the TPM is not opened at all
            handle = stack.enter_context(tpm.open_tpm_if_any(inputs.tcti))
        try:
            prepared = reseal.prepare(root, handle, keys)
        except RebindRefused as e:
            raise sbupdate.BadUpdate(
                f"not writing it: the TPM-bound volumes could not be re-sealed for the next "
                f"boot ({e})"
            ) from None
        sbupdate.write(root, step)
        if prepared is None:
            return ""
        assert handle is not None  # prepare refuses TPM-bound volumes without a TPM
        try:
            done = reseal.reseal_for_next_boot(root, handle, prepared)
        except (RebindRefused, RebindError) as e:
            return (
                f"the {step.variable} update was written, but re-sealing the TPM-bound "
                f"volumes to the next boot's PCR 7 failed ({e}): the next boot needs a "
                "recovery key"
            )
    names = ", ".join(r.volume for r in done.rebound)
    note = f"TPM-bound volume(s) {names} re-sealed to the next boot's PCR 7"
    if done.skipped:
        note += f" ({', '.join(done.skipped)} not present, not re-sealed)"
    return note


def release() -> None:
    """Free a slot `reserve()` took when the check could not be started after all."""
    _RUNNING.release()
