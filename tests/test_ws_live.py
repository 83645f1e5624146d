"""``/ws`` over real daphne processes: handshakes, replicas, replay, stalled clients.

Clients are the ``websockets`` library (or a raw socket, for a client that never
reads); jobs go in through signed ``POST /job``, as the poller sends them.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from gateway_client.signing import signed_headers
from testkit.servers import LOOPBACK, DaphneProcess
from tests.conftest import LiveGateway, own_postgres_database, process_env
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = pytest.mark.processes

# The time a job may take from POST /job to every client, on every replica.
FANOUT_DEADLINE = 0.2


def ws_connect(base: str, query: str = "", key: str = API_KEY) -> connect:
    # No Origin header, like a game client; never through an environment proxy.
    return connect(
        f"{base}/ws{query}",
        additional_headers={"X-API-KEY": key},
        compression=None,
        proxy=None,
        open_timeout=5,
    )


async def hello(client: ClientConnection) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await client.recv())
    assert frame["type"] == "hello"
    return frame


async def next_job(client: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(client.recv(), timeout))
    assert frame["type"] == "job", frame
    job: dict[str, Any] = frame["job"]
    return job


async def post_job(http: httpx.AsyncClient, base: str, **fields: Any) -> dict[str, Any]:
    body = {"job_id": uuid.uuid4().hex, **fields}
    headers = signed_headers(API_KEY, HMAC_SECRET)
    response = await http.post(f"{base}/job", json=body, headers=headers)
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()["job"]
    return job


async def ws_clients(http: httpx.AsyncClient, base: str) -> dict[str, int]:
    response = await http.get(
        f"{base}/health", headers=signed_headers(API_KEY, HMAC_SECRET)
    )
    assert response.status_code == 200, response.text
    counts: dict[str, int] = response.json()["websocket_clients"]
    return counts


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        yield client


# --- One process ---------------------------------------------------------------


@pytest.mark.backends
async def test_daphne_admits_by_key_pushes_jobs_and_refuses_with_403(
    live_gateway: LiveGateway, http: httpx.AsyncClient
) -> None:
    base = live_gateway.ws_url
    async with (
        ws_connect(base) as by_header,
        connect(f"{base}/ws?api_key={API_KEY}", proxy=None) as by_query,
    ):
        await hello(by_header)
        await hello(by_query)
        job = await post_job(http, live_gateway.base_url, place_id=7, title="t")
        assert await next_job(by_header) == job
        assert await next_job(by_query) == job

    for query, key in [
        ("", "wrong-key"),
        ("?since=abc", API_KEY),
        ("?channels=a,,b", API_KEY),
        ("?batch=yes", API_KEY),
    ]:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_connect(base, query, key):
                pass
        assert refused.value.response.status_code == 403, query


async def frame_jobs(client: ClientConnection) -> tuple[str, list[int]]:
    """The type and job ids of the next frame, a ``job`` or ``jobs`` frame."""
    frame = json.loads(await asyncio.wait_for(client.recv(), 5))
    if frame["type"] == "job":
        return "job", [frame["job"]["id"]]
    assert frame["type"] == "jobs", frame
    assert len(frame["jobs"]) > 1  # a single job goes in the contract's frame
    return "jobs", [job["id"] for job in frame["jobs"]]


@pytest.mark.backends
async def test_batched_frames_carry_replays_and_bursts_exactly_once(
    live_gateway: LiveGateway, http: httpx.AsyncClient
) -> None:
    base = live_gateway.ws_url
    before = await post_job(http, live_gateway.base_url)
    stored = [(await post_job(http, live_gateway.base_url))["id"] for _ in range(5)]
    async with (
        ws_connect(base, f"?since={before['id']}&batch=1") as batched,
        ws_connect(base) as plain,
    ):
        await hello(batched)
        await hello(plain)
        assert await frame_jobs(batched) == ("jobs", stored)

        burst = await asyncio.gather(
            *(post_job(http, live_gateway.base_url) for _ in range(40))
        )
        expected = sorted(job["id"] for job in burst)
        received: dict[str, list[int]] = {"batched": [], "plain": []}
        for name, client in (("batched", batched), ("plain", plain)):
            while len(received[name]) < len(expected):
                kind, ids = await frame_jobs(client)
                assert kind == "job" or name == "batched"
                received[name].extend(ids)
        # Every job once (order: as the concurrent commits broadcast them).
        assert sorted(received["batched"]) == expected
        assert sorted(received["plain"]) == expected
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batched.recv(), 0.3)


@pytest.mark.backends
async def test_replay_during_a_steady_stream_has_no_gap_and_no_duplicate(
    live_gateway: LiveGateway, http: httpx.AsyncClient
) -> None:
    clients, spacing = 16, 5
    total = clients * spacing + 10
    published: list[int] = []
    reached = [asyncio.Event() for _ in range(clients)]

    async def publish_stream() -> None:
        for n in range(1, total + 1):
            published.append((await post_job(http, live_gateway.base_url))["id"])
            if n % spacing == 0 and n // spacing <= clients:
                reached[n // spacing - 1].set()

    async def reconnecting_client(k: int) -> tuple[list[int], int]:
        await reached[k].wait()
        # Some jobs are missed while "away": since points a few jobs back.
        since_index = len(published) - 1 - k % 4
        since = published[since_index]
        seen: list[int] = []
        async with ws_connect(live_gateway.ws_url, f"?since={since}") as client:
            await hello(client)
            # A job's frame can arrive before its POST is answered: count the
            # jobs still to come rather than wait for the publisher's last id.
            while len(seen) < total - since_index - 1:
                seen.append((await next_job(client))["id"])
        return seen, since_index

    async with asyncio.timeout(60):
        stream = asyncio.create_task(publish_stream())
        results = await asyncio.gather(
            *(reconnecting_client(k) for k in range(clients))
        )
        await stream
    # Read once the stream is done: the last frames can beat their POST's answer.
    for seen, since_index in results:
        assert seen == published[since_index + 1 :]


# --- Two replicas sharing PostgreSQL and Redis ---------------------------------


@pytest.fixture(scope="module")
def replica_database(request: pytest.FixtureRequest) -> Iterator[str]:
    """A migrated PostgreSQL database of this module's own, on the stack's server."""
    with own_postgres_database(request, "ws_replicas") as url:
        yield url


@pytest.fixture(scope="module")
def replicas(replica_database: str, redis_url: str) -> Iterator[list[DaphneProcess]]:
    """Two gateway processes, as two replicas behind a load balancer would be."""
    redis.Redis.from_url(redis_url).flushdb()  # no client counts of earlier runs
    env = process_env(DATABASE_URL=replica_database, REDIS_URL=redis_url)
    with DaphneProcess(env=env) as first, DaphneProcess(env=env) as second:
        yield [first, second]


async def test_a_job_posted_to_one_replica_reaches_clients_on_both_at_once(
    replicas: list[DaphneProcess], http: httpx.AsyncClient
) -> None:
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(ws_connect(r.ws_url)) for r in replicas
        ]
        for client in clients:
            await hello(client)
        # A first job through each process warms it up (database connections,
        # threads), untimed.
        for origin in replicas:
            warm_up = await post_job(http, origin.base_url)
            for client in clients:
                assert await next_job(client) == warm_up
        latencies: list[float] = []
        for origin in replicas * 2:
            receipts = [asyncio.create_task(_timed(next_job(c))) for c in clients]
            started = time.monotonic()
            job = await post_job(http, origin.base_url)
            for received, at in await asyncio.gather(*receipts):
                assert received == job
                latencies.append(at - started)
    assert max(latencies) < FANOUT_DEADLINE, sorted(latencies)


async def _timed(
    receipt: Awaitable[dict[str, Any]],
) -> tuple[dict[str, Any], float]:
    job = await receipt
    return job, time.monotonic()


async def test_many_clients_on_both_replicas_each_get_every_job_once(
    replicas: list[DaphneProcess], http: httpx.AsyncClient
) -> None:
    clients_per_replica, jobs = 25, 100
    async with AsyncExitStack() as stack:
        connections = await asyncio.gather(
            *(
                stack.enter_async_context(ws_connect(replica.ws_url))
                for replica in replicas
                for _ in range(clients_per_replica)
            )
        )
        await asyncio.gather(*(hello(c) for c in connections))
        # Each hello came after its count was written: both replicas see all.
        for replica in replicas:
            counts = await ws_clients(http, replica.base_url)
            assert counts == {
                "process": clients_per_replica,
                "total": len(connections),
            }

        limit = asyncio.Semaphore(10)

        async def post(n: int) -> int:
            async with limit:
                job = await post_job(http, replicas[n % 2].base_url)
            job_id: int = job["id"]
            return job_id

        posted = await asyncio.gather(*(post(n) for n in range(jobs)))
        # Posted after every broadcast above: whatever arrives before it is
        # everything a client was ever going to get of those jobs.
        sentinel = (await post_job(http, replicas[0].base_url))["id"]

        async def collect(client: ClientConnection) -> list[int]:
            ids: list[int] = []
            while (job_id := (await next_job(client))["id"]) != sentinel:
                ids.append(job_id)
            return ids

        async with asyncio.timeout(30):
            received = await asyncio.gather(*(collect(c) for c in connections))
    for ids in received:
        assert sorted(ids) == sorted(posted)


# --- A client that never reads ----------------------------------------------------


def _stalled_client(host: str, port: int) -> socket.socket:
    """Open /ws with a raw socket and a tiny receive buffer, then never read again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect((host, port))
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nX-API-KEY: {API_KEY}\r\n\r\n"
        ).encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


