"""The install seed's files, in IncusOS's format (lxc/incus-os doc/reference/seed.md and
incus-osd/api/seed/*.go): which files there are, how each is decoded, and every rule
that needs no machine. Pure: the bytes come from `hal.seed`, the machine's checks from
the sections (`apply.seed`).

    seed_name(filename)          "network.yaml" -> "network"; None for other files
    check_files(files, base)     every file decoded and validated, with the document the
                                 section files make over `base`: a `Checked`

Files named `<name>.json`, `.yaml` or `.yml`. The sections the API serves (network,
security, update, kernel) are decoded and validated exactly as a PUT of that section
would be (config.from_dict over the stored document); the others (install, provider,
services, applications, incus, migration-manager, operations-center) as far as IncusOS's
structs go. Decoding is strict: unknown keys, duplicate keys, YAML aliases and values
JSON has no word for (dates, binary) are refused; `version`, when given, must be "1".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import model
from .bytesize import ByteSizeError, parse_byte_size
from .decode import decode
from .errors import ConfigError, FieldError, child
from .formats import has_control, show

# Seed name -> the Config attribute it sets: the API's sections.
SECTION_FILES: Mapping[str, str] = {
    "network": "network",
    "security": "security",
    "update": "update",
    "kernel": "kernel",
    "provider": "provider",
    "services": "services",
}
# The services IncusOS's seed names that this version builds (their configs are the
# `services` section's); the others are checked and reported as not applied.
BUILT_SERVICES = ("iscsi", "multipath", "nvme")
# The applications IncusOS calls primary: one per machine, the one whose API fronts
# IncusOS's (incus-osd/internal/applications).
PRIMARY_APPLICATIONS = ("incus", "migration-manager", "operations-center")
# Incus's certificate types (shared/api/certificate.go); an entry without one is a client.
INCUS_CERTIFICATE_TYPES = ("client", "metrics")
# Where the API listens over HTTPS when a seed gives it client certificates and the
# stored document names no address: IncusOS's (Incus's :8443, which fronts /os).
SEEDED_LISTEN_ADDRESS = "[::]:8443"
# IncusOS's other seed files: checked as far as its structs go, not applied by this
# version (no such section yet) except `install`, which the installer reads, and
# `applications`, which the update checker installs (apply/seed.py).
OTHER_FILES = (
    "install",
    "applications",
    "incus",
    "migration-manager",
    "operations-center",
)
NAMES = (*SECTION_FILES, *OTHER_FILES)
EXTENSIONS = (".json", ".yaml", ".yml")
# The services IncusOS's seed names (api/seed/services.go).
SERVICES = ("iscsi", "lvm", "multipath", "netbird", "nvme", "ovn", "tailscale", "usbip")
SEED_VERSION = "1"
# A seed file larger than this is not a seed file; a seed holds at most this many.
MAX_FILE_BYTES = 1 << 20
MAX_FILES = 32
# How deep a YAML or JSON value may nest (a hostile document nests to exhaust the stack).
MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class Problem:
    """One line of `seed check`: `FILE: field.path: message`."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {FieldError(self.path, self.message)}"


@dataclass(frozen=True, slots=True)
class Checked:
    """What a seed holds once checked. `config` is the document the section files make
    (None when there are problems or no section file); `install` is set when the seed
    has an install file (an empty one too: IncusOS installs then)."""

    files: Mapping[str, str]  # seed name -> the file it came from
    config: model.Config | None
    install: model.InstallSeed | None
    problems: tuple[Problem, ...]
    notes: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()  # the Config attributes the seed sets
    raw: Mapping[str, Any] = field(default_factory=dict)  # seed name -> decoded data


def seed_name(filename: str) -> str | None:
    for ext in EXTENSIONS:
        if filename.endswith(ext) and len(filename) > len(ext):
            return filename[: -len(ext)]
    return None


