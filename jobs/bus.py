"""The one bus: every job, once, to every process, for pushes and wake-ups alike.

A published job is sent once, in one channel-layer message, to the group
``jobs.all``; each process has one member there, this module's
``Subscription``, which hands every message it receives to its listeners:
the fan-out hub (``jobs.fanout``), which pushes the job to WebSocket clients,
and the long-poll wake-up signal (``jobs.wakeups``), which wakes a waiting
``GET /job/next``. The channel layer is the in-memory one in the embedded
default and channels-redis with ``REDIS_URL``, so one process or many behave
alike.

A job back in the queue (a claim put back or restored, an operator's requeue)
goes the same way as a ``job.returned`` message, which wakes long-polls and
pushes nothing: WebSocket clients had it when it was published.

The layer delivers at most once. A message lost (the layer's connection
dropped, a member's capacity full) costs WebSocket clients a frame they
recover with ``since=``, and long-polls a wake-up: each subscription tells
its listeners that it may have missed some when it joins or joins again, and
waiters look at the queue again now and then (``LONG_POLL_RELOOK_SECONDS``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, NamedTuple, Protocol, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer, get_channel_layer

from jobs.per_loop import PerLoop

logger = logging.getLogger(__name__)

# Every message is sent once to this group; each process's Subscription is its
# one member there.
ALL_JOBS = "jobs.all"
# channels-redis and the in-memory layer forget a group member after a day.
REJOIN_SECONDS = 3600.0
# The most jobs in one message (about 60 KB at typical sizes).
MAX_JOBS_PER_MESSAGE = 100


class JobPublished(TypedDict):
    type: Literal["job.published"]
    job: dict[str, Any]


class JobsPublished(TypedDict):
    type: Literal["jobs.published"]
    jobs: list[dict[str, Any]]


class JobReturned(TypedDict):
    type: Literal["job.returned"]
    job: dict[str, Any] | None


def published(jobs: list[dict[str, Any]]) -> JobPublished | JobsPublished:
    """The message for jobs published together, oldest first."""
    if len(jobs) == 1:
        return {"type": "job.published", "job": jobs[0]}
    return {"type": "jobs.published", "jobs": jobs}


def returned(job: dict[str, Any] | None) -> JobReturned:
    """The message for a job back in the queue (None: some, not known which)."""
    return {"type": "job.returned", "job": job}


class News(NamedTuple):
    """What one message (or a gap in them) tells a listener.

    ``published`` jobs are new, oldest first: pushed and woken for. A job
    ``returned`` is back in the queue: woken for only. ``unknown``: jobs may
    have been published or returned that this process did not hear of.
    """

    published: list[dict[str, Any]]
    returned: dict[str, Any] | None = None
    unknown: bool = False


MISSED = News([], unknown=True)


def news_in(message: Mapping[str, Any]) -> News | None:
    """The news a message carries; None for a type this version does not know."""
    kind = message.get("type")
    if kind == "job.published":
        return News([message["job"]])
    if kind == "jobs.published":
        return News(list(message["jobs"]))
    if kind == "job.returned":
        job = message.get("job")
        if isinstance(job, dict):
            return News([], returned=job)
        return MISSED
    return None


class Listener(Protocol):
    def hear(self, news: News) -> Awaitable[None] | None:
        """Take in ``news`` without waiting; return something to await to hold
        the bus back until there is room for more (the messages behind then
        wait in the layer), or None."""


class Subscription:
    """This process's one member of ``ALL_JOBS`` (one per event loop).

    Started by its first listener. Every listener hears every message before
    any holds the bus back, so a fan-out behind on its clients does not hold
    up the wake-up of the message it is behind on.
    """

    def __init__(self) -> None:
        self.listeners: list[Listener] = []
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def join(self, listener: Listener) -> None:
        """Add ``listener``; returns once messages sent from now on reach it."""
        if listener not in self.listeners:
            self.listeners.append(listener)
        if self._task is None or self._task.done():
            self.subscribed.clear()
            self._task = asyncio.create_task(self._run())
        await self.subscribed.wait()

    def leave(self, listener: Listener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def stop(self) -> None:
        """Stop reading (tests: a loop about to close)."""
        if self._task is not None:
            self._task.cancel()

    async def tell(self, news: News) -> None:
        """Hand ``news`` to every listener, then wait for those holding back."""
        held = []
        for listener in list(self.listeners):
            try:
                hold = listener.hear(news)
            except Exception:
                logger.exception("a listener of the bus failed")
                continue
            if hold is not None:
                held.append(hold)
        for hold in held:
            await hold

    async def _run(self) -> None:
        layer = get_channel_layer()
        backoff = 0.1
        while True:
            try:
                channel = await layer.new_channel()
                await layer.group_add(ALL_JOBS, channel)
                self.subscribed.set()
                backoff = 0.1
                # Whatever was sent before this point (first join) or while
                # away (a join again) did not reach this process.
                await self.tell(MISSED)
                await self._receive(layer, channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # WebSocket clients keep their sockets and recover what they
                # miss with since=; long-polls are told on joining again.
                self.subscribed.clear()
                logger.warning("the bus lost the channel layer: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _receive(self, layer: Any, channel: str) -> None:
        loop = asyncio.get_running_loop()
        rejoin_at = loop.time() + REJOIN_SECONDS
        while True:
            try:
                # Not wait_for(): it runs the receive as a task of its own,
                # one turn of the loop per message, where this takes every
                # message the layer already holds without a turn.
                async with asyncio.timeout_at(rejoin_at):
                    message = await layer.receive(channel)
            except TimeoutError:
                await layer.group_add(ALL_JOBS, channel)
                rejoin_at = loop.time() + REJOIN_SECONDS
                continue
            news = news_in(message)
            if news is not None:
                await self.tell(news)


_subscriptions: PerLoop[Subscription] = PerLoop(Subscription)


def subscription() -> Subscription:
    """This process's subscription (one per event loop: tests run several)."""
    return _subscriptions.get()


