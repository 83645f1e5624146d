"""The load test's HTTP side: pulling workers, and a flood of bad signatures.

Workers hold signed ``GET /job/next?wait=S`` long-polls, as the reference
worker does, and note when each job reached them. The flood runs in a process
of its own and sends requests signed with a wrong ``X-SIGNATURE`` (and
WebSocket handshakes with a wrong key) as fast as its connections allow.
"""

from __future__ import annotations

import asyncio
import base64
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
from urllib.parse import urlsplit

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
    "ForgedClient",
    "Pulls",
    "WorkerTally",
    "admitted",
    "pull",
    "tally_workers",
]

NEXT_PATH = "/job/next"
JOB_PATH = "/job"
# A worker that got an error waits this long before asking again.
ERROR_BACKOFF = 0.2
FLOOD_KINDS = ("post", "next", "ws")
# What the flood says it is, in place of a client library's name.
_USER_AGENT = "loadtest-flood/1"

# What ``ForgedClient.send`` raises when a connection fails or an answer is not
# HTTP: counted as an answer of its own, as a flood would shrug it off.
FORGED_SEND_ERRORS = (
    OSError,
    TimeoutError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ValueError,
)


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
    # The flood process's CPU from its first request on (start-up not counted):
    # the attacker's, taken here from the machine the server runs on.
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


class ForgedClient:
    """Forged requests to one server, written and read over plain sockets.

    The attacker's side of the flood: on the server's machine its CPU is taken
    from the server, where a real attacker's is not. Sent with an HTTP client
    library (aiohttp), the load test's flood cost this machine about 1.06 ms
    of CPU a request, more than the server's refusal; written and read here,
    about 0.5 ms (docs/benchmarks.md). HTTP requests share one keep-alive
    connection, reopened when the server closes it; each handshake opens a
    connection of its own. The requests carry the headers a client library
    sends (``Host``, ``User-Agent``, ``Accept``, ``Accept-Encoding``).
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0) -> None:
        parsed = urlsplit(base_url)
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ValueError(f"not an http://host:port URL: {base_url!r}")
        self.host, self.port = parsed.hostname, parsed.port
        self.timeout = timeout
        self._common = (
            f"Host: {parsed.netloc}\r\nUser-Agent: {_USER_AGENT}\r\n"
            "Accept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
        )
        self._http: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def send(self, kind: str) -> str:
        """One forged request of ``kind`` (``FLOOD_KINDS``): "HTTP 401", "WS 403"..."""
        async with asyncio.timeout(self.timeout):
            if kind == "ws":
                return await self._handshake()
            try:
                return await self._request(kind)
            except BaseException:
                self.close()  # whatever was half-read must not be read as an answer
                raise

    def close(self) -> None:
        if self._http is not None:
            self._http[1].close()
            self._http = None

    async def _handshake(self) -> str:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            key = base64.b64encode(secrets.token_bytes(16)).decode()
            writer.write(
                f"GET /ws?api_key=forged-{secrets.token_hex(8)} HTTP/1.1\r\n"
                f"{self._common}Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "\r\n".encode()
            )
            status, _ = _head(await reader.readuntil(b"\r\n\r\n"))
            return f"WS {status}"
        finally:
            writer.close()

    async def _request(self, kind: str) -> str:
        signed = "".join(
            f"{name}: {value}\r\n" for name, value in forged_headers().items()
        )
        if kind == "post":
            body = json.dumps({"job_id": f"forged-{secrets.token_hex(8)}"}).encode()
            head = (
                f"POST {JOB_PATH} HTTP/1.1\r\n{self._common}{signed}"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
        else:
            body = b""
            head = f"GET {NEXT_PATH}?wait=10 HTTP/1.1\r\n{self._common}{signed}\r\n"
        if self._http is None:
            self._http = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._http
        writer.write(head.encode() + body)
        status, headers = _head(await reader.readuntil(b"\r\n\r\n"))
        length = headers.get("content-length")
        if length is None:  # no length: the body ends with the connection
            await reader.read()
            self.close()
        else:
            await reader.readexactly(int(length))
            if headers.get("connection", "").lower() == "close":
                self.close()
        return f"HTTP {status}"


def _head(raw: bytes) -> tuple[int, dict[str, str]]:
    """An answer's status and headers (names lower-cased), from its head."""
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    version, _, rest = status_line.partition(" ")
    status = rest[:3]
    if not version.startswith("HTTP/") or not status.isdigit():
        raise ValueError(f"not an HTTP answer: {status_line[:80]!r}")
    return int(status), headers


def admitted(answers: Mapping[str, int]) -> int:
    """How many of ``ForgedClient.send``'s answers admitted the request: must be 0."""
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

    async def sender(number: int) -> None:
        nonlocal sent
        client = ForgedClient(base_urls[number % len(base_urls)])
        await asyncio.sleep(random.uniform(0.0, spread))
        next_at = loop.time()
        count = number
        with contextlib.closing(client):
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
                    answers[await client.send(kind)] += 1
                except FORGED_SEND_ERRORS as exc:
                    answers[type(exc).__name__] += 1
                sent += 1

    conn.send("started")
    cpu_at_start = time.process_time()
    await asyncio.gather(*(sender(n) for n in range(concurrency)))
    if on_since is not None:
        flooded += time.perf_counter() - on_since
    os.set_blocking(conn.fileno(), True)  # the event loop made it non-blocking
    conn.send(
        FloodReport(
            requests=sent,
            seconds=flooded,
            answers=dict(answers),
            cpu_seconds=time.process_time() - cpu_at_start,
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
