"""HTTP benchmark: signed ``GET /job/next`` rate, and the drain of a full queue.

    python -m bench.http --quick      # 1 round, 1,000 jobs: 2-3 minutes
    python -m bench.http              # 3 rounds, 20,000 jobs: see below
    python -m bench.http --v2-before REF   # v2 rate, REF's gateway against this one
    python -m bench.http --without PATCH   # what one server patch earns

The full run's length is mostly the gateway publishing and draining 20,000 jobs
per server: about 10 minutes at 250 jobs/s, 30 at 100 jobs/s; ``--jobs`` and
``--modes`` shorten it.

For each queue backend the seed service (the baseline) and the gateway run in
the same invocation, alternately, round after round, so that the noise of a
shared machine falls on both; the table gives medians and gateway/seed ratios.

- rate: ``wrk`` on signed ``GET /job/next`` with an empty queue (one header
  set, signed at the start: the contract allows reusing it for 60 s);
- drain: N jobs published through ``POST /job`` by concurrent clients, then C
  clients loop ``GET /job/next`` until empty; every published job must come
  back exactly once;
- v2 rate (``--v2-before REF``, instead of the above): ``GET /job/next`` on an
  empty queue, each request signed v2 with a fresh nonce that the gateway must
  remember, on SQLite; the gateway of commit REF (a temporary worktree) and of
  this checkout alternate round after round, so a change to the nonce store
  (or anything on the v2 path) is measured before and after in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench import load
from bench.baseline import add_baseline_arguments, seed_factory
from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    Signer,
    checkout,
    cpu_seconds,
    fmt,
    format_table,
    machine_summary,
    median,
    ratio,
    run_async,
    wait_idle,
)
from bench.gateway import Gateway, PostgresDatabase
from gateway_project.server import LEAVE_OUT_VARIABLE
from testkit.servers import PostgresServer, RedisServer

# Bounds on each phase, so that a stuck server cannot hold the run forever: a
# publish or a drain may take as long as MIN_JOB_RATE jobs/s needs, no longer.
MIN_PHASE_SECONDS = 60.0
MIN_JOB_RATE = 30.0
WARMUP_SECONDS = 2.0
WARMUP_JOBS = 300
# The timestamp of wrk's one header set must stay within the 60 s tolerance.
MAX_WRK_SECONDS = 45.0


class Server(Protocol):
    """What a benchmark needs of a running server."""

    @property
    def base_url(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


@dataclass
class Side:
    """One server under test, and everything measured on it."""

    key: str
    server: str
    queue: str
    baseline: bool
    make: Callable[[], Server]
    running: Server | None = None
    wrk: list[load.WrkResult] = field(default_factory=list)
    publish: list[load.Phase] = field(default_factory=list)
    drain: list[load.Drain] = field(default_factory=list)
    # The server's CPU time per request (wrk) and per job drained, in µs.
    wrk_cpu: list[float] = field(default_factory=list)
    drain_cpu: list[float] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.running is not None
        return self.running.base_url

    def cpu(self) -> float | None:
        """The server process's CPU seconds so far."""
        return cpu_seconds(None if self.running is None else self.running.pid)

    @property
    def label(self) -> str:
        return f"{self.server}, {self.queue}"


@dataclass
class Group:
    """A baseline and the gateway configurations it is compared with."""

    name: str
    sides: list[Side]

    @property
    def baseline(self) -> Side | None:
        return next((side for side in self.sides if side.baseline), None)


@dataclass(frozen=True)
class Options:
    rounds: int
    drain_rounds: int
    duration: float
    threads: int
    connections: int
    jobs: int
    clients: int
    publishers: int
    access_log: bool


# --- Setting up the servers -----------------------------------------------------


