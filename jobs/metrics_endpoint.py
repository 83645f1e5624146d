"""``GET /metrics``: the Prometheus text format, for the API key or a token."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from discord_poller.status import read_status
from jobs import metrics  # noqa: F401  (registers the instruments)
from jobs.auth import authenticate, hold_refusal, request_ip
from jobs.db import in_db_thread
from jobs.queues import get_queue
from jobs.responses import ApiError, require_method

_read_poller_status = in_db_thread(read_status)

# The poller's report (discord_poller.runner) -> gauge name, help. The poller
# runs in another process, often on another machine: its numbers reach us
# through its status row, read at scrape time.
POLLER_GAUGES = {
    ("discord", "requests"): ("discord_requests", "Requests sent to Discord."),
    ("discord", "rate_limited"): (
        "discord_rate_limited",
        "429 answers from Discord, bans included.",
    ),
    ("discord", "rate_limit_wait_seconds"): (
        "discord_rate_limit_wait_seconds",
        "Seconds spent waiting for Discord's rate limits.",
    ),
    ("discord", "bans"): ("discord_bans", "Discord bans (Cloudflare 1015) seen."),
    ("discord", "errors"): ("discord_errors", "Failed polls."),
    ("jobs", "published"): ("jobs_published", "Jobs the poller published."),
    ("jobs", "duplicates"): ("jobs_duplicates", "Duplicates the gateway reported."),
    ("jobs", "buffered"): ("jobs_buffered", "Jobs waiting in the publish buffer."),
}


class _ScrapeTimeValues(Collector):
    """Gauges read just now (queue depth, the poller's report)."""

    def __init__(self, depth: int | None, poller: dict[str, Any] | None) -> None:
        self.depth = depth
        self.poller = poller

    def collect(self) -> Iterator[Metric]:
        if self.depth is not None:
            yield GaugeMetricFamily(
                "gateway_queue_depth", "Unexpired jobs waiting.", value=self.depth
            )
        report = self.poller
        if report is None or "error" in report:
            return
        yield GaugeMetricFamily(
            "gateway_poller_report_age_seconds",
            "Age of the poller's last report: more than a few seconds means down.",
            value=report.get("report_age_seconds", 0.0),
        )
        for (part, key), (name, help_text) in POLLER_GAUGES.items():
            value = report.get(part, {}).get(key)
            if isinstance(value, int | float):
                yield GaugeMetricFamily(f"gateway_poller_{name}", help_text, value)
        responses = report.get("discord", {}).get("responses")
        if isinstance(responses, dict):
            by_status = GaugeMetricFamily(
                "gateway_poller_discord_responses",
                "Discord's answers to the poller, by HTTP status.",
                labels=["status"],
            )
            for status, count in sorted(responses.items()):
                if isinstance(count, int):
                    by_status.add_metric([str(status)], count)
            yield by_status


async def _authorise(request: HttpRequest) -> None:
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    if token and header.startswith("Bearer "):
        offered = header.removeprefix("Bearer ").encode()
        if hmac.compare_digest(offered, token.encode()):
            return
        await hold_refusal(request_ip(request))
        raise ApiError(401, "bad_token", "The bearer token is not valid.")
    await authenticate(request)


async def metrics_view(request: HttpRequest) -> HttpResponse:
    """Every counter, plus queue depth and the poller's numbers read now."""
    await _authorise(request)
    require_method(request, "GET")
    # A backing service down must not hide the counters: leave its gauges out.
    depth: int | None
    try:
        depth = await get_queue().depth()
    except Exception:
        depth = None
    try:
        poller = await _read_poller_status()
    except DatabaseError:
        poller = None
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    extra = CollectorRegistry()
    extra.register(_ScrapeTimeValues(depth, poller))
    body += generate_latest(extra)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
