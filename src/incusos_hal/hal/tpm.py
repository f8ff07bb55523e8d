"""The TPM 2.0, through tpm2-pytss (the TSS's ESAPI) and hal.tpmwire: PCRs, randomness,
secrets sealed under a PCR policy, the storage root key shared with systemd, the
machine's identity key, and TPM2_Clear (a factory reset).

Sealing follows systemd (src/shared/tpm2-util.c) so that what we seal, systemd-cryptsetup
unseals and the other way round: the secret is a keyed-hash object under the SRK at the
reserved handle 0x81000001 (TCG Provisioning Guidance; created with the EK Credential
Profile's ECC template "L-2" if the TPM has none), with only fixedTPM and fixedParent set so
that nothing but its policy can release it; the policy is TPM2_PolicyPCR over a selection of
3 bytes (24 PCRs) of one bank. The policy digest is computed here rather than in a trial
session, which is what lets a secret be bound to PCR values this boot does not have: the
predicted PCR 7 after a Secure Boot update, or PCR 15 still all zeros after the initrd.

A secret can instead (or also) be sealed to a signer: PolicyAuthorize by a public key whose
signatures of PCR policies release it (hal.pcrsig; systemd's tpm2_pubkey, PCR 11 of a
signed UKI).

Parameter encryption: sealing and unsealing run in a session salted with the SRK, so the
secret never crosses the bus (or swtpm's socket) in the clear.

The SRK at 0x81000001 is trusted only when its public area is the template's (everything
but the key itself): a persistent key of another shape there (another tool's, or a planted
one) is left alone and the SRK is created transiently from the template instead, for as
long as the TPM is open. Same template, same owner seed: the same key, so what was sealed
under the persistent SRK loads under the transient one and the other way round.

A seal or unseal is a create, or a load and an unseal: no primary key is generated once
the SRK is persistent, and the two salted sessions (one HMAC session for create, one
policy session restarted for each unseal) are started once per open TPM and reused.

Two paths to one TPM connection: reading PCRs, sealing and unsealing under the persistent
SRK go through hal.tpmwire (the commands and sessions built here, sent through
_native.tss's TCTI; ~10x less time than the ESAPI's own session crypto), everything else
through tpm2-pytss's ESAPI, made over the same TCTI on first use; without _native.tss's
libraries, tpm2-pytss does it all.

Every transient object and session is flushed before the TPM is closed, the sealed
objects before the method that loaded them returns: a TPM (and swtpm even more, having no
resource manager) has room for three of each.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress

from incusos_hal.hal import tpmwire
from incusos_hal.hal.eventrecords import ALGORITHM_IDS, ALGORITHMS
from incusos_hal.hal.tpmwire import (
    FIXED_PARENT,
    FIXED_TPM,
    NO_DA,
    SENSITIVE_DATA_ORIGIN,
    USER_WITH_AUTH,
)

# Not `typing.TYPE_CHECKING`: a seal in a fresh interpreter (the fast path) imports
# neither typing, pathlib nor hal.pcrsig (and its event log, json, uuid): they are
# imported where a signer or a path is used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from incusos_hal.hal import pcrsig

SRK_HANDLE = 0x81000001
# The identity key: an ECC P-256 signing key derived from the endorsement seed, persisted
# here so every reader sees the same public key (IncusOS's `tpm_public_key`).
IDENTITY_HANDLE = 0x81000100
TRANSIENT_HANDLE_TYPE = 0x80  # TPM_HT_TRANSIENT, a handle's top byte
DEFAULT_TCTI = "device:/dev/tpmrm0"
PCR_SELECT_BYTES = 3  # 24 PCRs, as systemd marshals every selection
MAX_SEALED_DATA = 128  # TPM 2.0 part 2, TPMU_SENSITIVE_CREATE: "for interoperability"

# TPM_PT properties (TPM 2.0 part 2, 6.13): the fixed group.
PT_FIXED = 0x100
PT_REVISION = 0x102
PT_MANUFACTURER = 0x105
PT_VENDOR_STRING_1 = 0x106  # to _4 = 0x109
PT_FIRMWARE_VERSION_1 = 0x10B
PT_FIRMWARE_VERSION_2 = 0x10C

TPM_CC_POLICY_PCR = 0x0000017F

# TPMA_OBJECT bits and the templates: hal.tpmwire's, shared by both paths.
SIGN = 0x00040000
SRK_ATTRIBUTES = tpmwire.SRK_ATTRIBUTES
SEALED_OBJECT_ATTRIBUTES = tpmwire.SEALED_OBJECT_ATTRIBUTES
# systemd's pre-SRK primary: the same without noDA.
LEGACY_PRIMARY_ATTRIBUTES = SRK_ATTRIBUTES & ~NO_DA
is_srk_public = tpmwire.is_srk_public


class TPMError(RuntimeError):
    """A TPM operation failed; the message names the operation, never a secret."""


class PolicyError(TPMError):
    """The TPM refused the policy: the PCRs are not what the secret was sealed to."""


class PCRPolicy(tpmwire.Record):
    """A PCR policy: `values` maps each bound PCR to the value it must have (sealing against
    the current value is just reading it first, see Tpm.current_policy)."""

    __slots__ = ("bank", "values")
    bank: str
    values: Mapping[int, bytes]

    def __init__(self, bank: str, values: Mapping[int, bytes]) -> None:
        self._init(bank=bank, values=values)
        if self.bank not in ALGORITHM_IDS:
            raise ValueError(f"bank: unknown PCR bank {self.bank!r}")
        size = dict(ALGORITHMS.values())[self.bank]
        for pcr, value in self.values.items():
            if not 0 <= pcr < 8 * PCR_SELECT_BYTES:
                raise ValueError(f"pcrs: PCR {pcr} out of range 0-23")
            if len(value) != size:
                raise ValueError(f"pcrs: PCR {pcr} value is {len(value)} bytes, not {size}")

    @property
    def pcrs(self) -> tuple[int, ...]:
        return tuple(sorted(self.values))


def pcr_selection(bank: str, pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION with one bank, marshalled (count, hash, sizeofSelect, bitmap)."""
    bitmap = bytearray(PCR_SELECT_BYTES)
    for pcr in pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return struct.pack(">IHB", 1, ALGORITHM_IDS[bank], PCR_SELECT_BYTES) + bytes(bitmap)