def check_files(files: Mapping[str, bytes], base: model.Config) -> Checked:
    """Decode and validate every seed file in `files` (file name -> bytes) against the
    stored document `base`; nothing is applied."""
    problems: list[Problem] = []
    notes: list[str] = []
    names: dict[str, str] = {}
    raw: dict[str, Any] = {}
    if len(files) > MAX_FILES:
        problems.append(Problem("seed", "", f"more than {MAX_FILES} files"))
    for filename in sorted(files)[:MAX_FILES]:
        name = seed_name(filename)
        if name is None:
            continue  # not a seed file (a README beside them): IncusOS ignores it too
        if name not in NAMES:
            problems.append(
                Problem(filename, "", f"not a seed file (IncusOS reads {', '.join(NAMES)})")
            )
            continue
        if name in names:
            problems.append(Problem(filename, "", f"{names[name]} is there too: keep one"))
            continue
        names[name] = filename
        data, errors = parse_document(filename, files[filename])
        problems += [Problem(filename, e.path, e.message) for e in errors]
        if data is not None and not errors:
            raw[name] = data

    if isinstance(raw.get("services"), dict):
        # Services this version does not build are IncusOS's all the same: checked as far
        # as its structs go and reported, the built ones go through their section.
        services = raw["services"]
        unbuilt = {k: v for k, v in services.items() if k not in (*BUILT_SERVICES, "version")}
        if unbuilt:
            found: list[FieldError] = []
            _check_services(unbuilt, found)
            problems += [Problem(names["services"], e.path, e.message) for e in found]
            if not found:
                notes.append(
                    f"{names['services']}: {', '.join(sorted(unbuilt))}: valid; not applied "
                    "(this version does not build them)"
                )
        raw["services"] = {k: v for k, v in services.items() if k not in unbuilt}

    install: model.InstallSeed | None = None
    for name, data in raw.items():
        filename = names[name]
        errors = []
        if name == "install":
            install = check_install(data, errors)
        elif name in SECTION_FILES:
            continue  # below, all together
        else:
            CHECKS[name](data, errors)
            if not errors and name != "applications":  # wanted by the update checker
                notes.append(
                    f"{filename}: valid; its client certificates are the API's (HTTPS, "
                    f"{SEEDED_LISTEN_ADDRESS} unless an address is set), the rest not applied "
                    f"(this version has no {name} yet)"
                    if name == primary_application(raw)
                    else f"{filename}: valid; not applied (this version has no {name} yet)"
                )
        problems += [Problem(filename, e.path, e.message) for e in errors]

    sections = {SECTION_FILES[n]: d for n, d in raw.items() if n in SECTION_FILES}
    config, errors = seeded_config(base, sections)
    trusted = client_certificates(raw) if not problems else ()
    if trusted:
        config = trusting(config or base, trusted)
        sections["listener"] = {}
    by_attribute = {SECTION_FILES[n]: f for n, f in names.items() if n in SECTION_FILES}
    for e in errors:
        attribute = e.path.partition(".")[0]
        attribute = attribute.split("[", 1)[0]
        if attribute in by_attribute:
            # A message naming another field names it as the file does.
            message = re.sub(rf"(already used by ){re.escape(attribute)}\.", r"\1", e.message)
            e = FieldError(e.path, message)
            problems.append(
                Problem(by_attribute[attribute], e.path[len(attribute) :].lstrip("."), e.message)
            )
        else:
            problems.append(Problem("seed", e.path, e.message))
    return Checked(
        names,
        config if not problems and sections else None,
        install if "install" in names and not problems else None,
        tuple(problems),
        tuple(notes),
        tuple(sorted(sections)),
        raw,
    )


def trusting(config: model.Config, certificates: tuple[str, ...]) -> model.Config:
    """`config` whose API also trusts `certificates` (each once, after those it trusted),
    listening over HTTPS at SEEDED_LISTEN_ADDRESS when it named no address."""
    from dataclasses import replace

    listener = config.listener
    known = {c.strip() for c in listener.trusted_client_certificates}
    added = tuple(dict.fromkeys(c for c in certificates if c.strip() not in known))
    return replace(
        config,
        listener=replace(
            listener,
            listen_address=listener.listen_address or SEEDED_LISTEN_ADDRESS,
            trusted_client_certificates=(*listener.trusted_client_certificates, *added),
        ),
    )