@pytest.mark.backends
async def test_live_frames_are_framed_once_not_sent_through_asgi_per_client(
    transactional_db: None, http: httpx.AsyncClient
) -> None:
    # daphne logs at debug every frame an application sends through ASGI's
    # send; job frames go to each connection framed once for all of them
    # (gateway_project.server's prepared frames), in order with the rest.
    sent_through_asgi = "Sent WebSocket packet to client"
    with DaphneProcess(env=process_env(LOG_LEVEL="DEBUG")) as server:
        early = await post_job(http, server.base_url)
        async with (
            ws_connect(server.ws_url) as live,
            ws_connect(server.ws_url, "?since=0") as replayed,
        ):
            await hello(live)
            await hello(replayed)
            assert await next_job(replayed) == early  # a replay: through ASGI
            jobs = [await post_job(http, server.base_url) for _ in range(3)]
            for client in (live, replayed):
                assert [await next_job(client) for _ in jobs] == jobs
        output = server.output()
    assert output.count(sent_through_asgi) == 3, output  # two hellos, one replay


@pytest.mark.backends
async def test_frames_a_full_socket_held_back_arrive_whole_in_order_once(
    transactional_db: None, http: httpx.AsyncClient
) -> None:
    # The client stops reading: its receive window and the server's send
    # buffer (up to 4 MB) fill, and the server's writes go partly, then not at
    # all, to the socket, the rest through Twisted's buffer (gateway_project.server).
    # Once it reads again, every frame arrives whole, in order, once.
    padding = {f"f{n}": "x" * 5000 for n in range(100)}  # about 500 KB a job
    env = process_env(MAX_JOB_BYTES=str(1024 * 1024))
    with DaphneProcess(env=env) as server:
        async with connect(
            f"{server.ws_url}/ws",
            additional_headers={"X-API-KEY": API_KEY},
            compression=None,
            proxy=None,
            max_queue=1,  # stop reading from the socket past one frame
            max_size=None,
        ) as client:
            await hello(client)
            posted = [
                await post_job(http, server.base_url, fields=padding)
                for _ in range(16)  # 8 MB: past both buffers
            ]
            received = [await next_job(client) for _ in posted]
            assert received == posted
            with pytest.raises(TimeoutError):
                await next_job(client, timeout=0.5)  # and nothing twice


