"""Fault tests through real processes: what is promised when a part dies.

Each test runs real traffic against a real daphne, kills one part with
SIGKILL (Redis, PostgreSQL, daphne itself, the poller), brings it back, and
then accounts for every job. What each did and checked is printed (``pytest
-s`` shows it); docs/reliability.md lists the tests and the guarantees.

Publishers and workers are plain signed HTTP clients (httpx). Nothing waits on
a sleep: each step polls its condition against a deadline. Processes are killed
and started from a thread, so the clients keep running through the fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from asgiref.sync import sync_to_async

from gateway_client.signing import signed_headers
from jobs.models import Job
from jobs.queues import CLAIMING_KEY, QUEUE_KEY
from testkit.servers import REPO_ROOT, DaphneProcess, PostgresServer, RedisServer
from tests.conftest import LiveGateway, database_url, process_env
from tests.stack import API_KEY, HMAC_SECRET
from tests.test_runpoller import (
    CHANNEL,
    FakeDiscordProcess,
    job_embed,
    poller_env,
    poller_process,
    start_fake_discord,
)

pytestmark = pytest.mark.processes

WORKERS = 3
# Long polls short enough that a worker notices a stop quickly.
WORKER_WAIT = 0.5
STEP_DEADLINE = 20.0
# The Redis queue's claim timeout in these tests: a claim cut off by a kill is
# put back within the test (the claims look for them every 5 s).
CLAIM_TIMEOUT = "2"
PUT_BACK = "whose claim never finished"


@pytest.fixture(autouse=True)
def _quiet_http_clients() -> Iterator[None]:
    """httpx logs each request at INFO: thousands of lines that hide the account."""
    logger = logging.getLogger("httpx")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def report(test: str, line: str) -> None:
    """One line of the test's account, in CI output too (``-s`` or on failure)."""
    print(f"[{test}] {line}", flush=True)


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    timeout: float = STEP_DEADLINE,
) -> float:
    """Poll ``condition`` (plain or async) until it holds; return the seconds."""
    started = time.monotonic()
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(0.02)


def assert_unavailable(response: httpx.Response) -> None:
    """A 503 in the contract's shape, with Retry-After."""
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable", response.text
    assert set(response.json()) == {"error", "detail"}
    assert int(response.headers["Retry-After"]) >= 1


# --- Traffic: publishers and pulling workers -------------------------------------