def seeded_config(
    base: model.Config, sections: Mapping[str, Any]
) -> tuple[model.Config | None, list[FieldError]]:
    """The document a PUT of each seeded section over `base` would store (decoded and
    validated as config.from_dict does: field paths are document paths)."""
    from . import from_dict, to_dict

    errors: list[FieldError] = []
    doc = to_dict(base)
    for attribute, data in sections.items():
        section = {k: v for k, v in data.items() if k != "version"}
        if attribute == "security":
            # IncusOS refuses recovery keys from a seed (it is stored in plain text);
            # the machine's own keys stay.
            if "encryption_recovery_keys" in section:
                errors.append(
                    FieldError(
                        "security.encryption_recovery_keys",
                        "cannot be set by a seed (the seed is stored unencrypted)",
                    )
                )
                del section["encryption_recovery_keys"]
            keys = doc.get("security", {}).get("encryption_recovery_keys")
            if keys:
                section["encryption_recovery_keys"] = keys
        doc[attribute] = section
    try:
        config = from_dict(doc)
    except ConfigError as e:
        return None, errors + e.errors
    return (None if errors else config), errors


# -- decoding -----------------------------------------------------------------------------


def parse_document(filename: str, data: bytes) -> tuple[dict[str, Any] | None, list[FieldError]]:
    """A seed file's bytes as plain data (an empty file is an empty object, as IncusOS
    reads an empty install file), with its `version` checked."""
    if len(data) > MAX_FILE_BYTES:
        return None, [FieldError("", f"larger than {MAX_FILE_BYTES} bytes")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, [FieldError("", f"not UTF-8 text: {e.reason} at byte {e.start}")]
    if not text.strip():
        return {}, []
    try:
        value = _load_json(text) if filename.endswith(".json") else _load_yaml(text)
    except _Refused as e:
        return None, [FieldError(e.path, e.message)]
    except (ValueError, RecursionError) as e:
        return None, [FieldError("", f"not valid JSON: {e}")]
    if value is None:
        return {}, []
    if not isinstance(value, dict):
        return None, [FieldError("", "the document must be an object (a mapping)")]
    errors: list[FieldError] = []
    _plain(value, "", 0, errors)
    if errors:
        return None, errors
    version = value.get("version")
    if version is not None and (isinstance(version, bool) or str(version) != SEED_VERSION):
        shown = show(str(version)) if isinstance(version, str) else json.dumps(version)
        errors.append(
            FieldError("version", f"{shown} is not a seed version this reads ({SEED_VERSION!r})")
        )
    return value, errors


class _Refused(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def _load_json(text: str) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                raise _Refused(child("", key), "given twice")
            out[key] = value
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON value")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


def _load_yaml(text: str) -> Any:
    import yaml

    class Strict(yaml.SafeLoader):
        """YAML as plain data: no aliases (a billion laughs is a few lines of them), no
        key given twice (PyYAML keeps the last one silently)."""

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _Refused("", f"line {mark.line + 1}: YAML aliases are not accepted")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _value in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, str):
                    if key in seen:
                        line = key_node.start_mark.line + 1
                        raise _Refused(child("", key), f"line {line}: given twice")
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=Strict)  # noqa: S506 - a SafeLoader, stricter
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise _Refused("", f"not valid YAML: {where}{e.problem}") from None
    except yaml.YAMLError as e:
        raise _Refused("", f"not valid YAML: {' '.join(str(e).split())}") from None


def _plain(value: Any, path: str, depth: int, errors: list[FieldError]) -> None:
    """Only what JSON has: objects with text keys, lists, text, numbers, booleans, null."""
    if depth > MAX_DEPTH:
        errors.append(FieldError(path, f"nested deeper than {MAX_DEPTH}"))
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append(FieldError(path, f"key {key!r} is not text (quote it)"))
            else:
                _plain(item, child(path, key), depth + 1, errors)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _plain(item, child(path, i), depth + 1, errors)
    elif not isinstance(value, str | int | float | bool) and value is not None:
        errors.append(
            FieldError(path, f"a YAML {type(value).__name__} is not a value here (quote it)")
        )


