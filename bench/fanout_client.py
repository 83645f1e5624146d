"""A light WebSocket client for the fan-out benchmark, and the job publisher.

Thousands of connections live in one asyncio process (uvloop when installed).
Each connection is a bare ``asyncio.Protocol`` speaking just enough RFC 6455:
the handshake (no extensions offered, so no compression), unmasked server
frames, pong replies to pings and the closing handshake. ``data_received``
stamps the arrival time once per read and stores each text frame's payload;
JSON is parsed only after the measurement, so that the client's own cost
weighs as little as possible on the latency it measures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiohttp

from bench.common import API_KEY, Signer

__all__ = [
    "ClientPool",
    "Expected",
    "Publication",
    "Tally",
    "WsClient",
    "publish_jobs",
    "tally",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OP_CONTINUATION, _OP_TEXT, _OP_BINARY = 0x0, 0x1, 0x2
_OP_CLOSE, _OP_PING, _OP_PONG = 0x8, 0x9, 0xA
_MAX_HANDSHAKE = 16384
# A handshake in flight per this many: Twisted listens with a backlog of 50,
# and a burst beyond it costs SYN retries of a second or more.
HANDSHAKE_CONCURRENCY = 32
HANDSHAKE_TIMEOUT = 10.0


class HandshakeError(ConnectionError):
    """The server did not switch protocols."""


def _mask(payload: bytes) -> bytes:
    key = secrets.token_bytes(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return key + masked


def _client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A masked client frame with a short (control-sized) payload."""
    if len(payload) > 125:
        raise ValueError("only short client frames are needed here")
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + _mask(payload)


