"""What a refused request costs the server, with and without one server patch.

    python -m bench.refused --without consumer_dispatch   # about 1 minute

Two gateways run side by side (SQLite, embedded): one with every patch of the
server seam (``gateway_project/server``), one without the patch named. Round
after round, alternately, each gets the same refusals over keep-alive
connections: unsigned ``GET /job/next`` and unsigned ``POST /job`` with a
JSON job (``401``), then ``/ws`` handshakes with a wrong key (``403``). The
figure is the server's CPU time divided by the refusals, in µs; the table
gives medians over the rounds and the per-round ratios, without / with, so a
shared machine's noise falls on both. ``--without ""`` leaves nothing out:
the two gateways' difference then is the method's own noise. Refusals are
answered at once here (``AUTH_FAILURE_DELAY_SECONDS=0``): the held answer
costs a timer, not CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.common import cpu_seconds, machine_summary, median, run_async
from bench.gateway import Gateway
from gateway_project.server import LEAVE_OUT_VARIABLE


@dataclass
class Side:
    """One gateway and its µs per refusal, round by round."""

    label: str
    gateway: Gateway
    http_us: list[float] = field(default_factory=list)
    post_us: list[float] = field(default_factory=list)
    ws_us: list[float] = field(default_factory=list)


async def _refuse_http(base_url: str, count: int, concurrency: int) -> None:
    async def client(session: aiohttp.ClientSession, share: int) -> None:
        for _ in range(share):
            async with session.get(base_url + "/job/next") as response:
                await response.read()
                assert response.status == 401, response.status

    async with aiohttp.ClientSession() as session:
        share = count // concurrency
        await asyncio.gather(*(client(session, share) for _ in range(concurrency)))


async def _refuse_post(base_url: str, count: int, concurrency: int) -> None:
    job = {"job_id": "refused", "title": "x" * 200, "fields": {"players": 3}}

    async def client(session: aiohttp.ClientSession, share: int) -> None:
        for _ in range(share):
            async with session.post(base_url + "/job", json=job) as response:
                await response.read()
                assert response.status == 401, response.status

    async with aiohttp.ClientSession() as session:
        share = count // concurrency
        await asyncio.gather(*(client(session, share) for _ in range(concurrency)))


async def _refuse_ws(base_url: str, count: int, concurrency: int) -> None:
    url = base_url.replace("http", "ws", 1) + "/ws?api_key=wrong"

    async def client(session: aiohttp.ClientSession, share: int) -> None:
        for _ in range(share):
            with contextlib.suppress(aiohttp.WSServerHandshakeError):
                async with session.ws_connect(url):
                    raise AssertionError("a wrong key was accepted")

    async with aiohttp.ClientSession() as session:
        share = count // concurrency
        await asyncio.gather(*(client(session, share) for _ in range(concurrency)))


def _cost(side: Side, refuse: object, count: int, concurrency: int) -> float:
    """Server CPU µs per refusal for ``count`` refusals."""
    pid = side.gateway.pid
    before = cpu_seconds(pid)
    run_async(refuse(side.gateway.base_url, count, concurrency))  # type: ignore[operator]
    after = cpu_seconds(pid)
    assert before is not None and after is not None
    return (after - before) / count * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.refused",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--without", required=True, metavar="PATCH")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--handshakes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    env = {"AUTH_FAILURE_DELAY_SECONDS": "0"}
    sides = [
        Side("every patch", Gateway(extra_env=env)),
        Side(
            f"without {args.without}",
            Gateway(extra_env={**env, LEAVE_OUT_VARIABLE: args.without}),
        ),
    ]
    print(f"Refusals, with and without {args.without}.\n{machine_summary()}")
    with contextlib.ExitStack() as stack:
        for side in sides:
            stack.callback(side.gateway.close)
            side.gateway.start()
        for side in sides:  # warm up
            _cost(side, _refuse_http, 200, args.concurrency)
            _cost(side, _refuse_post, 200, args.concurrency)
            _cost(side, _refuse_ws, 100, args.concurrency)
        for number in range(args.rounds):
            for side in sides if number % 2 == 0 else sides[::-1]:
                side.http_us.append(
                    _cost(side, _refuse_http, args.requests, args.concurrency)
                )
                side.post_us.append(
                    _cost(side, _refuse_post, args.requests, args.concurrency)
                )
                side.ws_us.append(
                    _cost(side, _refuse_ws, args.handshakes, args.concurrency)
                )
    with_all, without = sides
    print(machine_summary())
    print(
        "| server | unsigned GET /job/next µs | unsigned POST /job µs "
        "| refused handshake µs |"
    )
    print("| --- | --- | --- | --- |")
    for side in sides:
        figures = (median(side.http_us), median(side.post_us), median(side.ws_us))
        print(f"| {side.label} | " + " | ".join(f"{f:.0f}" for f in figures) + " |")
    for name in ("http_us", "post_us", "ws_us"):
        ratios = [
            b / a
            for a, b in zip(
                getattr(with_all, name), getattr(without, name), strict=True
            )
        ]
        listed = ", ".join(f"{r:.2f}" for r in ratios)
        print(f"{name} without / with: median {median(ratios):.2f} ({listed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
