"""How a flood of forged requests reaches the server while refusals are held.

    python -m bench.flood_waves                 # 64 connections, 14 s
    python -m bench.flood_waves --connections 16 --seconds 6

The load test's flood: each connection sends its next forged request (``POST
/job``, ``GET /job/next``, a ``/ws`` handshake, by turns) as soon as the last
is answered, and the gateway holds each refusal for about
``AUTH_FAILURE_DELAY_SECONDS`` (its default, 1 s; pinned there, as the
flood's one address would otherwise be held longer and longer, up to
``AUTH_FAILURE_MAX_DELAY_SECONDS``). The send times after
the first few seconds, counted in 50 ms windows, show whether the flood comes
in waves (a few windows holding most requests) or evenly: the rate says how
many forged requests a second the holds let through.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import machine_summary, run_async
from bench.gateway import Gateway
from bench.loadtest_http import FLOOD_KINDS, ForgedClient, admitted

WINDOW = 0.05  # seconds
# Left out of the figures: the first sends go out together whatever the holds.
SETTLE = 4.0
# Seconds each refusal is held, the same for every one (no growth).
HOLD = "1"


@dataclass(frozen=True)
class Arrivals:
    """The flood's send times, counted in windows of ``WINDOW`` seconds."""

    per_second: float
    busiest_window: int
    median_window: float
    # The share of the requests sent in the busiest tenth of the windows.
    busiest_tenth_share: float

    @classmethod
    def of(cls, sent_at: Sequence[float], start: float, end: float) -> Arrivals:
        windows = round((end - start) / WINDOW)
        counts = Counter(int((at - start) / WINDOW) for at in sent_at)
        per_window = sorted(
            (counts.get(window, 0) for window in range(windows)), reverse=True
        )
        total = sum(per_window)
        busiest = sum(per_window[: max(1, windows // 10)])
        return cls(
            per_second=total / (end - start),
            busiest_window=per_window[0],
            median_window=statistics.median(per_window),
            busiest_tenth_share=busiest / total if total else 0.0,
        )


async def flood(
    base_url: str, connections: int, seconds: float
) -> tuple[list[float], Counter[str]]:
    """Flood for ``seconds``; the send times (from the start) and the answers."""
    sent_at: list[float] = []
    answers: Counter[str] = Counter()
    started = time.monotonic()
    deadline = started + seconds

    async def sender(number: int) -> None:
        with contextlib.closing(ForgedClient(base_url)) as client:
            while (now := time.monotonic()) < deadline:
                sent_at.append(now - started)
                kind = FLOOD_KINDS[number % len(FLOOD_KINDS)]
                answers[await client.send(kind)] += 1
                number += 1

    await asyncio.gather(*(sender(n) for n in range(connections)))
    return sent_at, answers


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood_waves",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--seconds", type=float, default=14.0, help=f"in all, {SETTLE:g} s unreported"
    )
    args = parser.parse_args(argv)
    if args.connections < 1 or args.seconds <= SETTLE:
        parser.error(f"--connections must be at least 1, --seconds over {SETTLE:g}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print(
        f"Flood: {args.connections} connections for {args.seconds:g} s, each "
        f"sending when answered; each refusal held about {HOLD} s.\n"
        f"{machine_summary()}"
    )
    gateway = Gateway(
        access_log=True,
        extra_env={
            "AUTH_FAILURE_DELAY_SECONDS": HOLD,
            "AUTH_FAILURE_MAX_DELAY_SECONDS": HOLD,
        },
    )
    try:
        gateway.start()
        sent_at, answers = run_async(
            flood(gateway.base_url, args.connections, args.seconds)
        )
    finally:
        gateway.close()
    arrivals = Arrivals.of([at for at in sent_at if at >= SETTLE], SETTLE, args.seconds)
    print(
        f"After the first {SETTLE:g} s: {arrivals.per_second:.1f} forged requests/s; "
        f"per {WINDOW * 1000:.0f} ms: busiest {arrivals.busiest_window}, "
        f"median {arrivals.median_window:g}; the busiest tenth of the windows "
        f"held {arrivals.busiest_tenth_share:.0%} of the requests (evenly: 10%)."
    )
    print("Answers: " + ", ".join(f"{a}: {n:,}" for a, n in sorted(answers.items())))
    if admitted(answers):
        print(f"PROBLEM: {admitted(answers)} forged request(s) admitted")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
