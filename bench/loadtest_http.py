"""The load test's HTTP side: pulling workers, and a flood of bad signatures.

Workers hold signed ``GET /job/next?wait=S`` long-polls, as the reference
worker does, and note when each job reached them. The flood runs in a process
of its own and sends requests signed with a wrong ``X-SIGNATURE`` (and
WebSocket handshakes with a wrong key) as fast as its connections allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import secrets
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp

from bench.common import API_KEY, Signer, run_async
from bench.load import check_exactly_once
from gateway_client.signing import (
    API_KEY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
)

__all__ = [
    "FloodProcess",
    "FloodReport",
    "Pulls",
    "WorkerTally",
    "admitted",
    "pull",
    "send_forged",
    "tally_workers",
]

NEXT_PATH = "/job/next"
JOB_PATH = "/job"
# A worker that got an error waits this long before asking again.
ERROR_BACKOFF = 0.2
FLOOD_KINDS = ("post", "next", "ws")


# --- Pulling workers ---------------------------------------------------------------


@dataclass
class Pulls:
    """What the workers received: each job with the time it arrived, and by whom."""

    claims: list[tuple[str, float, int]] = field(default_factory=list)
    requests: int = 0
    empty: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def pull(
    base_urls: Sequence[str],
    *,
    workers: int,
    wait: float,
    stop: asyncio.Event,
    result: Pulls,
    signer: Signer | None = None,
) -> None:
    """Run ``workers`` long-polling loops until ``stop`` is set, filling ``result``.

    The loops take turns over ``base_urls`` (several gateway processes), as
    connections behind a load balancer would.

    Each loop finishes the request it has in flight before it stops: a request
    cut off while the server hands it a job would lose that job on our side,
    not the server's.
    """
    signer = signer or Signer()
    urls = [f"{base_url}{NEXT_PATH}?wait={wait:g}" for base_url in base_urls]
    timeout = aiohttp.ClientTimeout(total=wait + 60.0)

    async def worker(session: aiohttp.ClientSession, number: int) -> None:
        url = urls[number % len(urls)]
        while not stop.is_set():
            result.requests += 1
            try:
                async with session.get(url, headers=signer.headers()) as answer:
                    body = await answer.read()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.errors[type(exc).__name__] += 1
                await asyncio.sleep(ERROR_BACKOFF)
                continue
            arrived = time.time()
            if status == 204:
                result.empty += 1
            elif status == 200:
                result.claims.append(
                    (json.loads(body)["job"]["job_id"], arrived, number)
                )
            else:
                result.errors[f"HTTP {status}"] += 1
                await asyncio.sleep(ERROR_BACKOFF)

    connector = aiohttp.TCPConnector(limit=workers)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session, n) for n in range(workers)))


async def take_leftovers(base_url: str, *, limit: int = 100_000) -> list[str]:
    """Claim whatever is still queued (``wait=0``): jobs no worker got."""
    signer = Signer()
    left: list[str] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(limit):
            async with session.get(
                base_url + NEXT_PATH, headers=signer.headers()
            ) as answer:
                if answer.status != 200:
                    break
                left.append((await answer.json())["job"]["job_id"])
    return left


@dataclass
class WorkerTally:
    """Whether each accepted job went to exactly one worker, and how fast."""

    expected: int
    pulled: int
    missing: int
    late: int
    duplicated: int
    unexpected: int
    latencies_ms: list[float]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)


def tally_workers(
    claims: Sequence[tuple[str, float, int]],
    sent_at: Mapping[str, float],
    *,
    expected: Iterable[str],
    uncertain: Iterable[str] = (),
    until: float = float("inf"),
    leftovers: Sequence[str] = (),
) -> WorkerTally:
    """Every accepted job pulled once, by one worker, by ``until``.

    ``claims`` are ``(job_id, arrival time, worker)``. A job pulled after
    ``until``, or found still queued afterwards (``leftovers``), is missing and
    ``late``; one pulled twice or more (by one worker or by several, leftovers
    included) is duplicated; one never published is unexpected. ``uncertain``
    jobs (posted, no answer) may be pulled once or not at all.
    """
    wanted = set(expected)
    everything = [job_id for job_id, _, _ in claims] + list(leftovers)
    verdict = check_exactly_once(sorted(wanted), everything, uncertain=uncertain)
    in_time: dict[str, float] = {}
    for job_id, arrived, _ in claims:
        if arrived <= until and job_id not in in_time:
            in_time[job_id] = arrived
    never_in_time = wanted - in_time.keys()
    latencies = sorted(
        (arrived - sent_at[job_id]) * 1000.0
        for job_id, arrived in in_time.items()
        if job_id in sent_at
    )
    return WorkerTally(
        expected=len(wanted),
        pulled=len(in_time.keys() & wanted),
        missing=len(never_in_time),
        late=len(never_in_time & set(everything)),
        duplicated=verdict.duplicated,
        unexpected=verdict.unexpected,
        latencies_ms=latencies,
    )


# --- The flood ---------------------------------------------------------------------


@dataclass(frozen=True)
class FloodReport:
    """What the flood sent and what it got back, and for how long it sent."""

    requests: int
    # Time spent flooding: paused turns not counted.
    seconds: float
    answers: dict[str, int]
    cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def admitted(self) -> int:
        """Forged requests the server accepted: must be 0."""
        return admitted(self.answers)


def forged_headers() -> dict[str, str]:
    """The right key and a fresh timestamp, with a signature that is wrong.

    The server gets as far as computing the HMAC before refusing: the most
    work a forged request can cost it.
    """
    return {
        API_KEY_HEADER: API_KEY,
        TIMESTAMP_HEADER: str(int(time.time())),
        SIGNATURE_HEADER: secrets.token_hex(32),
    }


async def send_forged(session: aiohttp.ClientSession, kind: str, base_url: str) -> str:
    """One forged request of ``kind`` (``FLOOD_KINDS``): "HTTP 401", "WS 403"..."""
    if kind == "ws":
        try:
            async with session.ws_connect(
                f"{base_url}/ws?api_key=forged-{secrets.token_hex(8)}"
            ):
                return "WS 101"
        except aiohttp.WSServerHandshakeError as exc:
            return f"WS {exc.status}"
    if kind == "post":
        body = json.dumps({"job_id": f"forged-{secrets.token_hex(8)}"})
        request = session.post(
            base_url + JOB_PATH,
            data=body,
            headers={**forged_headers(), "Content-Type": "application/json"},
        )
    else:
        request = session.get(
            f"{base_url}{NEXT_PATH}?wait=10", headers=forged_headers()
        )
    async with request as answer:
        await answer.read()
        return f"HTTP {answer.status}"


def admitted(answers: Mapping[str, int]) -> int:
    """How many of ``send_forged``'s answers admitted the request: must be 0."""
    return sum(
        count
        for answer, count in answers.items()
        if answer.startswith(("HTTP 2", "WS 101"))
    )


