"""Waking long-polls the moment a job is published, in every process.

A publish fires this process's signal at once; with Redis it also publishes on
a Redis channel that one listener task per process turns into the same local
signal, so a ``GET /job/next?wait=`` held by another replica wakes too.
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from django.conf import settings

from jobs import redis_clients

logger = logging.getLogger(__name__)

PUBLISHED_CHANNEL = "gateway:published"


class Signal:
    """An event that can be fired many times; waiters hold the generation they saw."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None

    def generation(self) -> asyncio.Event:
        """Take this before looking at the queue, then wait on it: no wake is missed."""
        if settings.REDIS_URL and self._listener is None:
            self._listener = asyncio.create_task(_listen(self))
        return self._event

    def fire(self) -> None:
        event, self._event = self._event, asyncio.Event()
        event.set()


_signals: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Signal] = (
    weakref.WeakKeyDictionary()
)


def signal() -> Signal:
    """This process's signal for the running event loop."""
    loop = asyncio.get_running_loop()
    found = _signals.get(loop)
    if found is None:
        found = _signals[loop] = Signal()
    return found


_waiting = 0


def waiting() -> int:
    """Long-polls waiting in this process right now."""
    return _waiting


async def wait(generation: asyncio.Event, timeout: float) -> bool:
    """Wait until a publish after ``generation`` was taken; False on timeout."""
    global _waiting
    _waiting += 1
    try:
        await asyncio.wait_for(generation.wait(), timeout)
    except TimeoutError:
        return False
    finally:
        _waiting -= 1
    return True


async def announce() -> None:
    """Tell every process's waiters that a job was published."""
    signal().fire()
    if settings.REDIS_URL:
        await redis_clients.async_client().publish(PUBLISHED_CHANNEL, b"1")


async def _listen(target: Signal) -> None:
    backoff = 0.1
    task = asyncio.current_task()
    while True:
        try:
            pubsub = redis_clients.async_client().pubsub()
            await pubsub.subscribe(PUBLISHED_CHANNEL)
            backoff = 0.1
            while True:
                # redis-py can swallow a cancellation that lands while it
                # connects; without this check the task would never end.
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=1.0
                )
                if message is not None:
                    target.fire()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("long-poll wake-up listener lost Redis: %s", exc)
            # Waiters may have missed a publish while we were away.
            target.fire()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