@pytest.mark.backends
async def test_a_client_that_never_reads_neither_delays_others_nor_stays(
    transactional_db: None, http: httpx.AsyncClient
) -> None:
    # Daphne pings every second (its timer looks every 2 s) and drops a client
    # that has not answered within 2 s: the only bound on what a stalled client
    # buffers, as nothing in the ASGI interface pushes back on a send.
    args = ["--ping-interval", "1", "--ping-timeout", "2"]
    with DaphneProcess(env=process_env(), extra_args=args) as server:
        stalled = await asyncio.to_thread(_stalled_client, LOOPBACK, server.port)
        try:
            async with ws_connect(server.ws_url) as healthy:
                await hello(healthy)
                assert (await ws_clients(http, server.base_url))["process"] == 2
                padding = {f"f{n}": "x" * 500 for n in range(16)}
                for _ in range(60):
                    started = time.monotonic()
                    job = await post_job(http, server.base_url, fields=padding)
                    assert await next_job(healthy, timeout=5) == job
                    assert time.monotonic() - started < 5
                # Dropped by the ping timeout; the healthy client, which
                # answers pings, stays.
                deadline = time.monotonic() + 10
                while (count := await ws_clients(http, server.base_url))["process"] > 1:
                    assert time.monotonic() < deadline, "the stalled client stayed"
                    await asyncio.sleep(0.1)
                assert count["process"] == 1, server.output()
                job = await post_job(http, server.base_url)
                assert await next_job(healthy) == job
        finally:
            stalled.close()
