"""The gateway's Prometheus instruments; each update is a cheap local increment.

With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client keeps every process's
values in files in that directory and ``/metrics`` sums them
(``jobs.metrics_endpoint``); without it, they live in this process's memory.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

JOBS_PUBLISHED = Counter("gateway_jobs_published", "Jobs stored and queued.")
JOBS_DUPLICATES = Counter(
    "gateway_jobs_duplicates", "Published jobs answered as duplicates."
)
JOBS_CLAIMED = Counter("gateway_jobs_claimed", "Jobs handed out by GET /job/next.")
JOBS_EXPIRED = Counter(
    "gateway_jobs_expired", "Queued jobs the queue found past their expiry."
)
LEASES_GRANTED = Counter(
    "gateway_leases_granted", "Jobs handed out under a lease (GET /job/next?lease=)."
)
LEASES_ACKED = Counter("gateway_leases_acked", "Leases acked: their jobs are done.")
LEASES_RELEASED = Counter(
    "gateway_leases_released", "Leases released: their jobs went back to the queue."
)
LEASES_EXPIRED = Counter(
    "gateway_leases_expired",
    "Leases that ran out: their jobs went back to the queue, or expired with them.",
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
