"""Waking long-polls the moment a job is published, in every process.

Each process's one subscription to the bus (``jobs.bus``) hands every job
published anywhere to this process's signal, as it hands it to the fan-out
hub: a ``GET /job/next?wait=`` held by any replica wakes for a job posted to
any other.

A job wakes one unfiltered waiter, the one that has waited longest: one
claim per job, not one per waiter (with 50 workers waiting, the other 49
would each look at the queue and find it empty). The wake-up names its job,
and is passed on to the next waiter when the woken one leaves without
looking (its client went away) or finds an older job first: the queue then
held a job no wake-up told of, so it may hold more. Claims put back and
restored announce themselves over the bus, and so does an operator's requeue.

Each wake-up carries the published job, so that a filtered long-poll
(``where=``, docs/filters.md) tests it and keeps waiting, without touching the
queue, when the job is not one it wants. A wake-up without a job (the bus was
joined, or joined again after a loss, or a requeue of several) wakes every
waiter.

The bus is at most once. So that a wake-up lost on the way strands no waiter
until its ``wait=`` ends, a waiter looks at the queue again after
``LONG_POLL_RELOOK_SECONDS`` without one (one look per waiter this often:
its client's next long-poll would look anyway, after a ``wait=`` of up to 30 s).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, NamedTuple

from django.conf import settings

from jobs import bus
from jobs.filters import JobFilter
from jobs.per_loop import PerLoop

logger = logging.getLogger(__name__)

# How long a long-poll waits for this process to join the bus before it waits
# without (the bus is away: a Redis outage).
LISTEN_SECONDS = 2.0


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

    def generation(self) -> Generation:
        """Take this before looking at the queue, then wait on it: no wake is missed."""
        return self._current

    def hear(self, news: bus.News) -> Awaitable[None] | None:
        """Fire for each job the bus carries (``jobs.bus.Listener``)."""
        for job in news.published:
            self.fire(job)
        if news.returned is not None:
            self.fire(news.returned)
        if news.unknown:
            self.fire(None)
        return None

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
        in memory, so they cost a filtered waiter no look at the queue. After
        ``LONG_POLL_RELOOK_SECONDS`` with nothing heard, ``Woken(None)`` before the
        timeout: the waiter looks at the queue, in case a wake-up was lost.
        """
        global _waiting
        relook_after = settings.LONG_POLL_RELOOK_SECONDS
        relook = timeout > relook_after
        if relook:
            timeout = relook_after
        _waiting += 1
        try:
            if job_filter is None or job_filter.is_empty:
                if generation.next is not None:
                    # Published since the waiter looked: it looks again at once.
                    return Woken.by(generation.job)
                woken = await self._idle_wait(timeout)
            else:
                woken = await _filtered_wait(generation, timeout, job_filter)
        finally:
            _waiting -= 1
        if woken is None and relook:
            return Woken(None)
        return woken

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


async def listen() -> None:
    """Have this process's waiters hear the bus; returns once they do.

    A long-poll calls this before it takes its first generation, so that no
    publish falls between. If the bus is away, it gives up after
    ``LISTEN_SECONDS``: the waiter then relies on its re-looks, and on the
    wake-up of everyone when the bus is joined.
    """
    try:
        async with asyncio.timeout(LISTEN_SECONDS):
            await bus.subscription().join(signal())
    except TimeoutError:
        pass  # the subscription logs its trouble with the layer


async def announce(job: dict[str, Any] | None = None) -> None:
    """Tell every process's waiters that ``job`` is back in the queue.

    None: some job, or several, not known which (every waiter looks). Jobs
    published need no announcing: the bus carries them to the waiters as it
    carries them to the WebSocket clients. Best effort, never raising: a
    waiter that misses the news looks again soon (``LONG_POLL_RELOOK_SECONDS``).
    """
    await bus.send(bus.returned(job))


def announce_from_sync() -> None:
    """From synchronous code (an operator's requeue): wake every waiter.

    Sent over the bus as ``announce`` sends it (``jobs.bus.send_from_sync``).
    Best effort, never raising, as ``announce``.
    """
    bus.send_from_sync(bus.returned(None))
