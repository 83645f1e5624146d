"""Filtered claims below the HTTP layer: the Redis scan and the wake-ups.

Many processes claiming with and without filters: tests/test_queue_concurrency.py.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.utils import timezone

from jobs import bus, queues, wakeups
from jobs.filters import parse_filter_query
from jobs.models import Job
from jobs.numbers import numbers_from_fields

RICH = parse_filter_query("where=money>=10M")


@sync_to_async
def _store(money: str) -> Job:
    now = timezone.now()
    job = Job.objects.create(
        job_id=f"job-{money}",
        fields={"Money": money},
        numbers=numbers_from_fields({"Money": money}),
        created_at=now,
        expires_at=now + timedelta(minutes=5),
    )
    queues.get_queue().enqueue(job)
    return job


# --- The Redis list's scan ------------------------------------------------------


@pytest.fixture
def redis_queue(transactional_db: None, settings: Any, clean_redis: str) -> str:
    settings.QUEUE_BACKEND = "redis"
    settings.REDIS_URL = clean_redis
    return clean_redis


@pytest.mark.backends
async def test_the_redis_scan_skips_nothing_when_others_pop_meanwhile(
    redis_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries popped from the head mid-scan shift every position down by three.

    A scan by position would then skip three entries, the match among them; the
    scan anchors each page on entries of the last one, found by value.
    """
    monkeypatch.setattr(queues, "SCAN_BATCH", 2)
    await _store("20M")  # the oldest match, taken by the pops below
    for _ in range(3):
        await _store("1M")
    wanted = await _store("30M")
    for _ in range(3):
        await _store("1M")
    real_take = queues.RedisQueue._take_if_matching
    popped: list[bytes] = []

    async def take_while_others_pop(
        self: queues.RedisQueue, client: Any, raw: bytes, *rest: Any
    ) -> dict[str, Any] | None:
        result = await real_take(self, client, raw, *rest)
        if not popped:
            # Three claims elsewhere, just after this scan read its first page.
            other = redis.asyncio.Redis.from_url(redis_queue)
            popped.extend(await other.lpop(queues.QUEUE_KEY, 3))  # type: ignore[arg-type]
            await other.aclose()
            return None  # as if another had removed the match first
        return result

    monkeypatch.setattr(queues.RedisQueue, "_take_if_matching", take_while_others_pop)
    job = await queues.get_queue().claim("10.0.0.1", RICH)
    assert len(popped) == 3
    assert job is not None and job["id"] == wanted.pk
    # Nothing else was taken by the scan.
    assert await queues.get_queue().depth() == 7 - 3 - 1


@pytest.mark.backends
async def test_the_redis_scan_starts_over_when_its_anchors_are_gone(
    redis_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queues, "SCAN_BATCH", 2)
    monkeypatch.setattr(queues, "SCAN_ANCHORS", 1)
    for _ in range(4):
        await _store("1M")
    wanted = await _store("30M")
    real_take = queues.RedisQueue._take_if_matching
    calls = 0

    async def take_while_others_drain(
        self: queues.RedisQueue, client: Any, raw: bytes, *rest: Any
    ) -> dict[str, Any] | None:
        nonlocal calls
        calls += 1
        if calls == 2:
            # The whole first page (the anchor included) claimed elsewhere.
            other = redis.asyncio.Redis.from_url(redis_queue)
            await other.lpop(queues.QUEUE_KEY, 2)
            await other.aclose()
        return await real_take(self, client, raw, *rest)

    monkeypatch.setattr(queues.RedisQueue, "_take_if_matching", take_while_others_drain)
    job = await queues.get_queue().claim("10.0.0.1", RICH)
    assert job is not None and job["id"] == wanted.pk
    assert await queues.get_queue().depth() == 2


@pytest.mark.backends
async def test_expired_entries_met_by_a_scan_are_dropped(
    redis_queue: str, settings: Any
) -> None:
    stale = await _store("50M")
    await Job.objects.filter(pk=stale.pk).aupdate(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    queue = queues.get_queue()
    client = redis.asyncio.Redis.from_url(redis_queue)
    # The list entry carries its own expiry: rewrite it as expired.
    raw = await client.lpop(queues.QUEUE_KEY)
    assert isinstance(raw, bytes)
    entry = json.loads(raw)
    entry["expires"] = 0
    await client.rpush(queues.QUEUE_KEY, json.dumps(entry))
    await client.aclose()
    fresh = await _store("50M")
    job = await queue.claim("10.0.0.1", RICH)
    assert job is not None and job["id"] == fresh.pk
    assert await queue.depth() == 0
    assert (await Job.objects.aget(pk=stale.pk)).status == Job.Status.EXPIRED


# --- Wake-ups -------------------------------------------------------------------


async def test_a_filtered_waiter_reads_every_job_published_meanwhile() -> None:
    signal = wakeups.Signal()
    generation = signal.generation()
    # Published before the waiter looks: it must still see all three, in order.
    for money in (1, 2, 30_000_000):
        signal.fire({"numbers": {"money": money}})
    assert await signal.wait(generation, 5, RICH)
    later = signal.generation()
    waiter = asyncio.create_task(signal.wait(later, 0.3, RICH))
    signal.fire({"numbers": {"money": 5}})
    signal.fire({"numbers": {}})
    assert not await waiter  # nothing it wanted: it timed out
    assert later.job == {"numbers": {"money": 5}}
    assert wakeups.waiting() == 0


async def test_a_wake_up_without_a_job_wakes_every_waiter() -> None:
    signal = wakeups.Signal()
    generation = signal.generation()
    signal.fire(None)  # Redis came back: something may have been published
    assert await signal.wait(generation, 5, RICH)
    assert await signal.wait(generation, 5, None)


def test_bus_messages_carry_their_jobs_to_the_waiters() -> None:
    job = {"id": 1, "numbers": {"money": 1}}
    assert bus.news_in(bus.published([job])) == bus.News([job])
    assert bus.news_in(bus.published([job, job])) == bus.News([job, job])
    assert bus.news_in(bus.returned(job)) == bus.News([], returned=job)
    # Back in the queue, not known which: every waiter looks.
    assert bus.news_in(bus.returned(None)) == bus.MISSED
    assert bus.news_in({"type": "from.a.later.version"}) is None


@pytest.mark.backends  # the channel layer
async def test_a_job_relayed_over_the_bus_reaches_filtered_waiters() -> None:
    await wakeups.listen()
    signal = wakeups.signal()
    generation = signal.generation()
    layer = get_channel_layer()
    # As another process's publish arrives: one message, two jobs.
    jobs = [{"id": 1, "numbers": {"money": 1}}, {"id": 2, "numbers": {"money": 2e7}}]
    await layer.group_send(bus.ALL_JOBS, bus.published(jobs))
    assert await signal.wait(generation, 5, RICH) == wakeups.Woken(2)
    assert generation.job == jobs[0]  # passed over first
    assert generation.next is not None
    assert generation.next.job == jobs[1]
