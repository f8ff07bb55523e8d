"""Every file the state directory holds, named once (and the API's socket).

    config.toml                         the operator's current document (only valid ones)
    config.last-good.toml               the last document applied successfully
    generator.cache                     the generator's output for those two (boot/fast.py
                                        spells the name itself: it imports nothing)
    state.json                          the service's flags (recovery keys retrieved, ...)
    network.unconfirmed-previous.toml   while a network change waits for `:confirm`: the
                                        document to go back to
    server.crt, server.key              the API's TLS identity
    update.json                         the update checker's state (last check, status,
                                        needs_reboot, what was handed on)
    updates/                            downloads: `.part` files being resumed, verified
                                        files waiting for their installer, the index cache
    .restore-<id>/                      a restore's switch in progress (state/switch.py)
    seed.applied                        the install seed was handled on a first boot (JSON:
                                        the files applied); never applied again while there
    seed.status.json                    the last first boot's seed outcome (problems, notes)
    applications.json                   the installed applications (apply/applications.py)
    updates/applications/               a local directory of application images
                                        (NAME_VERSION.raw + SHA256SUMS), beside what a
                                        provider hands on

Standard library only: the API's client and the boot path import it.
"""

from __future__ import annotations

STATE_DIR_ENV = "INCUSOS_HAL_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/incusos-hal"
SOCKET = "/run/incusos-hal/unix.socket"

CONFIG_FILE = "config.toml"
LAST_GOOD_FILE = "config.last-good.toml"
GENERATOR_CACHE = "generator.cache"
FLAGS_FILE = "state.json"
UNCONFIRMED_FILE = "network.unconfirmed-previous.toml"
UPDATE_STATE_FILE = "update.json"
UPDATES_DIR = "updates"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
APPLICATIONS_FILE = "applications.json"
# The applications the install seed asked for (names, JSON): the update checker looks
# for each one not installed yet.
WANTED_APPLICATIONS = "applications.wanted.json"
LOCAL_APPLICATIONS_DIR = "updates/applications"
# Where a server certificate or key that could not be used is kept (for a post-mortem)
# when a new pair replaces it.
DAMAGED_SUFFIX = ".damaged"

# The files a backup holds and a restore puts back; nothing else is restored.
RESTORED = (CONFIG_FILE, LAST_GOOD_FILE, FLAGS_FILE, SERVER_CERT, SERVER_KEY)
# Kept from the running machine when a restored archive has neither.
IDENTITY = (SERVER_CERT, SERVER_KEY)
# A file's mode in the state directory when it is not 0600.
MODES = {SERVER_CERT: 0o644}
STAGING_PREFIX = ".restore-"
SEED_APPLIED = "seed.applied"
SEED_STATUS = "seed.status.json"
# Where first boot reads the seed and a factory reset writes it, when not the seed-data
# partition (a scratch machine, the tests): a seed tar file or a directory.
SEED_PATH_ENV = "INCUSOS_HAL_SEED"
MARKER = "switch"

# Storage keys (IncusOS's names): a pool's raw 32-byte ZFS key, zpool.<pool>.key (a pool
# is "managed" while its key is here); an encrypted drive's LUKS key, luks.<by-id>.key.
ZPOOL_KEY_PREFIX = "zpool."
LUKS_KEY_PREFIX = "luks."
KEY_SUFFIX = ".key"
# The restore option that keeps the running `local` pool's key over the archive's.
LOCAL_KEY_SKIP = "local-data-encryption-key"
STORAGE_KEY_BYTES = 32


def is_storage_key(name: str) -> bool:
    """zpool.<pool>.key or luks.<by-id name>.key: a plain file name, nothing else."""
    if "/" in name or name.startswith(".") or not name.endswith(KEY_SUFFIX):
        return False
    for prefix in (ZPOOL_KEY_PREFIX, LUKS_KEY_PREFIX):
        middle = name[len(prefix) : -len(KEY_SUFFIX)] if name.startswith(prefix) else ""
        if middle and all(c.isascii() and (c.isalnum() or c in "-_.:+@=") for c in middle):
            return True
    return False
