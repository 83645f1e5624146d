"""The FIFO queue, two backends with one behaviour.

Each job is handed to exactly one caller, oldest first, and an expired job is
never handed out. ``database`` keeps the queue in the job table itself (the
default); ``redis`` keeps the jobs in a Redis list, as the seed service did,
and still records claims in the table for the admin (a claim cut off between
the two is put back: ``CLAIMING_KEY``).

A claim with a filter (docs/filters.md) takes the oldest job that matches,
never another: it reads the queue oldest first, in batches, tests each job in
Python, and takes the first match with a conditional write that only one
claimer can win. Its cost grows with the jobs it reads before the match; a
claim without a filter is the one-statement claim, unchanged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, Protocol

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import Case, F, When
from django.utils import timezone

from jobs import metrics, redis_clients, wakeups
from jobs.db import in_db_thread
from jobs.filters import JobFilter
from jobs.models import Job

logger = logging.getLogger(__name__)

QUEUE_KEY = "gateway:queue"
# Entries a claim has taken from the Redis list and not yet settled in the
# table, scored by when. A process that dies in between (or a reply lost with
# Redis) leaves its entry here, and the next claim of any process puts it back
# at the head once it is older than CLAIM_TIMEOUT_SECONDS and the table still
# holds the job as queued. The table's conditional write keeps that exactly
# once even if the first claim was only slow: whichever records first wins.
CLAIMING_KEY = "gateway:claiming"
RESTORE_EVERY_SECONDS = 5.0
# Jobs a filtered claim reads at a time, from the table or the Redis list.
SCAN_BATCH = 500


def claim_timeout() -> float:
    """Seconds before a Redis claim that never finished is put back."""
    return float(settings.CLAIM_TIMEOUT_SECONDS)


@dataclass(frozen=True)
class Lease:
    """A lease asked for with a claim (jobs.leases): its token and its end.

    ``until`` is the asked end; the table keeps the earlier of it and the
    job's own expiry, so that a lease never outlives its job.
    """

    token: str
    until: datetime


class Queue(Protocol):
    name: str

    def enqueue(self, job: Job) -> None:
        """Make a committed job claimable; raise if that failed."""

    async def claim(
        self,
        claimer: str,
        job_filter: JobFilter | None = None,
        lease: Lease | None = None,
    ) -> dict[str, Any] | None:
        """Hand the oldest unexpired job (that ``job_filter`` matches) or None.

        With ``lease`` the job is recorded as leased under it, not claimed.
        """

    async def depth(self) -> int:
        """How many jobs wait (expired ones may be counted until swept)."""

    async def release(self, job: dict[str, Any]) -> None:
        """Put a claimed job back at the head of the queue (its answer was lost)."""


class DatabaseQueue:
    """The job table is the queue: queued rows, claimed oldest first."""

    name = "database"

    def enqueue(self, job: Job) -> None:
        # A stored job with status "queued" is already in the queue.
        pass

    async def claim(
        self,
        claimer: str,
        job_filter: JobFilter | None = None,
        lease: Lease | None = None,
    ) -> dict[str, Any] | None:
        if not _maybe_queued():
            return None
        if job_filter is None or job_filter.is_empty:
            return await _claim_from_table(claimer, lease)
        return await _claim_matching_from_table(claimer, job_filter, lease)

    async def depth(self) -> int:
        return await _count_queued()

    async def release(self, job: dict[str, Any]) -> None:
        # Its id puts it back at the head: the queue is ordered by id.
        await _unclaim(job["id"])


# One statement claims the oldest unexpired queued job: atomic on its own, so
# no transaction is held open between a SELECT and an UPDATE. On PostgreSQL
# SKIP LOCKED lets concurrent claimers pass each other instead of queueing.
# The first claim is also the job's first delivery, unless a WebSocket client
# had it earlier (jobs.deliveries).
_CLAIM_SQL = """
UPDATE jobs_job SET status = %s, claimed_at = %s, claimed_by = %s,
    delivered_at = COALESCE(delivered_at, %s){lease}