def policy_pcr_digest(policy: PCRPolicy, start: bytes | None = None) -> bytes:
    """The session digest after TPM2_PolicyPCR (TPM 2.0 part 3, 23.7), from `start` (zeros
    for a fresh session). The name algorithm of the policy is SHA-256, as systemd's."""
    digest = start if start is not None else bytes(32)
    if not policy.values:
        return digest  # no PCR bound by value: systemd sends no PolicyPCR
    # pcrDigest is hashed with the session's algorithm over the bank's values in PCR order.
    pcr_digest = hashlib.sha256(b"".join(policy.values[p] for p in policy.pcrs)).digest()
    return hashlib.sha256(
        digest
        + struct.pack(">I", TPM_CC_POLICY_PCR)
        + pcr_selection(policy.bank, policy.pcrs)
        + pcr_digest
    ).digest()


def sealing_policy_digest(policy: PCRPolicy, signer: pcrsig.Signer | None = None) -> bytes:
    """The policy a secret is sealed under, in systemd's order: PolicyAuthorize by the
    signer's key (if any), then PolicyPCR over the PCRs bound by value."""
    if signer is None:
        return policy_pcr_digest(policy)
    from incusos_hal.hal import pcrsig

    start = pcrsig.policy_authorize_digest(signer.names[0])
    return policy_pcr_digest(policy, start)


class SignedPolicy(tpmwire.Record):
    """What unsealing a secret sealed to a signer needs: the key, the PCRs its signatures
    cover (systemd's tpm2_pubkey_pcrs, usually 11) and the signature document's entries."""

    __slots__ = ("pcrs", "signatures", "signer")
    signer: pcrsig.Signer
    pcrs: tuple[int, ...]
    signatures: tuple[pcrsig.PCRSignature, ...]

    def __init__(
        self,
        signer: pcrsig.Signer,
        pcrs: tuple[int, ...],
        signatures: tuple[pcrsig.PCRSignature, ...],
    ) -> None:
        self._init(signer=signer, pcrs=pcrs, signatures=signatures)


class Sealed(tpmwire.Record):
    """A sealed secret as it is stored: the TPM2B_PRIVATE and TPM2B_PUBLIC of the object
    (marshalled, size first), and what unsealing needs to know."""

    __slots__ = ("policy", "policy_hash", "private", "public", "signer", "srk")
    private: bytes
    public: bytes
    policy: PCRPolicy
    policy_hash: bytes
    srk: bytes  # the SRK's serialized ESYS_TR (systemd's tpm2_srk)
    signer: pcrsig.Signer | None

    def __init__(
        self,
        private: bytes,
        public: bytes,
        policy: PCRPolicy,
        policy_hash: bytes,
        srk: bytes,
        signer: pcrsig.Signer | None = None,
    ) -> None:
        self._init(
            private=private,
            public=public,
            policy=policy,
            policy_hash=policy_hash,
            srk=srk,
            signer=signer,
        )

    @property
    def blob(self) -> bytes:
        """systemd's tpm2-blob: TPM2B_PRIVATE then TPM2B_PUBLIC."""
        return self.private + self.public


def split_blob(blob: bytes) -> tuple[bytes, bytes]:
    """The TPM2B_PRIVATE and TPM2B_PUBLIC of a tpm2-blob, each with its size prefix."""
    if len(blob) < 4:
        raise ValueError("tpm2-blob: too short")
    (private_size,) = struct.unpack_from(">H", blob)
    if 2 + private_size + 2 > len(blob):
        raise ValueError("tpm2-blob: private part overruns the blob")
    (public_size,) = struct.unpack_from(">H", blob, 2 + private_size)
    end = 2 + private_size + 2 + public_size
    if end > len(blob):
        raise ValueError("tpm2-blob: public part overruns the blob")
    return blob[: 2 + private_size], blob[2 + private_size : end]


