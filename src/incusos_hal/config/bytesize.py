"""Byte sizes in Incus's syntax (`units.ParseByteSizeString`), as IncusOS reads
`kernel.memory.zram_swap_size`.

An integer of ASCII digits, then a suffix: none, `B` or ` bytes` (bytes); `kB`, `MB`,
`GB`, `TB`, `PB`, `EB` (powers of 1000); `KiB`, `MiB`, `GiB`, `TiB`, `PiB`, `EiB` (powers
of 1024). "" is 0. Unlike Go's int64 arithmetic, a product beyond int64 is refused
rather than wrapped.
"""

from __future__ import annotations

INT64_MAX = 2**63 - 1

MULTIPLIERS: dict[str, int] = {
    "": 1,
    "B": 1,
    " bytes": 1,
    **{f"{p}B": 1000 ** (i + 1) for i, p in enumerate("kMGTPE")},
    **{f"{p}iB": 1024 ** (i + 1) for i, p in enumerate("KMGTPE")},
}


class ByteSizeError(ValueError):
    pass


def parse_byte_size(text: str) -> int:
    """The number of bytes `text` says; ByteSizeError with Incus's wording otherwise."""
    if text == "":
        return 0
    digits = 0
    while digits < len(text) and text[digits] in "0123456789":
        digits += 1
    if digits == 0:
        raise ByteSizeError(f"Invalid value: {text}")
    value, suffix = int(text[:digits]), text[digits:]
    if value > INT64_MAX:
        raise ByteSizeError(f"Invalid integer: {text}")
    multiplier = MULTIPLIERS.get(suffix)
    if multiplier is None:
        raise ByteSizeError(f"Invalid value: {text}")
    if value * multiplier > INT64_MAX:
        raise ByteSizeError(f"Invalid value: {text} (beyond {INT64_MAX} bytes)")
    return value * multiplier