# -- the files that are not sections ------------------------------------------------------


def _fields(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "version"}


def check_install(data: Mapping[str, Any], errors: list[FieldError]) -> model.InstallSeed:
    seed = decode(model.InstallSeed, _fields(data), "", errors)
    if errors:
        return seed
    if (
        seed.security is not None
        and seed.security.missing_tpm
        and seed.security.missing_secure_boot
    ):
        errors.append(
            FieldError(
                "security",
                "install seed cannot enable both Secure Boot and TPM degraded security options",
            )
        )
    target = seed.target
    if target is None:
        return seed
    sizes: dict[str, int] = {}
    for name in ("min_size", "max_size"):
        text = getattr(target, name)
        try:
            sizes[name] = parse_byte_size(text)
        except ByteSizeError as e:
            errors.append(FieldError(f"target.{name}", str(e)))
    if sizes.get("min_size") and sizes.get("max_size") and sizes["min_size"] > sizes["max_size"]:
        errors.append(FieldError("target.min_size", "larger than target.max_size"))
    if target.sort_order.lower() not in ("", "smallest", "largest"):
        errors.append(
            FieldError("target.sort_order", f"unsupported sort order {show(target.sort_order)}")
        )
    for name in ("bus", "id"):
        text = getattr(target, name)
        if has_control(text) or ("/" in text and name == "bus"):
            errors.append(FieldError(f"target.{name}", f"{show(text)} is not a valid value"))
    return seed


# As a system extension's name must be (hal/sysext.py: it names /var/lib/extensions/NAME.raw).
APPLICATION_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}", re.ASCII)


def _check_applications(data: Mapping[str, Any], errors: list[FieldError]) -> None:
    seed = decode(model.ApplicationsSeed, _fields(data), "", errors)
    if errors:
        return
    if not seed.applications:
        errors.append(
            FieldError(
                "applications",
                "at least one application must be defined in the provided applications seed",
            )
        )
    primaries = [a.name for a in seed.applications if a.name in PRIMARY_APPLICATIONS]
    if len(primaries) > 1:
        errors.append(
            FieldError(
                "applications",
                f"at most one primary application ({', '.join(PRIMARY_APPLICATIONS)}); "
                f"listed: {', '.join(primaries)}",
            )
        )
    seen: set[str] = set()
    for i, app in enumerate(seed.applications):
        path = child(child("applications", i), "name")
        if not APPLICATION_NAME.fullmatch(app.name):
            errors.append(
                FieldError(path, f"{show(app.name)} is not an application name (a-z, 0-9, -)")
            )
        elif app.name in seen:
            errors.append(FieldError(path, f"{show(app.name)} is listed twice"))
        seen.add(app.name)


def _check_object(data: Any, path: str, errors: list[FieldError]) -> None:
    if data is not None and not isinstance(data, dict):
        errors.append(FieldError(path, "expected a table (object)"))


def _check_keys(data: Mapping[str, Any], known: tuple[str, ...], errors: list[FieldError]) -> None:
    for key in data:
        if key not in known:
            errors.append(FieldError(child("", key), "unknown key"))


def _check_incus(data: Mapping[str, Any], errors: list[FieldError]) -> None:
    """api/seed/incus.go: apply_defaults, preseed (Incus's InitPreseed, an object), whose
    `certificates` (Incus's CertificatesPost: type, certificate as PEM, restricted, ...)
    are checked whole: their client certificates become the API's trust."""
    fields = _fields(data)
    _check_keys(fields, ("apply_defaults", "preseed"), errors)
    if not isinstance(fields.get("apply_defaults", False), bool):
        errors.append(FieldError("apply_defaults", "expected true or false"))
    _check_object(fields.get("preseed"), "preseed", errors)
    preseed = fields.get("preseed")
    certs = preseed.get("certificates") if isinstance(preseed, Mapping) else None
    if certs is None:
        return
    if not isinstance(certs, list):
        errors.append(FieldError("preseed.certificates", "expected a list"))
        return
    for i, entry in enumerate(certs):
        path = child("preseed.certificates", i)
        if not isinstance(entry, Mapping):
            errors.append(FieldError(path, "expected an object"))
            continue
        kind = entry.get("type", "client")
        if kind not in INCUS_CERTIFICATE_TYPES:
            shown = show(kind) if isinstance(kind, str) else json.dumps(kind)
            known = ", ".join(INCUS_CERTIFICATE_TYPES)
            errors.append(FieldError(child(path, "type"), f"{shown} is not one of {known}"))
        if not isinstance(entry.get("restricted", False), bool):
            errors.append(FieldError(child(path, "restricted"), "expected true or false"))
        if "certificate" in entry:  # Incus also takes an entry without one (a token's)
            _check_pem(entry.get("certificate"), child(path, "certificate"), errors)


