"""systemd's INI dialect and its environment-file syntax, written deterministically.

These two writers are where configuration values become file text, and they refuse (never
escape silently) anything the reader would not give back exactly as written. Validation
refuses such values first, naming the field; this is the second gate, for values that
did not come through it.

The rules follow systemd's readers. conf-parser.c (systemd.syntax(7)): a line ends at
LF, CR or NUL; lines are stripped of spaces, tabs, CR and LF; `#` or `;` first makes a
comment, `[` a section; key and value are split at the first `=` and stripped; a line
ending in a backslash continues on the next. Unit files (and their drop-ins) also expand
`%` specifiers. env-file.c (EnvironmentFile=): quotes and backslashes are syntax,
whitespace around values is dropped and `#`/`;` begin comments; shells that source such a
file also give `$`, backquotes and `;` meaning.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Section = tuple[str, list[tuple[str, str]]]

# C0 (line breaks, NUL, tab...), DEL, C1, U+2028/2029, and lone surrogates (which cannot
# be encoded as UTF-8 at all).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SECTION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # SR-IOVVirtualFunctions= has a dash
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What the proxy variables need (URLs with percent-encoded credentials, no_proxy lists),
# and nothing an env-file reader or a shell treats specially.
_ENV_VALUE = re.compile(r"[A-Za-z0-9._~%:/@\[\],+-]*")


class UnsafeTextError(ValueError):
    """A section, key or value that would not read back as written. The message names
    where, never the value (it may be a secret)."""


def _check_value(where: str, value: str, *, specifiers: bool) -> None:
    if _CONTROL.search(value):
        raise UnsafeTextError(f"{where}: the value contains a control character or line break")
    if value != value.strip(" "):
        raise UnsafeTextError(f"{where}: the value begins or ends with a space (systemd strips it)")
    if value.endswith("\\"):
        raise UnsafeTextError(f"{where}: the value ends in a backslash (a continuation line)")
    if specifiers and "%" in value:
        raise UnsafeTextError(f"{where}: the value contains '%' (a unit-file specifier)")


def _check_comment(line: str) -> None:
    if _CONTROL.search(line) or line.endswith("\\"):
        raise UnsafeTextError("header: a comment line holds a control character or ends in '\\'")


def ini(sections: Iterable[Section], *, header: str = "", specifiers: bool = False) -> bytes:
    """Sections in the order given; empty sections are left out.

    `specifiers`: the file is a unit file or drop-in, where systemd expands `%`.
    Raises UnsafeTextError for anything that would not read back exactly.
    """
    out: list[str] = []
    if header:
        for line in header.splitlines():
            _check_comment(line)
            out.append(f"# {line}".rstrip())
    for name, entries in sections:
        if _SECTION.fullmatch(name) is None:
            raise UnsafeTextError(f"[{name!r}]: not a section name systemd reads back")
        if not entries:
            continue
        if out:
            out.append("")
        out.append(f"[{name}]")
        for key, value in entries:
            if _KEY.fullmatch(key) is None:
                raise UnsafeTextError(f"[{name}] {key!r}: not a key name systemd reads back")
            _check_value(f"[{name}] {key}=", value, specifiers=specifiers)
            out.append(f"{key}={value}")
    return ("\n".join(out) + "\n").encode()


def env_file(entries: Iterable[tuple[str, str]], *, header: str = "") -> bytes:
    """KEY=value lines for EnvironmentFile=; refuses what systemd or a shell would read
    differently (UnsafeTextError naming the key)."""
    out: list[str] = []
    for line in header.splitlines():
        _check_comment(line)
        out.append(f"# {line}".rstrip())
    for key, value in entries:
        if _ENV_KEY.fullmatch(key) is None:
            raise UnsafeTextError(f"{key!r}: not an environment variable name")
        if _CONTROL.search(value):
            raise UnsafeTextError(f"{key}=: the value contains a control character or line break")
        if _ENV_VALUE.fullmatch(value) is None:
            raise UnsafeTextError(
                f"{key}=: the value holds a character outside [A-Za-z0-9._~%:/@[],+-] "
                "(quotes, backslashes, whitespace, '$', '#' and the like mean something there)"
            )
        out.append(f"{key}={value}")
    return ("\n".join(out) + "\n").encode()


def yes(value: bool) -> str:
    return "yes" if value else "no"
