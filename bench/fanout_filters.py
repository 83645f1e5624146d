"""Filtered fan-out: 1,000 clients sharing five filters against five clients.

    python -m bench.fanout_filters            # the hub alone, then a real gateway
    python -m bench.fanout_filters --hub-only

Two measurements:

1. The hub alone, in this process (``jobs.fanout.Hub.dispatch`` with clients
   that drop their frames): CPU per job and filter matches per job, for five
   clients with five filters, 1,000 clients sharing those five, 1,000 clients
   without a filter, and 1,000 clients with 1,000 distinct filters (what
   matching once per client would cost).
2. End to end, with ``bench.fanout``'s phase (signed ``POST /job``, frames
   timed on arrival) against the embedded gateway under daphne: the same
   client counts, each client connecting with one of five filters. The five
   filters (``where=sent_at>=K``) all match every job, so that every client
   still expects every frame and delivery is counted as in ``bench.fanout``;
   what the filters add is the matching.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bench import fanout
from bench.common import API_KEY, fmt, format_table, machine_summary
from bench.fanout_client import ClientPool
from bench.gateway import Gateway

if TYPE_CHECKING:  # jobs needs Django set up, which the benchmark does first
    from jobs.fanout import Batch

FILTERS = [f"where=sent_at>={k}" for k in range(5)]


# --- 1. The hub alone -----------------------------------------------------------


class _Dropped:
    async def deliver(self, batch: Batch) -> None:
        return None


async def _hub_case(clients: int, filters: Sequence[str], jobs: int) -> dict[str, Any]:
    from jobs.fanout import Hub
    from jobs.filters import JobFilter, parse_filter_query

    hub = Hub()  # on the in-memory layer, idle: dispatch is called directly
    parsed = [parse_filter_query(query) for query in filters] or [JobFilter()]
    for n in range(clients):
        await hub.attach(_Dropped(), parsed[n % len(parsed)])
    calls = 0
    real = JobFilter.matches

    def counted(self: JobFilter, job: Any) -> bool:
        nonlocal calls
        calls += 1
        return real(self, job)

    JobFilter.matches = counted  # type: ignore[method-assign]
    try:
        job = {
            "id": 1,
            "channel": "api",
            "title": None,
            "fields": {"sent_at": "1764380000.5"},
            "numbers": {"sent_at": 1764380000.5},
        }
        started = time.process_time()
        for n in range(jobs):
            await hub.dispatch([{**job, "id": n}])
        cpu = time.process_time() - started
    finally:
        JobFilter.matches = real  # type: ignore[method-assign]
    return {
        "clients": clients,
        "filters": len(set(filters)),
        "groups": len(hub.groups),
        "us_per_job": cpu / jobs * 1e6,
        "matches_per_job": calls / jobs,
    }


def hub_alone(jobs: int) -> str:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
    import django

    django.setup()
    cases = [
        (5, FILTERS),
        (1000, FILTERS),
        (1000, []),
        (1000, [f"where=sent_at>={k}" for k in range(1000)]),
    ]
    rows = []
    for clients, filters in cases:
        result = asyncio.run(_hub_case(clients, filters, jobs))
        rows.append(
            [
                f"{result['clients']:,}",
                f"{result['filters']:,}" if filters else "none",
                fmt(result["matches_per_job"], 0),
                fmt(result["us_per_job"], 1),
            ]
        )
    header = ["clients", "distinct filters", "matches/job", "hub CPU µs/job"]
    return format_table(header, rows)


# --- 2. End to end --------------------------------------------------------------


class FilteredPool(ClientPool):
    """bench.fanout's pool, each connection asking for the next of FILTERS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._filters = itertools.cycle(FILTERS)

    @property
    def path(self) -> str:
        return f"/ws?api_key={API_KEY}&{next(self._filters)}"


def end_to_end(counts: Sequence[int], jobs: int, rate: float) -> str:
    side = fanout.Side(
        "gateway-embedded",
        "embedded",
        "gateway (SQLite, in-memory layer)",
        False,
        lambda side: Gateway(access_log=False),
    )
    rows = []
    with contextlib.ExitStack() as stack:
        server = side.make(side)
        stack.callback(server.close)
        server.start()
        side.running = server
        every = [side.pid]
        fanout.warm_up(side, rate, every)
        for number, (clients, filtered) in enumerate(
            (n, f) for n in counts for f in (False, True)
        ):
            # bench.fanout's phase opens its pool by this module-level name.
            setattr(fanout, "ClientPool", FilteredPool if filtered else ClientPool)  # noqa: B010
            try:
                fanout.measure(side, clients, jobs, rate, number, every)
            finally:
                setattr(fanout, "ClientPool", ClientPool)  # noqa: B010
            phase = side.phases[-1]
            delivered = max(phase.delivered, 1)
            rows.append(
                [
                    f"{clients:,}",
                    "5 (all match)" if filtered else "none",
                    fmt(phase.p50_ms, 1),
                    fmt(phase.p99_ms, 1),
                    f"{phase.missing:,} / {phase.expected:,}",
                    fmt(phase.server_cpu_s / delivered * 1e6, 1),
                ]
            )
        side.running = None
    header = ["clients", "filters", "p50 ms", "p99 ms", "missing", "server µs/frame"]
    return format_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_filters")
    parser.add_argument("--hub-only", action="store_true")
    parser.add_argument("--hub-jobs", type=int, default=2000)
    parser.add_argument("--clients", default="5,1000")
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    print(f"Filtered fan-out.\n{machine_summary()}")
    print(f"\n1. The hub alone, {args.hub_jobs:,} jobs per case:")
    print(hub_alone(args.hub_jobs))
    if not args.hub_only:
        counts = [int(part) for part in args.clients.split(",") if part.strip()]
        fanout.raise_file_limit(max(counts))
        print(
            f"\n2. End to end, embedded gateway, {args.jobs} jobs at "
            f"{args.rate:g}/s per phase:"
        )
        print(end_to_end(counts, args.jobs, args.rate))
    print(f"cores: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
