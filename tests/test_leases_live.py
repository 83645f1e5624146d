"""Leases through real processes: daphne, the Python client, a killed worker.

Two replicas share PostgreSQL and Redis, on each queue backend: a worker
process holding leases on jobs is SIGKILLed, and every job it held comes back
once, to other workers on either replica, never while its lease was live.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import psycopg
import pytest
import redis
from asgiref.sync import sync_to_async

from gateway_client import GatewayClient, LeaseLost
from jobs.models import Job
from jobs.queues import CLAIMING_KEY, QUEUE_KEY
from testkit.servers import REPO_ROOT, DaphneProcess
from tests.conftest import LiveGateway, own_postgres_database, process_env
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]

DEADLINE = 60.0


def client_for(base_url: str) -> GatewayClient:
    return GatewayClient(base_url, api_key=API_KEY, hmac_secret=HMAC_SECRET)


async def test_server_full_then_release_through_the_python_client(
    live_gateway: LiveGateway,
) -> None:
    async with client_for(live_gateway.base_url) as client:
        first = (await client.publish({"job_id": uuid.uuid4().hex})).job
        second = (await client.publish({"job_id": uuid.uuid4().hex})).job
        leased = await client.lease_job(30)
        assert leased is not None and leased.id == first["id"]
        # The Roblox server was full: give the job back, first in line.
        await client.release(leased)
        with pytest.raises(LeaseLost):
            await client.ack(leased)
        again = await client.lease_job(30)
        assert again is not None and again.id == first["id"]
        assert again.token != leased.token
        await client.ack(again)
        last = await client.lease_job(30, wait=1)
        assert last is not None and last.id == second["id"]
        await client.ack(last)
        assert await client.lease_job(30) is None
    statuses = await sync_to_async(
        lambda: set(Job.objects.values_list("status", flat=True))
    )()
    assert statuses == {Job.Status.CLAIMED}


async def test_the_worker_with_lease_acks_each_job_it_wrote(
    live_gateway: LiveGateway,
) -> None:
    async with client_for(live_gateway.base_url) as client:
        ids = [
            (await client.publish({"job_id": uuid.uuid4().hex})).job["id"]
            for _ in range(5)
        ]
    env = {
        **os.environ,
        "BASE_URL": live_gateway.base_url,
        "API_KEY": API_KEY,
        "HMAC_SECRET": HMAC_SECRET,
        "TIMEOUT": "7",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway_client",
        "--lease",
        "30",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        printed: list[int] = []
        async with asyncio.timeout(DEADLINE):
            while len(printed) < len(ids):
                printed.append(json.loads(await process.stdout.readline())["id"])

        async def all_acked() -> bool:
            rows = await sync_to_async(
                lambda: list(Job.objects.values_list("status", flat=True))
            )()
            return rows == [Job.Status.CLAIMED] * len(ids)

        # The ack follows the line it wrote: polled against a deadline.
        deadline = time.monotonic() + DEADLINE
        while not await all_acked():
            assert time.monotonic() < deadline, "the worker did not ack its jobs"
            await asyncio.sleep(0.05)
    finally:
        process.terminate()
        await process.wait()
    assert sorted(printed) == sorted(ids)


# --- Two replicas, a worker killed holding leases ---------------------------------


@pytest.fixture(scope="module")
def lease_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated PostgreSQL database of this module's own."""
    with own_postgres_database(request, "leases") as url:
        yield url


@pytest.fixture(params=["database", "redis"])
def replicas(
    request: pytest.FixtureRequest, lease_database: str, redis_url: str
) -> Iterator[tuple[list[DaphneProcess], str, str]]:
    """Two gateway processes on one PostgreSQL and one Redis, per queue backend."""
    backend: str = request.param
    redis.Redis.from_url(redis_url).flushdb()
    with psycopg.connect(lease_database, autocommit=True) as conn:
        conn.execute("DELETE FROM jobs_job")
    env = process_env(
        DATABASE_URL=lease_database, REDIS_URL=redis_url, QUEUE_BACKEND=backend
    )
    with DaphneProcess(env=env) as first, DaphneProcess(env=env) as second:
        yield [first, second], backend, redis_url


def table(url: str) -> dict[int, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT id, status FROM jobs_job").fetchall())


async def test_a_worker_killed_holding_leases_loses_no_job(
    replicas: tuple[list[DaphneProcess], str, str], lease_database: str
) -> None:
    gateways, backend, redis_url = replicas
    total, held_at_kill, lease_seconds = 40, 8, 3
    clients = [client_for(gateway.base_url) for gateway in gateways]
    try:
        for n in range(total):
            await clients[n % 2].publish({"job_id": f"lease-{n}", "ttl": 600})
        published = table(lease_database)
        assert len(published) == total

        # The doomed worker leases from the first replica and holds each job.
        holder = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.lease_holder",
            gateways[0].base_url,
            str(lease_seconds),
            cwd=REPO_ROOT,
            env={**os.environ, "API_KEY": API_KEY, "HMAC_SECRET": HMAC_SECRET},
            stdout=asyncio.subprocess.PIPE,
        )
        held: dict[int, datetime] = {}
        try:
            assert holder.stdout is not None
            async with asyncio.timeout(DEADLINE):
                while len(held) < held_at_kill:
                    line = json.loads(await holder.stdout.readline())
                    held[line["id"]] = datetime.fromisoformat(line["expires_at"])
        finally:
            holder.kill()
            await holder.wait()
        # It may have leased a few more after the count: all of them held too.
        assert holder.stdout is not None
        for raw in (await holder.stdout.read()).splitlines():
            line = json.loads(raw)
            held[line["id"]] = datetime.fromisoformat(line["expires_at"])

        # Survivors on both replicas lease, ack, and note when they got each.
        granted: list[tuple[int, float]] = []
        acked: Counter[int] = Counter()

        async def survivor(client: GatewayClient) -> None:
            while sum(acked.values()) < total:
                leased = await client.lease_job(30, wait=1)
                if leased is None:
                    continue
                granted.append((leased.id, time.time()))
                await client.ack(leased)  # LeaseLost here fails the test
                acked[leased.id] += 1

        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*(survivor(clients[n % 2]) for n in range(4)))
    finally:
        for client in clients:
            await client.aclose()

    assert set(acked) == set(published), "a job never came back"
    assert set(acked.values()) == {1}, "a job acked twice"
    twice = [pk for pk, n in Counter(pk for pk, _ in granted).items() if n > 1]
    assert not twice, f"handed out twice: {twice}"
    # No job held by two live leases: each held job came back after its lease.
    for pk, at in granted:
        if pk in held:
            assert at >= held[pk].timestamp() - 0.01, (pk, at, held[pk])
    assert set(table(lease_database).values()) == {Job.Status.CLAIMED}
    if backend == "redis":
        store = redis.Redis.from_url(redis_url)
        assert store.llen(QUEUE_KEY) == 0
        assert store.zcard(CLAIMING_KEY) == 0
    print(
        f"[lease fault, {backend} queue] killed a worker holding {len(held)} "
        f"leases of {lease_seconds} s; all {total} jobs acked once by the "
        "survivors on two replicas, each held one only after its lease ran out"
    )
