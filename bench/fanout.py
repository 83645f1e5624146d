"""WebSocket fan-out: delivery latency to N clients, and memory per client.

    python -m bench.fanout --quick    # 1,000 clients, 1 round (about 2 min)
    python -m bench.fanout            # 100 and 1,000 clients, 2 rounds (< 5 min)
    python -m bench.fanout --quick --no-baseline --configs embedded --without PATCH
                                      # what one server patch earns
    python -m bench.fanout --configs embedded --clients 1000 --jobs 100 \
        --rounds 5 --gateway-ref main # the seed, this checkout and main's gateway
    python -m bench.fanout --configs redis --processes 2
                                      # adds manage.py serve, 2 processes on Redis

N clients hold ``/ws`` open on one server while K jobs are published through
signed ``POST /job`` at a steady rate. Each job carries its send time
(``fields.sent_at`` for the gateway, a ``sent_at`` key for the seed); each
client stamps each frame on arrival, so every (client, job) pair gives one
latency. The seed service (the baseline) and the gateway run in the same
invocation, alternately, so that the noise of a shared machine falls on both:

- embedded: the gateway on SQLite with the in-memory channel layer, against
  the seed with its in-memory queue;
- redis-pubsub and redis: the gateway with ``REDIS_URL`` and
  ``CHANNEL_LAYER=redis-pubsub`` or ``redis``, against the seed on Redis.

Memory is the server's resident set (VmRSS, with any child processes): idle
after a warm-up, then with the N clients connected. The clients run in this
process and share the machine's cores with the server under test; the client
CPU column says how much of its one core the load took (near 100 % it would
be measuring itself). ``--busy N`` adds N processes spinning on the CPU for the
whole measured run: the competing load of a shared machine, the same for all.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench.baseline import add_baseline_arguments, seed_factory
from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    checkout,
    fmt,
    format_table,
    machine_summary,
    ratio,
    run_async,
)
from bench.fanout_client import ClientPool, Expected, publish_jobs, tally
from bench.fanout_proc import cpu_seconds, rss_kib, settle
from bench.gateway import Gateway
from bench.trace.fanout_trace import TRACE_VARIABLE, describe
from gateway_project.server import LEAVE_OUT_VARIABLE
from testkit.servers import LOOPBACK, RedisServer

CONFIGS = ("embedded", "redis-pubsub", "redis")
# Bounds on each step, so that a stuck server cannot hold the run forever.
CONNECT_TIMEOUT = 60.0
# A frame not in within this long after the last post counts as missing (and as
# an infinite latency in the percentiles): a backlog must not stall the run.
DELIVERY_TIMEOUT = 5.0
DUPLICATE_GRACE = 0.3
# Then the connections still open are dropped (TCP reset).
CLOSE_TIMEOUT = 3.0
SETTLE_TIMEOUT = 10.0
WARMUP_CLIENTS = 20
WARMUP_JOBS = 10
# Targets of the issue, at the largest client count.
TARGET_P99 = {"embedded": 1.5, "redis-pubsub": 3.0, "redis": 3.0, "serve": 1.0}
TARGET_MEMORY = 1.5


class Server(Protocol):
    """What the benchmark needs of a running server."""

    @property
    def base_url(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


class LayerGateway(Gateway):
    """The gateway with ``CHANNEL_LAYER`` set (``bench.gateway`` leaves it unset)."""

    def __init__(
        self, *, channel_layer: str, redis_url: str, access_log: bool = True
    ) -> None:
        super().__init__(redis_url=redis_url, access_log=access_log)
        self.channel_layer = channel_layer

    def env(self) -> dict[str, str]:
        return {**super().env(), "CHANNEL_LAYER": self.channel_layer}


# --- What is measured -----------------------------------------------------------


@dataclass
class PhaseResult:
    """One server, N clients, K jobs: everything measured in that phase."""

    clients: int
    round: int
    connected: int
    connect_failures: dict[str, int]
    connect_seconds: float
    rss_connected_kib: int | None
    rss_after_kib: int | None
    jobs_accepted: int
    publish_errors: dict[str, int]
    post_p50_ms: float | None
    post_p99_ms: float | None
    expected: int
    delivered: int
    missing: int
    duplicated: int
    unexpected: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    # Per job, the latency of its last client: when the whole fan-out was done.
    last_p50_ms: float | None
    last_p99_ms: float | None
    last_max_ms: float | None
    seconds: float
    server_cpu_s: float
    redis_cpu_s: float | None
    client_cpu_s: float
    aborted_closes: int
    steps: dict[str, float]


@dataclass
class Side:
    """One server under test and its phases."""

    key: str
    config: str
    server: str
    baseline: bool
    make: Callable[[Side], Server]
    compare_to: str | None = None
    batch: bool = False  # the gateway's clients ask for batched frames
    redis: RedisServer | None = None
    running: Server | None = None
    idle_rss_kib: int | None = None
    phases: list[PhaseResult] = field(default_factory=list)
    latencies: dict[int, array.array[float]] = field(default_factory=dict)
    last_latencies: dict[int, array.array[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    trace: Path | None = None

    @property
    def gateway(self) -> bool:
        return not self.baseline

    @property
    def label(self) -> str:
        return f"{self.config}, {self.server}"

    @property
    def pid(self) -> int:
        assert self.running is not None and self.running.pid is not None
        return self.running.pid

    @property
    def port(self) -> int:
        assert self.running is not None
        port = urlsplit(self.running.base_url).port
        assert port is not None
        return port

    def redis_pid(self) -> int | None:
        if self.redis is None or self.redis.process is None:
            return None
        return self.redis.process.pid


# --- Setting up the servers -------------------------------------------------------


def build_sides(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Side]:
    """The servers to compare; prints why any is left out."""
    seed = seed_factory(args)
    access_log: bool = args.access_log
    sides: list[Side] = []
    wanted: set[str] = args.configs

    def redis_for(side: Side) -> str:
        # One Redis per server: pub/sub channels are shared by every database
        # of a Redis server, so two gateways on one Redis would hear each other.
        server = RedisServer()
        stack.callback(server.close)
        server.start()
        side.redis = server
        return server.url

    trace = _tracing(args)
    if "embedded" in wanted:
        if seed is not None:
            sides.append(
                Side(
                    "seed-memory",
                    "embedded",
                    "seed (in-memory)",
                    True,
                    lambda side: seed(None),
                )
            )
        sides.append(
            Side(
                "gateway-embedded",
                "embedded",
                "gateway (SQLite, in-memory layer)",
                False,
                lambda side: Gateway(access_log=access_log, **trace(side)),
                compare_to="seed-memory" if seed else None,
            )
        )
    if args.gateway_ref:
        # Another commit's gateway, same stack: before and after a change.
        source = stack.enter_context(checkout(args.gateway_ref))
        sides.append(
            Side(
                f"gateway-{args.gateway_ref}",
                "embedded",
                f"gateway at {args.gateway_ref}",
                False,
                lambda side: Gateway(
                    access_log=access_log, source=source, **trace(side)
                ),
                compare_to="seed-memory" if seed else None,
            )
        )
    if args.without:
        # One patch of the server seam measured against every patch applied.
        sides.append(
            Side(
                f"gateway-without-{args.without}",
                "embedded",
                f"gateway without {args.without}",
                False,
                lambda side: Gateway(
                    access_log=access_log,
                    extra_env={LEAVE_OUT_VARIABLE: args.without},
                ),
                compare_to="gateway-embedded",
            )
        )
    redis_configs = [c for c in ("redis-pubsub", "redis") if c in wanted]
    processes: int | None = args.processes
    reason = RedisServer.unavailable_reason() if redis_configs or processes else None
    if reason:
        print(f"Skipping the Redis rows: {reason}.")
        redis_configs = []
        processes = None
    if (redis_configs or processes) and seed is not None:
        sides.append(
            Side(
                "seed-redis",
                "Redis",
                "seed (Redis)",
                True,
                lambda side: seed(redis_for(side)),
            )
        )
    for layer in redis_configs:
        sides.append(
            Side(
                f"gateway-{layer}",
                layer,
                f"gateway (CHANNEL_LAYER={layer})",
                False,
                _layer_gateway(layer, access_log, redis_for),
                compare_to="seed-redis" if seed else None,
            )
        )
    if processes:
        sides.append(
            Side(
                f"gateway-serve-{processes}",
                "serve",
                f"gateway, manage.py serve, {processes} processes (Redis)",
                False,
                lambda side: Gateway(
                    redis_url=redis_for(side),
                    access_log=access_log,
                    processes=processes,
                ),
                compare_to="seed-redis" if seed else None,
            )
        )
    return sides


def _tracing(args: argparse.Namespace) -> Callable[[Side], dict[str, Any]]:
    """A side's Gateway options: served through bench/trace with --trace."""
    folder: Path | None = args.trace

    def options(side: Side) -> dict[str, Any]:
        if folder is None:
            return {}
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{side.key}.jsonl"
        path.unlink(missing_ok=True)
        side.trace = path
        return {
            "application": "fanout_trace:application",
            "extra_env": {
                TRACE_VARIABLE: str(path),
                # The tracer alone on the path: any checkout's gateway finds it.
                "PYTHONPATH": str(REPO_ROOT / "bench" / "trace"),
            },
        }

    return options


