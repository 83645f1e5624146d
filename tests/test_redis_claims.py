"""Redis claims cut off between the list and the table are put back, once.

A claim takes an entry from the Redis list and notes it in a sorted set in one
atomic step, then records the claim in the table. A process that dies in
between leaves the note behind; the next claim of any process puts the entry
back once it is older than the ``CLAIM_TIMEOUT_SECONDS`` setting and the table
still holds the job as queued. Whichever claim records first wins; the other is skipped.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
from django.utils import timezone

from jobs import queues, redis_clients, services, wakeups
from jobs.filters import parse_filter_query
from jobs.models import Job
from jobs.payloads import JobDraft

pytestmark = pytest.mark.backends


@pytest.fixture
def redis_queue(transactional_db: None, settings: Any, clean_redis: str) -> str:
    settings.QUEUE_BACKEND = "redis"
    settings.REDIS_URL = clean_redis
    return clean_redis


async def publish() -> dict[str, Any]:
    published = await services.publish(JobDraft(job_id=uuid.uuid4().hex))
    return published.job


async def cut_off_claim(age: float) -> bytes:
    """Take the head entry as a claim does, and die before recording it."""
    client = redis_clients.async_client()
    pop = client.register_script(queues._POP_LUA)
    raw: bytes = await pop(
        keys=[queues.QUEUE_KEY, queues.CLAIMING_KEY], args=[time.time() - age]
    )
    assert raw is not None
    return raw


async def claiming() -> list[bytes]:
    client = redis_clients.async_client()
    members = await client.zrange(queues.CLAIMING_KEY, 0, -1)
    return [member for member in members if isinstance(member, bytes)]


async def test_a_claim_cut_off_before_its_record_is_put_back_first_in_line(
    redis_queue: str,
) -> None:
    stranded, later = await publish(), await publish()
    await cut_off_claim(age=queues.claim_timeout() + 1)
    queue = queues.RedisQueue()
    first = await queue.claim("203.0.113.1")
    assert first is not None and first["id"] == stranded["id"]
    second = await queue.claim("203.0.113.1")
    assert second is not None and second["id"] == later["id"]
    assert await claiming() == []
    assert await Job.objects.filter(status=Job.Status.CLAIMED).acount() == 2


async def test_a_claim_put_back_wakes_the_long_polls(redis_queue: str) -> None:
    await publish()
    await cut_off_claim(age=queues.claim_timeout() + 1)
    await wakeups.listen()  # as a long-poll does: the put-back comes over the bus
    signal = wakeups.signal()
    generation = signal.generation()
    waiter = asyncio.create_task(signal.wait(generation, 30))
    assert await queues.RedisQueue().claim("203.0.113.1") is not None
    # The job put back was claimed by the request that put it back; the
    # waiters look too, for anything else that came back.
    assert await asyncio.wait_for(waiter, 10)


async def test_a_young_unfinished_claim_is_left_to_its_claimer(
    redis_queue: str,
) -> None:
    await publish()
    raw = await cut_off_claim(age=0)
    assert await queues.RedisQueue().claim("203.0.113.1") is None
    assert await claiming() == [raw]


async def test_a_claim_recorded_before_it_died_is_not_handed_out_again(
    redis_queue: str,
) -> None:
    job = await publish()
    await cut_off_claim(age=queues.claim_timeout() + 1)
    # It died after the table's write, before clearing its note.
    now = timezone.now()
    assert await queues._record(job["id"], Job.Status.CLAIMED, now, "198.51.100.1", now)
    assert await queues.RedisQueue().claim("203.0.113.1") is None
    assert await claiming() == []


async def test_a_slow_claim_racing_the_restore_hands_the_job_out_once(
    redis_queue: str,
) -> None:
    job = await publish()
    raw = await cut_off_claim(age=queues.claim_timeout() + 1)
    client = redis_clients.async_client()
    assert await queues.restore_unfinished_claims(client) == 1
    # The slow claim records after all, and hands the job out.
    slow = await queues._settle(json.loads(raw), "198.51.100.2")
    assert slow is not None and slow["id"] == job["id"]
    # The entry put back is then stale: skipped, not handed out twice.
    assert await queues.RedisQueue().claim("203.0.113.1") is None
    assert await client.llen(queues.QUEUE_KEY) == 0


@pytest.mark.parametrize("query", [None, "channels=api"], ids=["plain", "filtered"])
async def test_a_claim_notes_its_entry_until_the_table_has_it(
    redis_queue: str, monkeypatch: pytest.MonkeyPatch, query: str | None
) -> None:
    job = await publish()
    settle = queues._settle
    noted: list[list[bytes]] = []

    async def settle_noting(
        entry: dict[str, Any], claimer: str, lease: Any = None
    ) -> Any:
        noted.append(await claiming())
        return await settle(entry, claimer, lease)

    monkeypatch.setattr(queues, "_settle", settle_noting)
    job_filter = parse_filter_query(query) if query else None
    claimed = await queues.RedisQueue().claim("203.0.113.1", job_filter)
    assert claimed is not None and claimed["id"] == job["id"]
    assert len(noted) == 1 and len(noted[0]) == 1
    assert json.loads(noted[0][0])["job"]["id"] == job["id"]
    assert await claiming() == []


async def test_claims_register_their_script_once(
    redis_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_clients.forget()
    client_class = type(redis_clients.async_client())
    register = client_class.register_script
    registered: list[str] = []

    def counted(client: Any, source: str) -> Any:
        registered.append(source)
        return register(client, source)

    monkeypatch.setattr(client_class, "register_script", counted)
    for _ in range(3):
        job = await publish()
        assert await queues.get_queue().claim("worker-1") == job
    assert registered == [queues._POP_LUA]
