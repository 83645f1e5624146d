"""When each job first reached a client: ``Job.delivered_at`` and the latency metric.

The consumer calls ``sent()`` after each job frame, and ``GET /job/next``
calls ``claimed()`` after each claim. A job's first delivery in this process
observes its latency (``gateway_delivery_latency_seconds``); a first frame also
notes the time, which a background task writes a moment later, in one
statement per batch, from a worker thread. A frame never waits for the
database, and a job costs at most one write per process. Claims record their
own delivery (``jobs.queues``); whichever came first is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from datetime import datetime
from typing import Any

from django.db import connection
from django.utils import timezone

from jobs import metrics, queues
from jobs.db import in_db_thread

logger = logging.getLogger(__name__)

# Ids already noted: every client of a broadcast sends the same id, and only
# the first send may cost anything. Old ids are forgotten first; a job that old
# has long been recorded.
MEMORY = 10_000
# Writes wait this long, so that one statement carries a burst of jobs and the
# write comes after the claims that follow a publish at once: on PostgreSQL a
# claim skips a row that another statement has locked (SKIP LOCKED).
FLUSH_DELAY_SECONDS = 0.5
# At most this many jobs per statement.
BATCH = 500

_noted: set[int] = set()
_noted_order: deque[int] = deque()  # the same ids, oldest first
_pending: dict[int, datetime] = {}
_flushers: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}


def sent(job: dict[str, Any], *, replayed: bool = False) -> None:
    """Note that ``job`` has just been sent to a client. Never waits.

    A replay (``since=``) is catch-up, not latency: it is recorded, not observed.
    """
    now = _first_delivery(job, observe=not replayed)
    if now is None:
        return
    _pending[job["id"]] = now
    loop = asyncio.get_running_loop()
    flusher = _flushers.get(loop)
    if flusher is None or flusher.done():
        # Tests run one loop each; a loop's flusher ends with the loop.
        for old in [key for key, task in _flushers.items() if task.done()]:
            del _flushers[old]
        _flushers[loop] = loop.create_task(_flush_later())


def claimed(job: dict[str, Any]) -> None:
    """Note that a claim handed ``job`` out; the claim recorded the time."""
    metrics.JOBS_CLAIMED.inc()
    _first_delivery(job)


def _first_delivery(job: dict[str, Any], *, observe: bool = True) -> datetime | None:
    """The time now if this is ``job``'s first delivery in this process."""
    job_id = job["id"]
    if job_id in _noted:
        return None  # the common case for a broadcast: no clock read, no parsing
    _noted.add(job_id)
    _noted_order.append(job_id)
    if len(_noted_order) > MEMORY:
        _noted.discard(_noted_order.popleft())
    now = timezone.now()
    if observe:
        created = datetime.fromisoformat(job["created_at"])
        metrics.DELIVERY_LATENCY.observe(max(0.0, (now - created).total_seconds()))
    return now


async def flush() -> None:
    """Write every noted delivery now (tests, and the flusher's own work)."""
    while _pending:
        batch = dict(itertools.islice(_pending.items(), BATCH))
        for job_id in batch:
            del _pending[job_id]
        try:
            await _write(batch)
        except Exception as exc:
            # Only the dashboard's statistics lose these; the jobs went out.
            logger.warning("could not record %d deliveries: %s", len(batch), exc)


async def _flush_later() -> None:
    await asyncio.sleep(FLUSH_DELAY_SECONDS)
    await flush()


# One statement per batch: each id gets its own moment, and a job that already
# has one (a claim came first) keeps it. Written out, like the other per-job
# statements: the ORM's CASE took longer to build than to run.
_WRITE_SQL = """
UPDATE jobs_job SET delivered_at = CASE id {cases} END
WHERE id IN ({ids}) AND delivered_at IS NULL
"""


@in_db_thread
def _write(batch: dict[int, datetime]) -> None:
    adapt = connection.ops.adapt_datetimefield_value
    sql = _WRITE_SQL.format(
        cases=" ".join(["WHEN %s THEN %s"] * len(batch)),
        ids=", ".join(["%s"] * len(batch)),
    )
    params: list[Any] = []
    for pk, at in batch.items():
        params += [pk, adapt(at)]
    params += batch
    # SQLite has one writer: queue up behind the claims on their mutex rather
    # than in SQLite's busy handler, which makes a claim sleep.
    lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if connection.vendor == "sqlite":
        lock = queues._sqlite_writer
    with lock, connection.cursor() as cursor:
        cursor.execute(sql, params)


def forget() -> None:
    """Drop what this process remembers (tests)."""
    _noted.clear()
    _noted_order.clear()
    _pending.clear()
