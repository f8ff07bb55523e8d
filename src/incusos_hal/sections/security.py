"""`/1.0/system/security`: recovery keys, custom CAs, and the TPM, Secure Boot and volume
state (IncusOS's SystemSecurity). A PUT first makes every crypttab volume open with
exactly the new recovery keys, all volumes or none, then stores them.

The custom CAs are files of the configure step (render/trust.py), at boot as after a PUT;
when they change, incusos-hal-trust.service rebuilds the system trust store from them."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..config.errors import FieldError
from ..core.files import Owned
from ..render.trust import CUSTOM_CA_DIR, TRUST_UNIT, is_custom_ca_file, render_custom_cas
from .base import Action, Context, Refused, Reload, Rendered, Section

if TYPE_CHECKING:
    from ..config.model import Config
    from ..hal.net import Nic


def read_state(ctx: Context) -> Any:
    from ..hal import tpm
    from ..security.state import Flags, security_state

    flags = ctx.flags()
    from .storage import drive_recovery_keys, pool_recovery_keys

    state_dir = ctx.settings.state_dir
    wanted = Flags(
        recovery_keys_retrieved=bool(flags.get("encryption_recovery_keys_retrieved")),
        drive_recovery_keys=drive_recovery_keys(state_dir),
        pool_recovery_keys=pool_recovery_keys(state_dir),
    )
    with tpm.open_tpm_if_any(ctx.settings.tcti) as handle:
        return security_state(ctx.settings.root, handle, wanted)


def check(new: Config, current: Config, root: str) -> list[FieldError]:
    """IncusOS keeps at least one recovery key."""
    if not new.security.encryption_recovery_keys:
        return [FieldError("security.encryption_recovery_keys", "at least one key is required")]
    return []


async def sync_recovery_keys(ctx: Context, new: Config, current: Config) -> None:
    """The volumes' keyslots first (all or nothing), then the config records them."""
    old_keys = current.security.encryption_recovery_keys
    new_keys = new.security.encryption_recovery_keys

    def work() -> None:
        from ..hal import tpm
        from ..security.recovery import RecoveryKeyError
        from ..security.recovery import sync_recovery_keys as sync

        with tpm.open_tpm_if_any(ctx.settings.tcti) as handle:
            try:
                changed = sync(ctx.settings.root, handle, old_keys, new_keys)
            except RecoveryKeyError as e:
                raise Refused(500, str(e)) from None
        for change in changed:
            ctx.log(
                "info",
                f"volume {change.volume}: {len(change.added)} recovery key(s) added, "
                f"{len(change.removed)} removed",
            )

    await ctx.run_in_thread(work)


def files(config: Config, nics: tuple[Nic, ...]) -> Rendered:
    return Rendered(render_custom_cas(config.security.custom_ca_certs))


async def retrieved(ctx: Context, body: Any) -> Any:
    ctx.set_flag("encryption_recovery_keys_retrieved", True)
    return {}


async def tpm_rebind(ctx: Context, body: Any) -> Any:
    await ctx.tpm_rebind()
    # As IncusOS: reboot at once, so the next boot shows the new bindings unlock.
    ctx.schedule("reboot.target")
    return {}


def keep_recovery_keys(archived: Config, running: Config) -> Config:
    keys = running.security.encryption_recovery_keys
    security = replace(archived.security, encryption_recovery_keys=keys)
    return replace(archived, security=security)


SECTION = Section(
    name="security",
    attribute="security",
    summary="recovery keys and CAs; TPM, Secure Boot and volume state",
    read_state=read_state,
    check=check,
    before_store=sync_recovery_keys,
    files=files,
    owns=(Owned(CUSTOM_CA_DIR, is_custom_ca_file),),
    reloads=(Reload(f"{CUSTOM_CA_DIR}/", TRUST_UNIT),),
    actions=(
        Action("retrieved", "mark the recovery keys as retrieved", retrieved),
        Action(
            "tpm-rebind",
            "re-seal the volumes the TPM no longer unseals to this boot's PCRs, then reboot",
            tpm_rebind,
        ),
    ),
    backup_skip={"encryption-recovery-keys": keep_recovery_keys},
)
