"""Load test: WebSocket clients and pulling workers under a steady stream of jobs.

    python -m bench.loadtest --quick      # 100 clients, 10 workers, 10 s (< 1 min)
    python -m bench.loadtest              # 1,000 clients, 50 workers, 60 s, 100/s
    python -m bench.loadtest --redis      # adds Redis (+ PostgreSQL) after embedded
    python -m bench.loadtest --redis --no-embedded --processes 2
    python -m bench.loadtest --redis --turns-only --duration 720 --turns 96

For each stack, three phases on one gateway (daphne; with ``--processes``, the
Redis stack runs several, sharing the load in turn): N WebSocket clients hold
``/ws`` open and W workers hold signed ``GET /job/next?wait=S`` long-polls while
jobs are published through signed ``POST /job`` at R per second for D seconds.
The second phase adds a flood: many concurrent requests to the same endpoints
with a wrong ``X-SIGNATURE`` (and ``/ws`` handshakes with a wrong key). The
third turns that flood on and off by turns (off, on, on, off, ...), so that the
jobs posted with it on and those posted with it off share the same minutes of
a noisy machine and the same state of the server (``--turns-only``: that
phase alone, for long runs of it).

Checked, job by job: every accepted job pulled by exactly one worker, and
pushed to every WebSocket client exactly once. Measured: delivery latency from
publish (the ``POST`` sent) to WebSocket client and to worker, p50 and p99;
daphne's CPU time and resident memory; and the valid traffic's throughput and
latency with the flood against without it (target: no more than 20 % slower),
phase against phase and turn against turn. Clients, workers, publisher and
flood run on the same machine as the server.

Exit status 1 if any job was lost or duplicated (or a forged request was
admitted); a missed slow-down target is reported but does not fail the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from bench.common import RESULTS_DIR, fmt, format_table, machine_summary, ratio
from bench.common import run_async as run_client_loop
from bench.fanout import percentile, raise_file_limit
from bench.fanout_client import Publication, publish_jobs
from bench.fanout_proc import cpu_seconds, rss_kib, settle
from bench.gateway import Gateway, PostgresDatabase
from bench.loadtest_http import (
    FloodProcess,
    FloodReport,
    Pulls,
    pull,
    take_leftovers,
    tally_workers,
)
from bench.loadtest_ws import (
    ClientProcess,
    Clients,
    Receipt,
    Report,
    job_name,
    split,
    tally_ws,
)
from testkit.servers import LOOPBACK, PostgresServer, RedisServer

# The target: the flood slows valid traffic by no more than 20 %.
SLOWDOWN_LIMIT = 0.20
# After the last post, how long to wait for frames and pulls still on their way
# (unless everything is in, or nothing moved for QUIET_SECONDS).
QUIET_SECONDS = 5.0
# Then a little longer, so that a duplicate sent right after a job's first
# copy is seen.
DUPLICATE_GRACE = 0.3
# A POST still unanswered this long after the last one was sent is abandoned.
ANSWER_TIMEOUT = 30.0
SETTLE_TIMEOUT = 20.0
# Let the flood reach its pace before the measured phase starts.
FLOOD_RAMP = 1.0
# The flood's connections start, and resume after a pause, each at a moment
# of its own within a second (the gateway's default hold), or within the
# ramp or a turn's settle if shorter: a flood under way arrives spread out.
FLOOD_SPREAD = 1.0
# The flood's turns, repeated: each pair of turns in the opposite order to the
# pair before, so that a drift over the phase weighs on both sides alike.
TURN_ORDER = (False, True, True, False)
# Jobs posted in a turn's first seconds are left out of both sides: the queues
# still hold the turn before's traffic. At most a quarter of a turn.
TURN_SETTLE = 2.0
PROGRESS_EVERY = 0.25
RSS_EVERY = 1.0


@dataclass(frozen=True)
class Load:
    """What a phase throws at the server."""

    clients: int
    workers: int
    rate: float
    duration: float
    wait: float
    client_procs: int
    batch: bool
    flood: bool
    flood_concurrency: int
    flood_rate: float
    drain_timeout: float
    # With a flood: in this many turns, off and on (0: on all along).
    turns: int = 0

    @property
    def jobs(self) -> int:
        return max(1, round(self.rate * self.duration))

    @property
    def turn_seconds(self) -> float:
        return self.duration / self.turns if self.turns else self.duration

    @property
    def turn_settle(self) -> float:
        """A turn's first seconds, left out of both sides."""
        return min(TURN_SETTLE, self.turn_seconds / 4)

    def flooded_at(self, offset: float) -> bool | None:
        """Whether a job posted ``offset`` s into publishing had the flood on.

        None for a job posted while the queues settle into a new turn, or out
        of the turns altogether.
        """
        if not self.turns:
            return self.flood
        number = math.floor(offset / self.turn_seconds)
        if not 0 <= number < self.turns:
            return None
        if offset - number * self.turn_seconds < self.turn_settle:
            return None
        return TURN_ORDER[number % len(TURN_ORDER)]


