"""A request refused, with the HTTP status the API answers it with. Raised by the layers
that decide (a section's checks, the script verifier, the API itself) and turned into an
Incus error envelope by the API; the message never quotes a secret."""

from __future__ import annotations


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
