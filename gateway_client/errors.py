"""Typed errors for every way a gateway request can fail (contract section 5)."""

from __future__ import annotations

import math
import time
from email.utils import parsedate_to_datetime
from typing import ClassVar

import httpx

# An error body is one short sentence; anything longer is not the gateway's.
_MAX_DETAIL = 300


class CredentialError(ValueError):
    """An API key or HMAC secret the client cannot sign with: empty, or not
    printable ASCII (a placeholder such as ``"…"`` left in).

    Raised before any request. The message names the argument or variable,
    never its value.
    """


class GatewayError(Exception):
    """The gateway refused or failed a request.

    ``code`` is the contract's error code, ``status`` the HTTP status (None when
    no answer came), ``retry_after`` the seconds the gateway asked us to wait.
    """

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        code: str,
        status: int | None,
        detail: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(code, status, detail, retry_after)
        self.code = code
        self.status = status
        self.detail = detail
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = "no answer" if self.status is None else f"HTTP {self.status}"
        return f"{self.code} ({where}): {self.detail}"


class AuthError(GatewayError):
    """401: the API key or the signature was refused; retrying cannot help."""


class RateLimited(GatewayError):
    """429: too many requests; wait ``retry_after`` seconds."""

    retryable = True


class BadRequest(GatewayError):
    """Any other 4xx: the request itself is wrong; retrying cannot help."""


class BadFilter(BadRequest):
    """The gateway could not read the filter; ``detail`` names the bad part.

    Over HTTP it is the gateway's ``400 bad_filter``, whose detail is the
    gateway's own. A ``/ws`` handshake carrying a filter is refused without a
    reason (HTTP 403): then ``status`` is 403 and ``detail`` lists the filter.
    """


class LeaseLost(BadRequest):
    """409 ``lease_lost``: the lease ran out, or was acked or released already.

    The job is no longer this worker's: another may have it by now.
    """


class Unavailable(GatewayError):
    """5xx: the gateway or a service behind it is down; worth retrying."""

    retryable = True


class GatewayUnreachable(GatewayError):
    """No answer at all: connection refused or dropped, or a timeout."""

    retryable = True


def error_from_response(response: httpx.Response) -> GatewayError:
    """The typed error for a 4xx or 5xx answer."""
    status = response.status_code
    code, detail = _code_and_detail(response)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    kind: type[GatewayError]
    if status == 401:
        kind = AuthError
    elif status == 429:
        kind = RateLimited
    elif status == 400 and code == "bad_filter":
        kind = BadFilter
    elif status == 409 and code == "lease_lost":
        kind = LeaseLost
    elif 400 <= status < 500:
        kind = BadRequest
    elif status >= 500:
        kind = Unavailable
    else:
        kind = GatewayError
    return kind(code, status, detail, retry_after)


def _code_and_detail(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        detail = body.get("detail")
        text = detail if isinstance(detail, str) else response.reason_phrase
        return body["error"], text[:_MAX_DETAIL]
    # Not the gateway's JSON: a proxy or load balancer answered instead.
    phrase = response.reason_phrase or "unexpected answer"
    return f"http_{response.status_code}", f"{phrase} (not a gateway error body)"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            return None
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