class TPMInfo(tpmwire.Record):
    __slots__ = ("banks", "firmware_version", "manufacturer", "spec_revision", "vendor")
    manufacturer: str
    vendor: str
    firmware_version: str
    spec_revision: str
    banks: tuple[str, ...]  # PCR banks with at least one PCR allocated

    def __init__(
        self,
        manufacturer: str,
        vendor: str,
        firmware_version: str,
        spec_revision: str,
        banks: tuple[str, ...],
    ) -> None:
        self._init(
            manufacturer=manufacturer,
            vendor=vendor,
            firmware_version=firmware_version,
            spec_revision=spec_revision,
            banks=banks,
        )

    @property
    def is_swtpm(self) -> bool:
        # swtpm (libtpms) reports the IBM reference implementation's manufacturer and
        # "SW   TPM" as its vendor string.
        return self.vendor.replace(" ", "").upper().startswith("SWTPM")


def _tss() -> Any:
    """tpm2_pytss, imported on first use: the inventory and the generator never need it."""
    try:
        import tpm2_pytss
    except ImportError as e:  # pragma: no cover - a broken install
        raise TPMError(f"tpm2-pytss is not usable: {e}") from None
    return tpm2_pytss


def default_tcti() -> str:
    return os.environ.get("TPM2TOOLS_TCTI") or os.environ.get("TSS2_TCTI") or DEFAULT_TCTI


def _rc_error(what: str, rc: int, text: str) -> TPMError:
    """The error for a TPM response code, whichever path got it."""
    rc &= 0xFFFF
    # Format-one codes carry the failing handle/session in bits 8-11: mask them off.
    # TPM_RC_POLICY_FAIL (0x9D) and TPM_RC_VALUE on PolicyPCR (0x84): the PCRs changed.
    code = rc & 0xBF if rc & 0x80 else rc
    if code in (0x9D, 0x84):
        return PolicyError(f"{what}: the PCR policy is not satisfied")
    return TPMError(f"{what}: {text}")


def _error(what: str, e: Exception) -> TPMError:
    if isinstance(e, tpmwire.ResponseError):
        return _rc_error(what, e.rc, f"TPM response 0x{e.rc:x}")
    if isinstance(e, (tpmwire.WireError, OSError)):
        return TPMError(f"{what}: {e}")
    tss = _tss()
    if isinstance(e, tss.TSS2_Exception):
        return _rc_error(what, int(e.rc), str(e))
    return TPMError(f"{what}: {e}")


def _u32_str(value: int) -> str:
    return value.to_bytes(4, "big").rstrip(b"\0").decode("ascii", "replace").strip()


