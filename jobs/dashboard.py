"""The admin's live dashboard: a page, and the JSON it polls every second.

Both views are wrapped by ``admin.site.admin_view`` in the URLconf (staff
only, never cached) and also need the permission to view jobs, as the job list
does. See docs/dashboard.md for what each number means.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError
from django.db.models import Count
from django.db.models.functions import TruncMinute
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_GET

from discord_poller.status import read_status
from jobs import presence
from jobs.models import Job
from jobs.queues import get_queue

logger = logging.getLogger(__name__)

PERMISSION = "jobs.view_job"
CHART_MINUTES = 60
LATEST_JOBS = 20
# Per-minute series change slowly, and the latency series reads rows rather
# than an aggregate: computed at most this often per process, however many
# pages poll.
CHARTS_MAX_AGE_SECONDS = 5.0
# The latency series reads at most this many of the hour's newest deliveries.
LATENCY_SAMPLES = 20_000
# The poller reports about once a second; older than this, it is not running.
POLLER_STALE_SECONDS = 10.0

_charts_lock = threading.Lock()
_charts_cache: tuple[float, dict[str, Any]] | None = None


def page(request: HttpRequest) -> HttpResponse:
    """The dashboard page; its numbers arrive from ``data``."""
    _require_permission(request)
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "data_url": reverse("admin-dashboard-data"),
        # The change page of job 0: the script swaps in each job's id.
        "job_url": reverse("admin:jobs_job_change", args=[0]),
    }
    return TemplateResponse(request, "jobs/dashboard.html", context)


@require_GET
def data(request: HttpRequest) -> JsonResponse:
    """Everything the page shows, as JSON."""
    _require_permission(request)
    now = timezone.now()
    queue_depth, clients = async_to_sync(_live_counts)()
    return JsonResponse(
        {
            "now": now.timestamp(),
            "queue": {"backend": get_queue().name, "depth": queue_depth},
            "clients": clients,
            "charts": charts(now),
            "poller": poller(),
            "latest_jobs": latest_jobs(now),
        }
    )


def _require_permission(request: HttpRequest) -> None:
    # admin_view has let staff through; the jobs themselves need this too.
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied


async def _live_counts() -> tuple[int | None, dict[str, int | None]]:
    try:
        depth: int | None = await get_queue().depth()
    except Exception as exc:  # the queue's store is down: show it, not a 500
        logger.warning("dashboard: could not read the queue depth: %s", exc)
        depth = None
    clients = {
        "process": presence.local_count(),
        "total": await presence.total_count(),
    }
    return depth, clients


def charts(now: datetime) -> dict[str, Any]:
    """The per-minute series of the last hour, at most CHARTS_MAX_AGE old."""
    global _charts_cache
    with _charts_lock:
        tick = time.monotonic()
        if _charts_cache is None or tick - _charts_cache[0] >= CHARTS_MAX_AGE_SECONDS:
            _charts_cache = (tick, compute_charts(now))
        return _charts_cache[1]


def forget() -> None:
    """Drop the cached series (tests)."""
    global _charts_cache
    _charts_cache = None


def compute_charts(now: datetime) -> dict[str, Any]:
    """Jobs published, and delivery latency p50/max, per minute of publishing.

    ``minutes`` are the minutes' starts in unix seconds, oldest first; a minute
    with no delivered job has ``null`` latencies.
    """
    first = _minute(now) - timedelta(minutes=CHART_MINUTES - 1)
    minutes = [first + timedelta(minutes=n) for n in range(CHART_MINUTES)]
    recent = Job.objects.filter(created_at__gte=first).order_by()
    published = dict(
        recent.annotate(minute=TruncMinute("created_at"))
        .values("minute")
        .annotate(jobs=Count("id"))
        .values_list("minute", "jobs")
    )
    latencies: dict[datetime, list[float]] = defaultdict(list)
    delivered = (
        recent.filter(delivered_at__isnull=False)
        .order_by("-id")
        .values_list("created_at", "delivered_at")[:LATENCY_SAMPLES]
    )
    for created_at, delivered_at in delivered:
        assert delivered_at is not None  # filtered above; for the type checker
        latencies[_minute(created_at)].append(_latency_ms(created_at, delivered_at))
    p50: list[float | None] = []
    worst: list[float | None] = []
    for minute in minutes:
        values = latencies.get(minute)
        p50.append(round(statistics.median(values), 1) if values else None)
        worst.append(round(max(values), 1) if values else None)
    return {
        "minutes": [int(minute.timestamp()) for minute in minutes],
        "published": [published.get(minute, 0) for minute in minutes],
        "latency_p50_ms": p50,
        "latency_max_ms": worst,
    }


def _minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def _latency_ms(created_at: datetime, delivered_at: datetime) -> float:
    # Another replica's clock may run a little behind: never below zero.
    return max(0.0, (delivered_at - created_at).total_seconds() * 1000)


def poller() -> dict[str, Any] | None:
    """The poller's last report, cut down to what the panel shows."""
    try:
        status = read_status()
    except DatabaseError:
        return {"error": "unavailable"}
    if status is None:
        return None  # no poller has ever reported
    discord = status.get("discord") or {}
    jobs = status.get("jobs") or {}
    age = status.get("report_age_seconds")
    return {
        "state": status.get("state"),
        "report_age_seconds": age,
        "stale": age is None or age > POLLER_STALE_SECONDS,
        "last_poll_at": discord.get("last_poll_at"),
        "last_error": discord.get("last_error"),
        "last_error_at": discord.get("last_error_at"),
        "rate_limited": discord.get("rate_limited"),
        "rate_limit_wait_seconds": discord.get("rate_limit_wait_seconds"),
        "published": jobs.get("published"),
        "buffered": jobs.get("buffered"),
        "publish_error": jobs.get("last_error"),
    }


def latest_jobs(now: datetime) -> list[dict[str, Any]]:
    """The newest jobs, newest first, with their age and delivery latency."""
    rows = Job.objects.order_by("-id").values(
        "id", "job_id", "channel", "status", "created_at", "expires_at", "delivered_at"
    )[:LATEST_JOBS]
    return [
        {
            "id": row["id"],
            "job_id": row["job_id"],
            "channel": row["channel"],
            "status": _status(row["status"], row["expires_at"], now),
            "age_seconds": round((now - row["created_at"]).total_seconds(), 1),
            "latency_ms": None
            if row["delivered_at"] is None
            else round(_latency_ms(row["created_at"], row["delivered_at"]), 1),
        }
        for row in rows
    ]


def _status(status: str, expires_at: datetime, now: datetime) -> str:
    # The sweep marks expired jobs now and then; the dashboard says it at once.
    if status == Job.Status.QUEUED and expires_at <= now:
        return str(Job.Status.EXPIRED)
    return status
