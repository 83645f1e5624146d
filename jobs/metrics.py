"""The gateway's Prometheus instruments; each update is a cheap local increment.

With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client keeps every process's
values in files in that directory and ``/metrics`` sums them (``jobs.scrape``);
without it, they live in this process's memory.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

JOBS_PUBLISHED = Counter("gateway_jobs_published", "Jobs stored and queued.")
JOBS_DUPLICATES = Counter(
    "gateway_jobs_duplicates", "Published jobs answered as duplicates."
)
JOBS_CLAIMED = Counter("gateway_jobs_claimed", "Jobs handed out by GET /job/next.")
JOBS_EXPIRED = Counter(
    "gateway_jobs_expired", "Queued jobs the queue found past their expiry."
)
WEBSOCKET_CLIENTS = Gauge(
    "gateway_websocket_clients",
    "Connected WebSocket clients.",
    # Summed over live processes: a dead process's clients are gone too.
    multiprocess_mode="livesum",
)
DELIVERY_LATENCY = Histogram(
    "gateway_delivery_latency_seconds",
    "From publish to a job's first delivery (claim or live push) in a process.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

# Ids already observed, oldest first: every client of a broadcast gets the same
# job, and only its first delivery in this process measures latency.
MEMORY = 10_000
_delivered: OrderedDict[int, None] = OrderedDict()


def first_delivery(job: dict[str, Any], now: datetime | None = None) -> None:
    """Observe the latency of ``job`` unless this process delivered it already."""
    pk = job["id"]
    if pk in _delivered:
        return  # the common case for a broadcast: no clock read, no parsing
    now = now or datetime.now(UTC)
    _delivered[pk] = None
    if len(_delivered) > MEMORY:
        _delivered.popitem(last=False)
    created = datetime.fromisoformat(job["created_at"])
    DELIVERY_LATENCY.observe(max(0.0, (now - created).total_seconds()))


def claimed(job: dict[str, Any]) -> None:
    """A claim handed ``job`` out."""
    JOBS_CLAIMED.inc()
    first_delivery(job)