@dataclass(frozen=True)
class Side:
    """The valid traffic posted with the flood on, or with it off (by turns)."""

    jobs_posted: int
    jobs_accepted: int
    ws_p50_ms: float | None
    ws_p99_ms: float | None
    pull_p50_ms: float | None
    pull_p99_ms: float | None
    post_p50_ms: float | None
    post_p99_ms: float | None

    @property
    def accepted_share(self) -> float | None:
        return ratio(self.jobs_accepted, self.jobs_posted)


@dataclass
class PhaseResult:
    """Everything one phase measured."""

    stack: str
    phase: str
    processes: int
    clients: int
    connected: int
    connect_failures: dict[str, int]
    dropped_clients: int
    workers: int
    jobs_posted: int
    jobs_accepted: int
    publish_errors: dict[str, int]
    post_p50_ms: float | None
    post_p99_ms: float | None
    wait_ended: str
    seconds: float
    ws_expected: int
    ws_delivered: int
    ws_missing: int
    ws_late: int
    ws_duplicated: int
    ws_unexpected: int
    ws_p50_ms: float | None
    ws_p99_ms: float | None
    ws_max_ms: float | None
    ws_arrived_p50_ms: float | None
    ws_arrived_p99_ms: float | None
    jobs_to_all_clients: int
    jobs_to_no_client: int
    jobs_to_some_clients: int
    pulled: int
    pull_missing: int
    pull_late: int
    pull_duplicated: int
    pull_unexpected: int
    pull_p50_ms: float | None
    pull_p99_ms: float | None
    pull_errors: dict[str, int]
    left_in_queue: int
    server_cpu_s: float
    services_cpu_s: float | None
    rss_connected_kib: int | None
    rss_peak_kib: int | None
    client_cpu_s: float
    flood: dict[str, object] | None = None
    # With the flood in turns: the jobs posted with it on, and with it off.
    flood_on: Side | None = None
    flood_off: Side | None = None

    @property
    def lost_or_duplicated(self) -> bool:
        return bool(
            self.ws_missing
            or self.ws_duplicated
            or self.ws_unexpected
            or self.pull_missing
            or self.pull_duplicated
            or self.pull_unexpected
        )

    @property
    def frames_per_second(self) -> float | None:
        return ratio(self.ws_delivered, self.seconds)

    @property
    def pulls_per_second(self) -> float | None:
        return ratio(self.pulled, self.seconds)

    @property
    def server_cpu_share(self) -> float | None:
        return ratio(self.server_cpu_s, self.seconds)


# --- The stacks ----------------------------------------------------------------


@dataclass
class Stack:
    """The gateway under test (one daphne process or several), and its services."""

    name: str
    label: str
    gateways: list[Gateway]
    services: list[Callable[[], int | None]] = field(default_factory=list)
    phases: list[PhaseResult] = field(default_factory=list)

    def start(self) -> None:
        for gateway in self.gateways:
            gateway.start()

    def close(self) -> None:
        # The first one's folder may hold the others' SQLite file.
        for gateway in reversed(self.gateways):
            gateway.close()

    @property
    def pids(self) -> list[int]:
        pids = [gateway.pid for gateway in self.gateways]
        assert None not in pids
        return [pid for pid in pids if pid is not None]

    @property
    def base_urls(self) -> list[str]:
        return [gateway.base_url for gateway in self.gateways]

    @property
    def ports(self) -> list[int]:
        ports = [urlsplit(url).port for url in self.base_urls]
        return [port for port in ports if port is not None]

    def rss_kib(self) -> int | None:
        """The daphne processes' resident memory together."""
        sizes = [rss_kib(pid) for pid in self.pids]
        return None if None in sizes else sum(size or 0 for size in sizes)

    def service_pids(self) -> list[int]:
        return [pid for get in self.services if (pid := get()) is not None]


def build_stacks(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Stack]:
    """The embedded stack, and with ``--redis`` Redis (+ PostgreSQL)."""
    stacks = []
    if not args.no_embedded:
        stacks.append(
            Stack(
                "embedded",
                "SQLite + in-memory channel layer",
                [Gateway(access_log=args.access_log, extra_env=args.settings)],
            )
        )
    if args.redis:
        reason = RedisServer.unavailable_reason()
        if reason:
            print(f"Leaving out the Redis stack: {reason}.")
            return stacks
        redis = RedisServer()
        stack.callback(redis.close)
        redis.start()
        services: list[Callable[[], int | None]] = [
            lambda: redis.process.pid if redis.process else None
        ]
        database_url = None
        records = "SQLite records"
        postgres_reason = "--no-postgres" if args.no_postgres else None
        postgres_reason = postgres_reason or PostgresServer.unavailable_reason()
        if postgres_reason:
            print(f"Redis stack on SQLite records: {postgres_reason}.")
        else:
            postgres = PostgresDatabase("loadtest")
            stack.callback(postgres.close)
            database_url = postgres.start()
            records = "PostgreSQL records"
            services.append(
                lambda: postgres.server.process.pid if postgres.server.process else None
            )
        processes = f", {args.processes} daphne processes" if args.processes > 1 else ""
        gateways: list[Gateway] = []
        for _ in range(args.processes):
            gateways.append(
                Gateway(
                    # One database for all: without PostgreSQL, the first
                    # one's SQLite file.
                    database_url=gateways[0].database_url if gateways else database_url,
                    redis_url=redis.url,
                    access_log=args.access_log,
                    extra_env={"CHANNEL_LAYER": "redis-pubsub", **args.settings},
                )
            )
        stacks.append(
            Stack(
                "redis",
                f"Redis queue + redis-pubsub layer, {records}{processes}",
                gateways,
                services,
            )
        )
    return stacks


