"""systemd's INI dialect, written deterministically."""

from __future__ import annotations

from collections.abc import Iterable

Section = tuple[str, list[tuple[str, str]]]


def ini(sections: Iterable[Section], *, header: str = "") -> bytes:
    """Sections in the order given; empty sections are left out."""
    out: list[str] = []
    if header:
        out.extend(f"# {line}".rstrip() for line in header.splitlines())
    for name, entries in sections:
        if not entries:
            continue
        if out:
            out.append("")
        out.append(f"[{name}]")
        out.extend(f"{key}={value}" for key, value in entries)
    return ("\n".join(out) + "\n").encode()


def yes(value: bool) -> str:
    return "yes" if value else "no"