class Tpm:
    """An open TPM. Use `open_tpm()` as a context manager.

    Two paths to one TPM connection: `wire` (hal.tpmwire over _native.tss's TCTI) for
    reading PCRs, sealing and unsealing under the persistent SRK, when the libraries load;
    tpm2-pytss's ESAPI (`esapi`) for everything else, made on first use over the same TCTI
    (so a command that seals never imports tpm2_pytss), or from the start without `wire`."""

    def __init__(
        self, esapi: Any = None, wire: tpmwire.Wire | None = None, tcti: Any = None
    ) -> None:
        self._esapi = esapi
        self._wire = wire
        self._tcti = tcti  # _native.tss.Tcti with `wire`: the connection both paths share
        self._pytss_tcti: Any = None
        self._srk: Any = None  # the SRK's ESYS_TR, looked up once per open TPM
        self._srk_is_transient = False  # the persistent one was not the template's
        # Sessions salted with the SRK, by kind ("hmac", "policy"), kept for reuse.
        self._sessions: dict[str, Any] = {}
        self._wire_sessions: dict[str, tpmwire.Session] = {}
        self._wire_srk: tpmwire.SRK | None = None
        self._wire_srk_foreign = False  # SRK_HANDLE holds a key that is not the template's

    @property
    def tss(self) -> Any:
        return _tss()

    @property
    def esapi(self) -> Any:
        """tpm2-pytss's ESAPI; with the fast path, made now over its TCTI."""
        if self._esapi is None:
            tss = _tss()
            from tpm2_pytss._libtpm2_pytss import ffi

            assert self._tcti is not None
            self._pytss_tcti = tss.TCTI(ffi.cast("TSS2_TCTI_CONTEXT *", self._tcti.address))
            try:
                self._esapi = tss.ESAPI(self._pytss_tcti)
            except Exception as e:
                raise TPMError(f"cannot open the TPM's ESAPI: {e}") from None
        return self._esapi

    def close(self) -> None:
        """Flush what this object kept loaded: the sessions, a transient SRK."""
        for session in self._wire_sessions.values():
            self._wire_flush_quietly(session.handle)
        self._wire_sessions.clear()
        kept = list(self._sessions.values())
        if self._srk_is_transient:
            kept.append(self._srk)
        self._sessions.clear()
        self._srk, self._srk_is_transient = None, False
        for handle in kept:
            self._flush_quietly(handle)

    def _disconnect(self) -> None:
        """Close the ESAPI and the TCTI (after close())."""
        if self._esapi is not None:
            self._esapi.close()
            self._esapi = None
        if self._tcti is not None:
            self._tcti.close()
            self._tcti = None

    def _wire_flush_quietly(self, handle: int) -> None:
        if self._wire is not None:
            with suppress(tpmwire.ResponseError, tpmwire.WireError, OSError):
                self._wire.flush(handle)

    # -- reading ------------------------------------------------------------------------

    def info(self) -> TPMInfo:
        tss = self.tss
        props: dict[int, int] = {}
        _, data = self.esapi.get_capability(tss.TPM2_CAP.TPM_PROPERTIES, PT_FIXED, 64)
        for prop in data.data.tpmProperties:
            props[int(prop.property)] = int(prop.value)
        vendor = "".join(_u32_str(props.get(PT_VENDOR_STRING_1 + i, 0)) for i in range(4))
        fw1, fw2 = props.get(PT_FIRMWARE_VERSION_1, 0), props.get(PT_FIRMWARE_VERSION_2, 0)
        revision = props.get(PT_REVISION, 0)
        return TPMInfo(
            manufacturer=_u32_str(props.get(PT_MANUFACTURER, 0)),
            vendor=vendor,
            firmware_version=f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}",
            spec_revision=f"{revision // 100}.{revision % 100}",
            banks=self.banks(),
        )

    def banks(self) -> tuple[str, ...]:
        tss = self.tss
        _, data = self.esapi.get_capability(tss.TPM2_CAP.PCRS, 0, 1)
        out = []
        for sel in data.data.assignedPCR:
            alg = int(sel.hash)
            if alg in ALGORITHMS and any(bytes(sel.pcrSelect)[: sel.sizeofSelect]):
                out.append(ALGORITHMS[alg][0])
        return tuple(out)

    def pcr_read(self, bank: str, pcrs: Sequence[int] = tuple(range(24))) -> dict[int, bytes]:
        """PCR values of one bank. TPM2_PCR_Read returns at most 8 digests per call, and
        may return fewer than asked: ask again for what is still missing."""
        if self._wire is not None:
            return self._wire_pcr_read(bank, pcrs)
        tss = self.tss
        wanted = sorted(set(pcrs))
        out: dict[int, bytes] = {}
        while wanted:
            sel = tss.TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, wanted[:8]))}")
            try:
                _, got_sel, values = self.esapi.pcr_read(sel)
            except Exception as e:
                raise _error("PCR read", e) from None
            got: list[int] = []
            for s in got_sel.pcrSelections[: got_sel.count]:
                bitmap = bytes(s.pcrSelect)[: s.sizeofSelect]
                got += [i for i in range(8 * len(bitmap)) if bitmap[i // 8] >> (i % 8) & 1]
            if not got:
                raise TPMError(f"PCR read: the TPM has no {bank} bank")
            for pcr, value in zip(got, values.digests[: values.count], strict=False):
                out[pcr] = bytes(value)
            wanted = [p for p in wanted if p not in out]
        return out

    def _wire_pcr_read(self, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
        assert self._wire is not None
        wanted = sorted(set(pcrs))
        out: dict[int, bytes] = {}
        while wanted:
            try:
                selection, values = self._wire.pcr_read(pcr_selection(bank, wanted[:8]))
            except (tpmwire.ResponseError, tpmwire.WireError, OSError) as e:
                raise _error("PCR read", e) from None
            got = _selected(selection, ALGORITHM_IDS[bank])
            if not got:
                raise TPMError(f"PCR read: the TPM has no {bank} bank")
            for pcr, value in zip(got, values, strict=False):
                out[pcr] = value
            wanted = [p for p in wanted if p not in out]
        return out

    def get_random(self, size: int) -> bytes:
        out = b""
        while len(out) < size:
            try:
                out += bytes(self.esapi.get_random(min(32, size - len(out))))
            except Exception as e:
                raise _error("GetRandom", e) from None
        return out

    def extend(self, pcr: int, digests: Mapping[str, bytes]) -> None:
        """TPM2_PCR_Extend with one digest per bank (how a test replays a recorded log)."""
        tss = self.tss
        values = tss.TPML_DIGEST_VALUES(
            [
                tss.TPMT_HA(hashAlg=ALGORITHM_IDS[bank], digest=tss.TPMU_HA(**{bank: digest}))
                for bank, digest in digests.items()
            ]
        )
        try:
            self.esapi.pcr_extend(tss.ESYS_TR.parse(f"pcr{pcr}"), values)
        except Exception as e:
            raise _error(f"PCR {pcr} extend", e) from None

    def current_policy(self, bank: str, pcrs: Sequence[int], **expected: bytes) -> PCRPolicy:
        """A policy on `pcrs` at their current values, except those given as `pcrN=value`."""
        values = self.pcr_read(bank, [p for p in pcrs if f"pcr{p}" not in expected])
        for key, value in expected.items():
            values[int(key.removeprefix("pcr"))] = value
        return PCRPolicy(bank, {p: values[p] for p in pcrs})

    # -- keys -----------------------------------------------------------------------------

    def _persistent(self, handle: int) -> Any | None:
        tss = self.tss
        _, data = self.esapi.get_capability(tss.TPM2_CAP.HANDLES, handle, 1)
        handles = list(data.data.handles)
        if not handles or int(handles[0]) != handle:
            return None
        return self.esapi.tr_from_tpmpublic(handle)

    def srk(self, create: bool = True) -> Any:
        """The shared SRK (ESYS_TR): the persistent one at SRK_HANDLE if its public area is
        the template's; created and persisted if the TPM has none yet (unless `create` is
        false: TPMError). If the handle holds a key of another shape, it is not trusted and
        not touched: the SRK is created transiently from the template (the same key: same
        template, same seed) and flushed when the TPM is closed."""
        if self._srk is not None:
            return self._srk
        tss = self.tss
        template = _storage_template(tss, SRK_ATTRIBUTES)
        existing = self._persistent(SRK_HANDLE)
        if existing is not None:
            try:
                public, _, _ = self.esapi.read_public(existing)
            except Exception as e:
                raise _error("SRK read", e) from None
            if is_srk_public(public.publicArea.marshal(), template.publicArea.marshal()):
                self._srk = existing
                return existing
        elif not create:
            raise TPMError("this TPM has no SRK (another TPM, or it was cleared)")
        try:
            transient, *_ = self.esapi.create_primary(None, template, tss.ESYS_TR.OWNER)
        except Exception as e:
            raise _error("SRK create", e) from None
        if existing is not None:
            self._srk, self._srk_is_transient = transient, True
            return transient
        try:
            self._srk = self.esapi.evict_control(tss.ESYS_TR.OWNER, transient, SRK_HANDLE)
        except Exception as e:
            raise _error("SRK persist", e) from None
        finally:
            self.esapi.flush_context(transient)
        return self._srk

    def identity_public_key_pem(self) -> str:
        """The machine's identity key (created and persisted on first use) as a PEM public
        key: an ECC P-256 signing key derived from the endorsement hierarchy."""
        tss = self.tss
        handle = self._persistent(IDENTITY_HANDLE)
        if handle is None:
            template = tss.TPM2B_PUBLIC(
                tss.TPMT_PUBLIC(
                    type=tss.TPM2_ALG.ECC,
                    nameAlg=tss.TPM2_ALG.SHA256,
                    objectAttributes=FIXED_TPM
                    | FIXED_PARENT
                    | SENSITIVE_DATA_ORIGIN
                    | USER_WITH_AUTH
                    | SIGN,
                    parameters=tss.TPMU_PUBLIC_PARMS(
                        eccDetail=tss.TPMS_ECC_PARMS(
                            symmetric=tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.NULL),
                            scheme=tss.TPMT_ECC_SCHEME(
                                scheme=tss.TPM2_ALG.ECDSA,
                                details=tss.TPMU_ASYM_SCHEME(
                                    ecdsa=tss.TPMS_SCHEME_HASH(hashAlg=tss.TPM2_ALG.SHA256)
                                ),
                            ),
                            curveID=tss.TPM2_ECC.NIST_P256,
                            kdf=tss.TPMT_KDF_SCHEME(scheme=tss.TPM2_ALG.NULL),
                        )
                    ),
                )
            )
            try:
                transient, *_ = self.esapi.create_primary(None, template, tss.ESYS_TR.ENDORSEMENT)
                try:
                    handle = self.esapi.evict_control(tss.ESYS_TR.OWNER, transient, IDENTITY_HANDLE)
                finally:
                    self.esapi.flush_context(transient)
            except TPMError:
                raise
            except Exception as e:
                raise _error("identity key create", e) from None
        public, _, _ = self.esapi.read_public(handle)
        return ecc_public_pem(
            bytes(public.publicArea.unique.ecc.x), bytes(public.publicArea.unique.ecc.y)
        )

    # -- sealing ----------------------------------------------------------------------------

    @contextmanager
    def _session(self, kind: str, srk: Any) -> Iterator[Any]:
        """A session salted with `srk`, encrypting the first parameter both ways. Salted with
        the SRK it is kept for the next call (a policy session restarted first); a session
        whose command failed is flushed, never reused."""
        tss = self.tss
        reusable = srk is not None and srk is self._srk
        session = self._sessions.pop(kind, None) if reusable else None
        if session is not None and kind == "policy":
            try:
                self.esapi.policy_restart(session)
            except Exception:  # a session the TPM lost: start another
                self._flush_quietly(session)
                session = None
        if session is None:
            session = self.esapi.start_auth_session(
                tpm_key=srk,
                bind=tss.ESYS_TR.NONE,
                session_type=tss.TPM2_SE.POLICY if kind == "policy" else tss.TPM2_SE.HMAC,
                symmetric=tss.TPMT_SYM_DEF(
                    algorithm=tss.TPM2_ALG.AES,
                    keyBits=tss.TPMU_SYM_KEY_BITS(aes=128),
                    mode=tss.TPMU_SYM_MODE(aes=tss.TPM2_ALG.CFB),
                ),
                auth_hash=tss.TPM2_ALG.SHA256,
            )
            try:
                self.esapi.trsess_set_attributes(
                    session,
                    tss.TPMA_SESSION.CONTINUESESSION
                    | tss.TPMA_SESSION.DECRYPT
                    | tss.TPMA_SESSION.ENCRYPT,
                )
            except Exception:
                self.esapi.flush_context(session)
                raise
        ok = False
        try:
            yield session
            ok = True
        finally:
            if ok and reusable:
                self._sessions[kind] = session
            else:
                self._flush_quietly(session)

    def _flush_quietly(self, handle: Any) -> None:
        # Already gone is fine: closing, or a session the TPM dropped with a failed command.
        with suppress(Exception):
            self.esapi.flush_context(handle)

    def seal(self, secret: bytes, policy: PCRPolicy, signer: pcrsig.Signer | None = None) -> Sealed:
        """Seal `secret` (1-128 bytes) so that only `policy` releases it, and, with a
        `signer`, only where the signed PCRs match a policy that key signed."""
        if not 0 < len(secret) <= MAX_SEALED_DATA:
            raise ValueError(f"secret: 1 to {MAX_SEALED_DATA} bytes")
        if not policy.values and signer is None:
            raise ValueError("policy: bind at least one PCR, by value or by signature")
        digest = sealing_policy_digest(policy, signer)
        srk_wire = self._fast_srk()
        if srk_wire is not None:
            try:
                with self._wire_session("hmac", srk_wire) as session:
                    assert self._wire is not None
                    private, public = self._wire.create(
                        session, srk_wire, secret, tpmwire.sealed_template(digest)
                    )
            except (tpmwire.ResponseError, tpmwire.WireError, OSError) as e:
                raise _error("seal", e) from None
            srk_blob = tpmwire.serialized_key(srk_wire.handle, srk_wire.public_area)
            return Sealed(private, public, policy, digest, srk_blob, signer)
        tss = self.tss
        srk = self.srk()
        public = tss.TPM2B_PUBLIC(
            tss.TPMT_PUBLIC(
                type=tss.TPM2_ALG.KEYEDHASH,
                nameAlg=tss.TPM2_ALG.SHA256,
                objectAttributes=SEALED_OBJECT_ATTRIBUTES,
                authPolicy=digest,
                parameters=tss.TPMU_PUBLIC_PARMS(
                    keyedHashDetail=tss.TPMS_KEYEDHASH_PARMS(
                        scheme=tss.TPMT_KEYEDHASH_SCHEME(scheme=tss.TPM2_ALG.NULL)
                    )
                ),
            )
        )
        sensitive = tss.TPM2B_SENSITIVE_CREATE(tss.TPMS_SENSITIVE_CREATE(data=secret))
        try:
            with self._session("hmac", srk) as session:
                private, out_public, *_ = self.esapi.create(
                    srk, sensitive, public, session1=session
                )
        except Exception as e:
            raise _error("seal", e) from None
        return Sealed(
            private=private.marshal(),
            public=out_public.marshal(),
            policy=policy,
            policy_hash=digest,
            srk=self.esapi.tr_serialize(srk),
            signer=signer,
        )

    def unseal(
        self,
        private: bytes,
        public: bytes,
        bank: str,
        pcrs: Sequence[int],
        srk: bytes | None = None,
        signed: SignedPolicy | None = None,
    ) -> bytes:
        """The secret of a sealed object, if the PCRs satisfy its policy now; PolicyError
        if not. `srk` is a serialized SRK handle (systemd's tpm2_srk) when the token has one;
        `signed` is required for an object sealed to a signer."""
        if srk and signed is None and len(srk) >= 4:
            srk_wire = self._fast_srk()
            if srk_wire is not None and int.from_bytes(srk[:4], "big") == srk_wire.handle:
                return self._wire_unseal(srk_wire, private, public, bank, pcrs)
        tss = self.tss
        try:
            priv, _ = tss.TPM2B_PRIVATE.unmarshal(private)
            pub, _ = tss.TPM2B_PUBLIC.unmarshal(public)
        except Exception as e:
            raise TPMError(f"unseal: malformed sealed object ({type(e).__name__})") from None
        transient = None
        if srk:
            # The token's serialized SRK names the handle; its public part is not trusted
            # (the header is outside input, and the session would be salted to that key):
            # the TPM's own object at that handle is used. A transient handle: sealed while
            # SRK_HANDLE held a key that was not the SRK, under the SRK made from the template.
            if len(srk) < 4:
                raise TPMError("unseal: malformed serialized SRK")
            handle = int.from_bytes(srk[:4], "big")
            if handle != SRK_HANDLE and handle >> 24 != TRANSIENT_HANDLE_TYPE:
                raise TPMError(f"unseal: sealed under 0x{handle:08x}, not the SRK")
            try:
                parent = self.srk(create=False)
            except TPMError as e:
                raise TPMError(f"unseal: {e}") from None
        else:
            # Sealed before systemd 255: under a transient primary from a fixed template.
            transient = parent = self._legacy_primary()
        try:
            obj = self.esapi.load(parent, priv, pub)
        except Exception as e:
            if transient is not None:
                self.esapi.flush_context(transient)
            raise _error("unseal: load", e) from None
        want = bytes(pub.publicArea.authPolicy)
        try:
            # The signer's key has two possible TPM names (see pcrsig): the policy is built
            # with each until the session digest is the one the object was sealed under.
            for public in signed.signer.publics if signed else (b"",):
                with self._session("policy", parent) as session:
                    try:
                        if signed:
                            self._authorize(session, signed, bank, public)
                        if pcrs:
                            self.esapi.policy_pcr(
                                session,
                                b"",
                                tss.TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, pcrs))}"),
                            )
                        if signed and bytes(self.esapi.policy_get_digest(session)) != want:
                            continue
                        return bytes(self.esapi.unseal(obj, session1=session))
                    except TPMError:
                        raise
                    except Exception as e:
                        raise _error("unseal", e) from None
            raise PolicyError("unseal: the object is not sealed to this signer's key")
        finally:
            self.esapi.flush_context(obj)
            if transient is not None:
                self.esapi.flush_context(transient)

    # -- the fast path ---------------------------------------------------------------------

    def _fast_srk(self) -> tpmwire.SRK | None:
        """The persistent SRK through the fast path if there is one and it is the
        template's; None sends the caller the tpm2-pytss way (which creates it, or uses a
        transient one)."""
        if self._wire is None or self._wire_srk_foreign:
            return None
        if self._wire_srk is None:
            template = tpmwire.storage_template(SRK_ATTRIBUTES)
            try:
                found = self._wire.srk(SRK_HANDLE, template)
            except tpmwire.ResponseError as e:
                if tpmwire.is_no_object(e.rc):
                    return None  # none yet: tpm2-pytss's way creates it
                raise _error("SRK read", e) from None
            except (tpmwire.WireError, OSError) as e:
                raise _error("SRK read", e) from None
            if found is None:
                self._wire_srk_foreign = True  # a key there that is not the template's
                return None
            # tpm2-pytss's sessions (kept from sealing before the SRK existed) would only
            # take the slots the wire's need: a TPM may have room for three sessions.
            kept = list(self._sessions.values())
            self._sessions.clear()
            for handle in kept:
                self._flush_quietly(handle)
            self._wire_srk = found
        return self._wire_srk

    @contextmanager
    def _wire_session(self, kind: str, srk: tpmwire.SRK) -> Iterator[tpmwire.Session]:
        """_session's twin on the wire: kept for reuse, restarted (policy), flushed when
        its command failed."""
        assert self._wire is not None
        wire = self._wire
        session = self._wire_sessions.pop(kind, None)
        if session is not None and kind == "policy":
            try:
                wire.policy_restart(session)
            except (tpmwire.ResponseError, tpmwire.WireError):
                self._wire_flush_quietly(session.handle)
                session = None
        if session is None:
            session_type = tpmwire.SE_POLICY if kind == "policy" else tpmwire.SE_HMAC
            try:
                session = wire.start_session(srk, session_type)
            except tpmwire.ResponseError as e:
                # TPM_RC_SESSION_MEMORY: a TPM without a resource manager (swtpm,
                # /dev/tpm0) with its slots taken by others; let go of ours and try once more.
                if e.rc != tpmwire.RC_SESSION_MEMORY or not self._wire_sessions:
                    raise
                for other in self._wire_sessions.values():
                    self._wire_flush_quietly(other.handle)
                self._wire_sessions.clear()
                session = wire.start_session(srk, session_type)
        ok = False
        try:
            yield session
            ok = True
        finally:
            if ok:
                self._wire_sessions[kind] = session
            else:
                self._wire_flush_quietly(session.handle)

    def _wire_unseal(
        self, srk: tpmwire.SRK, private: bytes, public: bytes, bank: str, pcrs: Sequence[int]
    ) -> bytes:
        for part in (private, public):
            if len(part) < 2 or int.from_bytes(part[:2], "big") != len(part) - 2:
                raise TPMError("unseal: malformed sealed object (a size is wrong)")
        assert self._wire is not None
        wire = self._wire
        try:
            handle, name = wire.load(srk, private, public)
        except (tpmwire.ResponseError, tpmwire.WireError, OSError) as e:
            raise _error("unseal: load", e) from None
        try:
            with self._wire_session("policy", srk) as session:
                if pcrs:
                    wire.policy_pcr(session, pcr_selection(bank, pcrs))
                return wire.unseal(session, handle, name)
        except (tpmwire.ResponseError, tpmwire.WireError, OSError) as e:
            raise _error("unseal", e) from None
        finally:
            self._wire_flush_quietly(handle)

    def _authorize(self, session: Any, signed: SignedPolicy, bank: str, public: bytes) -> None:
        """PolicyPCR over the signed PCRs as they are now, then PolicyAuthorize with the
        TPM's ticket for a signature of exactly that digest."""
        from incusos_hal.hal import pcrsig

        tss = self.tss
        selection = f"{bank}:{','.join(map(str, signed.pcrs))}"
        self.esapi.policy_pcr(session, b"", tss.TPML_PCR_SELECTION.parse(selection))
        approved = bytes(self.esapi.policy_get_digest(session))
        found = pcrsig.find_signature(signed.signatures, signed.signer, bank, signed.pcrs, approved)
        if found is None:
            raise PolicyError(
                f"unseal: no signature by this key for the current values of PCR "
                f"{','.join(map(str, signed.pcrs))} ({bank})"
            )
        key_public, _ = tss.TPM2B_PUBLIC.unmarshal(struct.pack(">H", len(public)) + public)
        signature, _ = tss.TPMT_SIGNATURE.unmarshal(
            pcrsig.tpmt_signature(signed.signer, found.signature)
        )
        # The owner hierarchy: a ticket from a key in the null hierarchy is a null ticket,
        # which PolicyAuthorize refuses.
        key = self.esapi.load_external(key_public, hierarchy=tss.ESYS_TR.OWNER)
        try:
            try:
                ticket = self.esapi.verify_signature(
                    key, hashlib.sha256(approved).digest(), signature
                )
            except Exception as e:
                raise PolicyError(f"unseal: the TPM rejects the PCR signature ({e})") from None
            # By keyword: tpm2-pytss 2.x (Debian 13) and 3.x order these differently.
            self.esapi.policy_authorize(
                policy_session=session,
                approved_policy=approved,
                policy_ref=b"",
                key_sign=pcrsig.tpm_name(public),
                check_ticket=ticket,
            )
        finally:
            self.esapi.flush_context(key)

    def _legacy_primary(self) -> Any:
        """systemd's pre-SRK primary: ECC P-256 storage key, no noDA (its "legacy" ECC
        template, which it keeps unchanged so old tokens still unseal)."""
        tss = self.tss
        template = _storage_template(tss, LEGACY_PRIMARY_ATTRIBUTES)
        try:
            handle, *_ = self.esapi.create_primary(None, template, tss.ESYS_TR.OWNER)
        except Exception as e:
            raise _error("legacy primary", e) from None
        return handle

    def unseal_sealed(self, sealed: Sealed, signed: SignedPolicy | None = None) -> bytes:
        return self.unseal(
            sealed.private,
            sealed.public,
            sealed.policy.bank,
            sealed.policy.pcrs,
            sealed.srk,
            signed,
        )

    # -- clearing ---------------------------------------------------------------------------

    def clear(self) -> None:
        """TPM2_Clear through the lockout hierarchy with its empty authorization, as
        `tpm2_clear` does by default (IncusOS's factory reset runs that): a new storage
        seed and new hierarchy proofs, so nothing sealed or persisted before loads again,
        and the owner, endorsement and lockout authorizations empty. The endorsement seed
        stays (only TPM2_ChangeEPS changes it): the identity key derived from it is the
        same afterwards. A TPM whose lockout
        authorization is set, or whose Clear is disabled, refuses: TPMError."""
        self.close()  # the sessions and a transient SRK belong to the seed that goes
        tss = self.tss
        try:
            self.esapi.clear(tss.ESYS_TR.LOCKOUT)
        except Exception as e:
            raise _error("TPM clear", e) from None
        finally:
            self._wire_srk, self._wire_srk_foreign = None, False