def _check_pem(pem: Any, path: str, errors: list[FieldError]) -> None:
    from .formats import check_client_certificate

    if not isinstance(pem, str):
        errors.append(FieldError(path, "expected a PEM certificate"))
        return
    why = check_client_certificate(pem)
    if why is not None:
        errors.append(FieldError(path, why))


def primary_application(raw: Mapping[str, Any]) -> str:
    """The primary application a checked seed installs: the one its applications seed
    lists, or incus (which IncusOS adds when the seed lists none)."""
    wanted = raw.get("applications")
    apps = wanted.get("applications", ()) if isinstance(wanted, Mapping) else ()
    names = [a.get("name") for a in apps if isinstance(a, Mapping)]
    return next((str(n) for n in names if n in PRIMARY_APPLICATIONS), "incus")


def client_certificates(raw: Mapping[str, Any]) -> tuple[str, ...]:
    """The client certificates a checked seed's primary application trusts, which IncusOS
    lets reach its API through that application (Incus's `/os`): the `incus` seed's
    unrestricted client certificates, or `trusted_client_certificates` of the
    migration-manager or operations-center seed when the applications seed makes that
    one the primary (IncusOS adds incus when the seed names no primary)."""
    primary = primary_application(raw)
    doc = raw.get(primary)
    if not isinstance(doc, Mapping):
        return ()
    if primary != "incus":
        certs = doc.get("trusted_client_certificates") or ()
        return tuple(c for c in certs if isinstance(c, str))
    preseed = doc.get("preseed")
    entries = preseed.get("certificates") if isinstance(preseed, Mapping) else None
    return tuple(
        e["certificate"]
        for e in (entries if isinstance(entries, list) else ())
        if isinstance(e, Mapping)
        and e.get("type", "client") == "client"
        and e.get("restricted", False) is False
        and isinstance(e.get("certificate"), str)
    )


def _check_application_seed(data: Mapping[str, Any], errors: list[FieldError]) -> None:
    """api/seed/migration_manager.go, operations_center.go."""
    fields = _fields(data)
    _check_keys(fields, ("apply_defaults", "trusted_client_certificates", "preseed"), errors)
    if not isinstance(fields.get("apply_defaults", False), bool):
        errors.append(FieldError("apply_defaults", "expected true or false"))
    certs = fields.get("trusted_client_certificates") or []
    if not isinstance(certs, list):
        errors.append(FieldError("trusted_client_certificates", "expected a list of PEM texts"))
    else:
        for i, pem in enumerate(certs):
            _check_pem(pem, child("trusted_client_certificates", i), errors)
    _check_object(fields.get("preseed"), "preseed", errors)


def _check_services(data: Mapping[str, Any], errors: list[FieldError]) -> None:
    """api/seed/services.go: one optional object per service (its API config)."""
    fields = _fields(data)
    _check_keys(fields, SERVICES, errors)
    for key, value in fields.items():
        if key in SERVICES:
            _check_object(value, key, errors)
            if isinstance(value, dict) and not isinstance(value.get("enabled", False), bool):
                errors.append(FieldError(f"{key}.enabled", "expected true or false"))


CHECKS = {
    "applications": _check_applications,
    "incus": _check_incus,
    "migration-manager": _check_application_seed,
    "operations-center": _check_application_seed,
}
