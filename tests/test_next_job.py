"""``GET /job/next`` (contract section 2) on both queue backends."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import time_machine
from asgiref.sync import sync_to_async
from django.utils import timezone

from jobs import services, wakeups
from jobs.models import Job
from jobs.payloads import parse_job
from jobs.queues import get_queue

Sign = Callable[..., dict[str, str]]

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("queue_backend")]

CLIENT_IP = "203.0.113.7"  # the address the ``api`` fixture connects from


async def publish(api: httpx.AsyncClient, sign: Sign, **job: Any) -> dict[str, Any]:
    response = await api.post("/job", json=job, headers=sign())
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["job"]
    return result


async def claim(api: httpx.AsyncClient, sign: Sign, query: str = "") -> httpx.Response:
    return await api.get(f"/job/next{query}", headers=sign())


async def test_jobs_come_out_oldest_first(api: httpx.AsyncClient, sign: Sign) -> None:
    published = [await publish(api, sign, job_id=f"job-{n}") for n in range(4)]
    claimed = [(await claim(api, sign)).json()["job"] for _ in range(4)]
    assert claimed == published


async def test_empty_queue_is_204_with_no_body(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    response = await claim(api, sign)
    assert response.status_code == 204
    assert response.content == b""
    assert "content-type" not in response.headers


async def test_each_job_goes_to_exactly_one_caller(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    published = {(await publish(api, sign, job_id=f"job-{n}"))["id"] for n in range(5)}
    responses = await asyncio.gather(*(claim(api, sign) for _ in range(10)))
    claimed = [r.json()["job"]["id"] for r in responses if r.status_code == 200]
    assert sorted(claimed) == sorted(published)
    assert sorted(r.status_code for r in responses) == [200] * 5 + [204] * 5


async def test_the_claim_is_recorded(api: httpx.AsyncClient, sign: Sign) -> None:
    job = await publish(api, sign, job_id="a")
    before = timezone.now()
    assert (await claim(api, sign)).status_code == 200
    stored = await sync_to_async(Job.objects.get)(pk=job["id"])
    assert stored.status == Job.Status.CLAIMED
    assert stored.claimed_by == CLIENT_IP
    assert stored.claimed_at is not None
    assert before <= stored.claimed_at <= timezone.now()


async def test_expired_jobs_are_never_handed_out(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    stale = await publish(api, sign, job_id="stale", ttl=1)
    fresh = await publish(api, sign, job_id="fresh", ttl=300)
    with time_machine.travel(timezone.now() + timedelta(seconds=2)):
        first = await claim(api, sign)
        second = await claim(api, sign)
    assert first.json()["job"]["id"] == fresh["id"]
    assert second.status_code == 204
    stored = await sync_to_async(Job.objects.get)(pk=stale["id"])
    assert stored.status != Job.Status.CLAIMED
    assert stored.claimed_at is None


async def test_a_job_expires_at_its_expires_at(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    start = timezone.now()
    with time_machine.travel(start, tick=False) as clock:
        await publish(api, sign, job_id="a", ttl=10)
        await publish(api, sign, job_id="b", ttl=10)
        clock.shift(9.999)
        assert (await claim(api, sign)).json()["job"]["job_id"] == "a"
        clock.shift(0.001)
        assert (await claim(api, sign)).status_code == 204


@pytest.mark.parametrize("wait", ["-1", "31", "abc", "nan", "inf", "-0.5", "1e3"])
async def test_wait_outside_0_to_30_is_a_400(
    api: httpx.AsyncClient, sign: Sign, wait: str
) -> None:
    response = await claim(api, sign, f"?wait={wait}")
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "bad_field"
    assert "wait" in body["detail"]


@pytest.mark.parametrize("wait", ["0", "30", "0.5", ""])
async def test_wait_inside_0_to_30_is_accepted(
    api: httpx.AsyncClient, sign: Sign, wait: str
) -> None:
    # A queued job answers at once, so even wait=30 returns straight away.
    await publish(api, sign, job_id="a")
    started = time.monotonic()
    response = await claim(api, sign, f"?wait={wait}")
    assert response.status_code == 200
    assert time.monotonic() - started < 5


async def test_wait_on_an_empty_queue_holds_then_204(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    started = time.monotonic()
    response = await claim(api, sign, "?wait=0.3")
    assert response.status_code == 204
    assert time.monotonic() - started >= 0.3


async def test_a_publish_wakes_a_waiting_long_poll(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Publish only once the poll has found the queue empty and is waiting.
    (poll,) = await park_polls(api, sign, monkeypatch, 1, "?wait=20")
    assert not poll.done()
    job = await publish(api, sign, job_id="woken")
    published_at = time.monotonic()
    response = await asyncio.wait_for(poll, timeout=10)
    assert response.status_code == 200
    assert response.json()["job"] == job
    assert time.monotonic() - published_at < 5  # woken, not timed out


async def test_one_publish_wakes_one_of_several_waiters(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = await park_polls(api, sign, monkeypatch, 3, "?wait=0.5")
    job = await publish(api, sign, job_id="only-one")
    responses = await asyncio.wait_for(asyncio.gather(*polls), timeout=10)
    winners = [r.json()["job"] for r in responses if r.status_code == 200]
    assert winners == [job]
    assert sorted(r.status_code for r in responses) == [200, 204, 204]


async def test_one_publish_makes_one_claim_not_one_per_waiter(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims = 0
    # On the class: patched on the shared instance, its undo would leave the
    # original bound method there, hiding later tests' patches of the class.
    queue = type(get_queue())
    real_claim = queue.claim

    async def counted_claim(*args: Any) -> dict[str, Any] | None:
        nonlocal claims
        claims += 1
        return await real_claim(*args)

    monkeypatch.setattr(queue, "claim", counted_claim)
    parked = await park_polls(api, sign, monkeypatch, 8, "?wait=0.5")
    assert claims == 8  # each looked once and found the queue empty
    job = await publish(api, sign, job_id="one-of-eight")
    responses = await asyncio.wait_for(asyncio.gather(*parked), timeout=10)
    assert [r.json()["job"] for r in responses if r.status_code == 200] == [job]
    assert claims == 8 + 1  # the woken waiter's, and nobody else's


async def test_a_job_queued_without_a_wake_up_passes_the_wake_up_on(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    parked = await park_polls(api, sign, monkeypatch, 3, "?wait=20")
    # Two jobs queued, the newer announced: as after an operator's requeue.
    # The waiter woken for the newer takes the older, and passes it on.
    stored = [
        await services._store(parse_job(json.dumps({"job_id": f"quiet-{n}"}).encode()))
        for n in range(2)
    ]
    wakeups.signal().fire(stored[1].job)
    claimed: list[int] = []
    pending = set(parked)
    while len(claimed) < 2:
        done, pending = await asyncio.wait(
            pending, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        assert done, "a queued job waited for a timeout"
        claimed += [task.result().json()["job"]["id"] for task in done]
    assert sorted(claimed) == [published.job["id"] for published in stored]
    for task in pending:
        task.cancel()


async def test_an_operators_requeue_wakes_a_waiting_long_poll(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = await publish(api, sign, job_id="requeued")
    assert (await claim(api, sign)).status_code == 200
    # The poll joins the bus before it waits; the requeue's wake-up comes back
    # through it (through Redis on the services stack).
    (poll,) = await park_polls(api, sign, monkeypatch, 1, "?wait=20")
    # The admin's action runs in a thread of its own, away from the event loop.
    assert await sync_to_async(services.requeue)([job["id"]]) == 1
    response = await asyncio.wait_for(poll, timeout=10)  # woken, not timed out
    assert response.status_code == 200
    assert response.json()["job"]["id"] == job["id"]


async def test_a_job_whose_wake_up_was_lost_is_found_before_the_wait_ends(
    api: httpx.AsyncClient,
    sign: Sign,
    monkeypatch: pytest.MonkeyPatch,
    settings: Any,
) -> None:
    settings.LONG_POLL_RELOOK_SECONDS = 0.5
    (poll,) = await park_polls(api, sign, monkeypatch, 1, "?wait=30")
    # Queued with nothing sent on the bus, as if the layer had lost it.
    stored = await services._store(parse_job(b'{"job_id": "unannounced"}'))
    response = await asyncio.wait_for(poll, timeout=20)  # well inside wait=30
    assert response.status_code == 200
    assert response.json()["job"]["id"] == stored.job["id"]


async def park_polls(
    api: httpx.AsyncClient,
    sign: Sign,
    monkeypatch: pytest.MonkeyPatch,
    count: int,
    query: str,
) -> list[asyncio.Task[httpx.Response]]:
    """``count`` long-polls, returned once every one is waiting."""
    waiting = 0
    all_waiting = asyncio.Event()
    real_wait = wakeups.Signal.wait

    async def observed_wait(self: wakeups.Signal, *args: Any) -> wakeups.Woken | None:
        nonlocal waiting
        waiting += 1
        if waiting >= count:
            all_waiting.set()
        return await real_wait(self, *args)

    monkeypatch.setattr(wakeups.Signal, "wait", observed_wait)
    polls = [asyncio.create_task(claim(api, sign, query)) for _ in range(count)]
    await asyncio.wait_for(all_waiting.wait(), timeout=10)
    return polls


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
async def test_wrong_method_is_405(
    api: httpx.AsyncClient, sign: Sign, method: str
) -> None:
    await publish(api, sign, job_id="a")
    response = await api.request(method, "/job/next", headers=sign())
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"
    assert response.headers["allow"] == "GET"
    # Nothing was claimed by the refused request.
    assert (await claim(api, sign)).status_code == 200
