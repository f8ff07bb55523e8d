"""One IncusOS section (`/1.0/system/<name>`): everything every caller needs to know of it.

A section is a row of the table in `sections/__init__.py`. The API builds its routes,
state and PUT from the rows; the configure step renders and owns files through them;
the generator wires units through them; apply maps changed files to systemd work through
them; backup/restore offers their skip options; OpenAPI and docs/api.md describe them.
Adding a section is one module defining one `Section`, and one entry in that table.

Functions, not subclasses: each field is a plain function of data (or None when the
section has nothing of that kind), so a section module reads top to bottom like the
files it produces.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..core.errors import Refusal

if TYPE_CHECKING:
    from ..config.errors import FieldError
    from ..config.model import Config
    from ..core.files import Owned
    from ..core.tree import Tree
    from ..hal.net import Nic


class Where(Protocol):
    """Where the section reads the machine and keeps its state."""

    @property
    def state_dir(self) -> Path: ...
    @property
    def root(self) -> str: ...
    # Where the service writes (and so may delete): "/" on a machine, a scratch
    # directory for a service that must leave the host alone.
    @property
    def target(self) -> str: ...
    @property
    def tcti(self) -> str | None: ...


class Refused(Refusal):
    """A section refuses a request: the API answers `status` with `message`."""


class Context(Protocol):
    """What a section may use of the service it runs in (`api.service.Service` is one).

    Reading state runs in a worker thread; actions and `before_store` run in the event
    loop, under the service's write lock where they change anything."""

    @property
    def settings(self) -> Where: ...
    def config(self) -> Config: ...
    def flags(self) -> dict[str, Any]: ...
    def set_flag(self, name: str, value: Any) -> None: ...
    def listener_active(self) -> bool: ...
    def log(self, level: str, message: str) -> None: ...
    async def confirm(self) -> None: ...
    async def tpm_rebind(self) -> None: ...
    async def flush_dns(self) -> None: ...
    def schedule(self, target: str) -> bool: ...
    async def run_in_thread(self, work: Callable[[], Any]) -> Any: ...


@dataclass(frozen=True, slots=True)
class Rendered:
    """What a section contributes to the configure step."""

    files: Tree
    renames: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Reload:
    """What systemd must do once a file this section owns changed: `path` is a file, or a
    directory ending in "/" for every file in it."""

    path: str
    unit: str
    how: Literal["restart", "reload-networkd", "start", "stop"] = "restart"
    # When the file was written, removed, or either ("changed").
    on: Literal["changed", "written", "removed"] = "changed"

    def covers(self, changed: str) -> bool:
        return changed.startswith(self.path) if self.path.endswith("/") else changed == self.path


@dataclass(frozen=True, slots=True)
class Action:
    """`POST /1.0/system/<section>/:<name>`: runs with the request's JSON body (None when
    there is none) and answers with the metadata it returns."""

    name: str
    summary: str
    run: Callable[[Context, Any], Awaitable[Any]]
    # 5xx statuses it answers by design, with why (declared in the OpenAPI description).
    failures: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class UnitInputs:
    """What the generator knows when it wires units: where the config came from (shown
    as SourcePath=) and where the system's unit files are."""

    source: str
    unit_dir: str


def _no_state(ctx: Context) -> dict[str, Any]:
    return {}


def _no_checks(new: Config, current: Config, root: str) -> list[FieldError]:
    return []


def _no_confirmation(config: Config) -> float:
    return 0.0


def _as_sent(config: Config) -> Config:
    return config


@dataclass(frozen=True, slots=True)
class Section:
    # /1.0/system/<name>, and the Config field whose value is the `config` half.
    name: str
    attribute: str
    summary: str
    # Listed in GET /1.0/system (IncusOS lists eight; its fallback listener is not one).
    listed: bool = True
    # The `state` half, read from the machine (in a worker thread).
    read_state: Callable[[Context], Any] = _no_state
    # Rules a PUT must pass beyond the document's validation, given the stored config and
    # the machine (read under `root`: a PCI address that is not there, say). Errors name
    # the field by its document path (`kernel.pci_passthrough[0]`); the API shows it to
    # the client as `config.<field>`.
    check: Callable[[Config, Config, str], list[FieldError]] = _no_checks
    # Work on the machine before the new document is stored (all or nothing; an
    # exception refuses the PUT with nothing stored).
    before_store: Callable[[Context, Config, Config], Awaitable[None]] | None = None
    # 5xx statuses the PUT answers by design (from before_store), with why.
    put_failures: tuple[tuple[int, str], ...] = ()
    # Seconds a change waits for `:confirm` before it is rolled back (0: applied at once).
    confirmation: Callable[[Config], float] = _no_confirmation
    # What is stored (and served) of an accepted document: IncusOS clears the network's
    # confirmation_timeout before storing, so a GET -> PUT never re-arms a rollback.
    stored: Callable[[Config], Config] = _as_sent
    # The configure step's files for this section, from the config and the NICs.
    files: Callable[[Config, tuple[Nic, ...]], Rendered] | None = None
    # Files of the configure step's directories that belong to this section (stale ones
    # are removed), and what systemd does when one of them changed.
    owns: tuple[Owned, ...] = ()
    reloads: tuple[Reload, ...] = ()
    # The generator's `.wants/` links and drop-ins for this section.
    units: Callable[[Config, UnitInputs], Tree] | None = None
    actions: tuple[Action, ...] = ()
    # `:restore?skip=<option>`: keep this part of the running config over the archive's.
    backup_skip: Mapping[str, Callable[[Config, Config], Config]] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return f"/1.0/system/{self.name}"