WHERE id = (
    SELECT id FROM jobs_job
    WHERE status = %s AND expires_at > %s
    ORDER BY id LIMIT 1 {lock}
)
RETURNING *
"""
# A leased claim also writes its lease, ending at the job's expiry at the latest.
_LEASE_SET_SQL = """,
    lease_token = %s,
    lease_expires_at = CASE WHEN expires_at < %s THEN expires_at ELSE %s END"""


def _lease_sql(lease: Lease | None) -> tuple[str, str, list[Any]]:
    """The status, the SET clause and its parameters for a claim."""
    if lease is None:
        return Job.Status.CLAIMED, "", []
    until = connection.ops.adapt_datetimefield_value(lease.until)
    return Job.Status.LEASED, _LEASE_SET_SQL, [lease.token, until, until]


# Written out: the ORM's exists() cost a third of a claim's CPU to build.
_ANY_QUEUED_SQL = "SELECT 1 FROM jobs_job WHERE status = %s LIMIT 1"
SWEEP_INTERVAL_SECONDS = 1.0

# SQLite has one writer at a time. Threads of this process wait for it on a
# mutex, which wakes them at once, rather than in SQLite's busy handler,
# which sleeps for up to 100 ms between tries.
_sqlite_writer = threading.Lock()
_last_sweep = 0.0


@contextlib.contextmanager
def table_writer() -> Iterator[None]:
    """Hold this process's SQLite writer mutex around a write (none elsewhere)."""
    if connection.vendor == "sqlite":
        with _sqlite_writer:
            yield
    else:
        yield


_peeks: dict[str, sqlite3.Connection] = {}
_peeks_lock = threading.Lock()


def _maybe_queued() -> bool:
    """False only when SQLite says for sure that no job is queued.

    Runs on the event loop, not in a worker thread: reading one entry of the
    queued-jobs index takes microseconds, and in WAL mode no writer blocks it.
    The thread hop it saves was most of an empty poll's cost. PostgreSQL (a
    network round trip) always takes the worker-thread path. The settings come
    from the connection handler, not a connection: on the event loop each
    request is a context of its own, where ``connections["default"]`` would
    build a connection object per request, a reference cycle left to the
    garbage collector.
    """
    params = connections.settings[DEFAULT_DB_ALIAS]
    if params["ENGINE"] != "django.db.backends.sqlite3":
        return True
    name = str(params["NAME"])
    with _peeks_lock:
        try:
            peek = _peeks.get(name)
            if peek is None:
                peek = _peeks[name] = sqlite3.connect(name, check_same_thread=False)
            row = peek.execute(
                "SELECT 1 FROM jobs_job WHERE status = 'queued' LIMIT 1"
            ).fetchone()
        except sqlite3.Error:
            return True  # let the ORM path decide, and report any error
    return row is not None


@in_db_thread
def _claim_from_table(claimer: str, lease: Lease | None) -> dict[str, Any] | None:
    now = timezone.now()
    _sweep_now_and_then(now)
    if connection.vendor == "sqlite":
        # A lock-free look first: an empty queue never waits for the writer.
        with connection.cursor() as cursor:
            cursor.execute(_ANY_QUEUED_SQL, [Job.Status.QUEUED])
            if cursor.fetchone() is None:
                return None
        with _sqlite_writer:
            return _claim_one(now, claimer, "", lease)
    return _claim_one(now, claimer, "FOR UPDATE SKIP LOCKED", lease)


def _claim_one(
    now: datetime, claimer: str, lock: str, lease: Lease | None
) -> dict[str, Any] | None:
    status, lease_set, lease_params = _lease_sql(lease)
    params = [
        status,
        now,
        claimer if claimer != "unknown" else None,
        now,
        *lease_params,
        Job.Status.QUEUED,
        now,
    ]
    sql = _CLAIM_SQL.format(lock=lock, lease=lease_set)
    with transaction.atomic():
        claimed = list(Job.objects.raw(sql, params))
    return claimed[0].to_wire() if claimed else None


# The filtered claim's write: this one job, if it is still queued. On
# PostgreSQL SKIP LOCKED makes a claimer that meets another's claim in progress
# move on at once (it would lose anyway) instead of waiting for its commit.
_CLAIM_ONE_SQL = """
UPDATE jobs_job SET status = %s, claimed_at = %s, claimed_by = %s,
    delivered_at = COALESCE(delivered_at, %s){lease}
WHERE id = (
    SELECT id FROM jobs_job
    WHERE id = %s AND status = %s AND expires_at > %s {lock}
)
RETURNING *
"""
# A numbers-only filter needs neither the title nor the fields decoded.
_SCANNED = ("id", "channel", "numbers")
_SCANNED_WITH_TEXT = (*_SCANNED, "title", "fields")


