"""Every file the state directory holds, named once (and the API's socket).

    config.toml                         the operator's current document (only valid ones)
    config.last-good.toml               the last document applied successfully
    generator.cache                     the generator's output for those two (boot/fast.py
                                        spells the name itself: it imports nothing)
    state.json                          the service's flags (recovery keys retrieved, ...)
    network.unconfirmed-previous.toml   while a network change waits for `:confirm`: the
                                        document to go back to
    server.crt, server.key              the API's TLS identity
    .restore-<id>/                      a restore's switch in progress (state/switch.py)
    applications.json                   the installed applications (apply/applications.py)
    updates/applications/               a local directory of application images
                                        (NAME_VERSION.raw + SHA256SUMS), until a provider

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
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
APPLICATIONS_FILE = "applications.json"
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
MARKER = "switch"
