"""``since=`` never skips a job: concurrent publishers, clients reconnecting.

Eight publishers post 480 jobs at once while three clients drop their
connection every few hundred milliseconds and reconnect with ``since=`` the
newest id they saw, each time to the other replica. Every client must end
with every job exactly once, and see each connection's jobs in id order (what
makes the newest id a safe place to resume). On PostgreSQL with Redis it runs
against two daphne replicas; on the embedded stack against one daphne on
SQLite.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway_client.signing import signed_headers
from testkit.servers import DaphneProcess
from tests.conftest import own_postgres_database, process_env
from tests.stack import API_KEY, HMAC_SECRET, STACK

pytestmark = [
    pytest.mark.backends,
    pytest.mark.processes,
    pytest.mark.usefixtures("empty_redis"),
]

PUBLISHERS = 8
JOBS_EACH = 60
CLIENTS = 3
DEADLINE = 90.0


@pytest.fixture(scope="module")
def replay_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated PostgreSQL database of this module's own."""
    with own_postgres_database(request, "replay") as url:
        yield url


class Reconnecting:
    """A client that keeps dropping and resuming with ``since=``, noting all."""

    def __init__(self, name: str, gateways: list[str]) -> None:
        self.name = name
        self.gateways = gateways
        self.received: list[int] = []
        self.connections = 0
        # The store holds this test's jobs only: since=0 from the first
        # connection on, so that none published before it is expected live.
        self.newest = 0
        self.out_of_order: list[tuple[int, int]] = []

    async def run(self, done: asyncio.Event) -> None:
        while not done.is_set():
            base = self.gateways[self.connections % len(self.gateways)]
            self.connections += 1
            url = f"{base}/ws?batch=1&since={self.newest}"
            headers = {"X-API-KEY": API_KEY}
            last_on_this_connection = self.newest
            try:
                async with connect(url, additional_headers=headers) as socket:
                    # Connected for a few hundred milliseconds, then dropped.
                    async with asyncio.timeout(random.uniform(0.1, 0.5)):
                        async for raw in socket:
                            frame = json.loads(raw)
                            if frame["type"] == "job":
                                jobs = [frame["job"]]
                            elif frame["type"] == "jobs":
                                jobs = frame["jobs"]
                            else:
                                continue
                            for job in jobs:
                                if job["id"] <= last_on_this_connection:
                                    self.out_of_order.append(
                                        (last_on_this_connection, job["id"])
                                    )
                                last_on_this_connection = job["id"]
                                self.received.append(job["id"])
                                self.newest = max(self.newest, job["id"])
            except (TimeoutError, ConnectionClosed, OSError):
                pass


async def publish_all(gateways: list[str]) -> list[int]:
    """Eight publishers at once, spread over the replicas; the ids stored."""
    ids: list[int] = []

    async def publisher(n: int) -> None:
        async with httpx.AsyncClient(base_url=gateways[n % len(gateways)]) as http:
            for k in range(JOBS_EACH):
                response = await http.post(
                    "/job",
                    json={"job_id": f"replay-{n}-{k}", "ttl": 600},
                    headers=signed_headers(API_KEY, HMAC_SECRET),
                    timeout=30,
                )
                assert response.status_code == 201, response.text
                ids.append(response.json()["job"]["id"])

    await asyncio.gather(*(publisher(n) for n in range(PUBLISHERS)))
    return ids


async def run_the_storm(test: str, gateways: list[DaphneProcess]) -> None:
    bases = [gateway.base_url for gateway in gateways]
    ws_bases = [gateway.ws_url.removesuffix("/ws") for gateway in gateways]
    clients = [
        Reconnecting(f"c{n}", ws_bases[n:] + ws_bases[:n]) for n in range(CLIENTS)
    ]
    done = asyncio.Event()
    running = [asyncio.create_task(client.run(done)) for client in clients]
    try:
        published = await publish_all(bases)
        deadline = time.monotonic() + DEADLINE
        while not all(set(c.received) >= set(published) for c in clients):
            if time.monotonic() > deadline or any(task.done() for task in running):
                break
            await asyncio.sleep(0.1)
    finally:
        done.set()
        await asyncio.gather(*running)
    assert len(set(published)) == PUBLISHERS * JOBS_EACH
    for client in clients:
        missing = sorted(set(published) - set(client.received))
        twice = [pk for pk, n in Counter(client.received).items() if n > 1]
        assert not missing, f"{client.name} missed {missing}"
        assert not twice, f"{client.name} got twice {twice}"
        assert not client.out_of_order, f"{client.name}: {client.out_of_order[:5]}"
    connections = sum(client.connections for client in clients)
    print(
        f"[{test}] {len(published)} jobs from {PUBLISHERS} publishers over "
        f"{len(gateways)} replica(s); {CLIENTS} clients reconnected "
        f"{connections} times with since=: each got every job once, in id order"
    )


@pytest.fixture
def two_replicas(replay_database: str, redis_url: str) -> Iterator[list[DaphneProcess]]:
    redis.Redis.from_url(redis_url).flushdb()
    env = process_env(DATABASE_URL=replay_database, REDIS_URL=redis_url)
    with DaphneProcess(env=env) as first, DaphneProcess(env=env) as second:
        yield [first, second]


async def test_no_gap_with_two_replicas_on_postgresql(
    two_replicas: list[DaphneProcess],
) -> None:
    await run_the_storm("replay, two replicas", two_replicas)


async def test_no_gap_on_one_process(transactional_db: None) -> None:
    # The suite's own stack: SQLite and the in-memory layer when embedded.
    with DaphneProcess(env=process_env()) as gateway:
        await run_the_storm(f"replay, {STACK} stack", [gateway])
