"""Garbage collections and event-loop stalls of daphne processes, summed up.

    PYTHONPATH=bench/garbage_hook GC_PAUSES_DIR=bench/results/pauses \\
        python -m bench.loadtest --redis --no-embedded --processes 2
    python -m bench.gc_pauses bench/results/pauses

Loaded through ``PYTHONPATH`` (the benchmarks pass the environment on to the
daphne processes they start), ``bench/garbage_hook`` records in each daphne
process every garbage collection with its generation and length, and every
time the event loop ran a 10 ms timer more than 20 ms late: a stall, during
which no frame, answer or refusal was written. This prints, per process, the
collections of each generation (how many, their total and longest pause) and
the stalls (how many over 20, 50 and 100 ms, their total and the longest).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.common import format_table


def summarise(log: Path) -> list[str]:
    """One table row for one process's log."""
    pauses: dict[int, list[float]] = {}
    stalls: list[float] = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event[0] == "gc":
            pauses.setdefault(event[2], []).append(event[3])
        else:
            stalls.append(event[2])
    collections = [
        f"{len(ms)} x, {sum(ms) * 1000:,.0f} ms, longest {max(ms) * 1000:,.0f}"
        if (ms := pauses.get(generation))
        else "-"
        for generation in (0, 1, 2)
    ]
    over = [sum(stall > limit for stall in stalls) for limit in (0.02, 0.05, 0.1)]
    return [
        log.stem.removeprefix("pauses-"),
        *collections,
        " / ".join(str(count) for count in over),
        f"{sum(stalls) * 1000:,.0f}",
        f"{max(stalls, default=0.0) * 1000:,.0f}",
    ]


def report(directory: Path) -> str:
    header = [
        "process",
        "young collections",
        "middle collections",
        "full collections",
        "stalls > 20 / 50 / 100 ms",
        "stalled ms",
        "longest stall ms",
    ]
    rows = [summarise(log) for log in sorted(directory.glob("pauses-*.jsonl"))]
    return format_table(header, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gc_pauses",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("directory", type=Path, help="the GC_PAUSES_DIR of a run")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not any(args.directory.glob("pauses-*.jsonl")):
        parser.error(f"no pauses-*.jsonl in {args.directory}")
    print(report(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
