"""Who is calling: the signing checks of contract section 1, and the client's IP."""

from __future__ import annotations

import ipaddress

from django.conf import settings
from django.http import HttpRequest

from gateway_client import signing
from jobs.responses import ApiError


def authenticate(request: HttpRequest) -> None:
    """Raise a 401 ``ApiError`` naming the first signing check that fails."""
    headers = request.headers
    try:
        signing.verify(
            headers.get(signing.API_KEY_HEADER),
            headers.get(signing.TIMESTAMP_HEADER),
            headers.get(signing.SIGNATURE_HEADER),
            api_keys=settings.API_KEYS,
            secrets=settings.HMAC_SECRETS,
            tolerance=settings.TIMESTAMP_TOLERANCE,
        )
    except signing.SignatureError as exc:
        raise ApiError(401, exc.code, exc.detail) from None


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
