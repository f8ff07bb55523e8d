"""The stored configuration: one TOML document in the state directory.

    config.toml            the operator's current document (only valid ones are saved)
    config.last-good.toml  the last document the configure step applied successfully

Loading falls back from a broken config.toml to the last good copy, then to the
default, and says which it used and why, so that a bad file never stops a boot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, dumps_toml, parse_toml
from ..config.model import Config
from ..core.files import atomic_write
from .paths import CONFIG_FILE, DEFAULT_STATE_DIR, LAST_GOOD_FILE, STATE_DIR_ENV

if TYPE_CHECKING:
    from ..hal.net import Nic

__all__ = [
    "CONFIG_FILE",
    "LAST_GOOD_FILE",
    "STATE_DIR_ENV",
    "Loaded",
    "load",
    "load_from",
    "mark_good",
    "save",
    "state_dir",
    "store_first_boot",
]


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


@dataclass(frozen=True, slots=True)
class Loaded:
    config: Config
    # "config", "last-good" or "default"
    source: str
    # The file the config came from ("" for the default).
    path: str
    # Why the preferred sources were not used; empty when config.toml was.
    problems: tuple[str, ...] = ()


def read_sources(directory: str | os.PathLike[str]) -> tuple[bytes | OSError | None, ...]:
    """The raw bytes of config.toml and config.last-good.toml (None: absent)."""
    out: list[bytes | OSError | None] = []
    for name in (CONFIG_FILE, LAST_GOOD_FILE):
        try:
            out.append(Path(directory, name).read_bytes())
        except FileNotFoundError:
            out.append(None)
        except OSError as e:
            out.append(e)
    return tuple(out)


def load_from(
    directory: str | os.PathLike[str],
    current: bytes | OSError | None,
    last_good: bytes | OSError | None,
) -> Loaded:
    """The fallback rule, as a pure function of the two files' contents."""
    base = Path(directory)
    current_path, last_good_path = base / CONFIG_FILE, base / LAST_GOOD_FILE
    if current is None:
        # No document at all: a fresh machine, which gets the default.
        return Loaded(Config(), "default", "")
    problems: list[str] = []
    if isinstance(current, OSError):
        problems.append(f"{current_path}: cannot read: {current.strerror}")
    else:
        try:
            return Loaded(parse_toml(current), "config", str(current_path))
        except ConfigError as e:
            problems += [f"{current_path}: {err}" for err in e.errors]
    if isinstance(last_good, OSError):
        problems.append(f"{last_good_path}: cannot read: {last_good.strerror}")
    elif last_good is not None:
        try:
            config = parse_toml(last_good)
            return Loaded(config, "last-good", str(last_good_path), tuple(problems))
        except ConfigError as e:
            problems += [f"{last_good_path}: {err}" for err in e.errors]
    return Loaded(Config(), "default", "", tuple(problems))


def load(directory: str | os.PathLike[str]) -> Loaded:
    current, last_good = read_sources(directory)
    return load_from(directory, current, last_good)


def save(directory: str | os.PathLike[str], config: Config) -> bytes:
    """Store `config` as the current document; returns the bytes written."""
    data = dumps_toml(config)
    atomic_write(Path(directory, CONFIG_FILE), data, 0o600)
    return data


def store_first_boot(
    directory: str | os.PathLike[str], nics: tuple[Nic, ...]
) -> tuple[Config | None, str]:
    """On a first boot (no document, or one whose network has no device), store the
    network IncusOS would: the default it applies (render.effective.first_boot_network),
    so that GET returns what runs. Returns the stored document (None when nothing was
    stored) and why not. A document that does not parse is left alone: the fallback
    rule, not this, decides what such a machine runs."""
    from ..config.validate import validate
    from ..render.effective import first_boot_network

    current, last_good = read_sources(directory)
    if isinstance(current, OSError):
        return None, f"{CONFIG_FILE}: cannot read: {current.strerror}"
    loaded = load_from(directory, current, last_good)
    if current is not None and loaded.source != "config":
        return None, f"{CONFIG_FILE} does not parse; left as it is"
    network = first_boot_network(loaded.config.network, nics)
    if network is None:
        return None, "the network is configured (or there is no NIC to default to)"
    config = replace(loaded.config, network=network)
    problems = validate(config)
    if problems:  # two NICs with one MAC, say: rendered as before, not stored
        return None, f"the default network does not validate: {problems[0]}"
    save(directory, config)
    return config, ""


def mark_good(directory: str | os.PathLike[str], config: Config) -> bool:
    """Record `config` as last good; False when it already was."""
    data = dumps_toml(config)
    path = Path(directory, LAST_GOOD_FILE)
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic_write(path, data, 0o600)
    return True