# --- One phase -----------------------------------------------------------------


async def run_phase(stack: Stack, load: Load, phase: str) -> PhaseResult:
    """Connect, publish for ``load.duration``, wait for delivery, check, report."""
    loop = asyncio.get_running_loop()
    base_urls = stack.base_urls
    ports = stack.ports
    server = stack.pids
    await settle(server, timeout=SETTLE_TIMEOUT)
    slug = "".join(c for c in phase if c.isalnum())[:8]
    prefix = f"load-{slug}-{secrets.token_hex(3)}"
    names = [job_name(prefix, n) for n in range(load.jobs)]
    slots = {name: n for n, name in enumerate(names)}

    # With several daphne processes, each client process holds its clients
    # on one of them, in turn.
    procs = [
        ClientProcess(
            Clients(
                LOOPBACK, ports[n % len(ports)], count, prefix, load.jobs, load.batch
            )
        )
        for n, count in enumerate(split(load.clients, load.client_procs))
    ]
    flooder: FloodProcess | None = None
    try:
        joined = await asyncio.gather(*(p.connected() for p in procs))
        connected = sum(j.connected for j in joined)
        failures: dict[str, int] = {}
        for j in joined:
            for kind, count in j.failures.items():
                failures[kind] = failures.get(kind, 0) + count
        await settle(server, timeout=SETTLE_TIMEOUT)
        rss_connected = stack.rss_kib()

        stop = asyncio.Event()
        pulls = Pulls()
        workers = asyncio.create_task(
            pull(
                base_urls, workers=load.workers, wait=load.wait, stop=stop, result=pulls
            )
        )
        if load.flood:
            flooder = FloodProcess(
                base_urls,
                concurrency=load.flood_concurrency,
                rate=load.flood_rate,
                spread=min(
                    FLOOD_SPREAD, load.turn_settle if load.turns else FLOOD_RAMP
                ),
            )
            await flooder.started()
            await asyncio.sleep(FLOOD_RAMP)

        peak = [rss_connected or 0]

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(RSS_EVERY)
                peak[0] = max(peak[0], stack.rss_kib() or 0)

        sampler = asyncio.create_task(sample_rss())
        cpu_before = cpu_seconds(server)
        services_before = cpu_seconds(stack.service_pids())
        started = time.time()
        turns = (
            asyncio.create_task(take_turns(flooder, load, started))
            if flooder and load.turns
            else None
        )
        publication = await publish_jobs(
            base_urls[0],
            names,
            also_to=base_urls[1:],
            rate=load.rate,
            gateway=True,
            deadline=loop.time() + load.duration + ANSWER_TIMEOUT,
        )
        if turns is not None:
            turns.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turns
        ended = await _wait_for_delivery(
            procs, pulls, connected, len(publication.accepted), load.drain_timeout
        )
        await asyncio.sleep(DUPLICATE_GRACE)
        until = time.time()
        server_cpu = cpu_seconds(server) - cpu_before
        services_cpu = (
            cpu_seconds(stack.service_pids()) - services_before
            if stack.services
            else None
        )
        sampler.cancel()
        peak[0] = max(peak[0], stack.rss_kib() or 0)

        stop.set()
        flood_report = await flooder.stop() if flooder else None
        reports: list[Report] = [await p.stop() for p in procs]
        await workers
        leftovers = await take_leftovers(base_urls[0])
    finally:
        for proc in procs:
            proc.close()
        if flooder is not None:
            flooder.close()

    sent_at = [publication.sent_at.get(name, math.nan) for name in names]
    receipts = [receipt for report in reports for receipt in report.receipts]
    sides: dict[bool, Side] = {}
    if load.turns:
        for flooded in (True, False):
            sides[flooded] = side_of(
                [
                    name
                    for name, at in publication.sent_at.items()
                    if load.flooded_at(at - started) is flooded
                ],
                slots,
                publication,
                receipts,
                pulls.claims,
                until=until,
            )
    ws = tally_ws(
        receipts,
        sent_at,
        expected=[slots[name] for name in publication.accepted],
        uncertain=[slots[name] for name in publication.unanswered],
        until=until,
    )
    pulled = tally_workers(
        pulls.claims,
        publication.sent_at,
        expected=publication.accepted,
        uncertain=publication.unanswered,
        until=until,
        leftovers=leftovers,
    )
    answers = sorted(publication.answer_ms.values())
    unanswered = len(publication.unanswered)
    return PhaseResult(
        stack=stack.name,
        phase=phase,
        processes=len(stack.gateways),
        clients=load.clients,
        connected=connected,
        connect_failures=failures,
        dropped_clients=sum(r.dropped for r in reports),
        workers=load.workers,
        jobs_posted=len(publication.sent_at),
        jobs_accepted=len(publication.accepted),
        publish_errors=dict(publication.errors),
        post_p50_ms=percentile(answers, 50, missing=unanswered),
        post_p99_ms=percentile(answers, 99, missing=unanswered),
        wait_ended=ended,
        seconds=until - started,
        ws_expected=ws.expected,
        ws_delivered=ws.delivered,
        ws_missing=ws.missing,
        ws_late=ws.late,
        ws_duplicated=ws.duplicated,
        ws_unexpected=ws.unexpected,
        ws_p50_ms=percentile(ws.latencies_ms, 50, missing=ws.missing),
        ws_p99_ms=percentile(ws.latencies_ms, 99, missing=ws.missing),
        ws_max_ms=percentile(ws.latencies_ms, 100, missing=ws.missing),
        ws_arrived_p50_ms=percentile(ws.latencies_ms, 50),
        ws_arrived_p99_ms=percentile(ws.latencies_ms, 99),
        jobs_to_all_clients=ws.jobs_to_all,
        jobs_to_no_client=ws.jobs_to_none,
        jobs_to_some_clients=ws.jobs_to_some,
        pulled=pulled.pulled,
        pull_missing=pulled.missing,
        pull_late=pulled.late,
        pull_duplicated=pulled.duplicated,
        pull_unexpected=pulled.unexpected,
        pull_p50_ms=percentile(pulled.latencies_ms, 50, missing=pulled.missing),
        pull_p99_ms=percentile(pulled.latencies_ms, 99, missing=pulled.missing),
        pull_errors=dict(pulls.errors),
        left_in_queue=len(leftovers),
        server_cpu_s=server_cpu,
        services_cpu_s=services_cpu,
        rss_connected_kib=rss_connected,
        rss_peak_kib=peak[0] or None,
        client_cpu_s=sum(r.cpu_seconds for r in reports),
        flood=_flood_summary(flood_report),
        flood_on=sides.get(True),
        flood_off=sides.get(False),
    )


