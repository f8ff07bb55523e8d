"""incusos-hal: the hardware and system layer of an immutable, API-only OS for Incus.

Kept empty on purpose: the boot-time generator imports this package, and everything
imported here would be paid for on every boot.
"""

__version__ = "0.1.0"
