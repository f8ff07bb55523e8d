"""The OpenAPI 3 description, generated from the route table and the typed config model
(the same dataclasses that decode a PUT), so the description cannot drift from what the
service accepts. Served at /1.0/openapi.json; docs/api.md is rendered from it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from .. import __version__
from ..config import model
from ..sections import by_name


def schema_of(tp: Any) -> dict[str, Any]:
    """JSON Schema for a model type: dataclasses are closed objects, as the decoder is;
    enumerations list their values; help text becomes the description."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        inner, *extras = typing.get_args(tp)
        schema = schema_of(inner)
        helps = [e.text for e in extras if isinstance(e, model.Help)]
        if helps and "$ref" not in schema:
            schema["description"] = helps[0]
        elif helps:  # a $ref takes no siblings in OpenAPI 3.0
            schema = {"allOf": [schema], "description": helps[0]}
        return schema
    if origin is typing.Literal:
        return {"type": "string", "enum": list(typing.get_args(tp))}
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return schema_of(inner[0])
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is str or (isinstance(tp, type) and issubclass(tp, str)):
        return {"type": "string"}
    if origin is tuple:
        return {"type": "array", "items": schema_of(typing.get_args(tp)[0])}
    if origin is Mapping:
        return {"type": "object", "additionalProperties": schema_of(typing.get_args(tp)[1])}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return {"$ref": f"#/components/schemas/{tp.__name__}"}
    raise TypeError(f"no schema for {tp!r}")


def _components() -> dict[str, Any]:
    out: dict[str, Any] = {}
    pending: list[type] = [model.Config]
    while pending:
        cls = pending.pop()
        if cls.__name__ in out:
            continue
        hints = typing.get_type_hints(cls, vars(model), include_extras=True)
        props, required = {}, []
        for f in dataclasses.fields(cls):
            props[f.name] = schema_of(hints[f.name])
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
            pending += _dataclasses_in(hints[f.name])
        schema: dict[str, Any] = {
            "type": "object",
            "properties": props,
            "additionalProperties": False,
        }
        if required:
            schema["required"] = required
        doc = (cls.__doc__ or "").strip()
        if doc and not doc.startswith(cls.__name__ + "("):
            schema["description"] = " ".join(doc.split())
        out[cls.__name__] = schema
    return out


def _dataclasses_in(tp: Any) -> list[type]:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [tp]
    if typing.get_origin(tp) is typing.Literal:
        return []
    return [c for a in typing.get_args(tp) for c in _dataclasses_in(a)]


def _envelope(metadata: dict[str, Any], kind: str = "sync") -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["type", "status", "status_code", "metadata"],
        "properties": {
            "type": {"type": "string", "enum": [kind]},
            "status": {"type": "string"},
            "status_code": {"type": "integer"},
            "operation": {"type": "string"},
            "error_code": {"type": "integer"},
            "error": {"type": "string"},
            "metadata": metadata,
        },
    }


ERROR = {
    "type": "object",
    "required": ["type", "error_code", "error"],
    "properties": {
        "type": {"type": "string", "enum": ["error"]},
        "error_code": {"type": "integer"},
        "error": {"type": "string"},
    },
}


def _section_type(path: str) -> Any:
    if path.startswith("/1.0/services/") and "{" not in path:
        service = path.rsplit("/", 1)[-1]
        return typing.get_type_hints(model.Services, vars(model)).get(service)
    row = by_name(path.rsplit("/", 1)[-1]) if path.startswith("/1.0/system/") else None
    if row is None:
        return None
    hints = typing.get_type_hints(model.Config, vars(model))
    return hints[row.attribute]


def _request(op: dict[str, Any], r: Any, section: Any) -> None:
    """The route's request body (and the query parameters that go with it) into `op`."""
    if r.body == "section" and section is not None:
        op["requestBody"] = {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "config": schema_of(section),
                            "state": {"type": "object"},
                        },
                        "additionalProperties": False,
                    }
                }
            },
        }
    elif r.body == "archive":
        op["requestBody"] = {
            "required": True,
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        }
    elif r.body == "update-check":  # IncusOS's SystemUpdate :check body, optional
        schema = {
            "type": "object",
            "properties": {"os_only": {"type": "boolean"}},
            "additionalProperties": False,
        }
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": schema}},
        }
        op["parameters"] = [
            {
                "name": "trigger",
                "in": "query",
                "required": False,
                "schema": {"type": "string", "enum": ["user", "boot", "timer"]},
            }
        ]
    elif r.body == "script":  # as `openssl smime -sign` writes it
        op["requestBody"] = {
            "required": True,
            "content": {"multipart/signed": {"schema": {"type": "string", "format": "binary"}}},
        }