async def take_turns(flooder: FloodProcess, load: Load, started: float) -> None:
    """Pause and resume the flood turn by turn from ``started`` (epoch seconds)."""
    for number in range(load.turns):
        if TURN_ORDER[number % len(TURN_ORDER)]:
            flooder.resume()
        else:
            flooder.pause()
        turn_ends = started + (number + 1) * load.turn_seconds
        await asyncio.sleep(max(0.0, turn_ends - time.time()))


def side_of(
    names: Sequence[str],
    slots: dict[str, int],
    publication: Publication,
    receipts: Sequence[Receipt],
    claims: Sequence[tuple[str, float, int]],
    *,
    until: float,
) -> Side:
    """Latencies of the jobs ``names`` only: to every client, to a worker, of the POST.

    Tallied as the whole phase is (``tally_ws``, ``tally_workers``): a job not
    in by ``until`` counts as an infinite latency, and so does a POST never
    answered.
    """
    mine = set(names)
    accepted = [name for name in names if name in publication.accepted]
    sent_at = [math.nan] * len(slots)
    for name, slot in slots.items():
        sent_at[slot] = publication.sent_at.get(name, math.nan)
    # The other jobs' frames are no concern of this side's.
    ws = tally_ws(
        receipts,
        sent_at,
        expected=[slots[name] for name in accepted],
        uncertain=range(len(slots)),
        until=until,
    )
    pulled = tally_workers(
        [claim for claim in claims if claim[0] in mine],
        publication.sent_at,
        expected=accepted,
        uncertain=mine & publication.unanswered,
        until=until,
    )
    post_ms = sorted(
        publication.answer_ms[name] for name in names if name in publication.answer_ms
    )
    post_missing = len(names) - len(post_ms)
    return Side(
        jobs_posted=len(names),
        jobs_accepted=len(accepted),
        ws_p50_ms=percentile(ws.latencies_ms, 50, missing=ws.missing),
        ws_p99_ms=percentile(ws.latencies_ms, 99, missing=ws.missing),
        pull_p50_ms=percentile(pulled.latencies_ms, 50, missing=pulled.missing),
        pull_p99_ms=percentile(pulled.latencies_ms, 99, missing=pulled.missing),
        post_p50_ms=percentile(post_ms, 50, missing=post_missing),
        post_p99_ms=percentile(post_ms, 99, missing=post_missing),
    )