class WsClient(asyncio.Protocol):
    """One WebSocket connection that records every text frame it receives.

    ``ready`` resolves at the 101 answer or, with ``wait_for_hello``, at the
    first text frame (the gateway's ``hello``, sent once the client has joined
    its groups). ``frames`` holds ``(arrival time, payload)`` pairs.
    """

    def __init__(
        self, host: str, path: str, pool: ClientPool, *, wait_for_hello: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        self.host = host
        self.path = path
        self.pool = pool
        self.wait_for_hello = wait_for_hello
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.frames: list[tuple[float, bytes]] = []
        self.transport: asyncio.Transport | None = None
        self._key = base64.b64encode(secrets.token_bytes(16))
        self._upgraded = False
        self._buffer = bytearray()
        self._partial: bytearray | None = None
        self._closing = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        request = (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.transport.write(request.encode())

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buffer = self._buffer
        buffer += data
        if not self._upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > _MAX_HANDSHAKE:
                    self._fail(HandshakeError("oversized handshake answer"))
                return
            head = bytes(buffer[:end])
            del buffer[: end + 4]
            problem = self._check_handshake(head)
            if problem:
                self._fail(HandshakeError(problem))
                return
            self._upgraded = True
            if not self.wait_for_hello and not self.ready.done():
                self.ready.set_result(None)
        self._parse(now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(
                exc or ConnectionError("closed before the handshake completed")
            )
        if not self.closed.done():
            self.closed.set_result(None)

    # Frames

    def _parse(self, now: float) -> None:
        buffer = self._buffer
        size = len(buffer)
        pos = 0
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            if second & 0x80:
                self._fail(ConnectionError("the server masked a frame"))
                return
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > size:
                break
            self._frame(first & 0x0F, bool(first & 0x80), buffer[start:end], now)
            pos = end
        if pos:
            del buffer[:pos]

    def _frame(self, opcode: int, fin: bool, payload: bytearray, now: float) -> None:
        if opcode in (_OP_TEXT, _OP_BINARY):
            self._partial = payload
        elif opcode == _OP_CONTINUATION and self._partial is not None:
            self._partial += payload
        elif opcode == _OP_PING:
            self._write(_client_frame(_OP_PONG, bytes(payload)))
            return
        elif opcode == _OP_CLOSE:
            if not self._closing:
                self._closing = True
                self._write(_client_frame(_OP_CLOSE, bytes(payload[:2])))
            if self.transport is not None:
                self.transport.close()
            return
        else:
            return  # a pong, or a continuation of nothing
        if not fin or self._partial is None:
            return
        text = bytes(self._partial)
        self.frames.append((now, text))
        self._partial = None
        # Counted in jobs: a batched frame holds several.
        self.pool.received += max(1, text.count(b'"job_id"')) if self.pool.batch else 1
        if not self.ready.done():
            self.ready.set_result(None)  # the hello
        elif self.pool.target and self.pool.received >= self.pool.target:
            self.pool.all_in.set()

    def _check_handshake(self, head: bytes) -> str | None:
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            return f"answer {lines[0]!r}"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        # RFC 6455 fixes SHA-1 here; it proves a WebSocket server, not secrecy.
        digest = hashlib.sha1(self._key + _GUID, usedforsecurity=False).digest()
        expected = base64.b64encode(digest).decode()
        if headers.get("sec-websocket-accept") != expected:
            return "wrong Sec-WebSocket-Accept"
        if headers.get("sec-websocket-extensions"):
            return "an extension was imposed though none was offered"
        return None

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # Closing

    def start_close(self) -> None:
        """Send a close frame (1000); the server answers and drops the TCP link."""
        if not self._closing and self._upgraded:
            self._closing = True
            self._write(_client_frame(_OP_CLOSE, (1000).to_bytes(2, "big")))
        elif self.transport is not None and not self._upgraded:
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self.transport is not None:
            self.transport.abort()


class ClientPool:
    """N connections to one server's ``/ws``; counts the frames they receive."""

    def __init__(
        self, host: str, port: int, *, wait_for_hello: bool, batch: bool = False
    ) -> None:
        self.host = host
        self.port = port
        self.wait_for_hello = wait_for_hello
        self.batch = batch  # the gateway's batched frames (/ws?batch=1)
        self.clients: list[WsClient] = []
        self.failures: dict[str, int] = {}
        self.received = 0
        self.target = 0
        self.all_in = asyncio.Event()
        # A WsClient subclass may record frames its own way (bench.loadtest_ws).
        self.client_type: type[WsClient] = WsClient

    @property
    def path(self) -> str:
        return f"/ws?api_key={API_KEY}" + ("&batch=1" if self.batch else "")

    async def connect(self, count: int, *, timeout: float) -> float:
        """Open ``count`` connections within ``timeout``; return the seconds taken.

        Each handshake may take ``HANDSHAKE_TIMEOUT``; those still pending at
        the end are counted as failures.
        """
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(HANDSHAKE_CONCURRENCY)
        started = time.perf_counter()

        async def one() -> None:
            async with gate:
                client = self.client_type(
                    f"{self.host}:{self.port}",
                    self.path,
                    self,
                    wait_for_hello=self.wait_for_hello,
                )
                try:
                    async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                        await loop.create_connection(
                            lambda: client, self.host, self.port
                        )
                        await client.ready
                except (OSError, TimeoutError) as exc:
                    client.abort()
                    self._failed(type(exc).__name__)
                    return
                except asyncio.CancelledError:
                    client.abort()
                    self._failed("connect deadline passed")
                    raise
                self.clients.append(client)

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        unaccounted = count - len(self.clients) - sum(self.failures.values())
        if unaccounted > 0:
            self.failures["not started before the deadline"] = unaccounted
        return time.perf_counter() - started

    def _failed(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1

    def expect(self, frames: int) -> None:
        """Set ``all_in`` once ``frames`` more frames have arrived."""
        self.all_in.clear()
        self.target = self.received + frames

    def expect_fewer(self, frames: int) -> None:
        """Lower the target (a job was refused, so never arrives)."""
        self.target -= frames
        if self.received >= self.target:
            self.all_in.set()

    async def close(self, *, timeout: float) -> int:
        """Close every connection; return how many had to be aborted."""
        for client in self.clients:
            client.start_close()
        pending = [c.closed for c in self.clients if not c.closed.done()]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*pending)
        stuck = [c for c in self.clients if not c.closed.done()]
        for client in stuck:
            client.abort()
        return len(stuck)


# --- Publishing -------------------------------------------------------------------


@dataclass
class Publication:
    """The jobs a phase posted: each id with its send time, and their answers."""

    sent_at: dict[str, float] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    # Posted, but not answered by the deadline: they may still be delivered.
    unanswered: set[str] = field(default_factory=set)
    # Each answered job's time from its POST sent to the answer received.
    answer_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    @property
    def expected(self) -> set[str]:
        """The jobs every client should receive: all but those refused."""
        return self.accepted | self.unanswered


def job_body(job_id: str, sent_at: str, *, gateway: bool) -> bytes:
    """The posted JSON: the gateway takes ``fields``, the seed any object."""
    if gateway:
        return json.dumps({"job_id": job_id, "fields": {"sent_at": sent_at}}).encode()
    return json.dumps({"job_id": job_id, "sent_at": sent_at}).encode()


async def publish_jobs(
    base_url: str,
    job_ids: Sequence[str],
    *,
    rate: float,
    gateway: bool,
    deadline: float,
    on_refused: Callable[[], None] = lambda: None,
    also_to: Sequence[str] = (),
) -> Publication:
    """POST each job at ``rate`` per second, on schedule however slow the answers.

    ``deadline`` is on the event loop's clock; answers still awaited then are
    abandoned and their jobs listed as ``unanswered``. ``on_refused`` is called
    for each job the server refused (it will never be delivered). With
    ``also_to`` (more gateway processes), the posts take turns over
    ``base_url`` and those, as behind a load balancer.
    """
    loop = asyncio.get_running_loop()
    signer = Signer()
    result = Publication()
    urls = [url + "/job" for url in (base_url, *also_to)]
    # One connection per job in flight, so that a slow answer delays no post.
    connector = aiohttp.TCPConnector(limit=max(1, min(len(job_ids), 64)))

    async def post(session: aiohttp.ClientSession, job_id: str, url: str) -> None:
        sent_at = time.time()
        body = job_body(job_id, repr(sent_at), gateway=gateway)
        headers = {**signer.headers(), "Content-Type": "application/json"}
        result.sent_at[job_id] = sent_at
        result.unanswered.add(job_id)
        try:
            async with session.post(url, data=body, headers=headers) as answer:
                payload = await answer.read()
                status = answer.status
        except aiohttp.ClientError as exc:
            result.unanswered.discard(job_id)
            result.fail(type(exc).__name__)
            on_refused()
            return
        result.unanswered.discard(job_id)
        result.answer_ms[job_id] = (time.time() - sent_at) * 1000.0
        if status in (200, 201) and json.loads(payload).get("queued") is True:
            result.accepted.add(job_id)
        else:
            result.fail(f"HTTP {status}")
            on_refused()

    started = loop.time()
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        for number, job_id in enumerate(job_ids):
            delay = started + number / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            url = urls[number % len(urls)]
            tasks.append(asyncio.create_task(post(session, job_id, url)))
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if result.unanswered:
        result.errors["no answer by the deadline"] = len(result.unanswered)
    return result


# --- Reading what arrived -----------------------------------------------------------


@dataclass
class Tally:
    """Delivery of one phase: a latency per (client, job), and the losses."""

    latencies_ms: list[float] = field(default_factory=list)
    # Per job, the latency of its last client (infinite if one never got it).
    last_ms: dict[str, float] = field(default_factory=dict)
    expected: int = 0
    missing: int = 0
    duplicated: int = 0
    unexpected: int = 0


@dataclass(frozen=True)
class Expected:
    """What every client should have received: these jobs, sent at these times."""

    sent_at: dict[str, float]
    accepted: set[str]


def _jobs_of(payload: bytes, *, gateway: bool) -> list[tuple[str, float]]:
    """``(job_id, sent_at)`` of each job of a frame; none for any other frame."""
    message: Any = json.loads(payload)
    if not gateway:
        return [(message["job_id"], float(message["sent_at"]))]
    kind = message.get("type")
    jobs = (
        [message["job"]] if kind == "job" else message["jobs"] if kind == "jobs" else []
    )
    return [(job["job_id"], float(job["fields"]["sent_at"])) for job in jobs]


def tally(
    clients: Sequence[WsClient], expected: Expected, *, gateway: bool, until: float
) -> Tally:
    """Match every client's frames against the published jobs.

    A frame arriving after ``until`` (the end of the wait) counts as missing.
    """
    result = Tally(expected=len(clients) * len(expected.accepted))
    for client in clients:
        seen: set[str] = set()
        for arrived, payload in client.frames:
            if arrived > until:
                break
            for job_id, sent_at in _jobs_of(payload, gateway=gateway):
                if job_id not in expected.accepted:
                    result.unexpected += 1
                elif job_id in seen:
                    result.duplicated += 1
                else:
                    seen.add(job_id)
                    latency = (arrived - sent_at) * 1000.0
                    result.latencies_ms.append(latency)
                    if latency > result.last_ms.get(job_id, -1.0):
                        result.last_ms[job_id] = latency
        unseen = expected.accepted - seen
        result.missing += len(unseen)
        for job_id in unseen:
            result.last_ms[job_id] = math.inf
    return result