@in_db_thread
def _claim_matching_from_table(
    claimer: str, job_filter: JobFilter, lease: Lease | None
) -> dict[str, Any] | None:
    now = timezone.now()
    _sweep_now_and_then(now)
    sqlite = connection.vendor == "sqlite"
    lock = "" if sqlite else "FOR UPDATE SKIP LOCKED"
    queued = Job.objects.filter(status=Job.Status.QUEUED, expires_at__gt=now)
    if job_filter.channels is not None:
        queued = queued.filter(channel__in=job_filter.channels)
    columns = _SCANNED_WITH_TEXT if job_filter.reads_text else _SCANNED
    after = 0
    while True:
        # Keyset pages on the queued-jobs index: each read starts where the
        # last one ended, so a deep queue is read once, not once per page.
        page = queued.filter(id__gt=after).order_by("id").values(*columns)
        batch = list(page[:SCAN_BATCH])
        for row in batch:
            if not job_filter.matches(row):
                continue
            if sqlite:
                with _sqlite_writer:
                    claimed = _claim_by_id(row["id"], now, claimer, lock, lease)
            else:
                claimed = _claim_by_id(row["id"], now, claimer, lock, lease)
            if claimed is not None:
                return claimed
            # Another claimer took it since the read: the next match, then.
        if len(batch) < SCAN_BATCH:
            return None
        after = batch[-1]["id"]


def _claim_by_id(
    pk: int, now: datetime, claimer: str, lock: str, lease: Lease | None
) -> dict[str, Any] | None:
    status, lease_set, lease_params = _lease_sql(lease)
    params = [
        status,
        now,
        claimer if claimer != "unknown" else None,
        now,
        *lease_params,
        pk,
        Job.Status.QUEUED,
        now,
    ]
    sql = _CLAIM_ONE_SQL.format(lock=lock, lease=lease_set)
    with transaction.atomic():
        claimed = list(Job.objects.raw(sql, params))
    return claimed[0].to_wire() if claimed else None


def _sweep_now_and_then(now: datetime) -> None:
    # Expired jobs left "queued" would be skipped by every claim; marking them
    # now and then keeps the claim's index scan short.
    global _last_sweep
    tick = time.monotonic()
    if tick - _last_sweep < SWEEP_INTERVAL_SECONDS:
        return
    _last_sweep = tick
    expired = Job.objects.filter(status=Job.Status.QUEUED, expires_at__lte=now).update(
        status=Job.Status.EXPIRED
    )
    metrics.JOBS_EXPIRED.inc(expired)


@in_db_thread
def _count_queued() -> int:
    return Job.objects.filter(
        status=Job.Status.QUEUED, expires_at__gt=timezone.now()
    ).count()


# The next page of a filtered scan of the Redis list: the entries after the
# newest of the given anchors (entries of the last page, newest first) that is
# still in the list. Other claimers remove entries (LPOP at the head, LREM
# anywhere), which shifts positions: an anchor found by value never skips an
# entry. When every anchor is gone, the scan starts over from the head.
_NEXT_PAGE_LUA = """
local count = tonumber(ARGV[1])
for i = 2, #ARGV do
    local position = redis.call('LPOS', KEYS[1], ARGV[i])
    if position then
        return {0, redis.call('LRANGE', KEYS[1], position + 1, position + count)}
    end
end
return {1, redis.call('LRANGE', KEYS[1], 0, count - 1)}
"""
# How many entries of a page serve as anchors for the next one.
SCAN_ANCHORS = 4
# A scan starts over when other claimers removed all its anchors meanwhile;
# this many times in one claim means a queue churning faster than it is read.
MAX_SCAN_RESTARTS = 20


