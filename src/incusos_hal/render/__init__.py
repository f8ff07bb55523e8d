"""Pure rendering: configuration (+ the NIC list) -> trees of files. No I/O, no clock.

One module per target format or daemon (networkd, the system daemons, crypttab, unit
wiring); the section table (`incusos_hal.sections`) decides which section renders what.
"""

from __future__ import annotations

from ..core.tree import Entry, File, Symlink, Tree

__all__ = ["Entry", "File", "Symlink", "Tree"]
