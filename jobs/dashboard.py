"""The admin's live dashboard: a page, and the JSON it polls every second.

Both views are wrapped by ``admin.site.admin_view`` in the URLconf (staff
only, never cached) and also need the permission to view jobs, as the job list
does. See docs/dashboard.md for what each number means.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
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
# The latency chart's series: the quantile of each minute's latencies they show.
LATENCY_SERIES = {
    "latency_p50_ms": 0.5,
    "latency_p90_ms": 0.9,
    "latency_p99_ms": 0.99,
    "latency_max_ms": 1.0,
}
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
    """Jobs published, and delivery latency percentiles, per minute of publishing.

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
    series: dict[str, list[float | None]] = {name: [] for name in LATENCY_SERIES}
    for minute in minutes:
        values = sorted(latencies.get(minute, ()))
        for name, fraction in LATENCY_SERIES.items():
            series[name].append(
                round(percentile(values, fraction), 1) if values else None
            )
    return {
        "minutes": [int(minute.timestamp()) for minute in minutes],
        "published": [published.get(minute, 0) for minute in minutes],
        **series,
    }


def percentile(ordered: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of sorted values, between the nearest two.

    Linear between neighbours, so that p50 is the median, and exact at the
    ends: p0 is the smallest value and p100 the largest.
    """
    position = (len(ordered) - 1) * fraction
    below = int(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


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
    """The newest jobs, newest first, with their age, state and delivery latency."""
    rows = Job.objects.order_by("-id").values(
        "id",
        "job_id",
        "channel",
        "status",
        "created_at",
        "expires_at",
        "claimed_at",
        "delivered_at",
        "pushed_at",
    )[:LATEST_JOBS]
    return [
        {
            "id": row["id"],
            "job_id": row["job_id"],
            "channel": row["channel"],
            "status": _status(row["status"], row["expires_at"], now),
            "delivered_by": _delivered_by(row),
            "state": _state(row, now),
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


def _delivered_by(row: Mapping[str, Any]) -> str | None:
    """``push``, ``pull``, ``both``, or None while no client has had the job."""
    pushed = row["pushed_at"] is not None
    # A delivery that no push made was a claim, even one the admin has since
    # requeued (which clears ``claimed_at``).
    pulled = row["claimed_at"] is not None or (
        row["delivered_at"] is not None and not pushed
    )
    if pushed and pulled:
        return "both"
    if pushed:
        return "push"
    return "pull" if pulled else None


def _state(row: Mapping[str, Any], now: datetime) -> str:
    """The words the table shows: how the job was delivered, or its queue status.

    A pushed job stays in the pull queue (its status reads ``queued``), but a
    client has it: the table says so rather than "queued".
    """
    delivered_by = _delivered_by(row)
    if delivered_by == "both":
        return "pushed + pulled"
    if delivered_by == "push":
        return "pushed"
    if delivered_by == "pull":
        return "pulled" if row["claimed_at"] is not None else "pulled, requeued"
    return _status(row["status"], row["expires_at"], now)