# Take the head entry and note it as being claimed, in one atomic step.
_POP_LUA = """
local raw = redis.call('LPOP', KEYS[1])
if raw then redis.call('ZADD', KEYS[2], ARGV[1], raw) end
return raw
"""
# Take this entry, if still there, and note it as being claimed.
_TAKE_LUA = """
if redis.call('LREM', KEYS[1], 1, ARGV[2]) == 1 then
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
"""
# Put a claim that never finished back at the head, unless someone else did.
RESTORE_LUA = """
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class RedisQueue:
    """A Redis list of jobs (RPUSH, LPOP): one atomic pop per claim."""

    name = "redis"

    def __init__(self) -> None:
        self._restored_at = -float("inf")  # monotonic seconds

    def enqueue(self, job: Job) -> None:
        entry = {"job": job.to_wire(), "expires": job.expires_at.timestamp()}
        redis_clients.sync_client().rpush(QUEUE_KEY, json.dumps(entry))

    async def claim(
        self,
        claimer: str,
        job_filter: JobFilter | None = None,
        lease: Lease | None = None,
    ) -> dict[str, Any] | None:
        client = redis_clients.async_client()
        await self._restore_now_and_then(client)
        if job_filter is not None and not job_filter.is_empty:
            return await self._claim_matching(claimer, job_filter, lease)
        pop = redis_clients.async_script(_POP_LUA)
        while True:
            raw: bytes | None = await pop(
                keys=[QUEUE_KEY, CLAIMING_KEY], args=[time.time()]
            )
            if raw is None:
                return None
            job = await _settle_noted(client, raw, json.loads(raw), claimer, lease)
            if job is not None:
                return job

    async def _claim_matching(
        self, claimer: str, job_filter: JobFilter, lease: Lease | None
    ) -> dict[str, Any] | None:
        """The oldest matching entry: read in pages, removed with LREM.

        LREM of the exact entry removes it for one caller only (it returns 1
        to that caller, 0 to any other), so each job is still claimed once.
        """
        client = redis_clients.async_client()
        next_page = redis_clients.async_script(_NEXT_PAGE_LUA)
        seen: set[bytes] = set()  # tested already: a restart skips them
        anchors: list[bytes] = []
        restarts = 0
        while True:
            restarted, page = await next_page(
                keys=[QUEUE_KEY], args=[SCAN_BATCH, *anchors]
            )
            if restarted and anchors:
                restarts += 1
                if restarts > MAX_SCAN_RESTARTS:
                    logger.warning("filtered claim gave up: the queue changed too fast")
                    return None
            for raw in page:
                if raw in seen:
                    continue
                seen.add(raw)
                job = await self._take_if_matching(
                    client, raw, claimer, job_filter, lease
                )
                if job is not None:
                    return job
            if len(page) < SCAN_BATCH:
                return None  # the tail of the list: no match
            anchors = page[: -SCAN_ANCHORS - 1 : -1]

    async def _take_if_matching(
        self,
        client: Any,
        raw: bytes,
        claimer: str,
        job_filter: JobFilter,
        lease: Lease | None,
    ) -> dict[str, Any] | None:
        entry = json.loads(raw)
        expired = entry["expires"] <= time.time()
        # Expired entries are dropped on the way, as a pop would.
        if not expired and not job_filter.matches(entry["job"]):
            return None
        take = redis_clients.async_script(_TAKE_LUA)
        if not await take(keys=[QUEUE_KEY, CLAIMING_KEY], args=[time.time(), raw]):
            return None  # another claimer removed it first
        return await _settle_noted(client, raw, entry, claimer, lease)

    async def _restore_now_and_then(self, client: Any) -> None:
        now = time.monotonic()
        if now - self._restored_at < RESTORE_EVERY_SECONDS:
            return
        self._restored_at = now
        try:
            if await restore_unfinished_claims(client):
                await wakeups.announce()  # every waiter looks at what came back
        except Exception as exc:
            logger.warning("could not look for unfinished claims: %s", exc)

    async def depth(self) -> int:
        return int(await redis_clients.async_client().llen(QUEUE_KEY))

    async def release(self, job: dict[str, Any]) -> None:
        expires = datetime.fromisoformat(job["expires_at"]).timestamp()
        entry = {"job": job, "expires": expires}
        await _unclaim(job["id"])
        await redis_clients.async_client().lpush(QUEUE_KEY, json.dumps(entry))


async def _settle_noted(
    client: Any,
    raw: bytes,
    entry: dict[str, Any],
    claimer: str,
    lease: Lease | None,
) -> dict[str, Any] | None:
    """Settle an entry taken with its note, then clear the note.

    A lease the table could not record keeps its note: the entry is then put
    back after the claim timeout, as a claim cut off would be.
    """
    settled = False
    try:
        job = await _settle(entry, claimer, lease)
        settled = True
    finally:
        if settled or lease is None:
            await _claimed(client, raw)
    return job


async def _settle(
    entry: dict[str, Any], claimer: str, lease: Lease | None = None
) -> dict[str, Any] | None:
    """Record a taken entry in the table: the job if it is the claimer's, else None."""
    job: dict[str, Any] = entry["job"]
    now = timezone.now()
    if entry["expires"] <= now.timestamp():
        await _record(job["id"], Job.Status.EXPIRED, None, None, now)
        metrics.JOBS_EXPIRED.inc()
        return None
    if lease is not None:
        # A lease lives in the table or not at all: its write is not skipped.
        if await _record_sync(job["id"], Job.Status.LEASED, now, claimer, now, lease):
            return job
        return None
    if await _record(job["id"], Job.Status.CLAIMED, now, claimer, now):
        return job
    # The table says this entry is stale: the admin expired the job, or
    # requeued it and a newer entry already handed it out.
    return None


