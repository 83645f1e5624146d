"""A waiting ``GET /job/next?wait=`` is woken by the publish itself, not a timer.

Through real daphne processes: one process, then two sharing Redis, the wait on
one and the publish on the other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.conftest import LiveGateway, process_env
from tests.servers import DaphneProcess

pytestmark = [pytest.mark.backends, pytest.mark.processes]

WAKE_WITHIN_SECONDS = 0.1


async def _wait_until_waiting(
    client: httpx.AsyncClient, sign: Callable[[], dict[str, str]]
) -> None:
    # Observing another process: its /health says when the long-poll is parked.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        health = (await client.get("/health", headers=sign())).json()
        if health["queue"]["long_polls_waiting"] >= 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the long-poll never started waiting")


async def _wake_latency(
    waiter_url: str, publisher_url: str, sign: Callable[[], dict[str, str]]
) -> tuple[float, dict[str, object]]:
    async with (
        httpx.AsyncClient(base_url=waiter_url, timeout=20) as waiter,
        httpx.AsyncClient(base_url=publisher_url, timeout=20) as publisher,
    ):
        waiting = asyncio.create_task(waiter.get("/job/next?wait=10", headers=sign()))
        await _wait_until_waiting(waiter, sign)
        posted = await publisher.post(
            "/job", json={"job_id": "wake-me"}, headers=sign()
        )
        published_at = time.monotonic()
        assert posted.status_code == 201
        answer = await waiting
        woke_after = time.monotonic() - published_at
    assert answer.status_code == 200
    return woke_after, answer.json()["job"]


async def test_one_process(
    live_gateway: LiveGateway, sign: Callable[[], dict[str, str]]
) -> None:
    woke_after, job = await _wake_latency(
        live_gateway.base_url, live_gateway.base_url, sign
    )
    assert job["job_id"] == "wake-me"
    assert woke_after < WAKE_WITHIN_SECONDS


@pytest.fixture
def two_replicas(
    transactional_db: None, redis_url: str
) -> Iterator[tuple[DaphneProcess, DaphneProcess]]:
    env = process_env(REDIS_URL=redis_url)
    with DaphneProcess(env=env) as first, DaphneProcess(env=env) as second:
        yield first, second


async def test_two_processes_share_wake_ups(
    two_replicas: tuple[DaphneProcess, DaphneProcess],
    sign: Callable[[], dict[str, str]],
) -> None:
    first, second = two_replicas
    woke_after, job = await _wake_latency(first.base_url, second.base_url, sign)
    assert job["job_id"] == "wake-me"
    assert woke_after < WAKE_WITHIN_SECONDS


async def test_wait_times_out_empty(
    live_gateway: LiveGateway, sign: Callable[[], dict[str, str]]
) -> None:
    async with httpx.AsyncClient(base_url=live_gateway.base_url) as client:
        started = time.monotonic()
        answer = await client.get("/job/next?wait=1", headers=sign())
    assert answer.status_code == 204
    assert 0.9 <= time.monotonic() - started < 3
