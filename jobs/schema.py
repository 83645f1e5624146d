"""``GET /openapi.json``: the OpenAPI 3.1 document of the HTTP API.

The document is ``jobs/openapi.json``, written by hand and checked against the
running gateway by schemathesis (tests/test_openapi.py). It is public, like
``/healthz``: a schema holds no secret, and tools must be able to read it
before they know how to sign.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from django.http import HttpRequest, HttpResponse

from jobs.responses import require_method

DOCUMENT = Path(__file__).with_name("openapi.json")


@cache
def document_bytes() -> bytes:
    """The document as stored; read once per process."""
    return DOCUMENT.read_bytes()


async def openapi_view(request: HttpRequest) -> HttpResponse:
    """The document, unsigned; GET or HEAD only."""
    require_method(request, "GET", "HEAD")
    return HttpResponse(document_bytes(), content_type="application/json")
