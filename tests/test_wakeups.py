"""Long-poll wake-ups: one unfiltered waiter per job, and none missed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from channels.layers import get_channel_layer

from jobs import bus, wakeups
from jobs.filters import parse_filter_query

RICH = parse_filter_query("where=money>=10M")


async def _waiters(
    signal: wakeups.Signal, count: int
) -> list[asyncio.Task[wakeups.Woken | None]]:
    """``count`` unfiltered waiters, parked in the order they were started."""
    generation = signal.generation()
    started = 0
    all_started = asyncio.Event()

    async def waiter() -> wakeups.Woken | None:
        nonlocal started
        started += 1
        if started == count:
            all_started.set()
        # Parks before it yields: once the last one has started, all are parked.
        return await signal.wait(generation, 30)

    tasks = [asyncio.create_task(waiter()) for _ in range(count)]
    await asyncio.wait_for(all_started.wait(), 10)
    return tasks


async def _next_done(
    tasks: list[asyncio.Task[wakeups.Woken | None]],
) -> asyncio.Task[wakeups.Woken | None]:
    done, _ = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1, f"{len(done)} waiters ended"
    (task,) = done
    tasks.remove(task)
    return task


async def test_each_job_wakes_one_waiter_the_longest_waiting() -> None:
    signal = wakeups.Signal()
    first, second, third = waiters = await _waiters(signal, 3)
    pending = list(waiters)
    signal.fire({"id": 1})
    assert await _next_done(pending) is first
    signal.fire({"id": 2})
    assert await _next_done(pending) is second
    assert not third.done()
    # Each knows the job it was woken for.
    assert first.result() == wakeups.Woken(1)
    assert second.result() == wakeups.Woken(2)
    third.cancel()


async def test_a_wake_up_without_a_job_wakes_every_waiter() -> None:
    signal = wakeups.Signal()
    waiters = await _waiters(signal, 3)
    signal.fire(None)  # Redis came back: any number of jobs may be waiting
    woken = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert woken == [wakeups.Woken(None)] * 3


async def test_a_waiter_woken_then_cancelled_passes_the_wake_up_on() -> None:
    signal = wakeups.Signal()
    first, second = await _waiters(signal, 2)
    signal.fire({"id": 1})  # wakes the first...
    first.cancel()  # ...whose client leaves before it looks at the queue
    assert await asyncio.wait_for(second, 10) == wakeups.Woken(1)
    assert first.cancelled()


async def test_a_job_published_before_the_wait_ends_it_at_once() -> None:
    signal = wakeups.Signal()
    generation = signal.generation()  # taken, then the queue was found empty
    signal.fire({"id": 1})  # published meanwhile, with nobody waiting yet
    assert await asyncio.wait_for(signal.wait(generation, 30), 1) == wakeups.Woken(1)


async def test_a_waiter_that_times_out_is_not_woken_later() -> None:
    signal = wakeups.Signal()
    generation = signal.generation()
    assert await signal.wait(generation, 0.01) is None
    (waiter,) = await _waiters(signal, 1)
    signal.fire({"id": 1})  # goes to the waiter still there, not the one gone
    assert await asyncio.wait_for(waiter, 10)


async def test_wake_one_with_nobody_waiting_does_nothing() -> None:
    signal = wakeups.Signal()
    signal.wake_one(wakeups.Woken(None))
    (waiter,) = await _waiters(signal, 1)
    done, _ = await asyncio.wait([waiter], timeout=0.05)
    assert not done  # the wake-up was not kept for a later waiter
    waiter.cancel()


@pytest.mark.backends
async def test_a_synchronous_announce_wakes_each_loop() -> None:
    # An operator's requeue, in a thread of its own: over the bus, sent from
    # every loop of the process on the in-memory layer (its queues belong to
    # their loop), from a loop of asgiref's on channels-redis.
    await wakeups.listen()
    (waiter,) = await _waiters(wakeups.signal(), 1)
    await asyncio.to_thread(wakeups.announce_from_sync)
    assert await asyncio.wait_for(waiter, 10) == wakeups.Woken(None)


@pytest.mark.backends
async def test_an_announced_job_wakes_one_waiter_over_the_bus() -> None:
    # A claim put back: one waiter looks, as for a publish.
    await wakeups.listen()
    first, second = await _waiters(wakeups.signal(), 2)
    await wakeups.announce({"id": 5})
    assert await asyncio.wait_for(first, 10) == wakeups.Woken(5)
    done, _ = await asyncio.wait([second], timeout=0.05)
    assert not done
    second.cancel()


async def test_a_waiter_hearing_nothing_looks_again_before_its_wait_ends(
    settings: Any,
) -> None:
    # The bus is at most once: a lost wake-up costs a waiter a re-look, not
    # its whole wait.
    settings.LONG_POLL_RELOOK_SECONDS = 0.2
    signal = wakeups.Signal()
    generation = signal.generation()
    filtered = asyncio.create_task(signal.wait(generation, 30, RICH))
    woken = await asyncio.wait_for(signal.wait(generation, 30), 10)
    assert woken == wakeups.Woken(None)
    assert await asyncio.wait_for(filtered, 10) == wakeups.Woken(None)
    # A wait shorter than that simply ends.
    assert await signal.wait(generation, 0.1) is None


@pytest.mark.backends
async def test_joining_the_bus_again_after_a_loss_wakes_every_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Whatever was published while the layer was away never arrives.
    await wakeups.listen()
    subscription = bus.subscription()
    waiters = await _waiters(wakeups.signal(), 2)
    layer = get_channel_layer()
    real_receive = layer.receive
    lost = asyncio.Event()

    async def receive_once_lost(channel: str) -> dict[str, Any]:
        if not lost.is_set():
            lost.set()
            raise ConnectionError("the layer went away")
        message: dict[str, Any] = await real_receive(channel)
        return message

    monkeypatch.setattr(layer, "receive", receive_once_lost)
    # The subscription is parked in a receive already: a message moves it on.
    await layer.group_send(bus.ALL_JOBS, {"type": "from.a.later.version"})
    woken = await asyncio.wait_for(asyncio.gather(*waiters), 10)
    assert lost.is_set()
    assert woken == [wakeups.Woken(None)] * 2
    await asyncio.wait_for(subscription.subscribed.wait(), 10)
