"""Where a WebSocket handshake's time goes: daphne profiled through a burst.

    python -m bench.handshakes                 # 1,000 handshakes, embedded
    python -m bench.handshakes --clients 3000 --top 30

A warmed-up gateway (SQLite, in-memory layer, daphne's access log on, as in
production) is profiled with cProfile, on its serving thread only, while N
clients connect at once and each waits for its ``hello``; the time is then
added up by where it was spent (the HTTP parser, autobahn's handshake, the
consumer, the access log, the socket calls). Profiling slows the server about
threefold: compare the shares, not the times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO_ROOT, machine_summary
from bench.fanout import raise_file_limit
from bench.fanout_client import ClientPool
from bench.gateway import Gateway
from testkit.servers import LOOPBACK, DaphneProcess

# Where a function's own time is counted: the first pattern its file matches.
PLACES = (
    ("daphne's access log", ("daphne/access.py", "log_patches.py")),
    ("the consumer (jobs/)", ("/jobs/",)),
    ("Channels and asgiref", ("/channels/", "/asgiref/")),
    ("autobahn (WebSocket handshake, frames)", ("/autobahn/", "/txaio/")),
    ("daphne", ("/daphne/",)),
    ("Twisted (HTTP parsing, TCP, deferreds)", ("/twisted/",)),
    ("asyncio event loop", ("/asyncio/",)),
    ("Django", ("/django/",)),
    ("Python's standard library", ("/lib/python3",)),
)


class Profiled(DaphneProcess):
    """daphne through bench/trace/daphne_profiled.py."""

    def __init__(self, *, out: Path, **options: object) -> None:
        self.out = out
        super().__init__(**options)  # type: ignore[arg-type]

    def _argv(self) -> list[str]:
        script = REPO_ROOT / "bench" / "trace" / "daphne_profiled.py"
        return [sys.executable, str(script), str(self.out), *super()._argv()[3:]]


async def burst(port: int, clients: int) -> float:
    """Connect ``clients`` at once, each until its hello; return the seconds."""
    pool = ClientPool(LOOPBACK, port, wait_for_hello=True)
    seconds = await pool.connect(clients, timeout=120)
    await pool.close(timeout=5)
    return seconds


def places(stats: pstats.Stats) -> list[tuple[str, float, float]]:
    """(place, own seconds, share of the total), largest first."""
    totals: dict[str, float] = {}
    table = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, own, _, _) in table.items():
        place = next(
            (label for label, parts in PLACES if any(p in filename for p in parts)),
            "socket and other built-in calls" if filename == "~" else "other",
        )
        totals[place] = totals.get(place, 0.0) + own
    whole = sum(totals.values()) or 1.0
    return sorted(((p, s, s / whole) for p, s in totals.items()), key=lambda r: -r[1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handshakes")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    args = parser.parse_args(argv)
    raise_file_limit(args.clients)
    print(f"{args.clients:,} handshakes at once, profiled.\n{machine_summary()}")
    out = Path(tempfile.mkdtemp(prefix="bench-handshakes-")) / "daphne.prof"
    gateway = Gateway()
    try:
        gateway.start()  # migrates; then replaced by the profiled daphne
        env = gateway.env()
        assert gateway.process is not None
        gateway.process.close()
        gateway.process = server = Profiled(out=out, env=env)
        server.start()
        asyncio.run(burst(server.port, 50))  # imports, threads, the hub
        assert server.pid is not None
        os.kill(server.pid, signal.SIGUSR2)
        seconds = asyncio.run(burst(server.port, args.clients))
        os.kill(server.pid, signal.SIGUSR1)
        for _ in range(100):
            if out.exists():
                break
            time.sleep(0.1)
    finally:
        gateway.close()
    print(f"{args.clients / seconds:,.0f} handshakes/s while profiled")
    stats = pstats.Stats(str(out))
    shutil.rmtree(out.parent, ignore_errors=True)
    print("\n| where | own CPU s | share |\n| --- | --- | --- |")
    for place, own, share in places(stats):
        print(f"| {place} | {own:.3f} | {share:.0%} |")
    print()
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
