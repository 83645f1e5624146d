"""A waiting ``GET /job/next?wait=`` is woken by the publish itself, not a timer.

Through real daphne processes: one process, then two sharing Redis, the wait on
one and the publish on the other; and an operator's requeue in a process of its
own. Every wake-up crosses the one bus (jobs.bus), the channel layer.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from testkit.servers import REPO_ROOT, DaphneProcess
from tests.conftest import LiveGateway, process_env

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
    # No re-look within a wait=: a long-poll answered 200 was woken by the bus.
    env = process_env(REDIS_URL=redis_url, LONG_POLL_RELOOK_SECONDS="60")
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


async def test_a_requeue_in_another_process_wakes_a_long_poll(
    two_replicas: tuple[DaphneProcess, DaphneProcess],
    sign: Callable[[], dict[str, str]],
    redis_url: str,
) -> None:
    first, second = two_replicas
    async with (
        httpx.AsyncClient(base_url=first.base_url, timeout=60) as waiter,
        httpx.AsyncClient(base_url=second.base_url, timeout=60) as other,
    ):
        posted = await other.post("/job", json={"job_id": "again"}, headers=sign())
        job_id = posted.json()["job"]["id"]
        taken = await other.get("/job/next", headers=sign())
        assert taken.json()["job"]["id"] == job_id
        waiting = asyncio.create_task(waiter.get("/job/next?wait=30", headers=sign()))
        await _wait_until_waiting(waiter, sign)
        # The admin's action, from a process that serves nobody.
        requeue = await asyncio.create_subprocess_exec(
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            f"from jobs.services import requeue; assert requeue([{job_id}]) == 1",
            cwd=REPO_ROOT,
            env={**os.environ, **process_env(REDIS_URL=redis_url)},
        )
        assert await requeue.wait() == 0
        answer = await waiting
    assert answer.status_code == 200  # woken: no re-look in 60 s, no 204
    assert answer.json()["job"]["id"] == job_id


async def test_wait_times_out_empty(
    live_gateway: LiveGateway, sign: Callable[[], dict[str, str]]
) -> None:
    async with httpx.AsyncClient(base_url=live_gateway.base_url) as client:
        started = time.monotonic()
        answer = await client.get("/job/next?wait=1", headers=sign())
    assert answer.status_code == 204
    assert 0.9 <= time.monotonic() - started < 3
