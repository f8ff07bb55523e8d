"""LUKS2 volumes through libcryptsetup: format, keyslots, the header, and the two tokens
systemd reads at boot, `systemd-tpm2` and `systemd-recovery`.

The TPM token is exactly what systemd-cryptenroll writes (src/cryptenroll/cryptenroll-tpm2.c,
tpm2_make_luks2_json in src/shared/tpm2-util.c), so crypttab's `tpm2-device=auto` unlocks a
volume we enrolled and we unlock one systemd enrolled: a 32-byte secret from the TPM, sealed
under a PCR policy (hal.tpm), and a keyslot whose passphrase is that secret in base64. Such a
key has 256 bits of entropy, so its keyslot uses PBKDF2 with the minimum of iterations, as
systemd's do; a slow KDF would only slow every boot.

A token may also bind the volume to a signer's key (systemd-cryptenroll --tpm2-public-key,
hal.pcrsig): it unlocks wherever the PCRs match a policy that key signed, so an OS update
brings a new signature rather than a re-enrollment. Unlocking then needs the signature
document (/run/systemd/tpm2-pcr-signature.json on a booted UKI).

Recovery keys are systemd's too: 32 random bytes in modhex (the YubiKey alphabet, which
types the same on every keyboard layout), in eight dash-separated groups of eight.

Secrets are bytes or str held by the caller; nothing here logs them or puts them in an
exception. libcryptsetup's own messages (which never contain key material) are collected and
appended to errors.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from incusos_hal._native import cryptsetup as cs
from incusos_hal.hal import pcrsig
from incusos_hal.hal.pcrsig import PCRSignature, Signer

if TYPE_CHECKING:
    from incusos_hal.hal.tpm import PCRPolicy, Tpm

TOKEN_TPM2 = "systemd-tpm2"  # noqa: S105 - token type names, not secrets
TOKEN_RECOVERY = "systemd-recovery"  # noqa: S105
MODHEX = "cbdefghijklnrtuv"
RECOVERY_KEY_BYTES = 32
RECOVERY_KEY_RE = re.compile(rf"[{MODHEX}]{{8}}(-[{MODHEX}]{{8}}){{7}}")
TPM2_SECRET_BYTES = 32
# libcryptsetup caps a token's JSON well below this; a header is at most a few MiB.
MAX_TOKEN_JSON = 256 * 1024


class LuksError(RuntimeError):
    def __init__(self, message: str, code: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = code


class WrongKeyError(LuksError):
    """No keyslot accepts the key given."""


@dataclass(frozen=True, slots=True)
class Pbkdf:
    """How a keyslot stretches its passphrase. `iterations` set means no benchmark: that
    many PBKDF2 iterations (or Argon2 passes), for keys that need no stretching."""

    type: str = "argon2id"
    hash: str = "sha256"
    time_ms: int = 2000
    max_memory_kb: int = 1024 * 1024
    parallel_threads: int = 4
    iterations: int = 0


# For keys with full entropy (TPM secrets, recovery keys), as systemd-cryptenroll does.
MINIMAL_PBKDF = Pbkdf(type="pbkdf2", hash="sha512", iterations=1000)


@dataclass(frozen=True, slots=True)
class Keyslot:
    id: int
    type: str
    key_size: int
    pbkdf: str
    priority: str = "normal"


@dataclass(frozen=True, slots=True)
class Segment:
    id: int
    type: str
    offset: int
    size: str  # bytes, or "dynamic" (to the end of the device)
    encryption: str
    sector_size: int


@dataclass(frozen=True, slots=True)
class Header:
    uuid: str
    keyslots: Mapping[int, Keyslot]
    tokens: Mapping[int, Mapping[str, Any]]
    segments: Mapping[int, Segment]

    def token_slots(self, token_type: str) -> list[int]:
        return sorted(
            int(s)
            for t in self.tokens.values()
            if t.get("type") == token_type
            for s in t.get("keyslots", [])
        )


# -- the library, one device at a time ----------------------------------------------------


class _Context:
    def __init__(self, cd: Any, messages: list[str]) -> None:
        self.cd = cd
        self.messages = messages

    def check(self, rc: int, what: str) -> int:
        if rc >= 0:
            return rc
        detail = "; ".join(m.strip() for m in self.messages if m.strip())
        self.messages.clear()
        code = -rc
        if code == errno.EPERM:
            raise WrongKeyError(f"{what}: no keyslot accepts this key", code)
        message = f"{what}: {os.strerror(code)}"
        raise LuksError(f"{message} ({detail})" if detail else message, code)


@contextmanager
def _open(device: str | os.PathLike[str], load: bool = True) -> Iterator[_Context]:
    lib = cs.lib()
    ffi = cs.ffi
    pcd = ffi.new("struct crypt_device **")
    messages: list[str] = []

    def collect(level: int, msg: Any, _: Any) -> None:
        if level == cs.CRYPT_LOG_ERROR and msg != ffi.NULL:
            messages.append(ffi.string(msg).decode("utf-8", "replace"))

    log = ffi.callback("void(int, const char *, void *)", collect)

    rc = lib.crypt_init(pcd, os.fsencode(device))
    if rc < 0:
        raise LuksError(f"{os.fspath(device)}: {os.strerror(-rc)}", -rc)
    ctx = _Context(pcd[0], messages)
    try:
        lib.crypt_set_log_callback(ctx.cd, log, ffi.NULL)
        if load:
            ctx.check(lib.crypt_load(ctx.cd, b"LUKS2", ffi.NULL), f"{os.fspath(device)}: not LUKS2")
        yield ctx
    finally:
        lib.crypt_free(ctx.cd)


def _set_pbkdf(ctx: _Context, pbkdf: Pbkdf) -> None:
    ffi = cs.ffi
    keep = (ffi.new("char[]", pbkdf.type.encode()), ffi.new("char[]", pbkdf.hash.encode()))
    p = ffi.new("struct crypt_pbkdf_type *")
    p.type, p.hash = keep
    if pbkdf.iterations:
        p.iterations = pbkdf.iterations
        p.flags = cs.CRYPT_PBKDF_NO_BENCHMARK
    else:
        p.time_ms = pbkdf.time_ms
    if pbkdf.type != "pbkdf2":
        p.max_memory_kb, p.parallel_threads = pbkdf.max_memory_kb, pbkdf.parallel_threads
    ctx.check(cs.lib().crypt_set_pbkdf_type(ctx.cd, p), "PBKDF")


def _as_bytes(key: bytes | str) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def _volume_key(ctx: _Context, key: bytes) -> Any:
    """The volume key in a cffi buffer (zeroed by _wipe when done)."""
    ffi, lib = cs.ffi, cs.lib()
    size = lib.crypt_get_volume_key_size(ctx.cd)
    buf = ffi.new("char[]", max(size, 1))
    psize = ffi.new("size_t *", size)
    ctx.check(
        lib.crypt_volume_key_get(ctx.cd, cs.CRYPT_ANY_SLOT, buf, psize, key, len(key)), "unlock"
    )
    return buf, psize[0]


def _wipe(buf: Any, size: int) -> None:
    cs.ffi.memmove(buf, bytes(size), size)


# -- operations ----------------------------------------------------------------------------


def format_volume(
    device: str | os.PathLike[str],
    key: bytes | str,
    *,
    cipher: str = "aes",
    cipher_mode: str = "xts-plain64",
    key_bits: int = 512,
    pbkdf: Pbkdf | None = None,
    volume_uuid: str | None = None,
) -> str:
    """Make `device` a LUKS2 volume whose keyslot 0 opens with `key`; returns its UUID."""
    ffi, lib = cs.ffi, cs.lib()
    if key_bits % 8 or not 128 <= key_bits <= 1024:
        raise ValueError("key_bits: a multiple of 8 from 128 to 1024")
    with _open(device, load=False) as ctx:
        _set_pbkdf(ctx, pbkdf or Pbkdf())
        ctx.check(
            lib.crypt_format(
                ctx.cd,
                b"LUKS2",
                cipher.encode(),
                cipher_mode.encode(),
                volume_uuid.encode() if volume_uuid else ffi.NULL,
                ffi.NULL,
                key_bits // 8,
                ffi.NULL,
            ),
            "format",
        )
        k = _as_bytes(key)
        ctx.check(
            lib.crypt_keyslot_add_by_volume_key(ctx.cd, 0, ffi.NULL, 0, k, len(k)), "add keyslot 0"
        )
        return str(ffi.string(lib.crypt_get_uuid(ctx.cd)).decode())


def add_key(
    device: str | os.PathLike[str],
    existing: bytes | str,
    new: bytes | str,
    *,
    pbkdf: Pbkdf | None = None,
    slot: int = cs.CRYPT_ANY_SLOT,
) -> int:
    """A new keyslot opening with `new`, authorised by `existing`; returns its number."""
    with _open(device) as ctx:
        return _add_key(ctx, _as_bytes(existing), _as_bytes(new), pbkdf, slot)


def _add_key(ctx: _Context, existing: bytes, new: bytes, pbkdf: Pbkdf | None, slot: int) -> int:
    lib = cs.lib()
    buf, size = _volume_key(ctx, existing)
    try:
        if pbkdf is not None:
            _set_pbkdf(ctx, pbkdf)
        return ctx.check(
            lib.crypt_keyslot_add_by_volume_key(ctx.cd, slot, buf, size, new, len(new)),
            "add keyslot",
        )
    finally:
        _wipe(buf, size)


def remove_keyslot(device: str | os.PathLike[str], slot: int) -> None:
    """Destroy keyslot `slot` and drop it from any token naming it (a token left with no
    keyslot is removed), so the header never names a slot that is gone."""
    with _open(device) as ctx:
        _remove_keyslot(ctx, slot)


def _remove_keyslot(ctx: _Context, slot: int) -> None:
    header = _header(ctx)
    if slot not in header.keyslots:
        raise LuksError(f"keyslot {slot}: no such keyslot", errno.ENOENT)
    if len(header.keyslots) == 1:
        raise LuksError(f"keyslot {slot}: the last keyslot; the volume would be lost", errno.EBUSY)
    ctx.check(cs.lib().crypt_keyslot_destroy(ctx.cd, slot), f"remove keyslot {slot}")
    for token_id, token in header.tokens.items():
        slots = [s for s in token.get("keyslots", []) if s != str(slot)]
        if slots == list(token.get("keyslots", [])):
            continue
        _token_set(ctx, token_id, {**token, "keyslots": slots} if slots else None)


def test_key(device: str | os.PathLike[str], key: bytes | str) -> int:
    """The keyslot that `key` opens (WrongKeyError if none)."""
    k = _as_bytes(key)
    with _open(device) as ctx:
        return ctx.check(
            cs.lib().crypt_activate_by_passphrase(
                ctx.cd, cs.ffi.NULL, cs.CRYPT_ANY_SLOT, k, len(k), 0
            ),
            "test key",
        )


def opens(device: str | os.PathLike[str], key: bytes | str) -> bool:
    """Whether some keyslot opens with `key`."""
    try:
        test_key(device, key)
    except WrongKeyError:
        return False
    return True


def open_volume(device: str | os.PathLike[str], name: str, key: bytes | str) -> int:
    """Map the volume as /dev/mapper/`name` (device-mapper); returns the keyslot used."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", name):
        raise ValueError(f"name: not a device-mapper name: {name!r}")
    k = _as_bytes(key)
    with _open(device) as ctx:
        return ctx.check(
            cs.lib().crypt_activate_by_passphrase(
                ctx.cd, name.encode(), cs.CRYPT_ANY_SLOT, k, len(k), 0
            ),
            f"open {name}",
        )


