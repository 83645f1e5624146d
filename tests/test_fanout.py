"""The per-process fan-out hub (``jobs.fanout``) on the bus (``jobs.bus``)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable

import pytest
from channels.layers import get_channel_layer

from jobs import bus, fanout, services, wakeups
from jobs.payloads import JobDraft

# Far past the channel layers' default capacity of 100 messages per channel.
BURST = 500


pytestmark = pytest.mark.backends


@pytest.fixture(autouse=True)
async def fresh_layer() -> AsyncIterator[None]:
    yield
    await get_channel_layer().flush()


class StuckClient:
    """Holds the hub on its first job until released, then records every id."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.all_arrived = asyncio.Event()
        self.ids: list[int] = []

    async def deliver(self, batch: fanout.Batch) -> None:
        self.holding.set()
        await self.release.wait()
        self.ids.extend(job["id"] for job in batch.jobs)
        if len(self.ids) == BURST:
            self.all_arrived.set()


async def test_a_hub_behind_on_a_burst_loses_none_of_it() -> None:
    hub = fanout.Hub()
    client = StuckClient()
    await hub.attach(client)
    try:
        await services.broadcast({"id": 1, "channel": "api"})
        await asyncio.wait_for(client.holding.wait(), 10)
        # The hub is stuck on job 1: the rest of the burst waits in the layer.
        for job_id in range(2, BURST + 1):
            await services.broadcast({"id": job_id, "channel": "api"})
        client.release.set()
        await asyncio.wait_for(client.all_arrived.wait(), 30)
        assert client.ids == list(range(1, BURST + 1))
    finally:
        hub.stop()


class Recorder:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.arrived = asyncio.Event()

    async def deliver(self, batch: fanout.Batch) -> None:
        self.ids.extend(job["id"] for job in batch.jobs)
        self.arrived.set()


class Noted(logging.Handler):
    """Sets ``seen`` once a record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


async def test_a_job_the_hub_cannot_dispatch_does_not_stop_the_next() -> None:
    hub = fanout.Hub()
    client = Recorder()
    noted = Noted("could not dispatch")
    fanout.logger.addHandler(noted)
    await hub.attach(client)
    try:
        await services.broadcast({"channel": "api"})  # no id: cannot be framed
        await asyncio.wait_for(noted.seen.wait(), 10)
        await services.broadcast({"id": 7, "channel": "api"})
        await asyncio.wait_for(client.arrived.wait(), 10)
        assert client.ids == [7]
    finally:
        fanout.logger.removeHandler(noted)
        assert hub._task is not None
        hub._task.cancel()


async def test_jobs_published_while_a_message_is_in_flight_go_out_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One channel-layer message at a time; those that queued up share the next."""
    layer = get_channel_layer()
    real_group_send = layer.group_send
    messages: list[dict[str, object]] = []
    in_flight = asyncio.Event()
    release = asyncio.Event()

    async def held_group_send(group: str, message: dict[str, object]) -> None:
        messages.append(message)
        if len(messages) == 1:
            in_flight.set()
            await release.wait()
        await real_group_send(group, message)

    monkeypatch.setattr(layer, "group_send", held_group_send)
    jobs = [{"id": job_id, "channel": "api"} for job_id in (1, 2, 3, 4)]
    hub = fanout.Hub()
    client = Recorder()
    await hub.attach(client)
    try:
        first = asyncio.create_task(services.broadcast(jobs[0]))
        await in_flight.wait()
        rest = [asyncio.create_task(services.broadcast(job)) for job in jobs[1:]]
        # One turn of the loop: each task queues its job, then waits for it.
        await asyncio.sleep(0)
        assert not any(task.done() for task in rest)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        assert messages == [bus.published(jobs[:1]), bus.published(jobs[1:])]
        assert messages[1]["type"] == "jobs.published"
        # The hub takes a message of several jobs apart, in order.
        while client.ids != [1, 2, 3, 4]:
            client.arrived.clear()
            await asyncio.wait_for(client.arrived.wait(), 10)
    finally:
        hub.stop()


async def test_a_broadcast_cut_off_by_shutdown_releases_its_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sending task cancelled mid-message: its callers do not wait forever."""
    layer = get_channel_layer()
    in_flight = asyncio.Event()

    async def never_sent(group: str, message: dict[str, object]) -> None:
        in_flight.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(layer, "group_send", never_sent)
    first = asyncio.create_task(services.broadcast({"id": 1, "channel": "api"}))
    await in_flight.wait()
    queued = asyncio.create_task(services.broadcast({"id": 2, "channel": "api"}))
    sender = bus._senders.get()  # the one the broadcasts above made
    assert sender._task is not None
    sender._task.cancel()
    # Both return: the one in flight and the one queued behind it.
    await asyncio.wait_for(asyncio.gather(first, queued), 10)
    assert sender._waiting == []


# --- The publish that leads to it ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_one_message_reaches_both_the_hub_and_the_long_polls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A publish sends one message; this process's one subscription hands the
    job to its WebSocket clients and to its waiting long-polls."""
    layer = get_channel_layer()
    real_group_send = layer.group_send
    sent: list[dict[str, object]] = []

    async def counted_group_send(group: str, message: dict[str, object]) -> None:
        sent.append(message)
        await real_group_send(group, message)

    monkeypatch.setattr(layer, "group_send", counted_group_send)
    hub = fanout.Hub()
    client = Recorder()
    await hub.attach(client)
    try:
        await wakeups.listen()
        signal = wakeups.signal()
        waiter = asyncio.create_task(signal.wait(signal.generation(), 30))
        result = await asyncio.wait_for(services.publish(JobDraft(job_id="both")), 10)
        woken = await asyncio.wait_for(waiter, 10)
        await asyncio.wait_for(client.arrived.wait(), 10)
        assert woken == wakeups.Woken(result.job["id"])
        assert client.ids == [result.job["id"]]
        assert sent == [bus.published([result.job])]
        # Both heard it through the one subscription of this process.
        assert {hub, signal} <= set(bus.subscription().listeners)
    finally:
        hub.stop()


