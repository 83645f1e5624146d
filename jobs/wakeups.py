"""Waking long-polls the moment a job is published, in every process.

A publish fires this process's signal at once; with Redis it also publishes on
a Redis channel that one listener task per process turns into the same local
signal, so a ``GET /job/next?wait=`` held by another replica wakes too.

A job wakes one unfiltered waiter, the one that has waited longest: one
claim per job, not one per waiter (with 50 workers waiting, the other 49
would each look at the queue and find it empty). The wake-up names its job,
and is passed on to the next waiter when the woken one leaves without
looking (its client went away) or finds an older job first: the queue then
held a job no wake-up told of, so it may hold more. Claims put back and
restored announce themselves, and so does an operator's requeue.

Each wake-up carries the published job, so that a filtered long-poll
(``where=``, docs/filters.md) tests it and keeps waiting, without touching the
queue, when the job is not one it wants. A wake-up without a job (Redis was
lost for a while, or an older process announced) wakes every waiter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any, NamedTuple

from django.conf import settings

from jobs import redis_clients
from jobs.filters import JobFilter
from jobs.per_loop import PerLoop

logger = logging.getLogger(__name__)

PUBLISHED_CHANNEL = "gateway:published"


class Generation:
    """The time between two publishes; once ended, it names the job that ended it.

    Ended generations link to the next one, so a waiter that wakes for a job it
    does not want reads every job published since, in order, and misses none.
    """

    __slots__ = ("_ended", "job", "next")

    def __init__(self) -> None:
        self._ended = asyncio.Event()
        self.job: dict[str, Any] | None = None
        self.next: Generation | None = None

    async def ended(self) -> None:
        await self._ended.wait()

    def end(self, job: dict[str, Any] | None) -> Generation:
        self.job = job
        self.next = Generation()
        self._ended.set()
        return self.next


class Woken(NamedTuple):
    """Why a waiter woke: the job whose publish woke it, None if not known."""

    job_id: int | None

    @classmethod
    def by(cls, job: dict[str, Any] | None) -> Woken:
        return cls(None if job is None else job.get("id"))


_waiting = 0


def waiting() -> int:
    """Long-polls waiting in this process right now."""
    return _waiting


class Signal:
    """Fired once per publish; waiters hold the generation they saw."""

    def __init__(self) -> None:
        self._current = Generation()
        # Unfiltered waiters, longest waiting first; each is woken on its own.
        self._idle: dict[asyncio.Future[Woken], None] = {}
        self._listener: asyncio.Task[None] | None = None
        # Set while the Redis listener is subscribed: publishes from other
        # processes reach this one's waiters.
        self.listening = asyncio.Event()
        # Marks this signal's own Redis messages, which it has fired already.
        self.origin = secrets.token_hex(8)

    def generation(self) -> Generation:
        """Take this before looking at the queue, then wait on it: no wake is missed."""
        if settings.REDIS_URL and self._listener is None:
            self._listener = asyncio.create_task(_listen(self))
        return self._current

    def fire(self, job: dict[str, Any] | None = None) -> None:
        """End the current generation with ``job`` (None: some job, unknown).

        A job wakes one unfiltered waiter and every filtered one that may want
        it; None wakes them all.
        """
        self._current = self._current.end(job)
        woken = Woken.by(job)
        if job is None:
            while self._idle:
                self.wake_one(woken)
        else:
            self.wake_one(woken)

    def wake_one(self, woken: Woken) -> None:
        """Wake the unfiltered waiter that has waited longest, if there is one."""
        while self._idle:
            future = next(iter(self._idle))
            del self._idle[future]
            if not future.done():
                future.set_result(woken)
                return

    async def wait(
        self,
        generation: Generation,
        timeout: float,
        job_filter: JobFilter | None = None,
    ) -> Woken | None:
        """Wait for a publish after ``generation`` that ``job_filter`` may want.

        None on timeout. Jobs the filter does not match are passed over here,
        in memory, so they cost a filtered waiter no look at the queue.
        """
        global _waiting
        _waiting += 1
        try:
            if job_filter is None or job_filter.is_empty:
                if generation.next is not None:
                    # Published since the waiter looked: it looks again at once.
                    return Woken.by(generation.job)
                return await self._idle_wait(timeout)
            return await _filtered_wait(generation, timeout, job_filter)
        finally:
            _waiting -= 1

    async def _idle_wait(self, timeout: float) -> Woken | None:
        future: asyncio.Future[Woken] = asyncio.get_running_loop().create_future()
        self._idle[future] = None
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            # Woken in the same turn as the timeout: the wake-up counts.
            return _woken(future)
        except asyncio.CancelledError:
            woken = _woken(future)
            if woken is not None:
                self.wake_one(woken)  # leaving without looking: someone else looks
            raise
        finally:
            self._idle.pop(future, None)


def _woken(future: asyncio.Future[Woken]) -> Woken | None:
    if future.done() and not future.cancelled():
        return future.result()
    return None


# Copied from an operator's thread by announce_from_sync.
_signals: PerLoop[Signal] = PerLoop(Signal)


def signal() -> Signal:
    """This process's signal for the running event loop."""
    return _signals.get()


