"""Per-client rate limits, counted by django-ratelimit in the shared cache."""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest
from django_ratelimit.core import get_usage

from jobs.responses import ApiError, unavailable

logger = logging.getLogger(__name__)

GROUP = "gateway"


def _usage(request: HttpRequest | None, ip: str) -> dict[str, Any] | None:
    usage: dict[str, Any] | None = get_usage(
        request,
        group=GROUP,
        key=lambda _group, _request: ip,
        rate=f"{settings.RATE_LIMIT_PER_MINUTE}/{settings.RATE_LIMIT_WINDOW_SECONDS}s",
        increment=True,
    )
    return usage


async def check_rate_limit(request: HttpRequest | None, ip: str) -> None:
    """Count this request for ``ip``; raise a 429 when it is over the limit."""
    if settings.RATE_LIMIT_PER_MINUTE <= 0:
        return
    try:
        # A thread, because the cache client (Redis) blocks; Django's async
        # cache increment is not atomic.
        usage = await sync_to_async(_usage, thread_sensitive=False)(request, ip)
    except Exception:
        # The store is down (django-ratelimit lets the cache's error through).
        if settings.RATE_LIMIT_FAIL_OPEN:
            logger.warning("rate-limit store unavailable; request let through")
            return
        logger.warning("rate-limit store unavailable; answering 503")
        raise unavailable("The rate-limit store is down; try again shortly.") from None
    if usage is None or not usage["should_limit"]:
        return
    # django-ratelimit's window still counts during its last whole second
    # (time_left 0): the new window opens one second after time_left.
    retry_after = max(1, int(usage["time_left"]) + 1)
    raise ApiError(
        429,
        "rate_limited",
        f"More than {settings.RATE_LIMIT_PER_MINUTE} requests in "
        f"{settings.RATE_LIMIT_WINDOW_SECONDS} seconds; retry in {retry_after} s.",
        headers={"Retry-After": str(retry_after)},
    )
