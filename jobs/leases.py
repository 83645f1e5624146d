"""Leases: a worker holds a job for a while, then acks it or hands it back.

``GET /job/next?lease=S`` claims a job as ``leased`` under a fresh token for S
seconds (never past the job's own expiry). ``POST /job/{id}/ack`` with the
token makes it ``claimed`` for good; ``POST /job/{id}/release`` puts it back at
the head of the queue at once. A lease that runs out is put back by the next
sweep of any gateway process (every ``SWEEP_EVERY_SECONDS``), or expired if the
job's own life ended with it.

The lease lives in the job table only (token and end), on both queue backends:
a store that evicts or empties on restart never holds it. Every change of a
lease is one conditional write on the job's row, so two of them (an ack and
the sweep, two sweeping replicas) never both succeed: a job has at most one
live lease, and a token once acked, released or run out is ``lease_lost``.

The Redis queue also needs the job back in its list. The way back is noted
first, as a claim is (``queues.CLAIMING_KEY``), then written to the table,
then pushed: a process that dies in between leaves the note, and the next
claim of any process pushes the job once the claim timeout has passed and the
table holds it as queued. Each put-back's entry carries a nonce of its own, so
that no other note or entry can be taken for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection
from django.utils import timezone

from jobs import metrics, queues, redis_clients, wakeups
from jobs.db import in_db_thread
from jobs.models import Job
from jobs.per_loop import PerLoop

logger = logging.getLogger(__name__)

MIN_LEASE_SECONDS = 1
MAX_LEASE_SECONDS = 300
# How often each process looks for leases that ran out.
SWEEP_EVERY_SECONDS = 1.0
# The most leases one sweep puts back.
SWEEP_BATCH = 500
# The longest token a client may send (tokens are 32 characters).
MAX_TOKEN_LENGTH = 64


class LeaseLost(Exception):
    """The token is unknown, ran out, or was already acked or released."""


class UnknownJob(Exception):
    """No job has this id."""


def new_token() -> str:
    """A fresh lease token: random, unguessable, URL-safe."""
    return secrets.token_urlsafe(24)


_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")


def could_be_a_token(text: str) -> bool:
    """Whether ``text`` has the shape of a token ``new_token`` makes."""
    return bool(_TOKEN_RE.fullmatch(text))


async def ack(pk: int, token: str) -> None:
    """Finish a leased job: it is ``claimed`` and never handed out again."""
    if not await _ack(pk, token):
        await _explain(pk)
    metrics.LEASES_ACKED.inc()


async def release(pk: int, token: str) -> None:
    """Give a leased job back at the head of the queue, at once."""
    if settings.QUEUE_BACKEND == "redis":
        job = await _release_to_redis(pk, token)
    else:
        job = await _release_in_table(pk, token)
    if job is None:
        await _explain(pk)
        return
    metrics.LEASES_RELEASED.inc()
    await wakeups.announce(job)  # back in the queue: a waiter looks


async def _explain(pk: int) -> None:
    if not await _exists(pk):
        raise UnknownJob(pk)
    raise LeaseLost(pk)


# A lease is live while its end is ahead: the sweep takes only those behind.
_ACK_SQL = """
UPDATE jobs_job SET status = %s, lease_token = NULL, lease_expires_at = NULL
WHERE id = %s AND status = %s AND lease_token = %s AND lease_expires_at > %s
"""


@in_db_thread
def _ack(pk: int, token: str) -> bool:
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    params: list[Any] = [Job.Status.CLAIMED, pk, Job.Status.LEASED, token, now]
    with queues.table_writer(), connection.cursor() as cursor:
        cursor.execute(_ACK_SQL, params)
        return bool(cursor.rowcount)


_RELEASE_SQL = """
UPDATE jobs_job SET status = %s, claimed_at = NULL, claimed_by = NULL,
    lease_token = NULL, lease_expires_at = NULL
