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

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Field
from django.utils import timezone

from jobs import layer_messages, logs, metrics, wakeups
from jobs.db import in_db_thread
from jobs.models import Job
from jobs.numbers import numbers_from_fields
from jobs.payloads import JobDraft
from jobs.per_loop import PerLoop
from jobs.queues import get_queue

logger = logging.getLogger(__name__)

# The most jobs in one channel-layer message (about 60 KB at typical sizes).
MAX_JOBS_PER_MESSAGE = 100


@dataclass(frozen=True)
class Published:
    """The stored job as clients see it, and whether this call created it."""

    job: dict[str, Any]
    created: bool


async def publish(draft: JobDraft) -> Published:
    """Store and queue ``draft`` unless it is a duplicate, then broadcast it.

    Runs to its end even when the caller is cancelled (its client left, or
    gave up waiting): a job stored is also announced and broadcast. Cut off in
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
        # Both are best effort, the job being safely queued already (WebSocket
        # clients recover a missed frame with ``since=``), and independent:
        # with Redis each is a round trip, and they overlap.
        await asyncio.gather(wakeups.announce(result.job), broadcast(result.job))
    else:
        metrics.JOBS_DUPLICATES.inc()
    return result


def _log_failure(publishing: asyncio.Future[Published]) -> None:
    """The outcome of a publish whose caller had left: nobody else reads it."""
    if not publishing.cancelled() and (exc := publishing.exception()) is not None:
        logger.error("publishing failed after its caller left: %r", exc)


async def broadcast(job: dict[str, Any]) -> None:
    """Send a job once to every process's fan-out (jobs.fanout).

    Returns once the message holding it is sent (or could not be: logged).
    """
    await _senders.get().send(job)


class _Broadcaster:
    """Sends published jobs to the channel layer, those that queue up together.

    channels-redis's pub/sub layer sends one message at a time per shard (each
    ``PUBLISH`` under a lock), so at 100 jobs a second on a busy event loop a
    message per job queued for hundreds of milliseconds, holding up both the
    ``POST`` and the frames (docs/benchmarks.md). One message is in flight at a
    time; the jobs published meanwhile go out together in the next, oldest
    first, as ``layer_messages.published`` has it.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def send(self, job: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] = loop.create_future()
        self._waiting.append((job, sent))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._send_waiting())
        # A caller cancelled (its client gone) stops waiting; the job still goes.
        await sent

    async def _send_waiting(self) -> None:
        layer = get_channel_layer()
        try:
            while self._waiting:
                batch = self._waiting[:MAX_JOBS_PER_MESSAGE]
                del self._waiting[: len(batch)]
                try:
                    await _send(layer, [job for job, _ in batch])
                finally:
                    _release(batch)
        finally:
            # Cancelled (the process is stopping): nobody waits for it.
            _release(self._waiting)
            self._waiting.clear()


async def _send(layer: Any, jobs: list[dict[str, Any]]) -> None:
    if layer is None:
        return
    try:
        await layer.group_send(layer_messages.ALL_JOBS, layer_messages.published(jobs))
    except Exception as exc:
        logger.warning(
            "could not broadcast jobs %s: %s",
            ", ".join(str(job["id"]) for job in jobs),
            exc,
        )


def _release(waiting: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
    for _, sent in waiting:
        if not sent.done():
            sent.set_result(None)


_senders: PerLoop[_Broadcaster] = PerLoop(_Broadcaster)


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
        job.expires_at = timezone.now() + timedelta(seconds=settings.JOB_TTL_SECONDS)
        with transaction.atomic():
            job.save(update_fields=["status", "claimed_at", "claimed_by", "expires_at"])
            get_queue().enqueue(job)
        count += 1
    if count:
        wakeups.announce_from_sync()
    return count
