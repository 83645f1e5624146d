"""A long-poll cancelled while its claim is in flight puts the job back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from jobs import wakeups
from jobs.filters import JobFilter
from jobs.queues import get_queue
from jobs.views import _claim_or_release


class SlowQueue:
    """Claims one job, but only when told to finish."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()
        self.released: list[dict[str, Any]] = []

    async def claim(
        self, claimer: str, job_filter: JobFilter | None = None, lease: Any = None
    ) -> dict[str, Any] | None:
        self.started.set()
        await self.finish.wait()
        return {"id": 7}

    async def release(self, job: dict[str, Any]) -> None:
        self.released.append(job)


@pytest.mark.backends
async def test_cancelled_claim_releases_the_job_and_wakes_a_waiter() -> None:
    await wakeups.listen()  # as a long-poll does: the release comes over the bus
    signal = wakeups.signal()
    waiter = asyncio.create_task(signal.wait(signal.generation(), 30))
    queue = SlowQueue()
    request = asyncio.create_task(
        _claim_or_release(queue, "10.0.0.1", JobFilter(), None)  # type: ignore[arg-type]
    )
    await queue.started.wait()
    request.cancel()
    await asyncio.sleep(0)  # the cancellation lands while the claim is running
    queue.finish.set()
    try:
        await request
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the request was not cancelled")
    assert queue.released == [{"id": 7}]
    assert await asyncio.wait_for(waiter, 10)  # the job is back: someone looks


@pytest.mark.backends
async def test_release_puts_the_job_back_first(
    api: httpx.AsyncClient, sign: Callable[[], dict[str, str]], queue_backend: str
) -> None:
    for job_id in ("first", "second"):
        assert (
            await api.post("/job", json={"job_id": job_id}, headers=sign())
        ).status_code == 201
    claimed = (await api.get("/job/next", headers=sign())).json()["job"]
    assert claimed["job_id"] == "first"

    await get_queue().release(claimed)

    again = (await api.get("/job/next", headers=sign())).json()["job"]
    assert again["id"] == claimed["id"]
    assert (await api.get("/job/next", headers=sign())).json()["job"][
        "job_id"
    ] == "second"
