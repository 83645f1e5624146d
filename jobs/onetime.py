"""Single-use values in the shared store: v2 nonces and WebSocket tickets.

With ``REDIS_URL`` the store is Redis, so every replica sees what any other
has remembered or consumed; the two operations that must be atomic are one
Redis command each (``SET NX`` and ``GETDEL``), so two requests racing on
different replicas cannot both win. Without Redis it is Django's local-memory
cache, whose ``add`` and ``delete`` hold a lock: enough for the one process
the embedded set-up runs.

Redis is spoken to directly (the async client of ``jobs.redis_clients``)
rather than through Django's cache, whose async methods hop to a thread.
"""

from __future__ import annotations

from django.conf import settings
from django.core.cache import cache

from jobs.redis_clients import async_client

PREFIX = "gateway:once:"


async def add(key: str, value: str, ttl: int) -> bool:
    """Store ``value`` under ``key`` for ``ttl`` seconds unless the key exists.

    True when this call stored it: the first to ask wins, once.
    """
    name = PREFIX + key
    if settings.REDIS_URL:
        return bool(await async_client().set(name, value, nx=True, ex=ttl))
    return bool(cache.add(name, value, ttl))


async def take(key: str) -> str | None:
    """Remove ``key`` and return its value; None if absent or already taken.

    Of any number of simultaneous calls, exactly one gets the value.
    """
    name = PREFIX + key
    if settings.REDIS_URL:
        raw = await async_client().getdel(name)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)
    value = cache.get(name)
    # delete() is True for the one caller that removed it.
    if value is None or not cache.delete(name):
        return None
    return str(value)
