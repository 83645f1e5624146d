"""How many WebSocket clients are connected, here and on every replica."""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref

from django.conf import settings

from jobs import redis_clients

logger = logging.getLogger(__name__)

PROCESS_ID = uuid.uuid4().hex
KEY_PREFIX = "gateway:ws-clients:"
# Each process re-states its count this often; a crashed process's count
# vanishes when its key expires.
REFRESH_SECONDS = 10
KEY_TTL_SECONDS = 3 * REFRESH_SECONDS

_local_count = 0
# Every connect and disconnect, and the last of them a write has carried.
_changes = 0
_sent = 0
_refresher: asyncio.Task[None] | None = None
# One write at a time: two SETs in flight on different connections may land
# in either order, leaving an old count in Redis until the next refresh.
_write_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def local_count() -> int:
    return _local_count


async def connected() -> None:
    global _local_count, _changes
    _local_count += 1
    _changes += 1
    await _publish()


async def disconnected() -> None:
    global _local_count, _changes
    _local_count -= 1
    _changes += 1
    await _publish()


async def total_count() -> int | None:
    """Clients on every replica; None when Redis is down.

    Without Redis there is one process serving clients (the channel layer is in
    memory), so its own count is the total.
    """
    if not settings.REDIS_URL:
        return _local_count
    client = redis_clients.async_client()
    try:
        keys = [key async for key in client.scan_iter(match=f"{KEY_PREFIX}*")]
        values = await client.mget(keys) if keys else []
    except Exception as exc:
        logger.warning("could not read client counts from Redis: %s", exc)
        return None
    return sum(int(value) for value in values if value is not None)


async def _publish() -> None:
    global _refresher
    if not settings.REDIS_URL:
        return
    if _refresher is None or _refresher.done():
        _refresher = asyncio.create_task(_refresh_forever())
    try:
        await _write(_changes)
    except Exception as exc:
        logger.warning("could not publish the client count: %s", exc)


async def _write(change: int | None = None) -> None:
    """Send the count, unless a write since ``change`` has carried it already."""
    global _sent
    loop = asyncio.get_running_loop()
    lock = _write_locks.get(loop)
    if lock is None:
        lock = _write_locks[loop] = asyncio.Lock()
    async with lock:
        if change is not None and _sent >= change:
            return
        # Marked sent before trying: when Redis hangs, the connects queued
        # behind this write give up at once; the refresher tries again.
        _sent = _changes
        await redis_clients.async_client().set(
            KEY_PREFIX + PROCESS_ID, _local_count, ex=KEY_TTL_SECONDS
        )


async def _refresh_forever() -> None:
    while True:
        await asyncio.sleep(REFRESH_SECONDS)
        try:
            await _write()
        except Exception as exc:
            logger.warning("could not refresh the client count: %s", exc)