def close_volume(name: str) -> None:
    lib, ffi = cs.lib(), cs.ffi
    pcd = ffi.new("struct crypt_device **")
    rc = lib.crypt_init_by_name(pcd, name.encode())
    if rc < 0:
        raise LuksError(f"close {name}: {os.strerror(-rc)}", -rc)
    try:
        ctx = _Context(pcd[0], [])
        ctx.check(lib.crypt_deactivate(ctx.cd, name.encode()), f"close {name}")
    finally:
        lib.crypt_free(pcd[0])


def _header(ctx: _Context) -> Header:
    ffi, lib = cs.ffi, cs.lib()
    out = ffi.new("const char **")
    ctx.check(lib.crypt_dump_json(ctx.cd, out, 0), "read header")
    # The UUID lives in the binary header, not in the JSON metadata.
    uuid = lib.crypt_get_uuid(ctx.cd)
    return parse_header(ffi.string(out[0]).decode(), ffi.string(uuid).decode() if uuid else "")


def header(device: str | os.PathLike[str]) -> Header:
    with _open(device) as ctx:
        return _header(ctx)


def _int(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise LuksError(f"header: {what} is not a number", errno.EINVAL)


def parse_header(text: str, uuid: str = "") -> Header:
    """The LUKS2 JSON metadata (as `cryptsetup luksDump --dump-json-metadata` prints it)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise LuksError(f"header: not JSON ({e})", errno.EINVAL) from None
    if not isinstance(doc, dict):
        raise LuksError("header: not a JSON object", errno.EINVAL)
    keyslots: dict[int, Keyslot] = {}
    for sid, ks in (doc.get("keyslots") or {}).items():
        if not isinstance(ks, dict):
            raise LuksError(f"header: keyslot {sid} is not an object", errno.EINVAL)
        kdf = ks["kdf"] if isinstance(ks.get("kdf"), dict) else {}
        keyslots[_int(sid, "keyslot id")] = Keyslot(
            id=_int(sid, "keyslot id"),
            type=str(ks.get("type", "")),
            key_size=_int(ks.get("key_size", 0), "key_size"),
            pbkdf=str(kdf.get("type", "")),
            priority={0: "ignore", 1: "normal", 2: "prefer"}.get(ks.get("priority", 1), "normal"),
        )
    tokens: dict[int, Mapping[str, Any]] = {}
    for tid, token in (doc.get("tokens") or {}).items():
        if not isinstance(token, dict):
            raise LuksError(f"header: token {tid} is not an object", errno.EINVAL)
        tokens[_int(tid, "token id")] = token
    segments: dict[int, Segment] = {}
    for sid, seg in (doc.get("segments") or {}).items():
        if not isinstance(seg, dict):
            raise LuksError(f"header: segment {sid} is not an object", errno.EINVAL)
        segments[_int(sid, "segment id")] = Segment(
            id=_int(sid, "segment id"),
            type=str(seg.get("type", "")),
            offset=_int(seg.get("offset", 0), "segment offset"),
            size=str(seg.get("size", "")),
            encryption=str(seg.get("encryption", "")),
            sector_size=_int(seg.get("sector_size", 512), "sector_size"),
        )
    return Header(uuid, keyslots, tokens, segments)


def _token_set(ctx: _Context, token_id: int, token: Mapping[str, Any] | None) -> int:
    ffi = cs.ffi
    text = json.dumps(token, separators=(",", ":")).encode() if token is not None else None
    if text is not None and len(text) > MAX_TOKEN_JSON:
        raise LuksError("token: JSON too large", errno.E2BIG)
    return ctx.check(
        cs.lib().crypt_token_json_set(ctx.cd, token_id, text if text is not None else ffi.NULL),
        "write token",
    )


def set_token(
    device: str | os.PathLike[str], token: Mapping[str, Any], token_id: int = cs.CRYPT_ANY_TOKEN
) -> int:
    with _open(device) as ctx:
        return _token_set(ctx, token_id, token)


def remove_token(device: str | os.PathLike[str], token_id: int) -> None:
    with _open(device) as ctx:
        _token_set(ctx, token_id, None)


# -- recovery keys --------------------------------------------------------------------------


def make_recovery_key(raw: bytes | None = None) -> str:
    """A recovery key as systemd-cryptenroll --recovery-key prints it."""
    data = raw if raw is not None else secrets.token_bytes(RECOVERY_KEY_BYTES)
    if len(data) != RECOVERY_KEY_BYTES:
        raise ValueError(f"a recovery key is {RECOVERY_KEY_BYTES} bytes")
    chars = "".join(MODHEX[b >> 4] + MODHEX[b & 0xF] for b in data)
    return "-".join(chars[i : i + 8] for i in range(0, len(chars), 8))


def is_recovery_key(text: str) -> bool:
    return RECOVERY_KEY_RE.fullmatch(text) is not None


def enroll_recovery_key(
    device: str | os.PathLike[str], unlock: bytes | str, key: str | None = None
) -> tuple[str, int]:
    """Add a recovery key (generated unless given) with a systemd-recovery token, as
    `systemd-cryptenroll --recovery-key` does; returns (key, keyslot)."""
    key = key if key is not None else make_recovery_key()
    with _open(device) as ctx:
        slot = _add_key(ctx, _as_bytes(unlock), key.encode(), MINIMAL_PBKDF, cs.CRYPT_ANY_SLOT)
        try:
            _token_set(ctx, cs.CRYPT_ANY_TOKEN, {"type": TOKEN_RECOVERY, "keyslots": [str(slot)]})
        except BaseException:
            cs.lib().crypt_keyslot_destroy(ctx.cd, slot)
            raise
    return key, slot


# -- the systemd-tpm2 token ------------------------------------------------------------------


def tpm2_token(
    sealed_blob: bytes,
    policy: PCRPolicy,
    policy_hash: bytes,
    srk: bytes,
    keyslot: int,
    signer: Signer | None = None,
    signer_pcrs: Sequence[int] = (),
) -> dict[str, Any]:
    """The token systemd-cryptenroll --tpm2-device writes (systemd 255+, SRK-based); with a
    signer, as --tpm2-public-key with --tpm2-public-key-pcrs adds."""
    signed: dict[str, Any] = {}
    if signer is not None:
        signed = {
            "tpm2_pubkey_pcrs": sorted(set(signer_pcrs)),
            "tpm2_pubkey": base64.b64encode(signer.pem).decode(),
        }
    return {
        "type": TOKEN_TPM2,
        "keyslots": [str(keyslot)],
        "tpm2-blob": base64.b64encode(sealed_blob).decode(),
        "tpm2-pcrs": list(policy.pcrs),
        "tpm2-pcr-bank": policy.bank,
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": policy_hash.hex(),
        "tpm2-pin": False,
        **signed,
        "tpm2_pcrlock": False,
        "tpm2_srk": base64.b64encode(srk).decode(),
    }


@dataclass(frozen=True, slots=True)
class Tpm2Token:
    id: int
    keyslot: int
    blob: bytes
    pcrs: tuple[int, ...]
    bank: str
    policy_hash: bytes
    srk: bytes | None
    pin: bool
    pcrlock: bool  # bound through systemd-pcrlock's NV index policy (not supported here)
    signer: Signer | None  # tpm2_pubkey: the key whose signatures release it
    signer_pcrs: tuple[int, ...]  # tpm2_pubkey_pcrs: the PCRs those signatures cover


def parse_tpm2_token(token_id: int, token: Mapping[str, Any]) -> Tpm2Token:
    """A systemd-tpm2 token, checked field by field (the header is outside input)."""

    def field(name: str, kind: type, default: Any = None) -> Any:
        value = token.get(name, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise LuksError(
                f"token {token_id}: {name} is missing or not a {kind.__name__}", errno.EINVAL
            )
        return value

    slots = field("keyslots", list)
    if len(slots) != 1 or not isinstance(slots[0], str) or not slots[0].isdigit():
        raise LuksError(f"token {token_id}: keyslots must name one keyslot", errno.EINVAL)
    pcrs = field("tpm2-pcrs", list, [])
    if not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p < 24 for p in pcrs):
        raise LuksError(f"token {token_id}: tpm2-pcrs must be PCR numbers 0-23", errno.EINVAL)
    bank = field("tpm2-pcr-bank", str, "sha256")
    if bank not in ("sha1", "sha256", "sha384", "sha512"):
        raise LuksError(f"token {token_id}: tpm2-pcr-bank {bank!r} unknown", errno.EINVAL)
    try:
        blob = base64.b64decode(field("tpm2-blob", str), validate=True)
        policy_hash = bytes.fromhex(field("tpm2-policy-hash", str))
        srk_text = token.get("tpm2_srk")
        srk = base64.b64decode(srk_text, validate=True) if isinstance(srk_text, str) else None
    except ValueError:
        raise LuksError(
            f"token {token_id}: tpm2-blob, tpm2-policy-hash or tpm2_srk is not valid base64/hex",
            errno.EINVAL,
        ) from None
    signer: Signer | None = None
    signer_pcrs = field("tpm2_pubkey_pcrs", list, [])
    if not all(type(p) is int and 0 <= p < 24 for p in signer_pcrs):
        raise LuksError(
            f"token {token_id}: tpm2_pubkey_pcrs must be PCR numbers 0-23", errno.EINVAL
        )
    pubkey = token.get("tpm2_pubkey")
    if pubkey:
        try:
            signer = pcrsig.signer(base64.b64decode(field("tpm2_pubkey", str), validate=True))
        except (ValueError, pcrsig.SignatureError) as e:
            raise LuksError(f"token {token_id}: tpm2_pubkey: {e}", errno.EINVAL) from None
        if not signer_pcrs:
            raise LuksError(f"token {token_id}: tpm2_pubkey without tpm2_pubkey_pcrs", errno.EINVAL)
    return Tpm2Token(
        id=token_id,
        keyslot=int(slots[0]),
        blob=blob,
        pcrs=tuple(pcrs),
        bank=bank,
        policy_hash=policy_hash,
        srk=srk,
        pin=bool(token.get("tpm2-pin", False)),
        pcrlock=bool(token.get("tpm2_pcrlock", False)),
        signer=signer,
        signer_pcrs=tuple(sorted(set(signer_pcrs))) if signer else (),
    )


def tpm2_passphrase(secret: bytes) -> bytes:
    """The keyslot passphrase for an unsealed TPM secret: its base64, as systemd's."""
    return base64.b64encode(secret)


def enroll_tpm2(
    device: str | os.PathLike[str],
    unlock: bytes | str,
    tpm: Tpm,
    policy: PCRPolicy,
    *,
    signer: Signer | None = None,
    signer_pcrs: Sequence[int] = (11,),
    wipe_other_tpm2: bool = False,
) -> tuple[int, int]:
    """Bind the volume to the TPM under `policy` (and, with a `signer`, to that key's signed
    policies over `signer_pcrs`): a new keyslot opening with a sealed secret and a
    systemd-tpm2 token for it. Returns (keyslot, token id). `wipe_other_tpm2` then removes
    the keyslots of older TPM tokens (systemd-cryptenroll --wipe-slot=tpm2).
    If anything fails, the header is as it was: the new keyslot is destroyed again."""
    secret = tpm.get_random(TPM2_SECRET_BYTES)
    sealed = tpm.seal(secret, policy, signer)
    passphrase = tpm2_passphrase(secret)
    with _open(device) as ctx:
        before = _header(ctx)
        slot = _add_key(ctx, _as_bytes(unlock), passphrase, MINIMAL_PBKDF, cs.CRYPT_ANY_SLOT)
        try:
            token_id = _token_set(
                ctx,
                cs.CRYPT_ANY_TOKEN,
                tpm2_token(
                    sealed.blob,
                    policy,
                    sealed.policy_hash,
                    sealed.srk,
                    slot,
                    signer,
                    signer_pcrs,
                ),
            )
        except BaseException:
            cs.lib().crypt_keyslot_destroy(ctx.cd, slot)
            raise
        if wipe_other_tpm2:
            for old in before.token_slots(TOKEN_TPM2):
                _remove_keyslot(ctx, old)
    return slot, token_id


def unseal_tpm2_tokens(
    header_: Header, tpm: Tpm, signatures: Sequence[PCRSignature] = ()
) -> Iterator[tuple[Tpm2Token, bytes]]:
    """(token, keyslot passphrase) for each systemd-tpm2 token this TPM unseals now; tokens
    it cannot (PCRs changed, another TPM, a PIN, a pcrlock policy, a signed policy with no
    signature for the PCRs as they are) are skipped."""
    from incusos_hal.hal.tpm import SignedPolicy, TPMError, split_blob

    for token_id, raw in sorted(header_.tokens.items()):
        if raw.get("type") != TOKEN_TPM2:
            continue
        token = parse_tpm2_token(token_id, raw)
        if token.pin or token.pcrlock:
            continue
        signed = None
        if token.signer is not None:
            if not signatures:
                continue
            signed = SignedPolicy(token.signer, token.signer_pcrs, tuple(signatures))
        try:
            private, public = split_blob(token.blob)
            secret = tpm.unseal(private, public, token.bank, token.pcrs, token.srk, signed)
        except (TPMError, ValueError):
            continue
        yield token, tpm2_passphrase(secret)


def unlock_tpm2(
    device: str | os.PathLike[str], tpm: Tpm, signatures: Sequence[PCRSignature] = ()
) -> tuple[int, bytes]:
    """(keyslot, passphrase) of the first TPM token that unseals and opens the volume.
    `signatures`: the PCR signature document's entries, for tokens bound to a signer."""
    for _token, passphrase in unseal_tpm2_tokens(header(device), tpm, signatures):
        try:
            return test_key(device, passphrase), passphrase
        except WrongKeyError:
            continue
    raise WrongKeyError(
        f"{os.fspath(device)}: no systemd-tpm2 token unseals with this TPM now", errno.EPERM
    )


# -- key files -------------------------------------------------------------------------------


def write_key_file(path: str | os.PathLike[str], key: bytes | str) -> None:
    """A key file: mode 0600 from the moment it exists, replaced atomically."""
    from incusos_hal.core.files import atomic_write

    atomic_write(path, _as_bytes(key), 0o600)


def read_key_file(path: str | os.PathLike[str], limit: int = 8192) -> bytes:
    """A key file's bytes (as cryptsetup's --key-file: the whole file, at most `limit`)."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LuksError(f"{os.fspath(path)}: key file larger than {limit} bytes", errno.EFBIG)
    return data


def volumes(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[str, Header]]:
    """The LUKS2 headers of those devices that have one."""
    out = []
    for p in paths:
        try:
            out.append((os.fspath(p), header(p)))
        except LuksError:
            continue
    return out