WHERE id = %s AND status = %s AND lease_token = %s AND lease_expires_at > %s
RETURNING *
"""


@in_db_thread
def _release_in_table(pk: int, token: str) -> dict[str, Any] | None:
    # On the database queue the id orders the queue: back at the head.
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    params = [Job.Status.QUEUED, pk, Job.Status.LEASED, token, now]
    with queues.table_writer():
        rows = list(Job.objects.raw(_RELEASE_SQL, params))
    return rows[0].to_wire() if rows else None


@in_db_thread
def _exists(pk: int) -> bool:
    return Job.objects.filter(pk=pk).exists()


@in_db_thread
def _leased_job(pk: int, token: str) -> Job | None:
    return Job.objects.filter(
        pk=pk, status=Job.Status.LEASED, lease_token=token
    ).first()


async def _release_to_redis(pk: int, token: str) -> dict[str, Any] | None:
    job = await _leased_job(pk, token)
    if job is None:
        return None
    client = redis_clients.async_client()
    raw = _entry(job)
    await client.zadd(queues.CLAIMING_KEY, {raw: time.time()})
    released = await _release_in_table(pk, token)
    if released is None:
        await client.zrem(queues.CLAIMING_KEY, raw)  # its own note: nobody else's
        return None
    await _push_back(client, [raw])
    return released


def _entry(job: Job) -> str:
    """A Redis queue entry for a job put back, unique to this put-back."""
    return json.dumps(
        {
            "job": job.to_wire(),
            "expires": job.expires_at.timestamp(),
            "back": secrets.token_hex(8),
        }
    )


async def _push_back(client: Any, raws: list[str]) -> None:
    """Push noted entries onto the head, newest first, so the oldest leads."""
    restore = redis_clients.async_script(queues.RESTORE_LUA)
    for raw in sorted(raws, key=lambda raw: -json.loads(raw)["job"]["id"]):
        await restore(keys=[queues.QUEUE_KEY, queues.CLAIMING_KEY], args=[raw])


# --- Leases that ran out -------------------------------------------------------

_LAPSED_SQL = """
SELECT id FROM jobs_job
WHERE status = %s AND lease_expires_at <= %s
ORDER BY lease_expires_at LIMIT {limit}
"""
# Back in the queue, unless the job's own life is over too.
_LAPSE_SQL = """
UPDATE jobs_job SET
    status = CASE WHEN expires_at > %s THEN %s ELSE %s END,
    claimed_at = NULL, claimed_by = NULL,
    lease_token = NULL, lease_expires_at = NULL
WHERE id IN ({ids}) AND status = %s AND lease_expires_at <= %s
RETURNING id, status
"""


@in_db_thread
def _lapsed(now: datetime) -> list[Job]:
    adapted = connection.ops.adapt_datetimefield_value(now)
    with connection.cursor() as cursor:
        sql = _LAPSED_SQL.format(limit=SWEEP_BATCH)
        cursor.execute(sql, [Job.Status.LEASED, adapted])
        ids = [row[0] for row in cursor.fetchall()]
    return list(Job.objects.filter(pk__in=ids)) if ids else []


@in_db_thread
def _lapse(ids: list[int], now: datetime) -> dict[int, str]:
    """Put back (or expire) the leases of ``ids`` that ran out; id -> new status."""
    adapted = connection.ops.adapt_datetimefield_value(now)
    sql = _LAPSE_SQL.format(ids=", ".join(["%s"] * len(ids)))
    params = [
        adapted,
        Job.Status.QUEUED,
        Job.Status.EXPIRED,
        *ids,
        Job.Status.LEASED,
        adapted,
    ]
    with queues.table_writer(), connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {pk: status for pk, status in cursor.fetchall()}


async def sweep() -> int:
    """Put back every lease that ran out (expire its job if that ran out too).

    Returns how many leases ran out in this sweep. Any number of processes may
    sweep at once: each lease is taken by one of them.
    """
    now = timezone.now()
    lapsed = await _lapsed(now)
    if not lapsed:
        return 0
    raws: dict[int, str] = {}
    client: Any = None
    if settings.QUEUE_BACKEND == "redis":
        client = redis_clients.async_client()
        raws = {job.pk: _entry(job) for job in lapsed}
        await client.zadd(
            queues.CLAIMING_KEY, dict.fromkeys(raws.values(), now.timestamp())
        )
    outcome = await _lapse([job.pk for job in lapsed], now)
    if client is not None:
        back = [
            raws[pk] for pk, status in outcome.items() if status == Job.Status.QUEUED
        ]
        others = [
            raw for pk, raw in raws.items() if outcome.get(pk) != Job.Status.QUEUED
        ]
        if others:
            await client.zrem(queues.CLAIMING_KEY, *others)
        await _push_back(client, back)
    expired = sum(1 for status in outcome.values() if status == Job.Status.EXPIRED)
    metrics.LEASES_EXPIRED.inc(len(outcome))
    metrics.JOBS_EXPIRED.inc(expired)
    if len(outcome) > expired:
        logger.info(
            "%d lease(s) ran out: job(s) back in the queue", len(outcome) - expired
        )
        await wakeups.announce()
    return len(outcome)


class _Sweeper:
    """This event loop's task that sweeps now and then, started on first use."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_SECONDS)
            try:
                await sweep()
            except Exception as exc:
                # The store is down: the leases wait for the next sweep.
                logger.warning("could not look for leases that ran out: %s", exc)


_sweepers: PerLoop[_Sweeper] = PerLoop(_Sweeper)


def keep_sweeping() -> None:
    """Make sure this process sweeps leases that ran out (cheap when it does)."""
    _sweepers.get().start()