def build_groups(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[Group]:
    """The groups to run; prints why any part is left out."""
    seed = seed_factory(args)
    access_log: bool = args.access_log
    groups: list[Group] = []

    if args.without:
        # One patch of the server seam measured: the gateway with every patch
        # is the baseline, the same gateway without that one is compared.
        seed = None
        without = {LEAVE_OUT_VARIABLE: args.without}
        groups.append(
            Group(
                f"gateway without {args.without} / with every patch",
                [
                    Side(
                        "gateway-sqlite",
                        "gateway",
                        "every patch",
                        True,
                        lambda: Gateway(access_log=access_log),
                    ),
                    Side(
                        f"gateway-without-{args.without}",
                        "gateway",
                        f"without {args.without}",
                        False,
                        lambda: Gateway(access_log=access_log, extra_env=without),
                    ),
                ],
            )
        )
        return groups

    if "memory" in args.modes:
        sides = []
        if seed is not None:
            sides.append(
                Side("seed-memory", "seed", "in-memory", True, lambda: seed(None))
            )
        sides.append(
            Side(
                "gateway-sqlite",
                "gateway",
                "database (SQLite)",
                False,
                lambda: Gateway(access_log=access_log),
            )
        )
        if args.postgres:
            reason = PostgresServer.unavailable_reason()
            if reason:
                print(f"Skipping the PostgreSQL row: {reason}.")
            else:
                postgres = PostgresDatabase()
                stack.callback(postgres.close)
                sides.append(
                    Side(
                        "gateway-postgres",
                        "gateway",
                        "database (PostgreSQL)",
                        False,
                        lambda: Gateway(
                            database_url=postgres.url or postgres.start(),
                            access_log=access_log,
                        ),
                    )
                )
        groups.append(Group("in-memory / database", sides))

    if "redis" in args.modes:
        reason = RedisServer.unavailable_reason()
        if reason:
            print(f"Skipping the Redis rows: {reason}.")
        else:
            redis_server = RedisServer()
            stack.callback(redis_server.close)

            def redis_url(db: int) -> str:
                if not redis_server.running:
                    redis_server.start()
                return redis_server.url.rsplit("/", 1)[0] + f"/{db}"

            sides = []
            if seed is not None:
                sides.append(
                    Side(
                        "seed-redis", "seed", "Redis", True, lambda: seed(redis_url(1))
                    )
                )
            sides.append(
                Side(
                    "gateway-redis",
                    "gateway",
                    "redis (SQLite records)",
                    False,
                    lambda: Gateway(redis_url=redis_url(0), access_log=access_log),
                )
            )
            groups.append(Group("Redis", sides))
    return groups


# --- Measuring ------------------------------------------------------------------


def measure_rate(side: Side, options: Options, *, record: bool = True) -> None:
    """wrk on an empty queue; checks the queue is empty before and after."""
    duration = options.duration if record else WARMUP_SECONDS
    signer = Signer()
    problem = load.probe_empty(side.url, signer)
    if problem:
        side.problems.append(f"queue not empty before wrk: {problem}")
        return
    cpu_before = side.cpu()
    result = load.run_wrk(
        side.url,
        signer.headers(),
        duration=duration,
        threads=options.threads,
        connections=options.connections,
    )
    cpu = _per_item(cpu_before, side.cpu(), result.requests)
    # Requests wrk left behind are still being served (and may claim a job).
    wait_idle(_pid(side))
    if not record:
        return
    side.wrk.append(result)
    if cpu is not None:
        side.wrk_cpu.append(cpu)
    if result.failed:
        side.problems.append(f"wrk counted failures: {result.errors}")
    problem = load.probe_empty(side.url, signer)
    if problem:
        side.problems.append(f"queue not empty after wrk: {problem}")
    print(
        f"  {side.label:<38} GET /job/next {result.rate:>8,.0f} req/s  "
        f"p50 {result.p50_ms:5.1f} ms  p99 {result.p99_ms:6.1f} ms  "
        f"CPU {fmt(cpu)} µs/req"
        + (f"  FAILURES {result.errors}" if result.failed else "")
    )


def measure_drain(
    side: Side, options: Options, tag: str, *, jobs: int, record: bool = True
) -> None:
    """Publish ``jobs`` jobs, drain them with ``options.clients`` clients, verify."""
    token = secrets.token_hex(4)
    job_ids = [f"{tag}-{token}-{n:06d}" for n in range(jobs)]
    phase_seconds = max(MIN_PHASE_SECONDS, jobs / MIN_JOB_RATE)
    wait_idle(_pid(side))
    published = run_async(
        load.publish(
            side.url,
            job_ids,
            concurrency=options.publishers,
            deadline=time.monotonic() + phase_seconds,
        )
    )
    # A publish cut short by the deadline may still be stored: let it land.
    wait_idle(_pid(side))
    cpu_before = side.cpu()
    drained = run_async(
        load.drain(
            side.url,
            clients=options.clients,
            max_requests=jobs + 10,
            deadline=time.monotonic() + phase_seconds,
        )
    )
    cpu = _per_item(cpu_before, side.cpu(), len(drained.claimed))
    queued = published.queued
    verdict = load.check_exactly_once(
        queued, drained.claimed, uncertain=published.unanswered
    )
    if not record:
        if published.errors or drained.errors or not verdict.ok:
            side.problems.append(
                f"warm-up failed: {dict(published.errors)} {dict(drained.errors)} "
                f"{verdict}"
            )
        return
    side.publish.append(published)
    side.drain.append(drained)
    if cpu is not None:
        side.drain_cpu.append(cpu)
    side.verdicts.append(str(verdict))
    for what, phase in (("publish", published), ("drain", drained)):
        if phase.errors:
            side.problems.append(f"{what} errors: {dict(phase.errors)}")
    if len(queued) != jobs:
        side.problems.append(
            f"only {len(queued)} of {jobs} jobs were queued "
            f"({len(published.unanswered)} unanswered)"
        )
    if not verdict.ok:
        side.problems.append(f"drain check failed: {verdict}")
    print(
        f"  {side.label:<38} publish {published.rate:>7,.0f} jobs/s  "
        f"drain {drain_rate(drained):>7,.0f} jobs/s  CPU {fmt(cpu)} µs/job  {verdict}"
    )


def _pid(side: Side) -> int | None:
    return None if side.running is None else side.running.pid


def _per_item(before: float | None, after: float | None, count: int) -> float | None:
    """Microseconds of CPU per item, when both readings exist."""
    if before is None or after is None or not count:
        return None
    return (after - before) / count * 1e6


def drain_rate(phase: load.Drain) -> float:
    """Jobs handed out per second of the drain."""
    return len(phase.claimed) / phase.seconds if phase.seconds else 0.0


T = TypeVar("T")


def rotated(sides: Sequence[T], by: int) -> list[T]:
    """``sides`` starting at ``by``: each round starts with another server."""
    shift = by % len(sides)
    return [*sides[shift:], *sides[:shift]]


def run_group(group: Group, options: Options, wrk_ok: bool) -> None:
    """Start the group's servers, warm them up, run the interleaved rounds."""
    print(f"\n== {group.name}")
    with contextlib.ExitStack() as servers:
        for side in group.sides:
            server = side.make()
            servers.callback(server.close)
            server.start()
            side.running = server
        for side in group.sides:
            # First requests pay for imports, connections and thread pools.
            if wrk_ok:
                measure_rate(side, options, record=False)
            warm_jobs = min(WARMUP_JOBS, max(50, options.jobs // 4))
            measure_drain(side, options, "warm", jobs=warm_jobs, record=False)
        for number in range(options.rounds):
            print(f" round {number + 1}/{options.rounds}")
            order = rotated(group.sides, number)
            if wrk_ok:
                for side in order:
                    measure_rate(side, options)
            if number < options.drain_rounds:
                for side in order:
                    measure_drain(side, options, f"r{number}", jobs=options.jobs)
        for side in group.sides:
            side.running = None


# --- Reporting ------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """Medians of one side, and its ratios to the group's baseline."""

    side: Side
    rate: float | None
    p50: float | None
    p99: float | None
    publish: float | None
    drain: float | None
    wrk_cpu: float | None
    drain_cpu: float | None
    rate_ratio: float | None
    drain_ratio: float | None
    # Baseline CPU per item over ours: the rate ratio if CPU were the only limit.
    cpu_ratio: float | None
    rate_ratios: list[float]
    drain_ratios: list[float]


def summarise(groups: Sequence[Group]) -> list[Row]:
    """One row per side, with medians over rounds and per-round ratios."""
    rows = []
    for group in groups:
        base = group.baseline
        for side in group.sides:
            rate = median([r.rate for r in side.wrk])
            drain = median([drain_rate(d) for d in side.drain])
            per_round_rate: list[float] = []
            per_round_drain: list[float] = []
            if base is not None and not side.baseline:
                per_round_rate = [
                    g.rate / b.rate
                    for g, b in zip(side.wrk, base.wrk, strict=False)
                    if b.rate
                ]
                per_round_drain = [
                    drain_rate(g) / drain_rate(b)
                    for g, b in zip(side.drain, base.drain, strict=False)
                    if drain_rate(b)
                ]
            base_rate = median([r.rate for r in base.wrk]) if base else None
            base_drain = median([drain_rate(d) for d in base.drain]) if base else None
            wrk_cpu = median(side.wrk_cpu)
            rows.append(
                Row(
                    side=side,
                    rate=rate,
                    p50=median([r.p50_ms for r in side.wrk]),
                    p99=median([r.p99_ms for r in side.wrk]),
                    publish=median([p.rate for p in side.publish]),
                    drain=drain,
                    wrk_cpu=wrk_cpu,
                    drain_cpu=median(side.drain_cpu),
                    rate_ratio=ratio(rate, base_rate),
                    drain_ratio=ratio(drain, base_drain),
                    cpu_ratio=ratio(median(base.wrk_cpu) if base else None, wrk_cpu),
                    rate_ratios=per_round_rate,
                    drain_ratios=per_round_drain,
                )
            )
    return rows


def table(rows: Sequence[Row]) -> str:
    header = [
        "server",
        "queue",
        "GET /job/next req/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "publish jobs/s",
        "drain jobs/s",
        "CPU µs/job",
        "req/s vs seed",
        "drain vs seed",
        "CPU/req vs seed",
    ]
    body = [
        [
            row.side.server,
            row.side.queue,
            fmt(row.rate),
            fmt(row.p50, 1),
            fmt(row.p99, 1),
            fmt(row.wrk_cpu),
            fmt(row.publish),
            fmt(row.drain),
            fmt(row.drain_cpu),
            fmt(row.rate_ratio, 2, "x"),
            fmt(row.drain_ratio, 2, "x"),
            fmt(row.cpu_ratio, 2, "x"),
        ]
        for row in rows
    ]
    return format_table(header, body)


def save(path: Path, options: Options, rows: Sequence[Row], summary: str) -> None:
    """Every figure of every round, as JSON, for later comparison."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": summary,
        "options": asdict(options),
        "rows": [
            {
                "key": row.side.key,
                "label": row.side.label,
                "wrk": [asdict(r) | {"rate": r.rate} for r in row.side.wrk],
                "publish_rates": [p.rate for p in row.side.publish],
                "drain_rates": [drain_rate(d) for d in row.side.drain],
                "wrk_cpu_us_per_request": row.side.wrk_cpu,
                "drain_cpu_us_per_job": row.side.drain_cpu,
                "verdicts": row.side.verdicts,
                "problems": row.side.problems,
                "median_rate": row.rate,
                "median_drain": row.drain,
                "rate_ratio": row.rate_ratio,
                "drain_ratio": row.drain_ratio,
                "cpu_ratio": row.cpu_ratio,
                "rate_ratios": row.rate_ratios,
                "drain_ratios": row.drain_ratios,
            }
            for row in rows
        ],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


# --- Command line ---------------------------------------------------------------


# --- Signature v2: one nonce remembered per request ------------------------------


def run_v2(args: argparse.Namespace) -> int:
    """The v2 request rate of ``args.v2_before``'s gateway and this one's."""
    print(
        f"Signature v2: GET /job/next on an empty queue, a fresh nonce per request, "
        f"{args.connections} clients, {args.duration:g} s a round, {args.rounds} "
        f"interleaved round(s); SQLite, one daphne each.\n{machine_summary()}"
    )
    rates: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    problems: list[str] = []
    sides: dict[str, Gateway] = {}
    with contextlib.ExitStack() as stack:
        before = stack.enter_context(checkout(args.v2_before))
        sides = {
            f"before ({args.v2_before})": Gateway(source=before),
            "after (this checkout)": Gateway(),
        }
        for gateway in sides.values():
            stack.callback(gateway.close)
            gateway.start()
            run_async(load.v2_requests(gateway.base_url, concurrency=8, duration=2))
        for number in range(args.rounds):
            for label, gateway in rotated(list(sides.items()), number):
                wait_idle(gateway.pid)
                cpu_before = cpu_seconds(gateway.pid)
                phase = run_async(
                    load.v2_requests(
                        gateway.base_url,
                        concurrency=args.connections,
                        duration=args.duration,
                    )
                )
                cpu = _per_item(cpu_before, cpu_seconds(gateway.pid), phase.count)
                rates.setdefault(label, []).append(phase.rate)
                if cpu is not None:
                    cpus.setdefault(label, []).append(cpu)
                if phase.errors:
                    problems.append(f"{label}: {dict(phase.errors)}")
                print(
                    f" round {number + 1}: {label:<28} {phase.rate:>7,.0f} req/s  "
                    f"CPU {fmt(cpu)} µs/req"
                )
    labels = list(sides)
    before_rates, after_rates = (rates.get(label, []) for label in labels)
    print(f"\nMedians of {args.rounds} round(s).\n{machine_summary()}")
    for label in labels:
        print(
            f"  {label:<28} {median(rates[label]):>7,.0f} req/s  "
            f"CPU {fmt(median(cpus.get(label, [])))} µs/req"
        )
    per_round = [
        ratio(after, before) or 0.0
        for before, after in zip(before_rates, after_rates, strict=True)
    ]
    print(
        f"  after / before: {fmt(ratio(median(after_rates), median(before_rates)), 2)} "
        f"(per round {_listed(per_round)})"
    )
    for problem in problems:
        print(f"PROBLEM {problem}")
    return 1 if problems else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.http",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round, 3 s of wrk, 1,000 jobs (2-3 min)",
    )
    parser.add_argument(
        "--rounds", type=int, help="interleaved rounds of wrk (default 3)"
    )
    parser.add_argument(
        "--drain-rounds",
        type=int,
        help="how many of those rounds also publish and drain (default 1)",
    )
    parser.add_argument("--duration", type=float, help="seconds of wrk (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--jobs", type=int, help="jobs to drain (default 20,000)")
    parser.add_argument("--clients", type=int, default=32, help="drain clients")
    parser.add_argument(
        "--publishers", type=int, default=32, help="clients publishing the jobs"
    )
    parser.add_argument(
        "--modes",
        default="memory,redis",
        help="comma-separated: memory (seed in-memory vs gateway database), "
        "redis (seed Redis vs gateway redis backend)",
    )
    parser.add_argument(
        "--postgres",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="add a gateway row on PostgreSQL, database queue (default: off)",
    )
    parser.add_argument(
        "--v2-before",
        metavar="REF",
        help="measure only the v2 request rate, the gateway at git REF against "
        "this checkout's (uses --rounds, --duration, --connections)",
    )
    add_baseline_arguments(parser)
    parser.add_argument(
        "--without",
        metavar="PATCH",
        help="instead of the seed, compare the gateway (SQLite) with every "
        "server patch against the gateway without PATCH (gateway_project/server)",
    )
    parser.add_argument("--json", type=Path, help="where to save every figure")
    args = parser.parse_args(argv)
    args.modes = {mode.strip() for mode in args.modes.split(",") if mode.strip()}
    if unknown := args.modes - {"memory", "redis"}:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.duration = args.duration or (3.0 if quick else 8.0)
    args.jobs = args.jobs or (1_000 if quick else 20_000)
    args.drain_rounds = min(args.drain_rounds or 1, args.rounds)
    if not 0 < args.duration <= MAX_WRK_SECONDS:
        parser.error(f"--duration must be between 0 and {MAX_WRK_SECONDS:g} seconds")
    for name in (
        "rounds",
        "drain_rounds",
        "jobs",
        "clients",
        "publishers",
        "threads",
        "connections",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.v2_before:
        return run_v2(args)
    options = Options(
        rounds=args.rounds,
        drain_rounds=args.drain_rounds,
        duration=args.duration,
        threads=args.threads,
        connections=args.connections,
        jobs=args.jobs,
        clients=args.clients,
        publishers=args.publishers,
        access_log=args.access_log,
    )
    summary = machine_summary()
    print(
        f"HTTP benchmark: signed GET /job/next (wrk -t{options.threads} "
        f"-c{options.connections} -d{options.duration:g}s, empty queue), and "
        f"{options.jobs:,} jobs published by {options.publishers} clients then "
        f"drained by {options.clients}; {options.rounds} interleaved round(s), "
        f"{options.drain_rounds} with a drain.\n"
        f"{summary}"
    )
    wrk_problem = load.wrk_available()
    if wrk_problem:
        print(f"No request-rate figures: {wrk_problem}.")
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        groups = build_groups(args, stack)
        for group in groups:
            run_group(group, options, wrk_ok=wrk_problem is None)
    rows = summarise(groups)
    print(f"\nMedians of {options.rounds} round(s); ratios are gateway / seed.")
    print(summary)
    print(table(rows))
    for row in rows:
        if row.rate_ratios or row.drain_ratios:
            print(
                f"  {row.side.label}: per-round req/s ratio "
                f"{_listed(row.rate_ratios)}; drain ratio {_listed(row.drain_ratios)}"
            )
    problems = [(row.side, p) for row in rows for p in row.side.problems]
    for side, problem in problems:
        print(f"PROBLEM {side.label}: {problem}")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.json or RESULTS_DIR / f"http-{stamp}.json"
    save(path, options, rows, summary)
    print(
        f"\nFigures saved to {_shown(path)}; took {time.monotonic() - started:.0f} s."
    )
    return 1 if problems else 0


def _listed(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values) or "-"


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(REPO_ROOT))
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