async def _claimed(client: Any, raw: bytes) -> None:
    """The claim of ``raw`` is settled: it no longer needs putting back."""
    try:
        await client.zrem(CLAIMING_KEY, raw)
    except Exception as exc:
        # Harmless: restoring it later finds the job no longer queued.
        logger.warning("could not clear a finished claim: %s", exc)


async def restore_unfinished_claims(
    client: Any, older_than: float | None = None
) -> int:
    """Put back claims taken from the list but never settled; how many."""
    if older_than is None:
        older_than = claim_timeout()
    stale: list[bytes] = await client.zrangebyscore(
        CLAIMING_KEY, "-inf", time.time() - older_than, start=0, num=SCAN_BATCH
    )
    if not stale:
        return 0
    entries = {raw: json.loads(raw) for raw in stale}
    queued = await _still_queued([entry["job"]["id"] for entry in entries.values()])
    restore = redis_clients.async_script(RESTORE_LUA)
    restored = 0
    # Newest first onto the head, so that the oldest ends up first in line.
    for raw, entry in sorted(entries.items(), key=lambda item: -item[1]["job"]["id"]):
        if entry["job"]["id"] in queued:
            restored += await restore(
                keys=[QUEUE_KEY, CLAIMING_KEY], args=[raw], client=client
            )
        else:
            await client.zrem(CLAIMING_KEY, raw)
    if restored:
        logger.warning("put back %d job(s) whose claim never finished", restored)
    return restored


@in_db_thread
def _still_queued(pks: list[int]) -> set[int]:
    rows = Job.objects.filter(
        pk__in=pks, status=Job.Status.QUEUED, expires_at__gt=timezone.now()
    )
    return set(rows.values_list("pk", flat=True))


@in_db_thread
def _unclaim(pk: int) -> None:
    Job.objects.filter(
        pk=pk, status__in=[Job.Status.CLAIMED, Job.Status.LEASED]
    ).update(
        status=Job.Status.QUEUED,
        claimed_at=None,
        claimed_by=None,
        lease_token=None,
        lease_expires_at=None,
        # Nobody had the job after all, unless a WebSocket client had it too.
        delivered_at=Case(
            When(delivered_at=F("claimed_at"), then=F("pushed_at")),
            default=F("delivered_at"),
        ),
    )


# Settling a popped entry, written out (the ORM's version cost more to build
# than to run). Only a job the table still holds as queued is this entry's to
# settle, and only one still unexpired there may be claimed. A claim is the
# first delivery unless one came before; no claim, no change (COALESCE with
# NULL).
_SETTLE_SQL = """
UPDATE jobs_job SET status = %s, claimed_at = %s, claimed_by = %s,
    delivered_at = COALESCE(delivered_at, %s){lease}
WHERE id = %s AND status = %s {unexpired}
"""


@in_db_thread
def _record_sync(
    pk: int,
    status: str,
    claimed_at: datetime | None,
    claimer: str | None,
    now: datetime,
    lease: Lease | None = None,
) -> int:
    adapt = connection.ops.adapt_datetimefield_value
    _, lease_set, lease_params = _lease_sql(lease)
    params = [
        status,
        adapt(claimed_at),
        claimer if claimer != "unknown" else None,
        adapt(claimed_at),
        *lease_params,
        pk,
        Job.Status.QUEUED,
    ]
    unexpired = ""
    if status != Job.Status.EXPIRED:
        unexpired = "AND expires_at > %s"
        params.append(adapt(now))
    sql = _SETTLE_SQL.format(unexpired=unexpired, lease=lease_set)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)


async def _record(
    pk: int,
    status: str,
    claimed_at: datetime | None,
    claimer: str | None,
    now: datetime,
) -> bool:
    """Settle a popped entry in the table; False if the table says it is stale."""
    # The pop already took the job from the queue; a database hiccup must not
    # lose it on its way to the client, so it is then handed out unchecked.
    try:
        return bool(await _record_sync(pk, status, claimed_at, claimer, now))
    except Exception:
        logger.exception("could not record job %s as %s", pk, status)
        return True


@cache
def _backends() -> dict[str, Queue]:
    return {"database": DatabaseQueue(), "redis": RedisQueue()}


def get_queue() -> Queue:
    """The queue backend named by ``QUEUE_BACKEND``."""
    return _backends()[settings.QUEUE_BACKEND]