def spec(routes: Iterable[Any]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for r in routes:
        op: dict[str, Any] = {"summary": r.summary, "responses": {}}
        section = _section_type(r.path) if r.built else None
        metadata: dict[str, Any] = {}
        if section is not None and r.method == "GET":
            metadata = {
                "type": "object",
                "required": ["config", "state"],
                "properties": {"config": schema_of(section), "state": {"type": "object"}},
            }
        _request(op, r, section)
        params: list[dict[str, Any]] = []
        if "{name}" in r.path:
            name_schema: dict[str, Any] = {"type": "string"}
            if r.names:
                name_schema["enum"] = list(r.names)
            params.append({"name": "name", "in": "path", "required": True, "schema": name_schema})
        if "{id}" in r.path:
            params.append(
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            )
        if params:
            op["parameters"] = [*op.get("parameters", []), *params]
        if r.path == "/1.0/system/:backup":
            ok = {
                "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}}
            }
        elif r.path == "/1.0/openapi.json":  # the description itself, not an envelope
            ok = {"content": {"application/json": {"schema": {"type": "object"}}}}
        elif r.path == "/1.0/events":
            ok = {"content": {}}
        else:
            ok = {"content": {"application/json": {"schema": _envelope(metadata)}}}
        if r.body == "archive" or r.operation:  # checked at once, then run as an operation
            async_ok = {"content": {"application/json": {"schema": _envelope({}, "async")}}}
            op["responses"]["202"] = {"description": "operation started", **async_ok}
        elif r.built:
            op["responses"]["200"] = {"description": "success", **ok}
        for status, why in r.failures:
            op["responses"][str(status)] = {
                "description": why,
                "content": {"application/json": {"schema": ERROR}},
            }
        op["responses"]["default"] = {
            "description": "an error (4xx: the request; 501: not built in this version)",
            "content": {"application/json": {"schema": ERROR}},
        }
        if not r.built:
            op["description"] = "Not built in this version: answers 501."
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "incusos-hal",
            "version": __version__,
            "description": "IncusOS-compatible system API (Incus's REST envelope).",
        },
        "paths": paths,
        "components": {"schemas": _components()},
    }


def markdown(document: dict[str, Any]) -> str:
    """docs/api.md: the routes as a table, from the same description."""
    lines = [
        "# The incusos-hal API",
        "",
        "Generated from the OpenAPI description the service serves at `/1.0/openapi.json`",
        "(`python -m incusos_hal.api.docs > docs/api.md`; a test keeps them equal).",
        "",
        "Every route needs authentication: on the unix socket (`/run/incusos-hal/unix.socket`)",
        "a root peer or a uid listed in `listener.socket_uids`; over HTTPS (TLS 1.3) a client",
        "certificate listed in `listener.trusted_client_certificates`. Responses use Incus's",
        "envelope; `{config, state}` objects carry an ETag and PUT honours If-Match (412).",
        "`POST /1.0/system/:backup` returns the whole state directory, including recovery",
        "keys and the server's private key: treat the archive as a secret.",
        "",
        "| method | path | what | status |",
        "| --- | --- | --- | --- |",
    ]
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            status = (
                "501: not built yet"
                if "200" not in op["responses"] and "202" not in op["responses"]
                else "built"
            )
            lines.append(f"| {method.upper()} | `{path}` | {op['summary']} | {status} |")
    lines += ["", "## Config objects", ""]
    for name, schema in document["components"]["schemas"].items():
        lines += [f"### {name}", ""]
        if schema.get("description"):
            lines += [schema["description"], ""]
        if not schema["properties"]:
            lines += ["(no fields yet)", ""]
            continue
        lines += ["| field | type | what |", "| --- | --- | --- |"]
        for field_name, prop in schema["properties"].items():
            lines.append(f"| `{field_name}` | {_type_text(prop)} | {_what(prop)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _type_text(prop: dict[str, Any]) -> str:
    if "allOf" in prop:
        return _type_text(prop["allOf"][0])
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if prop.get("type") == "array":
        return f"list of {_type_text(prop['items'])}"
    if prop.get("type") == "object":
        return f"map of {_type_text(prop['additionalProperties'])}"
    return str(prop.get("type", ""))


def _what(prop: dict[str, Any]) -> str:
    text = str(prop.get("description", ""))
    enum = prop.get("enum") or prop.get("items", {}).get("enum")
    if enum:
        values = ", ".join(f"`{v}`" for v in enum if v)
        text = f"{text} (one of {values})" if text else f"one of {values}"
    return text.replace("|", "\\|")