def _layer_gateway(
    layer: str, access_log: bool, redis_for: Callable[[Side], str]
) -> Callable[[Side], Server]:
    return lambda side: LayerGateway(
        channel_layer=layer, redis_url=redis_for(side), access_log=access_log
    )


def raise_file_limit(clients: int) -> None:
    """Client and server each hold one descriptor per connection."""
    needed = 2 * clients + 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        print(f"Only {target} file descriptors allowed: connections may fail.")


# --- Measuring --------------------------------------------------------------------


def _pids(side: Side) -> list[int]:
    return [side.pid]


async def _phase(
    side: Side,
    clients: int,
    jobs: int,
    rate: float,
    number: int,
    every_server: Sequence[int] = (),
) -> tuple[PhaseResult, list[float], list[float]]:
    loop = asyncio.get_running_loop()
    steps: dict[str, float] = {}
    clock = time.monotonic()

    def step(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        steps[name] = round(now - clock, 2)
        clock = now

    # The previous phase's server may still be busy with its backlog.
    await settle(every_server, timeout=SETTLE_TIMEOUT)
    step("settle")
    pool = ClientPool(
        LOOPBACK, side.port, wait_for_hello=side.gateway, batch=side.batch
    )
    connect_seconds = await pool.connect(clients, timeout=CONNECT_TIMEOUT)
    await settle(_pids(side), timeout=SETTLE_TIMEOUT)
    step("connect")
    rss_connected = rss_kib(side.pid)
    redis_pid = side.redis_pid()
    cpu_before = cpu_seconds(_pids(side))
    redis_before = cpu_seconds([redis_pid]) if redis_pid else None
    client_before = time.process_time()
    started = time.perf_counter()

    token = secrets.token_hex(3)
    job_ids = [f"fanout-{number}-{token}-{n:05d}" for n in range(jobs)]
    connected = len(pool.clients)
    pool.expect(connected * jobs)
    deadline = loop.time() + (jobs - 1) / rate + DELIVERY_TIMEOUT
    base_url = side.running.base_url if side.running else ""
    publisher = asyncio.create_task(
        publish_jobs(
            base_url,
            job_ids,
            rate=rate,
            gateway=side.gateway,
            deadline=deadline,
            on_refused=lambda: pool.expect_fewer(connected),
        )
    )
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout_at(deadline):
            await pool.all_in.wait()
    await asyncio.sleep(DUPLICATE_GRACE)
    until = time.time()
    publication = await publisher
    step("publish and deliver")

    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - client_before
    server_cpu = cpu_seconds(_pids(side)) - cpu_before
    redis_cpu = (
        cpu_seconds([redis_pid]) - redis_before
        if redis_pid and redis_before is not None
        else None
    )
    rss_after = rss_kib(side.pid)
    aborted = await pool.close(timeout=CLOSE_TIMEOUT)
    step("close")
    counted = tally(
        pool.clients,
        Expected(publication.sent_at, publication.expected),
        gateway=side.gateway,
        until=until,
    )
    latencies = sorted(counted.latencies_ms)
    last = sorted(counted.last_ms.values())
    answers = sorted(publication.answer_ms.values())
    unanswered = len(publication.unanswered)
    result = PhaseResult(
        clients=clients,
        round=number,
        connected=connected,
        connect_failures=dict(pool.failures),
        connect_seconds=connect_seconds,
        rss_connected_kib=rss_connected,
        rss_after_kib=rss_after,
        jobs_accepted=len(publication.accepted),
        publish_errors=dict(publication.errors),
        post_p50_ms=percentile(answers, 50, missing=unanswered),
        post_p99_ms=percentile(answers, 99, missing=unanswered),
        expected=counted.expected,
        delivered=len(latencies),
        missing=counted.missing,
        duplicated=counted.duplicated,
        unexpected=counted.unexpected,
        p50_ms=percentile(latencies, 50, missing=counted.missing),
        p99_ms=percentile(latencies, 99, missing=counted.missing),
        max_ms=percentile(latencies, 100, missing=counted.missing),
        last_p50_ms=percentile(last, 50),
        last_p99_ms=percentile(last, 99),
        last_max_ms=percentile(last, 100),
        seconds=seconds,
        server_cpu_s=server_cpu,
        redis_cpu_s=redis_cpu,
        client_cpu_s=client_cpu,
        aborted_closes=aborted,
        steps=steps,
    )
    return result, latencies, last


def measure(
    side: Side,
    clients: int,
    jobs: int,
    rate: float,
    number: int,
    every_server: Sequence[int],
) -> None:
    """Run one phase on ``side`` and record it."""
    started = time.monotonic()
    result, latencies, last = run_async(
        _phase(side, clients, jobs, rate, number, every_server)
    )
    side.phases.append(result)
    side.latencies.setdefault(clients, array.array("d")).extend(latencies)
    side.last_latencies.setdefault(clients, array.array("d")).extend(last)
    for problem in _problems(result, clients, jobs):
        side.problems.append(f"N={clients} round {number + 1}: {problem}")
    print(
        f"  {side.label:<50} p50 {_ms(result.p50_ms):>8}  "
        f"p99 {_ms(result.p99_ms):>8}  max {_ms(result.max_ms):>8}  "
        f"missing {result.missing:,}/{result.expected:,}  "
        f"dup {result.duplicated}  last client p99 {_ms(result.last_p99_ms)}  "
        f"POST p50 {_ms(result.post_p50_ms)} p99 {_ms(result.post_p99_ms)}  "
        f"RSS {fmt(_mib(result.rss_connected_kib), 1)} MiB  "
        f"({time.monotonic() - started:.0f} s: "
        + ", ".join(f"{name} {value:.0f}" for name, value in result.steps.items())
        + ")"
    )


def _problems(result: PhaseResult, clients: int, jobs: int) -> list[str]:
    problems = []
    if result.connected < clients:
        problems.append(
            f"{clients - result.connected} of {clients} clients could not connect "
            f"({result.connect_failures})"
        )
    if result.jobs_accepted < jobs:
        problems.append(f"only {result.jobs_accepted} of {jobs} jobs were accepted")
    if result.publish_errors:
        problems.append(f"publish errors: {result.publish_errors}")
    if result.missing or result.duplicated or result.unexpected:
        problems.append(
            f"{result.missing} frames missing, {result.duplicated} duplicated, "
            f"{result.unexpected} unexpected"
        )
    return problems


def warm_up(side: Side, rate: float, every_server: Sequence[int]) -> None:
    """First connections pay for imports, threads and pools; then idle memory."""
    result, _, _ = run_async(
        _phase(side, WARMUP_CLIENTS, WARMUP_JOBS, rate, -1, every_server)
    )
    if result.missing or result.connected < WARMUP_CLIENTS:
        side.problems.append(
            f"warm-up: {result.connected} connected, {result.missing} frames missing"
        )
    run_async(settle([side.pid], timeout=SETTLE_TIMEOUT))
    side.idle_rss_kib = rss_kib(side.pid)


def rotated(sides: Sequence[Side], by: int) -> list[Side]:
    """``sides`` starting at ``by``: each round starts with another server."""
    shift = by % len(sides)
    return [*sides[shift:], *sides[:shift]]


# --- Reporting --------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float, *, missing: int = 0) -> float | None:
    """Nearest-rank percentile of a sorted sequence plus ``missing`` infinities."""
    total = len(ordered) + missing
    if not total:
        return None
    rank = min(total, max(1, math.ceil(q / 100 * total)))
    return ordered[rank - 1] if rank <= len(ordered) else math.inf


def _ms(value: float | None) -> str:
    if value is not None and math.isinf(value):
        return f">{DELIVERY_TIMEOUT:g} s"
    return fmt(value, 1, " ms")


def _mib(kib: float | None) -> float | None:
    return None if kib is None else kib / 1024


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass(frozen=True)
class Row:
    """One server at one client count: pooled latencies, medians, ratios."""

    side: Side
    clients: int
    p50: float | None
    p99: float | None
    max: float | None
    last_p50: float | None
    last_p99: float | None
    last_max: float | None
    missing: int
    duplicated: int
    expected: int
    rss_idle_mib: float | None
    rss_connected_mib: float | None
    per_client_kib: float | None
    connect_rate: float | None
    post_p50: float | None
    post_p99: float | None
    server_us_per_frame: float | None
    redis_us_per_frame: float | None
    client_cpu_share: float | None
    server_cpu_share: float | None
    p99_ratio: float | None = None
    memory_ratio: float | None = None
    p99_ratios: tuple[float, ...] = ()


def summarise(sides: Sequence[Side], client_counts: Sequence[int]) -> list[Row]:
    """One row per side and client count; gateway rows carry ratios."""
    rows: list[Row] = []
    for clients in client_counts:
        by_key: dict[str, Row] = {}
        for side in sides:
            phases = [p for p in side.phases if p.clients == clients]
            if not phases:
                continue
            pooled = sorted(side.latencies.get(clients, array.array("d")))
            last = sorted(side.last_latencies.get(clients, array.array("d")))
            idle = side.idle_rss_kib
            frames = [p.delivered for p in phases]
            # The lowest of the rounds: a later one also holds what an earlier
            # backlog left behind (messages wait in a channel layer until they
            # expire), which is not the cost of the connections.
            measured = [p for p in phases if p.rss_connected_kib and p.connected]
            leanest = min(
                measured, key=lambda p: p.rss_connected_kib or 0, default=None
            )
            missing = sum(p.missing for p in phases)
            row = Row(
                side=side,
                clients=clients,
                p50=percentile(pooled, 50, missing=missing),
                p99=percentile(pooled, 99, missing=missing),
                max=percentile(pooled, 100, missing=missing),
                last_p50=percentile(last, 50),
                last_p99=percentile(last, 99),
                last_max=percentile(last, 100),
                missing=missing,
                duplicated=sum(p.duplicated for p in phases),
                expected=sum(p.expected for p in phases),
                rss_idle_mib=_mib(idle),
                rss_connected_mib=_mib(leanest.rss_connected_kib if leanest else None),
                per_client_kib=(
                    ((leanest.rss_connected_kib or 0) - idle) / leanest.connected
                    if leanest and idle is not None
                    else None
                ),
                connect_rate=_median(
                    [
                        p.connected / p.connect_seconds
                        for p in phases
                        if p.connect_seconds
                    ]
                ),
                post_p50=_median([p.post_p50_ms for p in phases]),
                post_p99=_median([p.post_p99_ms for p in phases]),
                server_us_per_frame=_per_frame(
                    [p.server_cpu_s for p in phases], frames
                ),
                redis_us_per_frame=_per_frame([p.redis_cpu_s for p in phases], frames),
                client_cpu_share=_median(
                    [p.client_cpu_s / p.seconds for p in phases if p.seconds]
                ),
                server_cpu_share=_median(
                    [p.server_cpu_s / p.seconds for p in phases if p.seconds]
                ),
            )
            by_key[side.key] = row
        for row in by_key.values():
            base = by_key.get(row.side.compare_to or "")
            if base is not None:
                mine = [p for p in row.side.phases if p.clients == clients]
                theirs = [p for p in base.side.phases if p.clients == clients]
                row = replace(
                    row,
                    p99_ratio=_ratio(row.p99, base.p99),
                    memory_ratio=ratio(row.per_client_kib, base.per_client_kib),
                    p99_ratios=tuple(
                        r
                        for g, b in zip(mine, theirs, strict=False)
                        if (r := _ratio(g.p99_ms, b.p99_ms)) is not None
                    ),
                )
            rows.append(row)
    return rows


def _ratio(mine: float | None, theirs: float | None) -> float | None:
    """gateway / seed; None when the seed's own figure is off scale."""
    if theirs is not None and math.isinf(theirs):
        return None
    return ratio(mine, theirs)


def _latency(value: float | None) -> str:
    if value is not None and math.isinf(value):
        return f">{DELIVERY_TIMEOUT:g} s"
    return fmt(value, 1)


def _times(value: float | None) -> str:
    if value is not None and math.isinf(value):
        return "off scale"
    return fmt(value, 2, "x")


def _share(value: float | None) -> str:
    """A CPU share of one core, as a percentage."""
    return fmt(None if value is None else value * 100, 0, "%")


def _per_frame(cpu: Sequence[float | None], frames: Sequence[int]) -> float | None:
    spent = [c for c in cpu if c is not None]
    if not spent or len(spent) != len(frames) or not sum(frames):
        return None
    return sum(spent) / sum(frames) * 1e6


def latency_table(rows: Sequence[Row]) -> str:
    header = [
        "config",
        "server",
        "N",
        "p50 ms",
        "p99 ms",
        "max ms",
        "last client p50 / p99 / max ms",
        "missing",
        "dup",
        "RSS idle MiB",
        "RSS with N MiB",
        "KiB/client",
        "p99 vs seed",
        "KiB/client vs seed",
    ]
    body = [
        [
            row.side.config,
            row.side.server,
            f"{row.clients:,}",
            _latency(row.p50),
            _latency(row.p99),
            _latency(row.max),
            " / ".join(_latency(v) for v in (row.last_p50, row.last_p99, row.last_max)),
            f"{row.missing:,} / {row.expected:,}",
            str(row.duplicated),
            fmt(row.rss_idle_mib, 1),
            fmt(row.rss_connected_mib, 1),
            fmt(row.per_client_kib, 1),
            _times(row.p99_ratio),
            _times(row.memory_ratio),
        ]
        for row in rows
    ]
    return format_table(header, body)


def cost_table(rows: Sequence[Row]) -> str:
    header = [
        "config",
        "server",
        "N",
        "handshakes/s",
        "POST /job p50 ms",
        "POST /job p99 ms",
        "server CPU",
        "server CPU µs/frame",
        "Redis CPU µs/frame",
        "client CPU",
        "p99 ratio per round",
    ]
    body = [
        [
            row.side.config,
            row.side.server,
            f"{row.clients:,}",
            fmt(row.connect_rate),
            _latency(row.post_p50),
            _latency(row.post_p99),
            _share(row.server_cpu_share),
            fmt(row.server_us_per_frame, 1),
            fmt(row.redis_us_per_frame, 1),
            _share(row.client_cpu_share),
            ", ".join(_times(r) for r in row.p99_ratios) or fmt(None),
        ]
        for row in rows
    ]
    return format_table(header, body)


def rounds_table(sides: Sequence[Side]) -> str:
    """Every phase of every side, round by round."""
    header = [
        "N",
        "round",
        "server",
        "p50 ms",
        "p99 ms",
        "max ms",
        "last client p99 ms",
        "missing",
        "POST /job p99 ms",
        "handshakes/s",
        "p99 vs its reference",
    ]
    by_key = {side.key: side for side in sides}
    body = []
    for side in sides:
        base = by_key.get(side.compare_to or "")
        for phase in side.phases:
            theirs = next(
                (
                    p
                    for p in (base.phases if base else [])
                    if p.clients == phase.clients and p.round == phase.round
                ),
                None,
            )
            body.append(
                [
                    f"{phase.clients:,}",
                    str(phase.round + 1),
                    side.server,
                    _latency(phase.p50_ms),
                    _latency(phase.p99_ms),
                    _latency(phase.max_ms),
                    _latency(phase.last_p99_ms),
                    f"{phase.missing:,}",
                    _latency(phase.post_p99_ms),
                    fmt(
                        phase.connected / phase.connect_seconds
                        if phase.connect_seconds
                        else None
                    ),
                    _times(_ratio(phase.p99_ms, theirs.p99_ms if theirs else None)),
                ]
            )
    body.sort(key=lambda row: (int(row[0].replace(",", "")), int(row[1])))
    return format_table(header, body)


def verdicts(rows: Sequence[Row], clients: int) -> list[str]:
    """The issue's targets, checked at ``clients`` clients."""
    lines = []
    for row in rows:
        if row.clients != clients or row.side.baseline:
            continue
        limit = TARGET_P99[row.side.config]
        base = next(
            (
                r
                for r in rows
                if r.clients == clients and r.side.key == row.side.compare_to
            ),
            None,
        )
        missing = row.missing + (base.missing if base else 0)
        checks = [
            f"frames missing (gateway + seed): {missing:,} "
            f"({'ok' if missing == 0 else 'MISSED'})",
            f"p99 {_times(row.p99_ratio)} of the seed's, target <= {limit}x "
            f"({_met(row.p99_ratio, limit)})",
            f"memory per client {_times(row.memory_ratio)}, target <= "
            f"{TARGET_MEMORY}x ({_met(row.memory_ratio, TARGET_MEMORY)})",
        ]
        lines.append(f"  {row.side.server}: " + "; ".join(checks))
    return lines


def _met(value: float | None, limit: float) -> str:
    if value is None:
        return "no baseline"
    return "ok" if value <= limit else "MISSED"


def save(
    path: Path,
    args: argparse.Namespace,
    sides: Sequence[Side],
    summary: str,
    rows: Sequence[Row],
) -> None:
    """Every phase's figures (not every latency), as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": summary,
        "options": {
            "clients": args.clients,
            "jobs": args.jobs,
            "rounds": args.rounds,
            "rate": args.rate,
            "configs": sorted(args.configs),
            "access_log": args.access_log,
            "gateway_ref": args.gateway_ref,
            "processes": args.processes,
            "busy": args.busy,
        },
        "sides": [
            {
                "key": side.key,
                "label": side.label,
                "idle_rss_kib": side.idle_rss_kib,
                "phases": [asdict(p) for p in side.phases],
                "problems": side.problems,
            }
            for side in sides
        ],
        "rows": [
            {
                "key": row.side.key,
                "clients": row.clients,
                **{
                    name: getattr(row, name)
                    for name in (
                        "p50",
                        "p99",
                        "max",
                        "missing",
                        "duplicated",
                        "expected",
                        "rss_idle_mib",
                        "rss_connected_mib",
                        "per_client_kib",
                        "connect_rate",
                        "post_p50",
                        "post_p99",
                        "last_p50",
                        "last_p99",
                        "last_max",
                        "server_us_per_frame",
                        "redis_us_per_frame",
                        "client_cpu_share",
                        "server_cpu_share",
                        "p99_ratio",
                        "memory_ratio",
                    )
                },
                "p99_ratios": list(row.p99_ratios),
            }
            for row in rows
        ],
    }
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")


def _finite(value: object) -> object:
    """JSON has no infinity: an off-scale latency is saved as null."""
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# --- Command line -----------------------------------------------------------------


def _counts(text: str) -> list[int]:
    try:
        counts = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not counts or counts[0] < 1 or counts[-1] > 10_000:
        raise argparse.ArgumentTypeError("client counts must be between 1 and 10,000")
    return counts


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1,000 clients only, 1 round of 30 jobs (about 2 minutes)",
    )
    parser.add_argument(
        "--clients", type=_counts, help="comma-separated client counts (100,1000)"
    )
    parser.add_argument("--jobs", type=int, help="jobs per phase (default 30)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 2)")
    parser.add_argument(
        "--rate", type=float, default=20.0, help="jobs published per second"
    )
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated: embedded, redis-pubsub, redis",
    )
    add_baseline_arguments(parser)
    parser.add_argument(
        "--batch",
        action="store_true",
        help="the gateway's clients ask for batched frames (/ws?batch=1)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=285.0,
        help="start a round only if, judging by the last one, it ends within "
        "this many seconds of the start (default 285)",
    )
    parser.add_argument(
        "--without",
        metavar="PATCH",
        help="add the embedded gateway without server patch PATCH "
        "(gateway_project/server), compared with the embedded gateway",
    )
    parser.add_argument(
        "--gateway-ref",
        metavar="REF",
        help="add the embedded gateway of git commit REF (a temporary worktree), "
        "compared with the seed: before and after a change, in one run",
    )
    parser.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="add the gateway on Redis under manage.py serve with N daphne "
        "processes on one port, compared with the seed on Redis",
    )
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="N processes spinning on the CPU during the measured rounds "
        "(a competing load)",
    )
    parser.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="trace where frames wait in the embedded gateways' hubs (bench/trace), "
        "one file per side in DIR, and summarise them",
    )
    parser.add_argument("--json", type=Path, help="where to save every figure")
    args = parser.parse_args(argv)
    args.configs = {c.strip() for c in args.configs.split(",") if c.strip()}
    if unknown := args.configs - set(CONFIGS):
        parser.error(f"unknown config(s): {', '.join(sorted(unknown))}")
    quick = args.quick
    args.clients = args.clients or ([1000] if quick else [100, 1000])
    args.jobs = args.jobs or 30
    args.rounds = args.rounds or (1 if quick else 2)
    if not 0 < args.rate <= 1000:
        parser.error("--rate must be between 0 and 1000 jobs per second")
    if args.processes is not None and not 1 <= args.processes <= 64:
        parser.error("--processes must be between 1 and 64")
    if not 0 <= args.busy <= 64:
        parser.error("--busy must be between 0 and 64")
    for name in ("jobs", "rounds"):
        if not 1 <= getattr(args, name) <= 10_000:
            parser.error(f"--{name} must be between 1 and 10,000")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    summary = machine_summary()
    counts = ", ".join(f"{n:,}" for n in args.clients)
    print(
        f"WebSocket fan-out: {counts} clients, {args.jobs} jobs per phase at "
        f"{args.rate:g}/s, {args.rounds} interleaved round(s).\n"
        f"{summary}\n"
        f"Cores: {os.cpu_count()}. The clients run in this one process and share "
        f"those cores with the server under test."
    )
    raise_file_limit(max(args.clients))
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        sides = build_sides(args, stack)
        for side in sides:
            side.batch = side.gateway and args.batch
            server = side.make(side)
            stack.callback(server.close)
            server.start()
            side.running = server
        every_server = [side.pid for side in sides]
        print("Warming up...")
        for side in sides:
            warm_up(side, args.rate, every_server)
        if args.busy:
            print(f"Competing load: {args.busy} process(es) spinning on the CPU.")
            stack.enter_context(busy_load(args.busy))
        step = 0
        skipped: list[str] = []
        for clients in args.clients:
            last_round = 0.0
            for number in range(args.rounds):
                elapsed = time.monotonic() - started
                if number and elapsed + last_round > args.max_seconds:
                    print(
                        f" N={clients:,}: {args.rounds - number} round(s) left out, "
                        f"they would end past {args.max_seconds:g} s (--max-seconds)."
                    )
                    skipped.append(f"N={clients:,}: {number} of {args.rounds} rounds")
                    break
                round_started = time.monotonic()
                print(f" N={clients:,}, round {number + 1}/{args.rounds}")
                for side in rotated(sides, step):
                    measure(side, clients, args.jobs, args.rate, number, every_server)
                step += 1
                last_round = time.monotonic() - round_started
        for side in sides:
            side.running = None
    rows = summarise(sides, args.clients)
    print(
        f"\nLatency: from POST /job sent to frame received, pooled over every "
        f"(client, job) of every round run. Missing: not received within "
        f"{DELIVERY_TIMEOUT:g} s of the last post (late or dropped), counted as "
        f"an infinite latency. RSS with N: the lowest of the rounds; KiB/client: "
        f"(RSS with N - RSS idle) / N. Ratios are gateway / seed. CPU: share of "
        f"one core over the publish-and-deliver step; µs/frame: that CPU time "
        f"over the frames delivered in time."
    )
    print(summary)
    print(latency_table(rows))
    print()
    print(cost_table(rows))
    print()
    print(rounds_table(sides))
    print(f"\nLoad average at the end: {_load_average()}")
    for side in sides:
        if side.trace is not None and side.trace.exists():
            lines = side.trace.read_text().splitlines()
            print("\nWhere frames waited, " + describe(side.label, lines))
    print(f"\nTargets at {max(args.clients):,} clients:")
    for line in verdicts(rows, max(args.clients)):
        print(line)
    for line in skipped:
        print(f"Rounds left out to stay within --max-seconds: {line}.")
    problems = [(side, p) for side in sides for p in side.problems]
    for side, problem in problems:
        print(f"PROBLEM {side.label}: {problem}")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS_DIR / f"fanout-{stamp}.json"
    save(path, args, sides, summary, rows)
    print(
        f"\nFigures saved to {_shown(path)}; took {time.monotonic() - started:.0f} s."
    )
    return 1 if problems else 0


@contextlib.contextmanager
def busy_load(count: int) -> Iterator[None]:
    """``count`` processes spinning on the CPU until the block ends."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _load_average() -> str:
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPO_ROOT))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
