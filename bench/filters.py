"""Filtered claims: how a claim's latency grows with the jobs it reads past.

    python -m bench.filters                    # depths 10, 1,000, 10,000
    python -m bench.filters --depths 10,1000 --repeat 10 --backends sqlite

For each queue backend (SQLite and PostgreSQL with the database queue, Redis
with the Redis queue) and each depth D, the queue holds D - 1 jobs that do not
match, then one that does, the newest. A filtered claim (``where=money>=10M``)
must read past every other job to find it: the worst case. The same queue is
claimed without a filter for comparison (that takes the head at once). Each
repetition queues a fresh job at the tail first, so the depth stays D.

The claims run in this process through ``jobs.queues`` directly, without HTTP,
so that the figure is the queue's own cost. Each backend runs in a child
process of its own (Django reads its settings once per process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, fmt, format_table
from testkit.servers import PostgresServer, RedisServer

BACKENDS = ("sqlite", "postgresql", "redis")
FILTER = "where=money>=10M"


# --- The child: one backend, every depth --------------------------------------


def child(depths: Sequence[int], repeat: int) -> list[dict[str, Any]]:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", "--noinput", verbosity=0)
    return asyncio.run(_measure(depths, repeat))


async def _measure(depths: Sequence[int], repeat: int) -> list[dict[str, Any]]:
    from asgiref.sync import sync_to_async

    from jobs.filters import parse_filter_query
    from jobs.queues import get_queue

    queue = get_queue()
    job_filter = parse_filter_query(FILTER)
    results = []
    for depth in depths:
        await sync_to_async(_fill)(depth - 1)
        timings: dict[str, list[float]] = {"filtered": [], "unfiltered": []}
        for _ in range(repeat):
            newest = await sync_to_async(_queue_job)("10M")
            started = time.perf_counter()
            job = await queue.claim("10.0.0.1", job_filter)
            timings["filtered"].append(time.perf_counter() - started)
            assert job is not None and job["id"] == newest, "claimed the wrong job"
        for _ in range(repeat):
            await sync_to_async(_queue_job)("1M")
            started = time.perf_counter()
            job = await queue.claim("10.0.0.1")
            timings["unfiltered"].append(time.perf_counter() - started)
            assert job is not None
        depth_now = await queue.depth()
        assert depth_now == depth - 1, f"depth {depth_now}, expected {depth - 1}"
        for kind, values in timings.items():
            values.sort()
            results.append(
                {
                    "depth": depth,
                    "kind": kind,
                    "p50_ms": statistics.median(values) * 1000,
                    "p90_ms": values[int(0.9 * (len(values) - 1))] * 1000,
                    "max_ms": values[-1] * 1000,
                }
            )
    return results


def _fill(count: int) -> None:
    """Exactly ``count`` queued jobs, none of which matches."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from jobs import redis_clients
    from jobs.models import Job
    from jobs.numbers import numbers_from_fields
    from jobs.queues import QUEUE_KEY, get_queue

    Job.objects.all().delete()
    if settings.REDIS_URL:
        redis_clients.sync_client().delete(QUEUE_KEY)
    now = timezone.now()
    fields = {"Money": "1M", "Players": "3/8", "Name": "Not this one"}
    jobs = Job.objects.bulk_create(
        Job(
            job_id=f"filler-{n}",
            fields=fields,
            numbers=numbers_from_fields(fields),
            created_at=now,
            expires_at=now + timedelta(hours=1),
        )
        for n in range(count)
    )
    queue = get_queue()
    for job in jobs:
        queue.enqueue(job)


def _queue_job(money: str) -> int:
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import Job
    from jobs.numbers import numbers_from_fields
    from jobs.queues import get_queue

    now = timezone.now()
    fields = {"Money": money, "Players": "3/8", "Name": "This one"}
    job = Job.objects.create(
        job_id=f"job-{time.perf_counter_ns()}",
        fields=fields,
        numbers=numbers_from_fields(fields),
        created_at=now,
        expires_at=now + timedelta(hours=1),
    )
    get_queue().enqueue(job)
    return job.pk


# --- The parent: servers, children, the table ---------------------------------


def run_backend(backend: str, args: argparse.Namespace, stack: Any) -> list[Any]:
    env = {"QUEUE_BACKEND": "database", "REDIS_URL": "", "DEBUG": "false"}
    if backend == "sqlite":
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        env["DATABASE_URL"] = f"sqlite:///{Path(folder) / 'bench.sqlite3'}"
    elif backend == "postgresql":
        server = stack.enter_context(PostgresServer())
        env["DATABASE_URL"] = server.create_database("bench_filters")
    else:
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        env["DATABASE_URL"] = f"sqlite:///{Path(folder) / 'bench.sqlite3'}"
        redis_server = stack.enter_context(RedisServer())
        env.update(QUEUE_BACKEND="redis", REDIS_URL=redis_server.url)
    command = [
        sys.executable,
        "-m",
        "bench.filters",
        "--child",
        "--depths",
        ",".join(str(d) for d in args.depths),
        "--repeat",
        str(args.repeat),
    ]
    done = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"{backend} failed:\n{done.stderr[-3000:]}")
    rows: list[Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return rows


def _depths(text: str) -> list[int]:
    depths = sorted({int(part) for part in text.split(",") if part.strip()})
    if not depths or depths[0] < 1 or depths[-1] > 100_000:
        raise argparse.ArgumentTypeError("depths must be between 1 and 100,000")
    return depths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.filters")
    parser.add_argument("--depths", type=_depths, default=[10, 1000, 10_000])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        print(json.dumps(child(args.depths, args.repeat)))
        return 0
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"Filtered claims ({FILTER}, only the newest job matches) against "
        f"unfiltered ones, {args.repeat} claims per depth.\n"
        f"cores: {os.cpu_count()}, Python {sys.version.split()[0]}, "
        f"load average at start: {load}"
    )
    body = []
    for backend in wanted:
        reason = (
            PostgresServer.unavailable_reason()
            if backend == "postgresql"
            else RedisServer.unavailable_reason()
            if backend == "redis"
            else None
        )
        if reason:
            print(f"Skipping {backend}: {reason}.")
            continue
        with contextlib.ExitStack() as stack:
            rows = run_backend(backend, args, stack)
        by = {(r["depth"], r["kind"]): r for r in rows}
        for depth in args.depths:
            filtered, plain = by[(depth, "filtered")], by[(depth, "unfiltered")]
            body.append(
                [
                    backend,
                    f"{depth:,}",
                    fmt(plain["p50_ms"], 2),
                    fmt(filtered["p50_ms"], 2),
                    fmt(filtered["p90_ms"], 2),
                    fmt(filtered["p50_ms"] / depth * 1000, 1),
                ]
            )
    header = [
        "backend",
        "depth",
        "unfiltered p50 ms",
        "filtered p50 ms",
        "filtered p90 ms",
        "filtered µs/job read",
    ]
    print(format_table(header, body))
    print(f"cores: {os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
