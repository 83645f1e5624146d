"""When each job first reached a client: ``Job.delivered_at``, ``Job.pushed_at``
and the latency metric.

The consumer calls ``sent()`` after each job frame, and ``GET /job/next``
calls ``claimed()`` after each claim. A job's first delivery in this process
observes its latency (``gateway_delivery_latency_seconds``); a first frame also
notes the time, which a background task writes a moment later, in one
statement per batch, from a worker thread. A frame never waits for the
database, and a job costs at most one write per process. The write sets
``pushed_at``, and ``delivered_at`` unless a claim came first: claims record
their own delivery (``jobs.queues``), and the first delivery is kept.
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


class _Recent:
    """The last ``MEMORY`` ids added, oldest forgotten first."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.order: deque[int] = deque()  # the same ids, oldest first

    def add(self, job_id: int) -> bool:
        """Remember ``job_id``; False if it was remembered already."""
        if job_id in self.ids:
            return False
        self.ids.add(job_id)
        self.order.append(job_id)
        if len(self.order) > MEMORY:
            self.ids.discard(self.order.popleft())
        return True

    def clear(self) -> None:
        self.ids.clear()
        self.order.clear()


# Jobs whose push is noted, and jobs whose latency is observed (or, replayed,
# never will be): a claim observes a job's latency but must not hide its push.
_pushed = _Recent()
_observed = _Recent()
_pending: dict[int, datetime] = {}
_flushers: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}


def sent(job: dict[str, Any], *, replayed: bool = False) -> None:
    """Note that ``job`` has just been sent to a client. Never waits.

    A replay (``since=``) is catch-up, not latency: it is recorded, not observed.
    """
    job_id = job["id"]
    if not _pushed.add(job_id):
        return  # the common case for a broadcast: no clock read, no parsing
    now = timezone.now()
    if _observed.add(job_id) and not replayed:
        _observe(job, now)
    _pending[job_id] = now
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
    if _observed.add(job["id"]):
        _observe(job, timezone.now())


def _observe(job: dict[str, Any], now: datetime) -> None:
    created = datetime.fromisoformat(job["created_at"])
    metrics.DELIVERY_LATENCY.observe(max(0.0, (now - created).total_seconds()))


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


# One statement per batch: each id gets its own moment as its first push, and
# as its first delivery unless it has one (a claim came first). Written out,
# like the other per-job statements: the ORM's CASE took longer to build than
# to run. Both sides of SET read the row as it was, hence the CASE twice.
_WRITE_SQL = """
UPDATE jobs_job SET pushed_at = CASE id {cases} END,
    delivered_at = COALESCE(delivered_at, CASE id {cases} END)
WHERE id IN ({ids}) AND pushed_at IS NULL
"""


@in_db_thread
def _write(batch: dict[int, datetime]) -> None:
    adapt = connection.ops.adapt_datetimefield_value
    sql = _WRITE_SQL.format(
        cases=" ".join(["WHEN %s THEN %s"] * len(batch)),
        ids=", ".join(["%s"] * len(batch)),
    )
    cases: list[Any] = []
    for pk, at in batch.items():
        cases += [pk, adapt(at)]
    params = [*cases, *cases, *batch]
    # SQLite has one writer: queue up behind the claims on their mutex rather
    # than in SQLite's busy handler, which makes a claim sleep.
    lock: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
    if connection.vendor == "sqlite":
        lock = queues._sqlite_writer
    with lock, connection.cursor() as cursor:
        cursor.execute(sql, params)


def forget() -> None:
    """Drop what this process remembers (tests)."""
    _pushed.clear()
    _observed.clear()
    _pending.clear()