async def _flood(
    conn: Connection,
    base_urls: Sequence[str],
    concurrency: int,
    rate: float,
    spread: float,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Cleared while paused ("pause", then "resume"); set again by "stop" so
    # that paused senders see it.
    flooding = asyncio.Event()
    flooding.set()
    on_since: float | None = time.perf_counter()
    flooded = 0.0

    def on_command() -> None:
        nonlocal on_since, flooded
        command = conn.recv()
        if command == "pause" and on_since is not None:
            flooded += time.perf_counter() - on_since
            on_since = None
            flooding.clear()
        elif command == "resume" and on_since is None:
            on_since = time.perf_counter()
            flooding.set()
        elif command == "stop":
            loop.remove_reader(conn.fileno())
            stop.set()
            flooding.set()

    loop.add_reader(conn.fileno(), on_command)
    answers: Counter[str] = Counter()
    sent = 0
    # With a rate, each connection sends one request per this many seconds.
    interval = concurrency / rate if rate > 0 else 0.0

    async def sender(session: aiohttp.ClientSession, number: int) -> None:
        nonlocal sent
        base_url = base_urls[number % len(base_urls)]
        await asyncio.sleep(random.uniform(0.0, spread))
        next_at = loop.time()
        count = number
        while not stop.is_set():
            if not flooding.is_set():
                await flooding.wait()
                await asyncio.sleep(random.uniform(0.0, spread))
                next_at = loop.time()
                continue
            if interval:
                next_at += interval
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            kind = FLOOD_KINDS[count % len(FLOOD_KINDS)]
            count += 1
            try:
                answers[await send_forged(session, kind, base_url)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                answers[type(exc).__name__] += 1
            sent += 1

    timeout = aiohttp.ClientTimeout(total=30.0)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        conn.send("started")
        await asyncio.gather(*(sender(session, n) for n in range(concurrency)))
    if on_since is not None:
        flooded += time.perf_counter() - on_since
    os.set_blocking(conn.fileno(), True)  # the event loop made it non-blocking
    conn.send(
        FloodReport(
            requests=sent,
            seconds=flooded,
            answers=dict(answers),
            cpu_seconds=time.process_time(),
        )
    )


def _serve_flood(
    conn: Connection,
    base_urls: Sequence[str],
    concurrency: int,
    rate: float,
    spread: float,
) -> None:
    run_async(_flood(conn, base_urls, concurrency, rate, spread))


class FloodProcess:
    """The flood, in a process of its own so that it has its own event loop.

    Its connections take turns over ``base_urls`` (several gateway processes).
    Each starts, and resumes after a pause, at a random moment within
    ``spread`` seconds, as the connections of a flood under way arrive; all at
    once, each start would be a wave of its own.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        concurrency: int,
        rate: float,
        spread: float = 0.0,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve_flood,
            args=(child, list(base_urls), concurrency, rate, spread),
            name="loadtest-flood",
            daemon=True,
        )
        self.process.start()
        child.close()

    async def _answer(self, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._conn.poll, timeout):
            raise TimeoutError("the flood process did not answer")
        return self._conn.recv()

    async def started(self) -> None:
        """Wait until the flood is under way."""
        await self._answer(60.0)

    def pause(self) -> None:
        """Stop sending new requests until ``resume()`` (those in flight finish)."""
        self._conn.send("pause")

    def resume(self) -> None:
        self._conn.send("resume")

    async def stop(self) -> FloodReport:
        """Stop flooding; return what was sent and answered."""
        self._conn.send("stop")
        answer = await self._answer(60.0)
        assert isinstance(answer, FloodReport)
        return answer

    def close(self) -> None:
        self.process.join(10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        with contextlib.suppress(OSError):
            self._conn.close()
