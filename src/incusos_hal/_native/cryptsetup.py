"""libcryptsetup through cffi in ABI mode: the library's C API called directly, no
`cryptsetup` process per operation and no passphrase on a command line or pipe.

ABI mode (dlopen of the stable soname, libcryptsetup.so.12) rather than a compiled
extension: the package then installs without libcryptsetup's headers, and a machine
without the library still imports everything else; only the declarations below must match
libcryptsetup.h, and they are the documented, versioned ones (2.4 or later for
crypt_dump_json).
"""

from __future__ import annotations

import threading
from typing import Any

import cffi

CDEF = """
struct crypt_device;
struct crypt_pbkdf_type {
    const char *type;
    const char *hash;
    uint32_t time_ms;
    uint32_t iterations;
    uint32_t max_memory_kb;
    uint32_t parallel_threads;
    uint32_t flags;
};
int crypt_init(struct crypt_device **cd, const char *device);
int crypt_init_by_name(struct crypt_device **cd, const char *name);
void crypt_free(struct crypt_device *cd);
void crypt_set_log_callback(struct crypt_device *cd,
    void (*log)(int level, const char *msg, void *usrptr), void *usrptr);
int crypt_load(struct crypt_device *cd, const char *requested_type, void *params);
int crypt_format(struct crypt_device *cd, const char *type, const char *cipher,
    const char *cipher_mode, const char *uuid, const char *volume_key,
    size_t volume_key_size, void *params);
int crypt_set_pbkdf_type(struct crypt_device *cd, const struct crypt_pbkdf_type *pbkdf);
int crypt_get_volume_key_size(struct crypt_device *cd);
int crypt_volume_key_get(struct crypt_device *cd, int keyslot, char *volume_key,
    size_t *volume_key_size, const char *passphrase, size_t passphrase_size);
int crypt_keyslot_add_by_volume_key(struct crypt_device *cd, int keyslot,
    const char *volume_key, size_t volume_key_size, const char *passphrase,
    size_t passphrase_size);
int crypt_keyslot_destroy(struct crypt_device *cd, int keyslot);
int crypt_activate_by_passphrase(struct crypt_device *cd, const char *name, int keyslot,
    const char *passphrase, size_t passphrase_size, uint32_t flags);
int crypt_deactivate(struct crypt_device *cd, const char *name);
int crypt_token_json_get(struct crypt_device *cd, int token, const char **json);
int crypt_token_json_set(struct crypt_device *cd, int token, const char *json);
int crypt_dump_json(struct crypt_device *cd, const char **json, uint32_t flags);
const char *crypt_get_uuid(struct crypt_device *cd);
"""

SONAME = "libcryptsetup.so.12"
CRYPT_ANY_SLOT = -1
CRYPT_ANY_TOKEN = -1
CRYPT_PBKDF_NO_BENCHMARK = 1 << 1
CRYPT_LOG_ERROR = 1

ffi = cffi.FFI()
ffi.cdef(CDEF)
_lib: Any = None
_lock = threading.Lock()


def lib() -> Any:
    """The loaded library; OSError naming the soname when the machine has none."""
    global _lib
    with _lock:
        if _lib is None:
            try:
                _lib = ffi.dlopen(SONAME)
            except OSError as e:
                raise OSError(f"libcryptsetup is not installed ({SONAME}): {e}") from None
        return _lib
