"""What a refused request costs the server: forged signatures and keys, by kind.

    python -m bench.refusals                  # 1,000 of each kind, 3 rounds
    python -m bench.refusals --requests 200 --rounds 1 --no-baseline

A flood of forged requests costs the server the work it does before it can
refuse each one. For each kind (``POST /job`` and ``GET /job/next`` with the
right key, a fresh timestamp and a wrong ``X-SIGNATURE``; a ``/ws`` handshake
with a wrong key) one client sends requests back to back, over one kept-open
connection for HTTP and a new connection per handshake, and the server's CPU
time (user + system, from ``/proc``) is divided by the requests sent. The seed
service runs in the same rounds, interleaved, for the ratio. The gateway
answers at once here (``AUTH_FAILURE_DELAY_SECONDS=0``): a held refusal costs
a timer, and waiting a second per request would only make the run longer.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.baseline import add_baseline_arguments, seed_factory
from bench.common import fmt, format_table, machine_summary, ratio, run_async
from bench.fanout_proc import cpu_seconds, settle
from bench.gateway import Gateway
from bench.loadtest_http import ForgedClient, admitted

WARM_UP = 50
# Each kind, and its name among the flood's.
KINDS = {"POST /job": "post", "GET /job/next": "next", "/ws handshake": "ws"}


@dataclass
class Server:
    """One server under test, and what each kind cost it per request, per round."""

    label: str
    base_url: str
    pid: int
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)

    def median_ms(self, kind: str) -> float | None:
        values = self.cpu_ms.get(kind)
        return statistics.median(values) if values else None

    @property
    def admitted(self) -> int:
        """Forged requests the server accepted: must be 0."""
        return admitted(self.answers)


async def measure(server: Server, requests: int) -> None:
    """One round: ``requests`` of each kind, the server's CPU per request."""
    client = ForgedClient(server.base_url)
    for kind, flood_kind in KINDS.items():
        for _ in range(WARM_UP):
            await client.send(flood_kind)
        await settle([server.pid])
        before = cpu_seconds([server.pid])
        for _ in range(requests):
            server.answers[await client.send(flood_kind)] += 1
        spent = cpu_seconds([server.pid]) - before
        server.cpu_ms.setdefault(kind, []).append(spent * 1000.0 / requests)
    client.close()


def report(servers: Sequence[Server], rounds: int) -> str:
    header = ["kind", *(f"{s.label} CPU ms/request" for s in servers)]
    if len(servers) == 2:
        header.append(f"ratio {servers[0].label} / {servers[1].label}")
    rows = []
    for kind in KINDS:
        medians = [server.median_ms(kind) for server in servers]
        row = [kind, *(fmt(value, 3) for value in medians)]
        if len(servers) == 2:
            row.append(fmt(ratio(medians[0], medians[1]), 2, "x"))
        rows.append(row)
    return f"Medians of {rounds} round(s).\n" + format_table(header, rows)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.refusals",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests of each kind per round"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    add_baseline_arguments(parser)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    summary = machine_summary()
    print(
        f"Refused requests: {args.requests:,} of each kind per round, "
        f"{args.rounds} round(s), one client sending back to back.\n{summary}"
    )
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        gateway = Gateway(
            access_log=args.access_log,
            extra_env={"AUTH_FAILURE_DELAY_SECONDS": "0"},
        )
        stack.callback(gateway.close)
        gateway.start()
        assert gateway.pid is not None
        servers = [Server("gateway", gateway.base_url, gateway.pid)]
        start_seed = seed_factory(args)
        if start_seed is not None:
            seed = start_seed(None)
            stack.callback(seed.close)
            seed.start()
            assert seed.pid is not None
            servers.append(Server("seed", seed.base_url, seed.pid))
        for _ in range(args.rounds):
            for server in servers:
                run_async(measure(server, args.requests))
    print(summary)
    print(report(servers, args.rounds))
    leaky = [server for server in servers if server.admitted]
    for server in leaky:
        print(f"PROBLEM {server.label}: {server.admitted} forged request(s) admitted")
    for server in servers:
        answers = ", ".join(f"{a}: {n:,}" for a, n in sorted(server.answers.items()))
        print(f"  {server.label} answered {answers}")
    print(f"Took {time.monotonic() - started:.0f} s.")
    return 1 if leaky else 0


if __name__ == "__main__":
    sys.exit(main())
