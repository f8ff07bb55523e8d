"""`/1.0/system/provider`: where updates come from (IncusOS's SystemProvider: config
`{name, config}`, state `{registered}`), the providers themselves in update/providers.py.

A PUT that changes the provider deregisters the old one first (an error other than
"registration unsupported" refuses the PUT with nothing changed: IncusOS answers 500
"deregistration unsupported" for Operations Center), then registers the new one when it
can register (a token is configured); if that fails, the old provider's registration is
put back and nothing is stored (lxc/incus-os internal/rest/api_system_provider.go).
"""

from __future__ import annotations

import datetime
import os
from typing import TYPE_CHECKING, Any

from .base import Context, Refused, Section

if TYPE_CHECKING:
    from ..config.model import Config
    from ..update import providers

REGISTERED_FLAG = "provider_registered"


def read_state(ctx: Context) -> Any:
    name = ctx.config().provider.name
    return {"registered": ctx.flags().get(REGISTERED_FLAG) == name}


def _machine_id(root: str) -> str:
    try:
        with open(f"{root.rstrip('/')}/etc/machine-id", encoding="ascii") as f:
            return f.read(64).strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _source(ctx: Context, config: Config) -> providers.UpdateSource:
    from ..update import checker, providers

    inputs = checker.Inputs(
        config=config,
        state_dir=ctx.settings.state_dir,
        root=ctx.settings.root,
        now=lambda: datetime.datetime.now(datetime.UTC),
    )
    return providers.load(inputs.provider_inputs())


async def before_store(ctx: Context, new: Config, current: Config) -> None:
    # Imported here: the generator loads the section table on the boot path.
    from ..update import providers

    old_registered = ctx.flags().get(REGISTERED_FLAG) == current.provider.name
    changed = new.provider != current.provider
    if not changed:
        return
    machine = providers.Machine(os.uname().nodename, _machine_id(ctx.settings.root))

    def deregister() -> None:
        if new.provider.name != current.provider.name and old_registered:
            _source(ctx, current).deregister()

    def register() -> bool:
        try:
            _source(ctx, new).register(machine)
        except providers.Unsupported:
            return False
        return True

    try:
        await ctx.run_in_thread(deregister)
    except providers.ProviderError as e:
        raise Refused(500, str(e)) from None
    if new.provider.name != current.provider.name:
        ctx.set_flag(REGISTERED_FLAG, None)
    try:
        registered = await ctx.run_in_thread(register)
    except providers.ProviderError as e:
        # Roll back: the old provider stays, registered as it was.
        ctx.set_flag(REGISTERED_FLAG, current.provider.name if old_registered else None)
        raise Refused(500, f"registering with {new.provider.name}: {e}") from None
    if registered:
        ctx.set_flag(REGISTERED_FLAG, new.provider.name)
    ctx.log("info", f"update provider: {new.provider.name}")


SECTION = Section(
    name="provider",
    attribute="provider",
    summary="where updates come from: configuration and registration state",
    read_state=read_state,
    before_store=before_store,
)