async def _filtered_wait(
    generation: Generation, timeout: float, job_filter: JobFilter
) -> Woken | None:
    """Read every job published after ``generation`` until one may be wanted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    current = generation
    while True:
        while current.next is not None:
            if _may_want(job_filter, current.job):
                return Woken.by(current.job)
            current = current.next
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        try:
            await asyncio.wait_for(current.ended(), remaining)
        except TimeoutError:
            return None


def _may_want(job_filter: JobFilter, job: dict[str, Any] | None) -> bool:
    return job is None or job_filter.matches(job)  # None: some job, unknown


async def announce(job: dict[str, Any] | None = None) -> None:
    """Tell every process's waiters that ``job`` was published.

    Best effort, never raising: the job is queued already, and a waiter that
    misses the news looks again when its wait ends.
    """
    local = signal()
    local.fire(job)
    if settings.REDIS_URL:
        message = json.dumps({"origin": local.origin, "job": job})
        try:
            await redis_clients.async_client().publish(PUBLISHED_CHANNEL, message)
        except Exception as exc:
            logger.warning("could not wake long-polls in other processes: %s", exc)


def announce_from_sync() -> None:
    """From synchronous code (an operator's requeue): wake every waiter.

    With Redis, every process's listener hears it, this one's included;
    without, it is handed to each of this process's event loops. Best effort,
    never raising, as ``announce``.
    """
    if settings.REDIS_URL:
        message = json.dumps({"origin": "sync", "job": None})
        try:
            redis_clients.sync_client().publish(PUBLISHED_CHANNEL, message)
        except Exception as exc:
            logger.warning("could not wake long-polls: %s", exc)
        return
    for loop, target in _signals.items():
        if not loop.is_closed():
            loop.call_soon_threadsafe(target.fire)


def _job_in(target: Signal, data: Any) -> tuple[bool, dict[str, Any] | None]:
    """Whether a Redis message is news to ``target``, and the job it names."""
    try:
        message = json.loads(data)
    except (TypeError, ValueError):
        return True, None  # not ours to read: wake everyone, as before
    if not isinstance(message, dict):
        return True, None
    if message.get("origin") == target.origin:
        return False, None  # fired locally already, by announce()
    job = message.get("job")
    return True, job if isinstance(job, dict) else None


async def _listen(target: Signal) -> None:
    backoff = 0.1
    task = asyncio.current_task()
    while True:
        try:
            pubsub = redis_clients.async_client().pubsub()
            await pubsub.subscribe(PUBLISHED_CHANNEL)
            target.listening.set()
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
                    news, job = _job_in(target, message["data"])
                    if news:
                        target.fire(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            target.listening.clear()
            logger.warning("long-poll wake-up listener lost Redis: %s", exc)
            # Waiters may have missed a publish while we were away.
            target.fire()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
