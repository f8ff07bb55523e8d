"""Incus's REST envelope, as pure functions of data.

    sync:  {"type": "sync", "status": "Success", "status_code": 200, "operation": "",
            "error_code": 0, "error": "", "metadata": ...}
    async: {"type": "async", "status": "Operation created", "status_code": 100,
            "operation": "/1.0/operations/<id>", "metadata": <the operation>}
    error: {"type": "error", "status": "", "status_code": 0, "error_code": N,
            "error": "...", "metadata": null}

(lxc/incus shared/api/response.go and internal/server/response). The ETag of a resource
is the SHA-256 of its canonical JSON: for `{config, state}` objects only the config part,
so that a counter moving in the state does not fail a client's If-Match.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Incus's status codes (shared/api/status_code.go) for operations.
OPERATION_CREATED = 100
STARTED = 101
STOPPED = 102
RUNNING = 103
CANCELLING = 104
PENDING = 105
SUCCESS = 200
FAILURE = 400
CANCELLED = 401

STATUS_TEXT = {
    OPERATION_CREATED: "Operation created",
    STARTED: "Started",
    STOPPED: "Stopped",
    RUNNING: "Running",
    CANCELLING: "Cancelling",
    PENDING: "Pending",
    SUCCESS: "Success",
    FAILURE: "Failure",
    CANCELLED: "Cancelled",
}


def sync(metadata: Any) -> dict[str, Any]:
    return {
        "type": "sync",
        "status": "Success",
        "status_code": SUCCESS,
        "operation": "",
        "error_code": 0,
        "error": "",
        "metadata": metadata,
    }


def async_(operation: dict[str, Any], url: str) -> dict[str, Any]:
    return {
        "type": "async",
        "status": STATUS_TEXT[OPERATION_CREATED],
        "status_code": OPERATION_CREATED,
        "operation": url,
        "error_code": 0,
        "error": "",
        "metadata": operation,
    }


def error(code: int, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "status": "",
        "status_code": 0,
        "operation": "",
        "error_code": code,
        "error": message,
        "metadata": None,
    }


def canonical(data: Any) -> bytes:
    """Sorted, compact JSON; a NaN or an infinity is a ValueError, never `NaN`."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def etag(data: Any) -> str:
    """A strong ETag (quoted) for `data`."""
    return '"' + hashlib.sha256(canonical(data)).hexdigest() + '"'


def if_match_ok(header: str | None, current: str) -> bool:
    """RFC 9110 If-Match: absent or `*` matches; otherwise any listed tag equal to ours.
    Weak tags (W/"...") never match: If-Match uses the strong comparison."""
    if header is None or header.strip() == "*":
        return True
    return any(tag.strip() == current for tag in header.split(","))
