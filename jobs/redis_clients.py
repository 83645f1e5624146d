"""One Redis client per process (and per event loop, for the async one)."""

from __future__ import annotations

from functools import cache

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.commands.core import AsyncScript

from jobs.per_loop import PerLoop

# Seconds: fail fast when Redis is down, so callers can answer 503 quickly.
CONNECT_TIMEOUT = 2
SOCKET_TIMEOUT = 5


@cache
def sync_client() -> redis.Redis:
    """A thread-safe client, for code running in worker threads."""
    return redis.Redis.from_url(
        _url(), socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT
    )


def async_client() -> aioredis.Redis:
    """A client bound to the running loop (tests run several loops in one process)."""
    return _async_clients.get()


def _new_async_client() -> aioredis.Redis:
    return aioredis.Redis.from_url(
        _url(), socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=SOCKET_TIMEOUT
    )


_async_clients: PerLoop[aioredis.Redis] = PerLoop(_new_async_client)
# Each loop's scripts by source (a script runs on its loop's client).
_async_scripts: PerLoop[dict[str, AsyncScript]] = PerLoop(dict)


def async_script(source: str) -> AsyncScript:
    """The Lua ``source`` as a script of ``async_client()``, registered once.

    ``register_script`` works out the script's SHA-1 each time it is called:
    once per event loop here, rather than once per claim.
    """
    scripts = _async_scripts.get()
    script = scripts.get(source)
    if script is None:
        script = scripts[source] = async_client().register_script(source)
    return script


def _url() -> str:
    if not settings.REDIS_URL:
        raise RuntimeError("REDIS_URL is not set, yet a Redis backend was asked for.")
    return settings.REDIS_URL


def forget() -> None:
    """Drop every client, so the next call connects to the current REDIS_URL."""
    sync_client.cache_clear()
    _async_clients.clear()
    _async_scripts.clear()
