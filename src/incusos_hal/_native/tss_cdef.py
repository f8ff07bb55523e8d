"""The C declarations _native.tss uses, and the generator of _tss_ffi.py from them (cffi's
out-of-line ABI mode): `python -m incusos_hal._native.tss_cdef > _tss_ffi.py`. A test keeps
the committed module equal to what this generates."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

CDEF = """
typedef uint32_t TSS2_RC;
typedef struct TSS2_TCTI_OPAQUE_CONTEXT_BLOB TSS2_TCTI_CONTEXT;
typedef struct {
    uint64_t magic;
    uint32_t version;
    TSS2_RC (*transmit)(TSS2_TCTI_CONTEXT *, size_t, const uint8_t *);
    TSS2_RC (*receive)(TSS2_TCTI_CONTEXT *, size_t *, uint8_t *, int32_t);
    void (*finalize)(TSS2_TCTI_CONTEXT *);
    TSS2_RC (*cancel)(TSS2_TCTI_CONTEXT *);
    void *getPollHandles;
    TSS2_RC (*setLocality)(TSS2_TCTI_CONTEXT *, uint8_t);
} TSS2_TCTI_CONTEXT_COMMON_V1;
TSS2_RC Tss2_TctiLdr_Initialize(const char *nameConf, TSS2_TCTI_CONTEXT **context);
void Tss2_TctiLdr_Finalize(TSS2_TCTI_CONTEXT **context);
"""

CRYPTO_CDEF = """
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct ec_key_st EC_KEY;
typedef struct ec_group_st EC_GROUP;
typedef struct ec_point_st EC_POINT;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
const EVP_CIPHER *EVP_aes_128_cfb128(void);
int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
    const unsigned char *key, const unsigned char *iv, int enc);
int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
    const unsigned char *in, int inl);
EC_KEY *EC_KEY_new_by_curve_name(int nid);
void EC_KEY_free(EC_KEY *key);
int EC_KEY_generate_key(EC_KEY *key);
const EC_GROUP *EC_KEY_get0_group(const EC_KEY *key);
const EC_POINT *EC_KEY_get0_public_key(const EC_KEY *key);
EC_POINT *EC_POINT_new(const EC_GROUP *group);
void EC_POINT_free(EC_POINT *point);
size_t EC_POINT_point2oct(const EC_GROUP *group, const EC_POINT *p, int form,
    unsigned char *buf, size_t len, void *ctx);
int EC_POINT_oct2point(const EC_GROUP *group, EC_POINT *p, const unsigned char *buf,
    size_t len, void *ctx);
int ECDH_compute_key(void *out, size_t outlen, const EC_POINT *pub_key, const EC_KEY *ecdh,
    void *kdf);
"""

MODULE = "incusos_hal._native._tss_ffi"


def generate() -> str:
    """The text of _tss_ffi.py."""
    import cffi

    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.cdef(CRYPTO_CDEF)
    builder.set_source(MODULE, None)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        path = os.path.join(tmp, "out.py")
        builder.emit_python_code(path)  # it says so on stdout
        with open(path) as f:
            return f.read()


if __name__ == "__main__":
    sys.stdout.write(generate())
