"""Where a frame waits in the hub (``jobs.fanout``): per job, its arrival in the
hub's inbox, the start of the round that takes it, and the end of that round.

    python -m bench.fanout --trace ...               # traces the gateway sides
    python -m bench.trace.fanout_trace FILE [FILE]   # summarises trace files

A CPU profile shows where the process works, not where a frame waits: a job
that sits in the inbox while the hub is paused, or while the process runs
something else, costs no CPU at all. This counts the wait of each job between
its arrival and its round's start, split into the time a round was being
written (it waited behind other frames) and the time none was (the hub paused,
or the event loop ran other work).

Served as ``fanout_trace:application`` with this folder on ``PYTHONPATH``, it
wraps the hub of whichever checkout the server runs from (another commit's
too, for ``--gateway-ref``), then serves ``gateway_project.asgi``. It imports
nothing from ``bench``, so that it can be found on its own.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

TRACE_VARIABLE = "FANOUT_TRACE"


def install(path: str) -> None:
    """Record the hub's rounds in ``path``, one JSON line per event."""
    from jobs import fanout

    hub_class: Any = fanout.Hub
    out = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)
    arrivals: dict[Any, float] = {}
    hear, in_order, dispatch = hub_class.hear, hub_class.in_order, hub_class.dispatch

    def traced_hear(self: Any, news: Any) -> Any:
        now = time.monotonic()
        for job in news.published:
            arrivals[job.get("id")] = now
        return hear(self, news)

    async def traced_in_order(self: Any, jobs: list[dict[str, Any]]) -> Any:
        # Called once per round, first thing: the round's start.
        taken = [[job.get("id"), arrivals.pop(job.get("id"), None)] for job in jobs]
        record = {
            "start": time.monotonic(),
            "jobs": taken,
            "clients": len(self._filters),
        }
        out.write(json.dumps(record) + "\n")
        return await in_order(self, jobs)

    async def traced_dispatch(self: Any, jobs: list[dict[str, Any]]) -> None:
        try:
            await dispatch(self, jobs)
        finally:
            out.write(json.dumps({"end": time.monotonic()}) + "\n")

    hub_class.hear = traced_hear
    hub_class.in_order = traced_in_order
    hub_class.dispatch = traced_dispatch


def summary(lines: Sequence[str], *, min_clients: int = 100) -> dict[str, Any]:
    """Rounds and waits of one trace; rounds of fewer clients (warm-up) left out."""
    rounds: list[tuple[float, float, list[tuple[Any, float | None]], int]] = []
    for line in lines:
        event = json.loads(line)
        if "start" in event:
            rounds.append(
                (event["start"], event["start"], event["jobs"], event["clients"])
            )
        elif rounds:
            start, _, jobs, clients = rounds[-1]
            rounds[-1] = (start, event["end"], jobs, clients)
    spans = [(start, end) for start, end, _, _ in rounds]
    measured = [r for r in rounds if r[3] >= min_clients]
    waits: list[float] = []
    behind = outside = 0.0
    for start, _, jobs, _ in measured:
        for _, arrived in jobs:
            if arrived is None:
                continue
            waits.append((start - arrived) * 1000)
            during = sum(max(0.0, min(start, b) - max(arrived, a)) for a, b in spans)
            behind += during * 1000
            outside += (start - arrived) * 1000 - during * 1000
    lengths = sorted((end - start) * 1000 for start, end, _, _ in measured)
    waits.sort()
    return {
        "rounds": len(measured),
        "round_ms": _quantiles(lengths),
        "jobs": len(waits),
        "waited_over_1ms": sum(1 for w in waits if w > 1),
        "wait_ms": _quantiles(waits),
        "wait_behind_rounds_ms": round(behind, 1),
        "wait_outside_rounds_ms": round(outside, 1),
    }


def _quantiles(ordered: Sequence[float]) -> dict[str, float] | None:
    if not ordered:
        return None

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {
        "p50": at(0.5),
        "p99": at(0.99),
        "max": round(ordered[-1], 1),
        "mean": round(statistics.fmean(ordered), 1),
    }


def describe(name: str, lines: Sequence[str]) -> str:
    """One paragraph about one trace."""
    s = summary(lines)
    if not s["rounds"]:
        return f"{name}: no round of 100 clients or more"
    r, w = s["round_ms"], s["wait_ms"]
    return (
        f"{name}: {s['rounds']} rounds, a round took p50 {r['p50']} / p99 "
        f"{r['p99']} / max {r['max']} ms; {s['jobs']} jobs, {s['waited_over_1ms']} "
        f"waited over 1 ms in the inbox (p99 {w['p99']}, max {w['max']} ms); "
        f"all waits: {s['wait_behind_rounds_ms']} ms behind a round being "
        f"written, {s['wait_outside_rounds_ms']} ms while none was"
    )


if os.environ.get(TRACE_VARIABLE):
    # Loaded as the server's application: the gateway first (it sets Django up).
    from gateway_project.asgi import application as application

    install(os.environ[TRACE_VARIABLE])


def main(argv: Sequence[str]) -> int:
    """Summarise each trace file named."""
    if not argv:
        print(__doc__)
        return 2
    for name in argv:
        with open(name) as trace:
            print(describe(name, trace.read().splitlines()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
