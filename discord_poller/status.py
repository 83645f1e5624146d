"""The poller's status row: written off the poll loop, read by ``/health``."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from django.db import close_old_connections, connections
from django.utils import timezone

from discord_poller.models import PollerStatus
from discord_poller.waits import wait_for_stop

logger = logging.getLogger(__name__)

Report = dict[str, Any]


def save_report(report: Report, started_at: datetime) -> None:
    """Replace the status row with ``report``, stamped now."""
    PollerStatus.objects.update_or_create(
        pk=PollerStatus.SINGLETON_ID,
        defaults={
            "started_at": started_at,
            "updated_at": timezone.now(),
            "report": report,
        },
    )


def read_status() -> dict[str, Any] | None:
    """The last report with its age, as ``/health`` shows it; None if none yet."""
    row = PollerStatus.objects.filter(pk=PollerStatus.SINGLETON_ID).first()
    return None if row is None else row.as_health(timezone.now())


class _WriterThread:
    """A daemon thread for the database work of the status reports.

    A thread of the reporter's own rather than Django's sync thread: a write
    stuck on an unreachable database can then neither delay the poll loop nor
    hold up the process's exit.
    """

    def __init__(self) -> None:
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="poller-status", daemon=True).start()

    def submit(self, work: Callable[[], None]) -> Future[None]:
        """Run ``work`` after what is queued already."""
        future: Future[None] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    work()
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(None)

        self._work.put(run)
        return future

    def stop(self) -> None:
        """End the thread once the queued work is done, closing its connection."""
        self._work.put(None)

    def _run(self) -> None:
        try:
            while (work := self._work.get()) is not None:
                work()
        finally:
            connections.close_all()  # this thread's own


class StatusReporter:
    """Writes ``snapshot()`` to the status row about once every ``interval`` s.

    The poll loop never waits on the database: the writes run in a thread of
    the reporter's own. A failed write is logged and the next one tries again.
    """

    def __init__(
        self,
        snapshot: Callable[[], Report],
        *,
        interval: float = 1.0,
        started_at: datetime | None = None,
    ) -> None:
        self._snapshot = snapshot
        self._interval = interval
        self.started_at = started_at or timezone.now()
        self.writes = 0
        self.failures = 0
        self._failing = False
        self._thread: _WriterThread | None = None  # while ``run`` runs

    async def write(self, report: Report | None = None) -> bool:
        """Write one report (by default a fresh snapshot); False if it failed."""
        thread = self._thread or _WriterThread()
        try:
            return await self._write(thread, report)
        finally:
            if thread is not self._thread:
                thread.stop()

    async def run(self, stop: asyncio.Event) -> None:
        """Write a report now and then about once a second, until ``stop``.

        The writer thread outlives it: a last ``write()`` queues behind a
        write this left in flight, so the last report asked for is the last
        one saved. ``close()`` ends the thread.
        """
        self._thread = thread = self._thread or _WriterThread()
        while not stop.is_set():
            await self._write(thread, None)
            if await wait_for_stop(stop, self._interval):
                return

    def close(self) -> None:
        """End the writer thread once what is queued is written."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    async def _write(self, thread: _WriterThread, report: Report | None) -> bool:
        report = self._snapshot() if report is None else report
        started_at = self.started_at

        def work() -> None:
            # The connection may have died or aged out since the last write:
            # what ``channels.db.aclose_old_connections`` does, in the thread
            # that owns the connection.
            close_old_connections()
            save_report(report, started_at)

        try:
            await asyncio.wrap_future(thread.submit(work))
        except Exception as exc:
            self.failures += 1
            if not self._failing:
                logger.warning("could not write the poller's status: %s", exc)
            self._failing = True
            return False
        if self._failing:
            logger.info("the poller's status is written again")
        self._failing = False
        self.writes += 1
        return True