async def send(message: JobReturned) -> None:
    """Send one message to every process now. Best effort: failures are logged."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(ALL_JOBS, message)
    except Exception as exc:
        logger.warning("could not send %s on the bus: %s", message["type"], exc)


def send_from_sync(message: JobReturned) -> None:
    """``send`` from synchronous code, in any thread. Best effort, never raising.

    channels-redis is sent to from whatever event loop asgiref finds (the
    request's own, for a view in Django's thread). The in-memory layer's
    queues belong to the event loop that reads them, so the message is sent
    from each of this process's loops that has joined the bus, and returns
    at once.
    """
    layer = get_channel_layer()
    if not isinstance(layer, InMemoryChannelLayer):
        try:
            async_to_sync(send)(message)
        except Exception as exc:
            logger.warning("could not send %s on the bus: %s", message["type"], exc)
        return
    for loop, _ in _subscriptions.items():
        if loop.is_closed():
            continue
        sending = send(message)
        try:
            asyncio.run_coroutine_threadsafe(sending, loop)
        except RuntimeError:
            sending.close()  # the loop closed meanwhile: nobody listens there


async def publish(job: dict[str, Any]) -> None:
    """Send a published job once to every process.

    Returns once the message holding it is sent (or could not be: logged).
    """
    await _senders.get().send(job)


class _Publisher:
    """Sends published jobs to the channel layer, those that queue up together.

    channels-redis's pub/sub layer sends one message at a time per shard (each
    ``PUBLISH`` under a lock), so at 100 jobs a second on a busy event loop a
    message per job queued for hundreds of milliseconds, holding up both the
    ``POST`` and the frames (docs/benchmarks.md). One message is in flight at a
    time; the jobs published meanwhile go out together in the next, oldest
    first, as ``published`` has it.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def send(self, job: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] = loop.create_future()
        self._waiting.append((job, sent))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._send_waiting())
        # A caller cancelled (its client gone) stops waiting; the job still goes.
        await sent

    async def _send_waiting(self) -> None:
        layer = get_channel_layer()
        try:
            while self._waiting:
                batch = self._waiting[:MAX_JOBS_PER_MESSAGE]
                del self._waiting[: len(batch)]
                try:
                    await _send_published(layer, [job for job, _ in batch])
                finally:
                    _release(batch)
        finally:
            # Cancelled (the process is stopping): nobody waits for it.
            _release(self._waiting)
            self._waiting.clear()


async def _send_published(layer: Any, jobs: list[dict[str, Any]]) -> None:
    if layer is None:
        return
    try:
        await layer.group_send(ALL_JOBS, published(jobs))
    except Exception as exc:
        logger.warning(
            "could not broadcast jobs %s: %s",
            ", ".join(str(job["id"]) for job in jobs),
            exc,
        )


def _release(waiting: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
    for _, sent in waiting:
        if not sent.done():
            sent.set_result(None)


_senders: PerLoop[_Publisher] = PerLoop(_Publisher)