@dataclass
class Traffic:
    """Signed publishers and workers against one gateway, and what they saw."""

    base_url: str
    label: str
    acknowledged: dict[str, int] = field(default_factory=dict)  # job_id -> id
    refused: list[str] = field(default_factory=list)  # answered 503
    uncertain: set[str] = field(default_factory=set)  # no answer at all
    received: list[dict[str, Any]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    publishing: bool = True
    pulling: bool = True
    # Set once no job will be published any more (retries included); then
    # the workers that got a 204 to a request sent after that.
    finished: bool = False
    empty_seen_by: set[str] = field(default_factory=set)
    _next: int = 0

    def received_job_ids(self) -> list[str]:
        return [job["job_id"] for job in self.received]

    async def publish_one(self, client: httpx.AsyncClient, job_id: str) -> None:
        headers = signed_headers(API_KEY, HMAC_SECRET)
        try:
            response = await client.post(
                "/job", json={"job_id": job_id, "ttl": 600}, headers=headers
            )
        except httpx.TransportError:
            self.uncertain.add(job_id)
            self.outcomes["publish: no answer"] += 1
            return
        self.outcomes[f"publish: {response.status_code}"] += 1
        if response.status_code == 201:
            self.acknowledged[job_id] = response.json()["job"]["id"]
            self.uncertain.discard(job_id)
        elif response.status_code == 503:
            assert_unavailable(response)
            self.refused.append(job_id)
        else:
            raise AssertionError(f"POST /job {job_id}: {response.text}")

    async def publisher(self, client: httpx.AsyncClient) -> None:
        while self.publishing:
            job_id = f"{self.label}-{self._next}"
            self._next += 1
            await self.publish_one(client, job_id)
            await asyncio.sleep(0.01)  # pacing, about 100 jobs a second at most

    async def worker(self, client: httpx.AsyncClient, name: str) -> None:
        while self.pulling:
            after_publishing = self.finished
            headers = signed_headers(API_KEY, HMAC_SECRET)
            try:
                response = await client.get(
                    "/job/next", params={"wait": WORKER_WAIT}, headers=headers
                )
            except httpx.TransportError:
                self.outcomes["pull: no answer"] += 1
                await asyncio.sleep(0.05)  # back off while the gateway is away
                continue
            self.outcomes[f"pull: {response.status_code}"] += 1
            if response.status_code == 200:
                self.received.append(response.json()["job"])
            elif response.status_code == 503:
                assert_unavailable(response)
            elif response.status_code == 204:
                if after_publishing:
                    self.empty_seen_by.add(name)
            else:
                raise AssertionError(f"GET /job/next: {response.text}")

    async def drained(self) -> float:
        """Wait until every worker found the queue empty after publishing ended.

        Each worker pulls one request at a time, so once each has had a 204
        to a request sent after the last publish, no job is left to hand out
        and none is on its way to a worker.
        """
        self.publishing = False
        self.finished = True
        return await until(
            lambda: len(self.empty_seen_by) == WORKERS, "the queue drained"
        )

    def summary(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in sorted(self.outcomes.items()))


@asynccontextmanager
async def running(traffic: Traffic) -> AsyncIterator[httpx.AsyncClient]:
    """Publisher and workers run inside the block; stopped (and checked) after."""
    async with httpx.AsyncClient(base_url=traffic.base_url, timeout=10) as client:
        tasks = [asyncio.create_task(traffic.publisher(client))]
        tasks += [
            asyncio.create_task(traffic.worker(client, f"w{n}")) for n in range(WORKERS)
        ]
        try:
            yield client
        finally:
            traffic.publishing = traffic.pulling = False
            done = await asyncio.gather(*tasks, return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result


async def retry_refused(traffic: Traffic, client: httpx.AsyncClient) -> int:
    """Send every refused job again: each must be new (201), never a duplicate.

    A 503 promises that nothing was written; a half-written job would come
    back as ``200 duplicate`` here.
    """
    refused = sorted(set(traffic.refused) - set(traffic.acknowledged))
    for job_id in refused:
        await traffic.publish_one(client, job_id)
        assert job_id in traffic.acknowledged, f"{job_id} was half-written"
    return len(refused)


async def through_an_outage(
    test: str,
    traffic: Traffic,
    client: httpx.AsyncClient,
    what: str,
    server: RedisServer | PostgresServer,
    restarted_as: str,
) -> None:
    """Traffic before, during and after ``server`` is SIGKILLed and restarted.

    Checks the 503s while it is down and the recovery after, re-sends what was
    refused, and waits until every acknowledged job is pulled; reports each step.
    """
    await until(
        lambda: len(traffic.acknowledged) >= 30 and len(traffic.received) >= 10,
        "traffic flowing before the fault",
    )
    before = len(traffic.acknowledged)
    await asyncio.to_thread(server.kill)
    report(test, f"SIGKILLed {what} after {before} jobs were acknowledged")
    await until(
        lambda: len(traffic.refused) >= 3 and traffic.outcomes["pull: 503"] >= 3,
        f"503s for publishers and workers while {what} is down",
    )
    report(
        test,
        f"while down: {len(traffic.refused)} POST /job and "
        f"{traffic.outcomes['pull: 503']} GET /job/next answered "
        "503 unavailable (contract shape, Retry-After)",
    )
    await asyncio.to_thread(server.start)
    restarted = len(traffic.acknowledged)
    took = await until(
        lambda: len(traffic.acknowledged) >= restarted + 30,
        "publishing again after the restart",
    )
    report(
        test,
        f"restarted {restarted_as}; 30 more jobs acknowledged {took:.2f} s later",
    )
    traffic.publishing = False
    retried = await retry_refused(traffic, client)
    report(test, f"re-sent the {retried} refused jobs: each 201, none 200")
    await traffic.drained()


async def drain_put_back(test: str, traffic: Traffic) -> None:
    """Keep the workers pulling until no acknowledged job is left ``queued``."""
    ids = sorted(traffic.acknowledged.values())

    async def none_queued() -> bool:
        return "queued" not in (await statuses(ids)).values()

    took = await until(none_queued, "every cut-off claim put back", timeout=40)
    traffic.empty_seen_by.clear()
    await traffic.drained()
    left = await statuses(ids)
    cut_off = [pk for pk in ids if pk not in {job["id"] for job in traffic.received}]
    report(
        test,
        f"no acknowledged job left queued {took:.1f} s after the drain; "
        f"{len(cut_off)} not received (statuses: "
        f"{sorted({left[pk] for pk in cut_off}) or '-'})",
    )


def put_back(gateway: DaphneProcess) -> int:
    """How many jobs the gateway's claims put back, by its log."""
    return sum(
        int(line.split("put back ", 1)[1].split()[0])
        for line in gateway.output().splitlines()
        if PUT_BACK in line
    )


async def statuses(ids: list[int]) -> dict[int, str]:
    rows = await sync_to_async(
        lambda: dict(Job.objects.filter(pk__in=ids).values_list("pk", "status"))
    )()
    return rows


def account(
    test: str, traffic: Traffic, table: dict[int, str], stranded_as: set[str]
) -> dict[int, str]:
    """Check what the workers received against what was acknowledged.

    No job is handed out twice and none is invented. An acknowledged job not
    received must be one a claim took from the queue just as the fault struck
    (its answer died with the connection): it is never handed out again, and
    its status in the table (``table``: id -> status) is one of
    ``stranded_as``. There can be at most one per worker. Returns those.
    """
    ids = [job["id"] for job in traffic.received]
    twice = [pk for pk, n in Counter(ids).items() if n > 1]
    assert not twice, f"handed out twice: {twice}"
    known = set(traffic.acknowledged) | traffic.uncertain
    phantom = set(traffic.received_job_ids()) - known
    assert not phantom, f"never published: {sorted(phantom)[:5]}"
    got = set(ids)
    stranded = {pk: table[pk] for pk in traffic.acknowledged.values() if pk not in got}
    assert set(stranded.values()) <= stranded_as, stranded
    assert len(stranded) <= WORKERS, stranded
    report(test, traffic.summary())
    report(
        test,
        f"checked: {len(traffic.acknowledged)} acknowledged (201); "
        f"{len(traffic.acknowledged) - len(stranded)} delivered exactly once; "
        f"{len(stranded)} taken by a claim the fault cut off, never handed out "
        f"again (status: {', '.join(sorted(set(stranded.values()))) or '-'}); "
        "0 handed out twice",
    )
    return stranded


# --- Redis --------------------------------------------------------------------------


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, persisting as docs/deploy.md asks."""
    reason = RedisServer.unavailable_reason()
    if reason:
        pytest.fail(reason)
    with RedisServer(extra_args=RedisServer.APPEND_ONLY) as server:
        yield server


@pytest.mark.backends
async def test_redis_killed_and_restarted(
    transactional_db: None, aof_redis: RedisServer
) -> None:
    test = "redis fault"
    env = process_env(
        REDIS_URL=aof_redis.url,
        QUEUE_BACKEND="redis",
        CLAIM_TIMEOUT_SECONDS=CLAIM_TIMEOUT,
    )
    with DaphneProcess(env=env) as gateway:
        traffic = Traffic(gateway.base_url, "redis")
        async with running(traffic) as client:
            await through_an_outage(
                test,
                traffic,
                client,
                "Redis",
                aof_redis,
                f"Redis on port {aof_redis.port} (append-only file replayed)",
            )
            # A claim whose pop Redis persisted but whose reply died with it
            # left its note: the job is put back after the claim timeout.
            await drain_put_back(test, traffic)
        stranded = account(
            test,
            traffic,
            await statuses(sorted(traffic.acknowledged.values())),
            # Claimed if the kill came after the table's update; never
            # queued: such a claim was put back and handed out.
            stranded_as={"claimed"},
        )
        report(test, f"{put_back(gateway)} claim(s) cut off by the kill put back")
        depth = await asyncio.to_thread(
            lambda: redis.Redis.from_url(aof_redis.url).llen(QUEUE_KEY)
        )
        assert depth == 0, depth
    report(
        test,
        f"checked: the Redis queue is empty; {len(stranded)} lost to the "
        "claim window, 0 acknowledged jobs lost by the restart itself",
    )


# --- PostgreSQL ---------------------------------------------------------------------


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[tuple[PostgresServer, str]]:
    """A PostgreSQL of this test's own, migrated, that the test may kill."""
    reason = PostgresServer.unavailable_reason()
    if reason:
        pytest.fail(reason)
    with PostgresServer() as server:
        url = server.create_database("faults")
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v0"],
            cwd=REPO_ROOT,
            env={**os.environ, "DATABASE_URL": url, "REDIS_URL": ""},
            check=True,
            timeout=120,
        )
        yield server, url


async def read_statuses(url: str, ids: list[int]) -> dict[int, str]:
    """Job statuses straight from the test's own PostgreSQL."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cursor = await conn.execute(
            "SELECT id, status FROM jobs_job WHERE id = ANY(%s)", [ids]
        )
        rows = await cursor.fetchall()
    return {pk: status for pk, status in rows}


async def test_postgresql_killed_and_restarted(
    own_postgres: tuple[PostgresServer, str],
) -> None:
    test = "postgresql fault"
    server, url = own_postgres
    # The database queue, and no Redis at all: PostgreSQL is the only store.
    env = process_env(DATABASE_URL=url, REDIS_URL="", QUEUE_BACKEND="database")
    with DaphneProcess(env=env) as gateway:
        traffic = Traffic(gateway.base_url, "pg")
        async with running(traffic) as client:
            await through_an_outage(
                test,
                traffic,
                client,
                "PostgreSQL",
                server,
                f"PostgreSQL on port {server.port} (crash recovery)",
            )
    ids = sorted(traffic.acknowledged.values())
    table = await read_statuses(url, ids)
    # The claim commits before its answer is sent: a commit that reached the
    # disk with a reply that died with the server leaves the job "claimed".
    account(test, traffic, table, stranded_as={"claimed"})
    assert "queued" not in table.values(), table


# --- daphne SIGKILLed during a drain ---------------------------------------------


@pytest.fixture(params=["database", "redis"])
def drain_env(request: pytest.FixtureRequest, transactional_db: None) -> dict[str, str]:
    """A gateway environment per queue backend, on the test database."""
    if request.param == "redis":
        url: str = request.getfixturevalue("clean_redis")
        return process_env(
            REDIS_URL=url, QUEUE_BACKEND="redis", CLAIM_TIMEOUT_SECONDS=CLAIM_TIMEOUT
        )
    return process_env(REDIS_URL="", QUEUE_BACKEND="database")


@pytest.mark.backends
async def test_daphne_killed_during_a_drain(drain_env: dict[str, str]) -> None:
    backend = drain_env["QUEUE_BACKEND"]
    test = f"daphne fault, {backend} queue"
    total = 200
    with DaphneProcess(env=drain_env) as gateway:
        traffic = Traffic(gateway.base_url, "drain")
        traffic.publishing = False  # all published up front
        async with httpx.AsyncClient(base_url=gateway.base_url) as client:
            for n in range(total):
                await traffic.publish_one(client, f"drain-{n}")
        assert len(traffic.acknowledged) == total
        report(test, f"queued {total} jobs (each 201)")
        async with running(traffic):
            await until(lambda: len(traffic.received) >= total // 4, "a quarter out")
            in_hand = len(traffic.received)
            await asyncio.to_thread(gateway.kill)
            report(test, f"SIGKILLed daphne with {in_hand} jobs received by workers")
            await asyncio.to_thread(gateway.start)
            report(test, f"restarted daphne on port {gateway.port}")
            await traffic.drained()
            if backend == "redis":
                # Popped by Redis before the table recorded the claim: put
                # back after the claim timeout, and handed out then.
                await drain_put_back(test, traffic)
                report(test, f"{put_back(gateway)} cut-off claim(s) put back")
        assert len(traffic.received) > in_hand, "nothing drained after the restart"
    # A job leaves the queue (the claim commits, or Redis pops it) before its
    # answer is written: one whose answer died with the process after the
    # table recorded its claim is never handed out again. It shows "claimed";
    # the admin lists it and can requeue it.
    table = await statuses(sorted(traffic.acknowledged.values()))
    account(test, traffic, table, stranded_as={"claimed"})


@contextlib.contextmanager
def table_write_blocked(pk: int) -> Iterator[None]:
    """Hold a lock that stops any other writer of job ``pk``'s row until the end."""
    url = database_url()
    if url.startswith("sqlite:///"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")  # the one writer's lock
            yield
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        return
    with psycopg.connect(url) as pg:
        pg.execute("SELECT id FROM jobs_job WHERE id = %s FOR UPDATE", [pk])
        yield
        # A killed client's statement waiting for the lock would otherwise
        # still run, in its server process, once the lock is gone.
        pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND wait_event_type = 'Lock'"
        )
        pg.rollback()


@pytest.mark.backends
async def test_a_redis_claim_cut_off_by_a_kill_is_put_back(
    transactional_db: None, clean_redis: str
) -> None:
    """The kill lands between Redis's pop and the table's record, every time.

    The table's write of the claim is held up by a lock the test holds, so
    the claim has popped the job and noted it when daphne is SIGKILLed. After
    the restart, a claim puts it back once the claim timeout has passed, and
    it is handed out once.
    """
    test = "redis claim cut off"
    env = process_env(
        REDIS_URL=clean_redis,
        QUEUE_BACKEND="redis",
        CLAIM_TIMEOUT_SECONDS=CLAIM_TIMEOUT,
    )
    store = redis.Redis.from_url(clean_redis)
    with DaphneProcess(env=env) as gateway:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as client:
            headers = signed_headers(API_KEY, HMAC_SECRET)
            posted = await client.post(
                "/job", json={"job_id": "cut-off"}, headers=headers
            )
            assert posted.status_code == 201, posted.text
            pk = posted.json()["job"]["id"]
            with table_write_blocked(pk):
                claim = asyncio.create_task(
                    client.get(
                        "/job/next", headers=signed_headers(API_KEY, HMAC_SECRET)
                    )
                )
                await until(lambda: store.zcard(CLAIMING_KEY) == 1, "the pop noted")
                assert store.llen(QUEUE_KEY) == 0
                await asyncio.to_thread(gateway.kill)
                report(test, "SIGKILLed daphne between the pop and the table's record")
            with pytest.raises(httpx.TransportError):
                await claim
            assert (await statuses([pk])) == {pk: "queued"}
            await asyncio.to_thread(gateway.start)
            got: list[dict[str, Any]] = []

            async def handed_out() -> bool:
                response = await client.get(
                    "/job/next",
                    params={"wait": 1},
                    headers=signed_headers(API_KEY, HMAC_SECRET),
                )
                if response.status_code == 200:
                    got.append(response.json()["job"])
                return bool(got)

            took = await until(handed_out, "the cut-off claim put back", timeout=40)
            again = await client.get(
                "/job/next", headers=signed_headers(API_KEY, HMAC_SECRET)
            )
            assert again.status_code == 204, again.text
        assert put_back(gateway) == 1, "the log says no claim was put back"
    assert [job["id"] for job in got] == [pk]
    assert (await statuses([pk])) == {pk: "claimed"}
    assert store.zcard(CLAIMING_KEY) == 0 and store.llen(QUEUE_KEY) == 0
    report(
        test,
        f"put back and handed out once {took:.1f} s after the restart "
        f"(claim timeout {CLAIM_TIMEOUT} s); the Redis list and notes empty",
    )


# --- The poller SIGKILLed mid-burst ------------------------------------------------


@pytest.fixture
def fake_discord() -> Iterator[FakeDiscordProcess]:
    fake = start_fake_discord()
    try:
        yield fake
    finally:
        fake.process.close()


async def discord_jobs() -> dict[str, int]:
    """message_id -> how many jobs the gateway holds for it."""
    rows = await sync_to_async(
        lambda: list(
            Job.objects.filter(source="discord").values_list("message_id", flat=True)
        )
    )()
    return dict(Counter(str(message_id) for message_id in rows))


@pytest.mark.backends
async def test_poller_killed_and_restarted_mid_burst(
    live_gateway: LiveGateway, fake_discord: FakeDiscordProcess
) -> None:
    test = "poller fault"
    burst = 60
    env = poller_env(fake_discord, live_gateway.base_url)
    posted: list[str] = []
    jobs: dict[str, int] = {}

    async def post_burst() -> None:
        for n in range(burst):
            message = await asyncio.to_thread(
                fake_discord.post, CHANNEL, embeds=job_embed(f"burst-{n}")
            )
            posted.append(message["id"])
            await asyncio.sleep(0.02)  # pacing: a burst over about two seconds

    async def published_at_least(count: int) -> bool:
        jobs.clear()
        jobs.update(await discord_jobs())
        return len(jobs) >= count

    poller = poller_process(env)
    with poller:
        poster = asyncio.create_task(post_burst())
        await until(lambda: published_at_least(10), "10 messages became jobs")
        await asyncio.to_thread(poller.kill)
        report(
            test,
            f"SIGKILLed the poller mid-burst: {len(jobs)} jobs published of "
            f"{len(posted)} messages posted so far",
        )
        await until(lambda: len(posted) >= 2 * burst // 3, "more messages posted")
        await asyncio.to_thread(poller.start)
        report(
            test,
            f"restarted the poller with {len(posted)} messages posted; it re-reads "
            "the channel back to JOB_TTL_SECONDS",
        )
        await poster
        await until(lambda: published_at_least(burst), f"{burst} jobs")
    assert sorted(jobs) == sorted(posted), "a message without a job, or the reverse"
    twice = {message: n for message, n in jobs.items() if n != 1}
    assert not twice, twice
    rows = await sync_to_async(
        lambda: list(
            Job.objects.filter(source="discord").values_list("job_id", flat=True)
        )
    )()
    assert sorted(rows) == sorted(f"burst-{n}" for n in range(burst))

    # The gateway's access log: no message created twice (201); what the
    # restarted poller sent again was answered as a duplicate (200). A POST in
    # flight when the poller died created its job without a logged answer
    # (daphne logs a reply only to a client still connected), and the re-send
    # of it was a duplicate; so 201s and 200s together cover every message.
    def answers() -> tuple[int, int]:
        log = live_gateway.process.output()
        return log.count("POST /job 201 "), log.count("POST /job 200 ")

    await until(lambda: sum(answers()) >= burst, f"{burst} answers logged")
    created, duplicates = answers()
    assert burst - 1 <= created <= burst, created
    report(
        test,
        f"checked: {burst} messages, {len(rows)} jobs, exactly one per message; "
        f"POST /job answered 201 x{created} and 200 duplicate x{duplicates} "
        "(the restarted poller re-sent what it had already published)",
    )
