"""Discord message to WebSocket client: the poller's latency, beside the seed's.

For each mode of the fake Discord (lenient: 50 requests/s; Discord-like: a
bucket of 5 requests per 2 s) and each server (the seed, whose own poller runs
in its process; the gateway under daphne with ``manage.py runpoller`` beside
it, polling over REST; the same with ``DISCORD_MODE=gateway``, the messages
pushed by the fake's Discord Gateway), interleaved: a fresh fake, the server,
one WebSocket client, a few seconds for the poller to settle, then messages
posted at random moments, each with an embed carrying a unique job id. Latency
is the client's receive time minus the moment the fake's control endpoint
returned the message, on one clock.

    python -m bench.latency [--messages N] [--quick] [--seed S]

The polling pollers run at the default intervals (0.25 s, 0.05 s in bursts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.baseline import (
    BaselineUnavailableError,
    SeedProcess,
    ensure_venv,
    find_baseline,
)
from bench.common import (
    API_KEY,
    REPO_ROOT,
    fmt,
    format_table,
    machine_summary,
    ratio,
    run_async,
)
from bench.gateway import Gateway
from testkit.fakes.discord import DEFAULT_TOKEN
from testkit.fakes.discord import MODES as BUCKETS
from testkit.servers import ManagedProcess

CHANNEL = "1390012345678901234"
MODES = ("lenient", "discord-like")
# The seed; the gateway with runpoller polling REST; with runpoller on the
# Discord Gateway.
SERVERS = ("seed", "gateway", "gateway-ws")
LABELS = {"seed": "seed", "gateway": "gateway, REST", "gateway-ws": "gateway, Gateway"}
POLL_SECONDS = "0.25"
BURST_SECONDS = "0.05"
SETTLE_SECONDS = 3.0  # the poller reaches its steady pace before the first post
DRAIN_SECONDS = 5.0  # how long to wait for the last messages after the last post
GAP_RANGE = (0.3, 1.5)  # uniform random gap between two posts, seconds
# Targets: gateway / seed, for p50 and p99 alike, per mode.
TARGETS = {"lenient": 1.0, "discord-like": 0.35}
# Gateway mode's targets, absolute: p50 and p99 in ms.
WS_TARGETS = (50.0, 100.0)


@dataclass
class PhaseResult:
    """One mode and one server."""

    mode: str
    server: str
    latencies_ms: list[float] = field(default_factory=list)
    sent: int = 0
    requests: int = 0
    status_429: int = 0
    seconds: float = 0.0

    @property
    def missing(self) -> int:
        return self.sent - len(self.latencies_ms)

    @property
    def requests_per_second(self) -> float | None:
        return self.requests / self.seconds if self.seconds > 0 else None

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile of the latencies, in ms."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[rank - 1]


# --- Processes ---------------------------------------------------------------


def start_fake(mode: str) -> tuple[ManagedProcess, str]:
    """A fake Discord process in ``mode``; returns it and its API base URL."""
    fake = ManagedProcess(
        [sys.executable, "-m", "testkit.fakes.discord", "--port", "0", "--mode", mode],
        cwd=REPO_ROOT,
        name="fake-discord",
        ready=lambda p: p.wait_for_output("READY ", 15),
    )
    fake.start()
    line = next(
        line for line in fake.output(current_run=True).splitlines() if "READY " in line
    )
    return fake, line.split("READY ", 1)[1].strip()


def poller_env(api_base: str) -> dict[str, str]:
    """What both pollers read, at the default intervals."""
    return {
        "CHANNEL_ID": CHANNEL,
        "DISCORD_TOKEN": DEFAULT_TOKEN,
        "DISCORD_API_BASE": api_base,
        "DISCORD_POLL_SECONDS": POLL_SECONDS,
        "BURST_POLL_SECONDS": BURST_SECONDS,
    }


class Server:
    """The seed (poller inside) or the gateway plus ``runpoller``."""

    def __init__(self, kind: str, api_base: str, seed_python: Any, seed_dir: Any):
        self.kind = kind
        self._seed: SeedProcess | None = None
        self._gateway: Gateway | None = None
        self._poller: ManagedProcess | None = None
        if kind == "seed":
            self._seed = SeedProcess(seed_python, seed_dir, access_log=False)
            self._seed.env.update(poller_env(api_base))
        else:
            self._gateway = Gateway(access_log=False)
            self._api_base = api_base
            self._mode = "gateway" if kind == "gateway-ws" else "rest"

    def start(self) -> None:
        if self._seed is not None:
            self._seed.start()
            return
        assert self._gateway is not None
        self._gateway.start()
        env = {
            **self._gateway.env(),
            **poller_env(self._api_base),
            "SERVICE_BASE_URL": self._gateway.base_url,
            "DISCORD_MODE": self._mode,
            "LOG_LEVEL": "INFO",  # a log line says it is ready
        }
        ready = "polling channel" if self._mode == "rest" else "caught up over REST"
        self._poller = ManagedProcess(
            [sys.executable, "manage.py", "runpoller"],
            env=env,
            cwd=REPO_ROOT,
            name="runpoller",
            ready=lambda p: p.wait_for_output(ready, 30),
        )
        self._poller.start()

    def ws(self) -> tuple[str, dict[str, str]]:
        """The WebSocket URL and handshake headers."""
        if self._seed is not None:
            url = self._seed.base_url.replace("http://", "ws://")
            return f"{url}/ws?api_key={API_KEY}", {}
        assert self._gateway is not None and self._gateway.process is not None
        return f"{self._gateway.process.ws_url}/ws", {"X-API-KEY": API_KEY}

    def close(self) -> None:
        for proc in (self._poller, self._seed):
            if proc is not None:
                proc.close()
        if self._gateway is not None:
            self._gateway.close()


# --- One phase ---------------------------------------------------------------


def _message_id(kind: str, data: Any) -> str | None:
    if not isinstance(data, dict):
        return None
    if kind != "seed":
        if data.get("type") != "job" or not isinstance(data.get("job"), dict):
            return None
        data = data["job"]
    value = data.get("message_id")
    return str(value) if value is not None else None


async def run_phase(
    result: PhaseResult, server: Server, api_base: str, gaps: list[float]
) -> None:
    """Connect, settle, post at the given gaps, wait for the stragglers."""
    control = api_base.rsplit("/api/", 1)[0] + "/_control"
    posted: dict[str, float] = {}
    received: dict[str, float] = {}
    arrived = asyncio.Event()
    url, headers = server.ws()
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.ws_connect(url, headers=headers, autoping=True) as ws,
    ):

        async def reader() -> None:
            async for msg in ws:
                now = time.monotonic()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                message_id = _message_id(server.kind, json.loads(msg.data))
                if message_id is not None and message_id not in received:
                    received[message_id] = now
                    arrived.set()

        reading = asyncio.create_task(reader())
        await asyncio.sleep(SETTLE_SECONDS)
        async with session.get(f"{control}/requests", params={"since": "0"}) as r:
            since = (await r.json())["next"]
        started = time.monotonic()
        for gap in gaps:
            await asyncio.sleep(gap)
            job_id = str(uuid.uuid4())
            body = {
                "channel_id": CHANNEL,
                "content": "",
                "embeds": [
                    {
                        "type": "rich",
                        "title": "Server Found",
                        "fields": [
                            {"name": "Job ID", "value": f"`{job_id}`", "inline": True},
                            {"name": "Players", "value": "**5**/8", "inline": True},
                        ],
                    }
                ],
            }
            async with session.post(f"{control}/messages", json=body) as r:
                message = await r.json()
                posted[str(message["id"])] = time.monotonic()
        deadline = time.monotonic() + DRAIN_SECONDS
        while not posted.keys() <= received.keys():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), left)
        result.seconds = time.monotonic() - started
        async with session.get(f"{control}/requests", params={"since": since}) as r:
            log = (await r.json())["requests"]
        reading.cancel()
    polls = [entry for entry in log if entry["path"].endswith("/messages")]
    result.sent = len(posted)
    result.requests = len(polls)
    result.status_429 = sum(1 for entry in polls if entry["status"] == 429)
    result.latencies_ms = [
        (received[mid] - at) * 1000 for mid, at in posted.items() if mid in received
    ]


def measure(
    mode: str, kind: str, gaps: list[float], seed_python: Any, seed_dir: Any
) -> PhaseResult:
    result = PhaseResult(mode, kind)
    fake, api_base = start_fake(mode)
    server = Server(kind, api_base, seed_python, seed_dir)
    try:
        server.start()
        run_async(run_phase(result, server, api_base, gaps))
    finally:
        server.close()
        fake.close()
    return result


# --- Report ------------------------------------------------------------------


def report(results: list[PhaseResult]) -> str:
    header = [
        "fake Discord",
        "server",
        "p50 ms",
        "p99 ms",
        "max ms",
        "received",
        "Discord req/s",
        "429s",
        "p50 / seed",
        "p99 / seed",
        "target",
    ]
    rows: list[list[str]] = []
    verdicts: list[str] = []
    by_key = {(r.mode, r.server): r for r in results}
    for r in results:
        seed = by_key.get((r.mode, "seed"))
        p50_ratio = p99_ratio = None
        target = ""
        if r.server != "seed" and seed is not None:
            p50_ratio = ratio(r.percentile(50), seed.percentile(50))
            p99_ratio = ratio(r.percentile(99), seed.percentile(99))
        if r.server == "gateway-ws":
            p50, p99 = r.percentile(50), r.percentile(99)
            met = (
                p50 is not None
                and p99 is not None
                and p50 < WS_TARGETS[0]
                and p99 < WS_TARGETS[1]
                and r.missing == 0
            )
            target = (
                f"p50 < {WS_TARGETS[0]:.0f} ms, p99 < {WS_TARGETS[1]:.0f} ms: "
                f"{'met' if met else 'MISSED'}"
            )
            verdicts.append(f"{r.mode} Gateway mode: {'met' if met else 'missed'}")
        elif r.server == "gateway" and seed is not None:
            limit = TARGETS[r.mode]
            met = (
                p50_ratio is not None
                and p99_ratio is not None
                and p50_ratio <= limit
                and p99_ratio <= limit
                and r.status_429 == 0
                and r.missing == 0
            )
            target = f"<= {limit:.2f}x, 0 429s: {'met' if met else 'MISSED'}"
            verdicts.append(f"{r.mode}: {'met' if met else 'missed'}")
        rows.append(
            [
                r.mode,
                LABELS[r.server],
                fmt(r.percentile(50)),
                fmt(r.percentile(99)),
                fmt(max(r.latencies_ms) if r.latencies_ms else None),
                f"{len(r.latencies_ms)}/{r.sent}",
                fmt(r.requests_per_second, 2),
                str(r.status_429),
                fmt(p50_ratio, 2, "x"),
                fmt(p99_ratio, 2, "x"),
                target,
            ]
        )
    return (
        format_table(header, rows)
        + "\n\ntargets: "
        + "; ".join(verdicts)
        + "\n"
        + "\n".join(
            polling_floor(mode) for mode in dict.fromkeys(r.mode for r in results)
        )
    )


def polling_floor(mode: str) -> str:
    """The least median wait any poller can have within the fake's bucket.

    With ``limit`` requests per ``window`` seconds, the polls that return
    messages are at most ``limit`` per window. A message posted at a random
    moment waits for the next one; the gaps between polls add up to the window,
    so the chance of waiting less than ``w`` is at most ``limit * w / window``.
    Half the messages wait at least ``window / (2 * limit)``, however the polls
    are spaced: evenly, or in bursts followed by a 429.
    """
    limit, window = BUCKETS[mode]
    floor_ms = window / (2 * limit) * 1000
    return (
        f"{mode}: {limit} requests per {window:g} s; no poller's median wait can be "
        f"under {floor_ms:.0f} ms (the bucket's window / (2 x its limit))"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, help="messages per phase (30)")
    parser.add_argument("--quick", action="store_true", help="12 messages per phase")
    parser.add_argument("--seed", type=int, default=1, help="random seed for gaps")
    parser.add_argument("--baseline-dir", help="the seed service's folder")
    args = parser.parse_args(argv)
    count = args.messages or (12 if args.quick else 30)
    try:
        seed_dir = find_baseline(args.baseline_dir)
        seed_python = ensure_venv(seed_dir)
    except BaselineUnavailableError as exc:
        print(f"baseline unavailable: {exc}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    print(machine_summary())
    print(
        f"{count} messages per phase, gaps uniform {GAP_RANGE[0]}-{GAP_RANGE[1]} s, "
        f"poll {POLL_SECONDS} s, burst {BURST_SECONDS} s"
    )
    results: list[PhaseResult] = []
    for index, mode in enumerate(MODES):
        gaps = [rng.uniform(*GAP_RANGE) for _ in range(count)]
        # Alternate which server goes first, so neither always runs on a
        # machine just warmed (or just loaded) by the other.
        order = SERVERS if index % 2 == 0 else SERVERS[::-1]
        phase: dict[str, PhaseResult] = {}
        for kind in order:
            print(f"  {mode} / {kind}...", flush=True)
            phase[kind] = measure(mode, kind, gaps, seed_python, seed_dir)
        results.extend(phase[kind] for kind in SERVERS)
    print()
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
