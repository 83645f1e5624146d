"""Filters on ``GET /job/next``: numbers on the wire, filtered claims, long-polls.

Every test runs once per queue backend (database, Redis). Jobs go in through
signed ``POST /job``, so the service layer's numbers are what is filtered on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from jobs import queues, wakeups
from jobs.filters import JobFilter
from tests.filter_cases import (
    BAD_FILTERS,
    CASE_IDS,
    CASES,
    JOBS,
    NUMBERS,
    TIER_CASES,
    TIERS,
)

Sign = Callable[..., dict[str, str]]

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("queue_backend")]


async def publish(api: httpx.AsyncClient, sign: Sign, **job: Any) -> dict[str, Any]:
    job.setdefault("job_id", uuid.uuid4().hex)
    response = await api.post("/job", json=job, headers=sign())
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()["job"]
    return result


async def publish_cases(api: httpx.AsyncClient, sign: Sign) -> list[dict[str, Any]]:
    return [await publish(api, sign, **job) for job in JOBS]


async def claim(api: httpx.AsyncClient, sign: Sign, query: str = "") -> httpx.Response:
    return await api.get(f"/job/next?{query}", headers=sign())


async def drain(api: httpx.AsyncClient, sign: Sign, query: str = "") -> list[int]:
    """Claim with ``query`` until the queue has no match; the ids, in order."""
    ids: list[int] = []
    while (response := await claim(api, sign, query)).status_code == 200:
        ids.append(response.json()["job"]["id"])
        assert len(ids) == len(set(ids)) <= 100, "a job was handed out twice"
    assert response.status_code == 204, response.text
    return ids


# --- Numbers ------------------------------------------------------------------


async def test_every_job_carries_the_numbers_of_its_fields(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    published = await publish_cases(api, sign)
    assert [job["numbers"] for job in published] == NUMBERS
    claimed = [(await claim(api, sign)).json()["job"] for _ in JOBS]
    assert [job["numbers"] for job in claimed] == NUMBERS


async def test_a_client_cannot_set_numbers(api: httpx.AsyncClient, sign: Sign) -> None:
    response = await api.post(
        "/job",
        json={"job_id": "x", "fields": {"Money": "1K"}, "numbers": {"money": 1e30}},
        headers=sign(),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "bad_field"
    assert "'numbers'" in response.json()["detail"]
    assert (await claim(api, sign)).status_code == 204  # nothing half-written


# --- Filtered claims ----------------------------------------------------------


@pytest.mark.parametrize(("query", "wanted"), CASES, ids=CASE_IDS)
async def test_a_filtered_claim_takes_the_oldest_match_and_nothing_else(
    api: httpx.AsyncClient, sign: Sign, query: str, wanted: list[int]
) -> None:
    ids = [job["id"] for job in await publish_cases(api, sign)]
    assert await drain(api, sign, query) == [ids[n] for n in wanted]
    # The others are still queued, in their order.
    rest = [ids[n] for n in range(len(JOBS)) if n not in wanted]
    assert await drain(api, sign) == rest


@pytest.mark.parametrize(("query", "wanted"), TIER_CASES)
async def test_tiers_name_filters(
    api: httpx.AsyncClient,
    sign: Sign,
    settings: Any,
    query: str,
    wanted: list[int],
) -> None:
    settings.TIERS = TIERS
    ids = [job["id"] for job in await publish_cases(api, sign)]
    assert await drain(api, sign, query) == [ids[n] for n in wanted]


async def test_channels_narrow_a_claim(api: httpx.AsyncClient, sign: Sign) -> None:
    first = await publish(api, sign, channel="111")
    await publish(api, sign, channel="222")
    third = await publish(api, sign, channel="333", fields={"Money": "5M"})
    ids = await drain(api, sign, "channels=111,333&where=money>=1M")
    assert ids == [third["id"]]
    assert await drain(api, sign, "channels=111") == [first["id"]]


@pytest.mark.parametrize(("query", "named"), BAD_FILTERS)
async def test_a_bad_filter_is_a_400_naming_it(
    api: httpx.AsyncClient, sign: Sign, query: str, named: str
) -> None:
    await publish(api, sign)
    response = await claim(api, sign, query)
    assert response.status_code == 400
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "bad_filter"
    assert named in body["detail"]
    assert (await claim(api, sign)).status_code == 200  # nothing was claimed


async def test_a_match_deep_in_the_queue_is_found_across_batches(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queues, "SCAN_BATCH", 3)
    others = [await publish(api, sign, fields={"Money": "1M"}) for _ in range(10)]
    wanted = await publish(api, sign, fields={"Money": "20M"})
    assert await drain(api, sign, "where=money>=10M") == [wanted["id"]]
    assert await drain(api, sign) == [job["id"] for job in others]


# --- Long-polls ---------------------------------------------------------------


async def test_a_filtered_long_poll_is_woken_only_by_a_matching_job(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims = 0
    # On the class, as tests/test_next_job.py explains.
    queue = type(queues.get_queue())
    real_claim = queue.claim

    async def counted_claim(
        self: queues.Queue, claimer: str, *args: Any
    ) -> dict[str, Any] | None:
        nonlocal claims
        claims += 1
        return await real_claim(self, claimer, *args)

    monkeypatch.setattr(queue, "claim", counted_claim)
    waiting = asyncio.Event()
    passed_over: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    real_wait, real_may_want = wakeups.Signal.wait, wakeups._may_want

    async def observed_wait(self: wakeups.Signal, *args: Any) -> wakeups.Woken | None:
        waiting.set()
        return await real_wait(self, *args)

    def observed_may_want(job_filter: JobFilter, job: dict[str, Any] | None) -> bool:
        wanted = real_may_want(job_filter, job)
        if not wanted:
            passed_over.put_nowait(job)
        return wanted

    monkeypatch.setattr(wakeups.Signal, "wait", observed_wait)
    monkeypatch.setattr(wakeups, "_may_want", observed_may_want)
    poll = asyncio.create_task(
        claim(api, sign, "wait=20&where=money_per_sec>=10M&where=players<players_max")
    )
    await asyncio.wait_for(waiting.wait(), timeout=10)
    assert claims == 1  # the first look at the queue, empty

    poor = await publish(api, sign, fields={"Money per sec": "9M", "Players": "1/8"})
    full = await publish(api, sign, fields={"Money per sec": "50M", "Players": "8/8"})
    for expected in (poor, full):
        seen = await asyncio.wait_for(passed_over.get(), 10)
        assert seen is not None and seen["id"] == expected["id"]
    assert not poll.done()
    assert claims == 1  # passed over in memory: the queue was not touched

    wanted = await publish(api, sign, fields={"Money per sec": "10M", "Players": "7/8"})
    response = await asyncio.wait_for(poll, timeout=10)
    assert response.status_code == 200
    assert response.json()["job"] == wanted
    assert claims == 2
    assert await drain(api, sign) == [poor["id"], full["id"]]


async def test_a_filtered_long_poll_times_out_when_nothing_matches(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    await publish(api, sign, fields={"Money": "1M"})
    response = await claim(api, sign, "wait=0.2&where=money>=10M")
    assert response.status_code == 204