def _storage_template(tss: Any, attributes: int) -> Any:
    """An ECC P-256 storage key, AES-128-CFB: the EK Credential Profile's template L-2,
    from the bytes the fast path checks the persistent SRK against."""
    area = tpmwire.storage_template(attributes)
    public, _ = tss.TPM2B_PUBLIC.unmarshal(tpmwire.tpm2b(area))
    return public


def _selected(selection: bytes, alg: int) -> list[int]:
    """The PCRs of bank `alg` in a marshalled TPML_PCR_SELECTION, in order."""
    r = tpmwire.Reader(selection)
    out: list[int] = []
    for _ in range(r.u32()):
        hash_alg, bitmap = r.u16(), r.take(r.u8())
        if hash_alg == alg:
            out += [i for i in range(8 * len(bitmap)) if bitmap[i // 8] >> (i % 8) & 1]
    return out


def ecc_public_pem(x: bytes, y: bytes) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.EllipticCurvePublicNumbers(
        int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
    ).public_key()
    pem: bytes = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


@contextmanager
def open_tpm(tcti: str | None = None) -> Iterator[Tpm]:
    """Open the TPM named by a TCTI string ("device:/dev/tpmrm0", "swtpm:host=H,port=P";
    default: $TPM2TOOLS_TCTI, else the kernel's resource manager)."""
    spec = tcti or default_tcti()
    handle = _open_fast(spec) or _open_pytss(spec)
    try:
        yield handle
    finally:
        try:
            handle.close()
        finally:
            handle._disconnect()


def _open_fast(spec: str) -> Tpm | None:
    """The TPM through _native.tss, or None when its libraries do not load."""
    try:
        from incusos_hal._native import tss as native
    except ImportError:  # no cffi
        return None
    if not native.available():
        return None
    try:
        connection = native.Tcti(spec)
    except OSError as e:
        raise TPMError(str(e)) from None
    wire = tpmwire.Wire(connection.transact, native.aes128_cfb, native.ecdh_p256)
    return Tpm(wire=wire, tcti=connection)


def _open_pytss(spec: str) -> Tpm:
    tss = _tss()
    name, _, conf = spec.partition(":")
    try:
        ctx = tss.TCTILdr(name, conf or None)
    except Exception as e:
        raise TPMError(f"cannot open TPM {spec}: {e}") from None
    try:
        esapi = tss.ESAPI(ctx)
    except Exception as e:
        ctx.close()
        raise TPMError(f"cannot open TPM {spec}: {e}") from None
    return Tpm(esapi)


@contextmanager
def open_tpm_if_any(
    tcti: str | None = None, on_error: Callable[[TPMError], None] = lambda e: None
) -> Iterator[Tpm | None]:
    """open_tpm, or None when the TPM cannot be opened (`on_error` hears why): for the
    callers that report a machine without a usable TPM rather than fail."""
    with ExitStack() as stack:
        handle = None
        try:
            handle = stack.enter_context(open_tpm(tcti))
        except TPMError as e:
            on_error(e)
        yield handle


def device_present(root: Path | str = "/") -> bool:
    """A TPM 2.0 the kernel drives (sysfs), without opening it."""
    from pathlib import Path

    base = Path(root) / "sys/class/tpm"
    for dev in sorted(base.glob("tpm[0-9]*")):
        try:
            if (dev / "tpm_version_major").read_text().strip() == "2":
                return True
        except OSError:
            continue
    return False
