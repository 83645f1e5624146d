"""The poller's status row: written off the loop, throttled, shown in /health."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import DatabaseError, OperationalError

from discord_poller import status
from discord_poller.models import PollerStatus
from discord_poller.status import StatusReporter

pytestmark = [pytest.mark.backends, pytest.mark.django_db(transaction=True)]

Sign = Callable[[], dict[str, str]]


async def poller_health(api: httpx.AsyncClient, sign: Sign) -> Any:
    response = await api.get("/health", headers=sign())
    assert response.status_code == 200
    return response.json()["poller"]


async def test_health_shows_the_last_report_and_its_age(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    assert await poller_health(api, sign) is None  # no poller ever reported
    reporter = StatusReporter(lambda: {"state": "running", "jobs": {"published": 3}})
    assert await reporter.write()
    shown = await poller_health(api, sign)
    assert shown["state"] == "running"
    assert shown["jobs"] == {"published": 3}
    assert 0 <= shown["report_age_seconds"] < 5
    assert shown["started_at"] <= shown["updated_at"]
    assert await reporter.write({"state": "stopped"})
    assert (await poller_health(api, sign))["state"] == "stopped"
    assert await sync_to_async(PollerStatus.objects.count)() == 1


async def test_health_survives_an_unreadable_status(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> None:
        raise DatabaseError("no such table")

    monkeypatch.setattr("jobs.health._read_poller_status", broken)
    assert (await poller_health(api, sign))["error"] == "unavailable"


async def test_writes_about_once_per_interval_and_stops_at_once() -> None:
    calls: list[float] = []
    enough = asyncio.Event()

    def snapshot() -> dict[str, Any]:
        calls.append(time.monotonic())
        if len(calls) >= 3:
            enough.set()
        return {"state": "running"}

    reporter = StatusReporter(snapshot, interval=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(reporter.run(stop))
    await asyncio.wait_for(enough.wait(), 5)
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(task, 2)
    assert time.monotonic() - started < 0.2
    assert min(b - a for a, b in itertools.pairwise(calls)) >= 0.19
    assert reporter.writes == len(calls)


async def test_a_write_never_blocks_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_save(report: dict[str, Any], started_at: Any) -> None:
        entered.set()
        release.wait(5)

    monkeypatch.setattr(status, "save_report", slow_save)
    task = asyncio.create_task(StatusReporter(dict).write())
    # The loop runs on while the database works.
    assert await asyncio.to_thread(entered.wait, 5)
    assert not task.done()
    release.set()
    assert await asyncio.wait_for(task, 5)


async def test_a_hung_database_cannot_hold_up_the_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()
    monkeypatch.setattr(status, "save_report", lambda *args: release.wait(10))
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(StatusReporter(dict).write(), 0.2)
        assert time.monotonic() - started < 5  # not the 10 s of the hang
    finally:
        release.set()


async def test_database_errors_are_survived_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing(report: dict[str, Any], started_at: Any) -> None:
        raise OperationalError("database is locked")

    reporter = StatusReporter(lambda: {"state": "running"})
    monkeypatch.setattr(status, "save_report", failing)
    assert not await reporter.write()
    assert not await reporter.write()
    monkeypatch.undo()
    assert await reporter.write()
    assert reporter.failures == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "database is locked" in warnings[0].getMessage()
    row = await sync_to_async(PollerStatus.objects.get)()
    assert row.report == {"state": "running"}


async def test_the_last_report_asked_for_is_the_last_saved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A periodic write still in the database when the poller stops must not
    # land after the final one (an exit "failed" shown as "running").
    saved: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def save(report: dict[str, Any], started_at: Any) -> None:
        if report["state"] == "running":
            entered.set()
            release.wait(5)
        saved.append(report["state"])

    monkeypatch.setattr(status, "save_report", save)
    reporter = StatusReporter(lambda: {"state": "running"})
    stop = asyncio.Event()
    periodic = asyncio.create_task(reporter.run(stop))
    assert await asyncio.to_thread(entered.wait, 5)
    stop.set()
    periodic.cancel()  # as the service stops it, its write in flight
    with contextlib.suppress(asyncio.CancelledError):
        await periodic
    final = asyncio.create_task(reporter.write({"state": "failed"}))
    release.set()
    assert await asyncio.wait_for(final, 5)
    reporter.close()
    assert saved == ["running", "failed"]
