"""docs/api.md, from the route table through the OpenAPI description:
`python -m incusos_hal.api.docs > docs/api.md` (tests/test_api_schema.py keeps it equal)."""

from __future__ import annotations

from .openapi import markdown, spec
from .server import ROUTES

if __name__ == "__main__":
    print(markdown(spec(ROUTES)), end="")
