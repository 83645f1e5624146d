"""The one write path: validate, de-duplicate, store, enqueue, broadcast.

Every job, from the poller or any client, goes through ``publish``. A job is
either stored and queued, or neither: a failure anywhere before that point
leaves nothing behind, and the caller answers 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Field
from django.utils import timezone

from jobs import bus, logs, metrics, wakeups
from jobs.db import in_db_thread
from jobs.models import Job
from jobs.numbers import numbers_from_fields
from jobs.payloads import JobDraft
from jobs.queues import get_queue

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    """The stored job as clients see it, and whether this call created it."""

    job: dict[str, Any]
    created: bool


async def publish(draft: JobDraft) -> Published:
    """Store and queue ``draft`` unless it is a duplicate, then broadcast it.

    Runs to its end even when the caller is cancelled (its client left, or
    gave up waiting): a job stored is also broadcast. Cut off in
    between, it would reach no connected client, and the client's retry,
    answered as a duplicate, would not send it either.
    """
    logs.job_id.set(draft.job_id)  # on every line of the rest of this request
    publishing = asyncio.ensure_future(_publish(draft))
    try:
        return await asyncio.shield(publishing)
    except asyncio.CancelledError:
        publishing.add_done_callback(_log_failure)
        raise


async def _publish(draft: JobDraft) -> Published:
    result = await _store(draft)
    if result.created:
        metrics.JOBS_PUBLISHED.inc()
        logger.info("published job %s as id %s", draft.job_id, result.job["id"])
        # Best effort, the job being safely queued already: WebSocket clients
        # recover a missed frame with ``since=``, long-polls look again.
        await broadcast(result.job)
    else:
        metrics.JOBS_DUPLICATES.inc()
    return result


def _log_failure(publishing: asyncio.Future[Published]) -> None:
    """The outcome of a publish whose caller had left: nobody else reads it."""
    if not publishing.cancelled() and (exc := publishing.exception()) is not None:
        logger.error("publishing failed after its caller left: %r", exc)


async def broadcast(job: dict[str, Any]) -> None:
    """Send a job once to every process: its fan-out hub and its long-polls.

    Returns once the message holding it is sent (or could not be: logged).
    """
    await bus.publish(job)


@in_db_thread
def _store(draft: JobDraft) -> Published:
    now = timezone.now()
    try:
        with transaction.atomic():
            original = _find_duplicate(draft, now)
            if original is not None:
                return Published(original.to_wire(), created=False)
            job = Job(
                job_id=draft.job_id,
                place_id=draft.place_id,
                channel=draft.channel,
                source=draft.source,
                message_id=draft.message_id,
                title=draft.title,
                fields=draft.fields,
                # Here, not in the poller: posted jobs get their numbers too.
                numbers=numbers_from_fields(draft.fields),
                created_at=now,
                expires_at=now
                + timedelta(seconds=draft.ttl or settings.JOB_TTL_SECONDS),
            )
            _take_the_next_id()
            _insert(job)
    except IntegrityError:
        # Another request stored the same message_id between our look and our
        # insert; the unique constraint kept one, which is the answer.
        original = Job.objects.filter(message_id=draft.message_id).first()
        if original is None:
            raise
        return Published(original.to_wire(), created=False)
    try:
        get_queue().enqueue(job)
    except Exception:
        # Not queued, so not stored either.
        Job.objects.filter(pk=job.pk).delete()
        raise
    return Published(job.to_wire(), created=True)


# The look for an earlier copy runs before every insert. Written out, it costs
# a fraction of the ORM's version, whose query building was a third of a
# publish's CPU; only a duplicate found is then loaded through the ORM.
_BY_MESSAGE_SQL = "SELECT id FROM jobs_job WHERE message_id = %s"
_RECENT_SQL = (
    "SELECT id FROM jobs_job WHERE job_id = %s AND created_at > %s ORDER BY id LIMIT 1"
)


_INSERT_SQL = "INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING {pk}"


@functools.cache
def _insert_statement() -> tuple[str, tuple[Field[Any, Any], ...]]:
    fields = tuple(f for f in Job._meta.concrete_fields if not f.primary_key)
    quote = connection.ops.quote_name
    sql = _INSERT_SQL.format(
        table=quote(Job._meta.db_table),
        columns=", ".join(quote(f.column) for f in fields),
        values=", ".join(["%s"] * len(fields)),
        pk=quote(Job._meta.pk.column),
    )
    return sql, fields


# Held from the insert to the commit, by one publisher at a time on every
# replica: ids are then committed in their own order (jobs.fanout relies on it).
# Two keys, so never the key space of the one-key locks on job_id hashes.
_ID_ORDER_LOCK = "SELECT pg_advisory_xact_lock(1246709331, 1)"


def _take_the_next_id() -> None:
    """Make this transaction's id the next one committed, on PostgreSQL.

    PostgreSQL hands out ids before commit, so without it a job could commit
    after one with a larger id, and a client that saw the larger one could
    miss the smaller on reconnecting with ``since=``. SQLite needs no lock:
    its IMMEDIATE transaction already holds the one writer's lock from the
    insert to the commit. Taken after the duplicate check, whose per-job_id
    lock comes first in every transaction, so that the two never deadlock.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(_ID_ORDER_LOCK)


def _insert(job: Job) -> None:
    """Insert ``job`` as ``save()`` would, from a statement built once.

    Building the INSERT cost ``save()`` more than running it. Every column is
    written, each value prepared by its own field, so a field added to the
    model is inserted here too.
    """
    sql, fields = _insert_statement()
    values = [f.get_db_prep_save(getattr(job, f.attname), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, values)
        job.pk = cursor.fetchone()[0]
    job._state.adding = False
    job._state.db = connection.alias


def _find_duplicate(draft: JobDraft, now: datetime) -> Job | None:
    with connection.cursor() as cursor:
        if draft.message_id is not None:
            cursor.execute(_BY_MESSAGE_SQL, [draft.message_id])
            found = cursor.fetchone()
            if found is not None:
                return Job.objects.get(pk=found[0])
        window = settings.DEDUP_WINDOW_SECONDS
        if not window:
            return None
        if connection.vendor == "postgresql":
            # Two requests with one job_id must not both miss each other's
            # insert: serialise them on the job_id for the rest of this
            # transaction.
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [draft.job_id])
        # SQLite needs no lock: the IMMEDIATE transaction already serialises
        # writers.
        since = connection.ops.adapt_datetimefield_value(
            now - timedelta(seconds=window)
        )
        cursor.execute(_RECENT_SQL, [draft.job_id, since])
        found = cursor.fetchone()
    return None if found is None else Job.objects.get(pk=found[0])


def requeue(pks: list[int]) -> int:
    """Put jobs back in the queue with a fresh expiry (the admin's action). Sync."""
    count = 0
    for job in Job.objects.filter(pk__in=pks).order_by("id"):
        job.status = Job.Status.QUEUED
        job.claimed_at = None
        job.claimed_by = None
        job.lease_token = None  # a lease held on it is lost: lease_lost
        job.lease_expires_at = None
        job.expires_at = timezone.now() + timedelta(seconds=settings.JOB_TTL_SECONDS)
        fields = ["status", "claimed_at", "claimed_by", "expires_at"]
        fields += ["lease_token", "lease_expires_at"]
        with transaction.atomic():
            job.save(update_fields=fields)
            get_queue().enqueue(job)
        count += 1
    if count:
        wakeups.announce_from_sync()
    return count