async def _wait_for_delivery(
    procs: Sequence[ClientProcess],
    pulls: Pulls,
    connected: int,
    accepted: int,
    drain_timeout: float,
) -> str:
    """Wait until every frame and pull is in; say why the wait ended."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + drain_timeout
    last: tuple[int, int] | None = None
    last_change = loop.time()
    while True:
        frames = sum(await asyncio.gather(*(p.first_arrivals() for p in procs)))
        progress = (frames, len(pulls.claims))
        if frames >= connected * accepted and len(pulls.claims) >= accepted:
            return "complete"
        now = loop.time()
        if progress != last:
            last, last_change = progress, now
        elif now - last_change >= QUIET_SECONDS:
            return f"nothing arrived for {QUIET_SECONDS:g} s"
        if now >= give_up:
            return f"--drain-timeout ({drain_timeout:g} s) after the last post"
        await asyncio.sleep(PROGRESS_EVERY)


def _flood_summary(report: FloodReport | None) -> dict[str, object] | None:
    if report is None:
        return None
    return {
        "requests": report.requests,
        "seconds": round(report.seconds, 2),
        "rate": round(report.rate, 1),
        "answers": report.answers,
        "admitted": report.admitted,
        "cpu_seconds": round(report.cpu_seconds, 2),
    }


# --- Reporting -----------------------------------------------------------------


def _ms(value: float | None) -> str:
    if value is not None and math.isinf(value):
        return "not all in"
    return fmt(value, 1)


def _pair(first: float | None, second: float | None) -> str:
    return f"{_ms(first)} / {_ms(second)}"


def _mib(kib: int | None) -> str:
    return fmt(None if kib is None else kib / 1024, 1)


def results_table(phases: Sequence[PhaseResult]) -> str:
    header = [
        "stack",
        "phase",
        "jobs accepted",
        "WS frames in / expected",
        "WS lost",
        "WS dup",
        "WS p50 / p99 ms",
        "pulled / expected",
        "pull lost",
        "pull dup",
        "pull p50 / p99 ms",
        "POST p50 / p99 ms",
    ]
    rows = [
        [
            p.stack,
            p.phase,
            f"{p.jobs_accepted:,} / {p.jobs_posted:,}",
            f"{p.ws_delivered:,} / {p.ws_expected:,}",
            f"{p.ws_missing:,}" + (f" ({p.ws_late:,} late)" if p.ws_late else ""),
            f"{p.ws_duplicated + p.ws_unexpected:,}",
            _pair(p.ws_p50_ms, p.ws_p99_ms),
            f"{p.pulled:,} / {p.jobs_accepted:,}",
            f"{p.pull_missing:,}" + (f" ({p.pull_late:,} late)" if p.pull_late else ""),
            f"{p.pull_duplicated + p.pull_unexpected:,}",
            _pair(p.pull_p50_ms, p.pull_p99_ms),
            _pair(p.post_p50_ms, p.post_p99_ms),
        ]
        for p in phases
    ]
    return format_table(header, rows)


def cost_table(phases: Sequence[PhaseResult]) -> str:
    header = [
        "stack",
        "phase",
        "daphne processes",
        "clients",
        "workers",
        "measured s",
        "daphne CPU s",
        "daphne CPU % of a core",
        "Redis/PostgreSQL CPU s",
        "daphne RSS MiB connected / peak",
        "client procs CPU s",
        "flood req/s",
        "flood CPU s",
    ]
    rows = [
        [
            p.stack,
            p.phase,
            str(p.processes),
            f"{p.connected:,} / {p.clients:,}",
            str(p.workers),
            fmt(p.seconds, 1),
            fmt(p.server_cpu_s, 1),
            fmt(None if p.server_cpu_share is None else p.server_cpu_share * 100),
            fmt(p.services_cpu_s, 1),
            f"{_mib(p.rss_connected_kib)} / {_mib(p.rss_peak_kib)}",
            fmt(p.client_cpu_s, 1),
            fmt(_flood_figure(p, "rate")),
            fmt(_flood_figure(p, "cpu_seconds"), 1),
        ]
        for p in phases
    ]
    return format_table(header, rows)


def _flood_figure(phase: PhaseResult, name: str) -> float | None:
    if not phase.flood:
        return None
    value = phase.flood.get(name)
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class Comparison:
    """The flood phase against the quiet one: one ratio per figure."""

    name: str
    quiet: float | None
    flooded: float | None
    higher_is_better: bool

    @property
    def ratio(self) -> float | None:
        if self.quiet is None or self.flooded is None:
            return None
        if math.isinf(self.quiet) or math.isinf(self.flooded):
            return None
        return ratio(self.flooded, self.quiet)

    @property
    def met(self) -> bool | None:
        value = self.ratio
        if value is None:
            return None
        if self.higher_is_better:
            return value >= 1.0 - SLOWDOWN_LIMIT
        return value <= 1.0 + SLOWDOWN_LIMIT


def compare(quiet: PhaseResult, flooded: PhaseResult) -> list[Comparison]:
    """Throughput (higher is better) and latency (lower is better) of valid traffic."""
    return [
        Comparison(
            "WS frames/s", quiet.frames_per_second, flooded.frames_per_second, True
        ),
        Comparison(
            "jobs pulled/s", quiet.pulls_per_second, flooded.pulls_per_second, True
        ),
        Comparison("WS p50", quiet.ws_p50_ms, flooded.ws_p50_ms, False),
        Comparison("WS p99", quiet.ws_p99_ms, flooded.ws_p99_ms, False),
        Comparison("pull p50", quiet.pull_p50_ms, flooded.pull_p50_ms, False),
        Comparison("pull p99", quiet.pull_p99_ms, flooded.pull_p99_ms, False),
        Comparison("POST p50", quiet.post_p50_ms, flooded.post_p50_ms, False),
    ]


def compare_sides(phase: PhaseResult) -> list[Comparison]:
    """The flood in turns: the jobs posted with it on against those with it off."""
    off, on = phase.flood_off, phase.flood_on
    if off is None or on is None:
        return []
    return [
        Comparison("jobs accepted", off.accepted_share, on.accepted_share, True),
        Comparison("WS p50", off.ws_p50_ms, on.ws_p50_ms, False),
        Comparison("WS p99", off.ws_p99_ms, on.ws_p99_ms, False),
        Comparison("pull p50", off.pull_p50_ms, on.pull_p50_ms, False),
        Comparison("pull p99", off.pull_p99_ms, on.pull_p99_ms, False),
        Comparison("POST p50", off.post_p50_ms, on.post_p50_ms, False),
    ]


def comparison_lines(stack: Stack) -> list[str]:
    lines = []
    quiet = next((p for p in stack.phases if p.phase == "no flood"), None)
    flooded = next((p for p in stack.phases if p.phase == "flood"), None)
    if quiet is not None and flooded is not None:
        lines += _verdict_lines(
            f"{stack.name}: flood / no flood", compare(quiet, flooded)
        )
    for phase in stack.phases:
        if checks := compare_sides(phase):
            lines += _verdict_lines(f"{stack.name}: flood on / off, by turns", checks)
    return lines


def _verdict_lines(what: str, checks: Sequence[Comparison]) -> list[str]:
    parts = [
        f"{c.name} {fmt(c.ratio, 2, 'x')}" + ("" if c.met in (True, None) else " (!)")
        for c in checks
    ]
    verdicts = [c.met for c in checks if c.met is not None]
    verdict = "met" if all(verdicts) else "MISSED"
    if len(verdicts) < len(checks):
        verdict += (
            f" ({len(checks) - len(verdicts)} figure(s) not comparable: a phase "
            "did not deliver everything, so its percentile is infinite)"
        )
    return [
        f"  {what}: " + ", ".join(parts),
        f"  {what}: valid traffic slowed by at most "
        f"{SLOWDOWN_LIMIT:.0%} (throughput >= {1 - SLOWDOWN_LIMIT:g}x, latency <= "
        f"{1 + SLOWDOWN_LIMIT:g}x): {verdict}",
    ]


def sides_table(phases: Sequence[PhaseResult]) -> str:
    header = [
        "stack",
        "flood",
        "jobs accepted / posted",
        "WS p50 / p99 ms",
        "pull p50 / p99 ms",
        "POST p50 / p99 ms",
    ]
    rows = [
        [
            p.stack,
            name,
            f"{side.jobs_accepted:,} / {side.jobs_posted:,}",
            _pair(side.ws_p50_ms, side.ws_p99_ms),
            _pair(side.pull_p50_ms, side.pull_p99_ms),
            _pair(side.post_p50_ms, side.post_p99_ms),
        ]
        for p in phases
        for name, side in (("off", p.flood_off), ("on", p.flood_on))
        if side is not None
    ]
    return format_table(header, rows)


def problems(phase: PhaseResult) -> list[str]:
    found = []
    where = f"{phase.stack}, {phase.phase}"
    if phase.connected < phase.clients:
        found.append(
            f"{where}: {phase.clients - phase.connected} clients could not connect "
            f"({phase.connect_failures})"
        )
    if phase.dropped_clients:
        found.append(f"{where}: {phase.dropped_clients} clients were disconnected")
    if phase.publish_errors:
        found.append(f"{where}: publish errors {phase.publish_errors}")
    if phase.pull_errors:
        found.append(f"{where}: worker errors {phase.pull_errors}")
    if phase.lost_or_duplicated:
        found.append(
            f"{where}: WebSocket {phase.ws_missing:,} frames lost "
            f"({phase.ws_late:,} of them late; jobs reaching every client "
            f"{phase.jobs_to_all_clients:,}, none {phase.jobs_to_no_client:,}, "
            f"some {phase.jobs_to_some_clients:,}), "
            f"{phase.ws_duplicated:,} duplicated, "
            f"{phase.ws_unexpected:,} unexpected; workers {phase.pull_missing:,} "
            f"jobs lost ({phase.pull_late:,} late), {phase.pull_duplicated:,} "
            f"duplicated, {phase.pull_unexpected:,} unexpected "
            f"(wait ended: {phase.wait_ended})"
        )
    if phase.flood and phase.flood.get("admitted"):
        found.append(f"{where}: the server ADMITTED forged requests: {phase.flood}")
    return found


def save(
    path: Path, args: argparse.Namespace, summary: str, stacks: Sequence[Stack]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": summary,
        "options": {
            name: value for name, value in vars(args).items() if name != "json"
        },
        "phases": [asdict(p) for s in stacks for p in s.phases],
        "comparisons": {
            s.name: [
                {"name": c.name, "ratio": c.ratio, "met": c.met}
                for quiet, flooded in _pairs(s)
                for c in compare(quiet, flooded)
            ]
            for s in stacks
        },
        "comparisons_by_turns": {
            s.name: [
                {"name": c.name, "ratio": c.ratio, "met": c.met}
                for p in s.phases
                for c in compare_sides(p)
            ]
            for s in stacks
        },
    }
    path.write_text(json.dumps(_finite(data), indent=2, default=str) + "\n")


def _pairs(stack: Stack) -> list[tuple[PhaseResult, PhaseResult]]:
    quiet = [p for p in stack.phases if p.phase == "no flood"]
    flooded = [p for p in stack.phases if p.phase == "flood"]
    return list(zip(quiet, flooded, strict=False))


def _finite(value: object) -> object:
    if isinstance(value, float) and math.isinf(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# --- Command line --------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.loadtest",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="100 clients, 10 workers, 10 s at 20 jobs/s (under a minute)",
    )
    parser.add_argument("--clients", type=int, help="WebSocket clients (1000)")
    parser.add_argument("--workers", type=int, help="pulling workers (50)")
    parser.add_argument("--rate", type=float, help="jobs published per second (100)")
    parser.add_argument("--duration", type=float, help="seconds of publishing (60)")
    parser.add_argument(
        "--wait", type=float, default=10.0, help="workers' long-poll wait= (10)"
    )
    parser.add_argument(
        "--client-procs",
        type=int,
        default=2,
        help="processes the WebSocket clients are spread over (2)",
    )
    parser.add_argument(
        "--batch",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clients ask for batched frames (/ws?batch=1), as the Python client does",
    )
    parser.add_argument(
        "--flood-concurrency",
        type=int,
        default=64,
        help="forged requests in flight at once during the flood (64)",
    )
    parser.add_argument(
        "--flood-rate",
        type=float,
        default=0.0,
        help="cap on forged requests per second; 0: as fast as they are answered",
    )
    parser.add_argument("--no-flood", action="store_true", help="the first phase only")
    parser.add_argument(
        "--turns",
        type=int,
        default=8,
        help="turns of the third phase's flood, off and on (8; a multiple of 4 "
        "balances them; 0 leaves the phase out)",
    )
    parser.add_argument(
        "--turns-only",
        action="store_true",
        help="the flood in turns alone, for a long run of the comparison that "
        "shares the machine's minutes between both sides",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds after the last post to wait for frames and pulls (60)",
    )
    parser.add_argument(
        "--redis", action="store_true", help="also on Redis (+ PostgreSQL)"
    )
    parser.add_argument(
        "--no-postgres",
        action="store_true",
        help="with --redis, keep job records in SQLite",
    )
    parser.add_argument(
        "--no-embedded", action="store_true", help="leave the embedded stack out"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="daphne processes of the Redis stack, sharing clients, workers, "
        "posts and flood in turn as behind a load balancer (1); the embedded "
        "stack is one process by design",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="daphne logs each request, as the production command does",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of every daphne process, e.g. "
        "AUTH_FAILURE_MAX_DELAY_SECONDS=1 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="where to save every figure")
    args = parser.parse_args(argv)
    args.settings = {}
    for assignment in args.set:
        name, equals, value = assignment.partition("=")
        if not equals or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            parser.error(f"--set takes NAME=VALUE, not {assignment!r}")
        args.settings[name] = value
    quick = args.quick
    args.clients = args.clients or (100 if quick else 1000)
    args.workers = args.workers or (10 if quick else 50)
    args.rate = args.rate or (20.0 if quick else 100.0)
    args.duration = args.duration or (10.0 if quick else 60.0)
    if not 1 <= args.clients <= 10_000:
        parser.error("--clients must be between 1 and 10,000")
    if not 1 <= args.workers <= 1_000:
        parser.error("--workers must be between 1 and 1,000")
    if not 0 < args.rate <= 1_000 or not 0 < args.duration <= 3_600:
        parser.error("--rate must be in (0, 1000] and --duration in (0, 3600]")
    if not 0 <= args.wait <= 30:
        parser.error("--wait must be between 0 and 30 (the contract's range)")
    if args.turns and not 2 <= args.turns <= 1_000:
        parser.error("--turns must be 0 or between 2 and 1,000")
    if args.turns_only and (args.no_flood or not args.turns):
        parser.error("--turns-only needs the flood and --turns of at least 2")
    if args.client_procs < 1 or args.flood_concurrency < 1:
        parser.error("--client-procs and --flood-concurrency must be at least 1")
    if args.no_embedded and not args.redis:
        parser.error("--no-embedded leaves nothing to run without --redis")
    if not 1 <= args.processes <= 16:
        parser.error("--processes must be between 1 and 16")
    if args.processes > 1 and not args.redis:
        parser.error("--processes needs --redis: the embedded stack is one process")
    # Every daphne process gets at least one process of clients.
    args.client_procs = max(args.client_procs, args.processes)
    return args


def phases_of(args: argparse.Namespace) -> list[tuple[str, bool, int]]:
    """Each phase to run, in order: its name, whether it floods, its turns."""
    if args.turns_only:
        return [("flood in turns", True, args.turns)]
    phases = [("no flood", False, 0)]
    if not args.no_flood:
        phases.append(("flood", True, 0))
        if args.turns:
            phases.append(("flood in turns", True, args.turns))
    return phases


def load_of(args: argparse.Namespace, *, flood: bool, turns: int = 0) -> Load:
    return Load(
        clients=args.clients,
        workers=args.workers,
        rate=args.rate,
        duration=args.duration,
        wait=args.wait,
        client_procs=args.client_procs,
        batch=args.batch,
        flood=flood,
        flood_concurrency=args.flood_concurrency,
        flood_rate=args.flood_rate,
        drain_timeout=args.drain_timeout,
        turns=turns,
    )


def warm_up_load(args: argparse.Namespace) -> Load:
    """First connections and requests pay for imports, threads and pools."""
    return Load(
        clients=min(20, args.clients),
        workers=min(5, args.workers),
        rate=10.0,
        duration=1.0,
        wait=args.wait,
        client_procs=1,
        batch=args.batch,
        flood=False,
        flood_concurrency=1,
        flood_rate=0.0,
        drain_timeout=10.0,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    summary = machine_summary()
    print(
        f"Load test: {args.clients:,} WebSocket clients (over {args.client_procs} "
        f"process(es), {'batched' if args.batch else 'one job per'} frames), "
        f"{args.workers} pulling workers (wait={args.wait:g}), "
        f"{args.rate:g} jobs/s for {args.duration:g} s; "
        + (
            f"with the flood in {args.turns} turns only, off and on: "
            if args.turns_only
            else "then the same with a flood of "
        )
        + f"{args.flood_concurrency} concurrent forged requests"
        + (f" capped at {args.flood_rate:g}/s" if args.flood_rate else "")
        + (" (left out)" if args.no_flood else "")
        + "".join(f"; {name}={value}" for name, value in args.settings.items())
        + f".\n{summary}\nCores: {os.cpu_count()}. Clients, workers, publisher "
        f"and flood run on this machine and share those cores with the server."
    )
    raise_file_limit(args.clients)
    started = time.monotonic()
    with contextlib.ExitStack() as exits:
        stacks = build_stacks(args, exits)
        for stack in stacks:
            exits.callback(stack.close)
            stack.start()
            print(f"[{stack.name}] {stack.label}: warming up...")
            warm = run_client_loop(run_phase(stack, warm_up_load(args), "warm-up"))
            for problem in problems(warm):
                print(f"  warm-up problem: {problem}")
            for name, flood, turns in phases_of(args):
                result = run_client_loop(
                    run_phase(stack, load_of(args, flood=flood, turns=turns), name)
                )
                stack.phases.append(result)
                print(
                    f"[{stack.name}] {name}: WS {result.ws_delivered:,}/"
                    f"{result.ws_expected:,} p50 {_ms(result.ws_p50_ms)} p99 "
                    f"{_ms(result.ws_p99_ms)} ms (of frames in: "
                    f"{_ms(result.ws_arrived_p50_ms)} / "
                    f"{_ms(result.ws_arrived_p99_ms)}); pulled {result.pulled:,}/"
                    f"{result.jobs_accepted:,} p99 {_ms(result.pull_p99_ms)} ms; "
                    f"daphne CPU {fmt(result.server_cpu_s, 1)} s; "
                    f"wait ended: {result.wait_ended}"
                )
            stack.close()
    phases_run = [p for s in stacks for p in s.phases]
    print(
        "\nLatency: from the POST sent to the frame (or the job) received, every "
        "(client, job) pair; anything not in by the end of the wait counts as "
        "lost and as an infinite latency ('not all in'). 'late': arrived after "
        "the wait ended. CPU: daphne's user + system time over the measured "
        "span (first post to end of the wait); RSS: daphne's resident set."
    )
    print(summary)
    print(results_table(phases_run))
    print()
    print(cost_table(phases_run))
    if any(p.flood_on for p in phases_run):
        print(
            "\nThe flood in turns: the jobs posted with it on, and with it off "
            f"(a turn's first {TURN_SETTLE:g} s left out of both):"
        )
        print(sides_table(phases_run))
    print("\nFlood against no flood (valid traffic only):")
    for stack in stacks:
        for line in comparison_lines(stack):
            print(line)
        for p in stack.phases:
            if p.flood:
                print(f"  {stack.name}: flood sent {p.flood}")
    found = [problem for p in phases_run for problem in problems(p)]
    for problem in found:
        print(f"PROBLEM {problem}")
    failed = any(
        p.lost_or_duplicated or (p.flood and p.flood.get("admitted"))
        for p in phases_run
    )
    print(
        "\nExactly once: "
        + (
            "FAILED: see the problems above."
            if failed
            else "every job pulled by "
            "exactly one worker and pushed to every client exactly once."
        )
    )
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS_DIR / f"loadtest-{stamp}.json"
    save(path, args, summary, stacks)
    print(f"Figures saved to {path}; took {time.monotonic() - started:.0f} s.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
