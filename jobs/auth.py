"""Who is calling: the signing checks (v1 and v2), and the client's IP."""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from typing import Any
from urllib.parse import quote

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest

from gateway_client import signing
from jobs import single_use
from jobs.responses import ApiError

# Characters a path may carry unescaped (RFC 3986 pchar and "/"), for the rare
# request that reaches us without its raw path.
_PATH_SAFE = "/:@!$&'()*+,;=~"

# A held refusal waits the delay give or take up to this share of it, at random.
REFUSAL_JITTER = 0.25
# Each run of this many refusals to one address doubles its next holds...
DOUBLE_EVERY = 10
# ...until a refusal comes after this long without one.
FORGET_AFTER_SECONDS = 60.0
# Addresses remembered per process; the least recently refused go first.
MAX_TRACKED = 10_000


async def authenticate(request: HttpRequest) -> signing.Verified:
    """Raise a 401 ``ApiError`` naming the first signing check that fails.

    A v2 request's nonce is remembered afterwards, so the same request is
    refused the second time (``replayed_nonce``).
    """
    try:
        verified = signing.verify_request(
            request.headers,
            method=request.method or "",
            target=request_target(request),
            body=lambda: _body(request),
            api_keys=settings.API_KEYS,
            secrets=settings.HMAC_SECRETS,
            tolerance=settings.TIMESTAMP_TOLERANCE,
            require_v2=settings.REQUIRE_SIGNATURE_V2,
        )
    except signing.SignatureError as exc:
        await hold_refusal(request_ip(request))
        raise ApiError(401, exc.code, exc.detail) from None
    await remember_nonce(verified, request_ip(request))
    return verified


class RepeatRefusals:
    """How many credentials this process refused lately, per client address.

    Addresses are kept most recently refused last, at most ``max_tracked`` of
    them, and each is forgotten once ``FORGET_AFTER_SECONDS`` pass without a
    refusal. In process memory, not the shared store: counting a refusal
    costs no round trip, and each replica holds back what it is sent.
    """

    def __init__(self, max_tracked: int = MAX_TRACKED) -> None:
        self.max_tracked = max_tracked
        self._seen: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def count(self, ip: str, now: float) -> int:
        """Note a refusal to ``ip``; return how many came before it in its run."""
        earlier, last = self._seen.pop(ip, (0, now))
        if now - last > FORGET_AFTER_SECONDS:
            earlier = 0
        self._seen[ip] = (earlier + 1, now)
        if len(self._seen) > self.max_tracked:
            del self._seen[next(iter(self._seen))]
        return earlier


repeat_refusals = RepeatRefusals()


def hold_seconds(earlier: int) -> float:
    """How long a refusal waits (before jitter), after ``earlier`` in its run.

    ``AUTH_FAILURE_DELAY_SECONDS``, doubled for each ``DOUBLE_EVERY`` earlier
    refusals, up to ``AUTH_FAILURE_MAX_DELAY_SECONDS`` (never below the delay).
    """
    delay = settings.AUTH_FAILURE_DELAY_SECONDS
    ceiling = max(delay, settings.AUTH_FAILURE_MAX_DELAY_SECONDS)
    doublings = min(earlier // DOUBLE_EVERY, 32)
    return float(min(ceiling, delay * 2**doublings))


async def hold_refusal(ip: str, *, at_most: float | None = None) -> None:
    """Wait a while before refusing a credential to ``ip``.

    A client waits for each answer on its connection, so a flood of forged
    requests gets about one refusal per connection per hold; a held refusal
    costs the server a timer, not a turn of its event loop. Valid requests are
    never held (docs/security.md, "Refused credentials").

    The hold is ``AUTH_FAILURE_DELAY_SECONDS`` at first and grows for an
    address refused again and again (``hold_seconds``): a client with a wrong
    key or clock is told within a second, a flood from one address is slowed
    ten times more. It varies by up to ``REFUSAL_JITTER`` either way: held
    exactly as long, a flood's connections, sent together, came back together
    after every hold, in waves that kept a process busy for tens of
    milliseconds at a time; spread, they arrive evenly, as many a second.
    ``at_most`` caps the hold before its jitter.
    """
    if settings.AUTH_FAILURE_DELAY_SECONDS <= 0:
        return
    hold = hold_seconds(repeat_refusals.count(ip, time.monotonic()))
    if at_most is not None:
        hold = min(hold, at_most)
    spread = random.uniform(-REFUSAL_JITTER, REFUSAL_JITTER)
    await asyncio.sleep(hold * (1 + spread))


async def remember_nonce(
    verified: signing.Verified, ip: str, *, at_most: float | None = None
) -> None:
    """Refuse a v2 nonce seen within its window; remember a new one.

    Only after the signature checked out: nobody without the secret can fill
    the store. Each nonce is kept until its timestamp goes stale.
    """
    if verified.nonce is None:
        return
    lifetime = verified.nonce_lifetime(settings.TIMESTAMP_TOLERANCE)
    if not await single_use.add("nonce:" + verified.nonce, "1", lifetime):
        await hold_refusal(ip, at_most=at_most)
        raise ApiError(
            401, "replayed_nonce", "This X-NONCE was used already; sign afresh."
        )


def request_target(request: HttpRequest) -> str:
    """The path and query as the client sent them, for signature v2."""
    scope: dict[str, Any] = getattr(request, "scope", None) or {}
    return scope_target(scope) if scope else _rebuilt_target(request)


def scope_target(scope: dict[str, Any]) -> str:
    """An ASGI scope's request target: the raw path, then ``?`` and the query."""
    raw_path = scope.get("raw_path")
    if raw_path:
        path = bytes(raw_path).decode("latin-1")
    else:
        path = quote(scope.get("path", ""), safe=_PATH_SAFE)
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    return f"{path}?{query}" if query else path


def _rebuilt_target(request: HttpRequest) -> str:
    query = request.META.get("QUERY_STRING", "")
    path = quote(request.path, safe=_PATH_SAFE)
    return f"{path}?{query}" if query else path


def _body(request: HttpRequest) -> bytes:
    try:
        return request.body
    except RequestDataTooBig:
        # Past even Django's cap: the body cannot be hashed, nor accepted.
        raise ApiError(
            413, "too_large", f"The body is over {settings.MAX_JOB_BYTES} bytes."
        ) from None


def client_ip(remote_addr: str | None, forwarded_for: str | None) -> str:
    """The caller's address, trusting ``TRUSTED_PROXY_COUNT`` proxies and no more.

    Each trusted proxy appends the address it saw to ``X-Forwarded-For``, so the
    client is that many entries from the right; anything further left was
    written by the client and is never believed.
    """
    count = settings.TRUSTED_PROXY_COUNT
    if count and forwarded_for:
        entries = [entry.strip() for entry in forwarded_for.split(",")]
        if len(entries) >= count:
            candidate = entries[-count]
            try:
                return str(ipaddress.ip_address(candidate))
            except ValueError:
                pass
    return remote_addr or "unknown"


def request_ip(request: HttpRequest) -> str:
    return client_ip(
        request.META.get("REMOTE_ADDR"), request.META.get("HTTP_X_FORWARDED_FOR")
    )