@pytest.mark.django_db(transaction=True)
async def test_a_stored_job_is_broadcast_even_if_its_caller_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that gives up mid-publish retries; the retry is a duplicate."""
    real_store = services._store
    stored = asyncio.Event()
    release = asyncio.Event()
    broadcast_done = asyncio.Event()

    async def slow_store(draft: JobDraft) -> services.Published:
        result = await real_store(draft)
        stored.set()
        await release.wait()
        return result

    async def broadcast(job: dict[str, object]) -> None:
        broadcast_done.set()

    monkeypatch.setattr(services, "_store", slow_store)
    monkeypatch.setattr(services, "broadcast", broadcast)
    await _publish_and_leave("left", once=stored)
    release.set()
    await asyncio.wait_for(broadcast_done.wait(), 10)
    monkeypatch.setattr(services, "_store", real_store)
    retried = await services.publish(JobDraft(job_id="left"))
    assert not retried.created


@pytest.mark.django_db(transaction=True)
async def test_a_publish_that_fails_after_its_caller_left_is_logged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing = asyncio.Event()
    release = asyncio.Event()

    async def broken_store(draft: JobDraft) -> services.Published:
        failing.set()
        await release.wait()
        raise OSError("the database went away")

    monkeypatch.setattr(services, "_store", broken_store)
    await _publish_and_leave("orphan", once=failing)
    logged = asyncio.Event()
    handler = _EventHandler(logged)
    logging.getLogger("jobs.services").addHandler(handler)
    try:
        release.set()
        await asyncio.wait_for(logged.wait(), 10)
    finally:
        logging.getLogger("jobs.services").removeHandler(handler)
    assert "the database went away" in handler.messages[0]


async def _publish_and_leave(job_id: str, once: asyncio.Event) -> None:
    """Publish, and cancel the caller (its client left) once ``once`` is set."""
    caller = asyncio.create_task(services.publish(JobDraft(job_id=job_id)))
    await asyncio.wait_for(once.wait(), 10)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller


class _EventHandler(logging.Handler):
    def __init__(self, event: asyncio.Event) -> None:
        super().__init__(logging.ERROR)
        self.event = event
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.event.set()


class SlowClient:
    """A client whose first write takes long: a round as long as a busy one."""

    WRITE_SECONDS = 0.1  # far above what any round of a quiet process takes

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.writing = asyncio.Event()
        self.written = asyncio.Event()
        self.second = asyncio.Event()

    async def deliver(self, batch: fanout.Batch) -> None:
        if not self.ids:
            self.writing.set()
            await asyncio.sleep(self.WRITE_SECONDS)
            self.written.set()
        else:
            self.second.set()
        self.ids.extend(job["id"] for job in batch.jobs)


class HeardHub(fanout.Hub):
    """A hub that says when the bus has handed it a job."""

    def __init__(self) -> None:
        super().__init__()
        self.heard: list[int] = []
        self.heard_one = asyncio.Event()

    def hear(self, news: bus.News) -> Awaitable[None] | None:
        held = super().hear(news)
        self.heard.extend(job["id"] for job in news.published)
        self.heard_one.set()
        return held


async def test_a_job_published_during_a_long_round_goes_out_in_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No pause after a long round: the job waiting for it goes out at once."""
    real_sleep = asyncio.sleep
    waits_after_the_round: list[float] = []
    client = SlowClient()

    async def noted_sleep(delay: float) -> None:
        # The hub's waits (not the layer's own timers) between the end of the
        # long round and the next job's write.
        by_hub = sys._getframe(1).f_globals.get("__name__") == fanout.__name__
        between = client.written.is_set() and not client.second.is_set()
        if delay and by_hub and between:
            waits_after_the_round.append(delay)
        await real_sleep(delay)

    hub = HeardHub()
    await hub.attach(client)
    monkeypatch.setattr(asyncio, "sleep", noted_sleep)
    try:
        await services.broadcast({"id": 1, "channel": "api"})
        await asyncio.wait_for(client.writing.wait(), 10)
        hub.heard_one.clear()
        await services.broadcast({"id": 2, "channel": "api"})
        await asyncio.wait_for(hub.heard_one.wait(), 10)
        assert not client.written.is_set()  # job 2 waits for the long round
        await asyncio.wait_for(client.second.wait(), 10)
        assert client.ids == [1, 2]
        assert waits_after_the_round == []
    finally:
        hub.stop()
