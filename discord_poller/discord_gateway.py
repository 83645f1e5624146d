"""A small client of Discord's Gateway (v10, JSON encoding). Django-free.

It does what Discord documents for one shard and nothing more: Hello, the
first heartbeat jittered and the next ones at the given interval, heartbeat
ACK tracking (no ACK before the next beat: a zombie connection, closed and
resumed), Identify or Resume (with the session id, the last sequence number
and ``resume_gateway_url``), Reconnect (op 7), Invalid Session (op 9), the
identify rate limits of ``session_start_limit``, and the close codes that must
not be retried. Events are handed to ``on_dispatch``; a new session (READY) is
announced to ``on_session``, so that the caller can fetch over REST what it
may have missed.

It is built on ``websockets`` rather than on discord.py or hikari: those bring
a whole bot framework (caches, models, their own HTTP client and rate
limiter) to read two events, start slower, and have no supported way to point
them at a fake Gateway for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from discord_poller.client import DiscordError, Unauthorized
from discord_poller.discord_gateway_protocol import (
    FATAL_CLOSE_CODES,
    INTENTS,
    NEW_SESSION_CLOSE_CODES,
    GatewayFatal,
    GatewayInfo,
    GatewayStats,
    Op,
    gateway_url,
    identify_token,
)
from discord_poller.waits import wait_for_stop

logger = logging.getLogger(__name__)

# One shard identifies at most once per 5 s (one max_concurrency bucket).
IDENTIFY_WINDOW: Final = 5.0
# Invalid Session with d=false: wait 1-5 s before identifying again.
INVALID_SESSION_WAIT: Final = (1.0, 5.0)
# Failures in a row (no READY or RESUMED reached): first wait, and the longest.
RECONNECT_BACKOFF: Final = 1.0
RECONNECT_BACKOFF_MAX: Final = 60.0
HELLO_TIMEOUT: Final = 20.0
# Our own close code when we drop a connection we want to resume: anything but
# 1000/1001, which would end the session.
RESUME_CLOSE_CODE: Final = 4000
# The largest event accepted; READY and GUILD_CREATE can be large.
MAX_EVENT_BYTES: Final = 16 * 1024 * 1024


@dataclass
class _Session:
    session_id: str
    resume_url: str
    seq: int | None


@dataclass
class _Outcome:
    """How a connection ended, and so what the next one does."""

    resume: bool
    delay: float = 0.0
    established: bool = False  # READY or RESUMED was reached


class _Closing(Exception):
    """We close the connection ourselves; ``outcome`` says what comes next."""

    def __init__(self, reason: str, outcome: _Outcome) -> None:
        super().__init__(reason)
        self.outcome = outcome


class DiscordGateway:
    """One shard's Gateway connection, kept up until ``run``'s ``stop`` is set.

    ``fetch_info`` answers ``GET /gateway/bot`` (through the rate-limited REST
    client); it is called before each Identify. ``on_dispatch(name, data)``
    gets every event but READY and RESUMED; ``on_session()`` is called on each
    READY: a new session, whose events before it are not replayed.
    """

    def __init__(
        self,
        token: str,
        *,
        fetch_info: Callable[[], Awaitable[GatewayInfo]],
        on_dispatch: Callable[[str, Any], None],
        on_session: Callable[[], None],
        intents: int = INTENTS,
        user_agent: str | None = None,
        identify_window: float = IDENTIFY_WINDOW,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._token = identify_token(token)
        self._fetch_info = fetch_info
        self._on_dispatch = on_dispatch
        self._on_session = on_session
        self._intents = intents
        self._user_agent = user_agent
        self._identify_window = identify_window
        self._clock = clock
        self._monotonic = monotonic
        self._info: GatewayInfo | None = None
        self._session: _Session | None = None
        self._identified_at: deque[float] = deque()
        self._acked = True
        self._beat_sent_at = 0.0
        self.stats = GatewayStats()

    def __repr__(self) -> str:
        return "<DiscordGateway>"

    # --- The connection loop ---------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected until ``stop`` is set; raise ``GatewayFatal`` if told to.

        ``Unauthorized`` from ``fetch_info`` is raised as it comes.
        """
        failures = 0
        delay = 0.0
        while not stop.is_set():
            if delay > 0 and await _wait(stop, delay):
                return
            outcome = await self._connect_once(stop)
            if stop.is_set():
                return
            self.stats.reconnects += 1
            if not outcome.resume:
                self._session = None
            failures = 0 if outcome.established else failures + 1
            delay = outcome.delay
            if failures:
                backoff = min(
                    RECONNECT_BACKOFF * 2.0 ** min(failures - 1, 30),
                    RECONNECT_BACKOFF_MAX,
                )
                delay = max(delay, backoff * random.uniform(0.5, 1.0))
            self.stats.state = "reconnecting"
            logger.info(
                "reconnecting to the Discord Gateway%s%s",
                f" in {delay:.1f} s" if delay > 0 else "",
                " to resume" if self._session is not None else "",
            )

    async def _connect_once(self, stop: asyncio.Event) -> _Outcome:
        """Open one connection, run it until it ends, say what comes next."""
        session = self._session
        if session is not None:
            url = session.resume_url
        else:
            info = await self._gateway_info(stop)
            if info is None or not await self._identify_slot(info, stop):
                return _Outcome(resume=False)  # stopping
            url = info.url
        self.stats.state = "connecting"
        self.stats.connects += 1
        try:
            ws = await connect(
                gateway_url(url),
                open_timeout=HELLO_TIMEOUT,
                close_timeout=1.0,
                ping_interval=None,  # the Gateway's heartbeats do that job
                max_size=MAX_EVENT_BYTES,
                user_agent_header=self._user_agent,
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            self._note_error(
                f"could not connect to {gateway_url(url)}: {type(exc).__name__}: {exc}"
            )
            return _Outcome(resume=session is not None)
        async with ws:
            return await self._serve(ws, session, stop)

    async def _serve(
        self, ws: ClientConnection, session: _Session | None, stop: asyncio.Event
    ) -> _Outcome:
        established = asyncio.Event()
        heartbeat: asyncio.Task[None] | None = None
        stopping = asyncio.create_task(stop.wait())
        try:
            hello = await self._receive_hello(ws)
            interval = float(hello["heartbeat_interval"]) / 1000
            self.stats.heartbeat_interval_ms = interval * 1000
            self._acked = True
            heartbeat = asyncio.create_task(self._heartbeat(ws, interval))
            if session is not None:
                self.stats.state = "resuming"
                await self._send(ws, Op.RESUME, self._resume_payload(session))
            else:
                self.stats.state = "identifying"
                await self._send(ws, Op.IDENTIFY, self._identify_payload())
            receiving = asyncio.create_task(self._receive(ws, established))
            done, _ = await asyncio.wait(
                {receiving, heartbeat, stopping}, return_when=asyncio.FIRST_COMPLETED
            )
            if stopping in done:
                receiving.cancel()
                # 1000 ends the session: Discord shows the bot offline at once.
                await ws.close(1000, "stopping")
                return _Outcome(resume=False)
            finished = receiving if receiving in done else heartbeat
            if finished is heartbeat:
                receiving.cancel()
            finished.result()  # raises _Closing, or returns: the server closed
            return await self._closed_by_server(ws, established.is_set())
        except _Closing as closing:
            closing.outcome.established = established.is_set()
            logger.warning("closing the Discord Gateway connection: %s", closing)
            await ws.close(RESUME_CLOSE_CODE, str(closing)[:120])
            self.stats.last_close_code = RESUME_CLOSE_CODE
            return closing.outcome
        except ConnectionClosed:
            return await self._closed_by_server(ws, established.is_set())
        except TimeoutError:
            self._note_error("no Hello from Discord")
            return _Outcome(resume=session is not None)
        except asyncio.CancelledError:
            # Stopping: 1000 ends the session, rather than the 1011 of a crash.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(0.5):
                    await ws.close(1000, "stopping")
            raise
        finally:
            stopping.cancel()
            if heartbeat is not None:
                heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await heartbeat

    async def _closed_by_server(
        self, ws: ClientConnection, established: bool
    ) -> _Outcome:
        """The server closed, or the connection dropped: fatal, resume or anew."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await ws.wait_closed()
        closed = ws.protocol.close_exc
        code = closed.rcvd.code if closed.rcvd is not None else 1006
        reason = closed.rcvd.reason if closed.rcvd is not None else "no close frame"
        self.stats.last_close_code = code
        if code in FATAL_CLOSE_CODES:
            self.stats.state = "failed"
            raise GatewayFatal(
                code,
                f"Discord closed the Gateway with {code} "
                f"({FATAL_CLOSE_CODES[code]}). Not retrying.",
            )
        self._note_error(f"the connection closed ({code} {reason})".strip())
        resume = self._session is not None and code not in NEW_SESSION_CLOSE_CODES
        return _Outcome(resume=resume, established=established)

    # --- Frames in --------------------------------------------------------------

    async def _receive_hello(self, ws: ClientConnection) -> Mapping[str, Any]:
        async with asyncio.timeout(HELLO_TIMEOUT):
            frame = _decode(await ws.recv())
        data = frame.get("d")
        if frame.get("op") != Op.HELLO or not isinstance(data, Mapping):
            raise _Closing("the first frame was not Hello", _Outcome(resume=True))
        if not isinstance(data.get("heartbeat_interval"), int | float):
            raise _Closing("Hello without heartbeat_interval", _Outcome(resume=True))
        return data

    async def _receive(self, ws: ClientConnection, established: asyncio.Event) -> None:
        """Handle frames until the connection closes (return) or we close it."""
        async for raw in ws:
            frame = _decode(raw)
            op = frame.get("op")
            if op == Op.DISPATCH:
                self._dispatch(frame, established)
            elif op == Op.HEARTBEAT_ACK:
                self._acked = True
                self.stats.latency_ms = (self._monotonic() - self._beat_sent_at) * 1000
            elif op == Op.HEARTBEAT:
                await self._send(ws, Op.HEARTBEAT, self._seq())
            elif op == Op.RECONNECT:
                raise _Closing("Discord asked for a reconnect", _Outcome(resume=True))
            elif op == Op.INVALID_SESSION:
                if frame.get("d") is True:
                    raise _Closing("invalid session, resumable", _Outcome(resume=True))
                wait = random.uniform(*INVALID_SESSION_WAIT)
                raise _Closing(
                    f"invalid session; identifying anew in {wait:.1f} s",
                    _Outcome(resume=False, delay=wait),
                )

    def _dispatch(self, frame: Mapping[str, Any], established: asyncio.Event) -> None:
        seq = frame.get("s")
        if isinstance(seq, int) and self._session is not None:
            self._session.seq = seq
        name, data = frame.get("t"), frame.get("d")
        if name == "READY" and isinstance(data, Mapping):
            self._ready(data, seq if isinstance(seq, int) else None, established)
        elif name == "RESUMED":
            self.stats.resumes += 1
            self._connected(established)
            logger.info("resumed the Discord Gateway session")
        elif isinstance(name, str):
            self.stats.events += 1
            self.stats.last_event_at = self._clock()
            self._on_dispatch(name, data)

    def _ready(
        self, data: Mapping[str, Any], seq: int | None, established: asyncio.Event
    ) -> None:
        session_id, resume_url = data.get("session_id"), data.get("resume_gateway_url")
        if not isinstance(session_id, str):
            raise _Closing("READY without a session id", _Outcome(resume=False))
        if not isinstance(resume_url, str) or not resume_url:
            assert self._info is not None  # READY comes after an Identify
            resume_url = self._info.url
        self._session = _Session(session_id, resume_url, seq)
        self._connected(established)
        user = data.get("user")
        name = user.get("username") if isinstance(user, Mapping) else None
        logger.info("connected to the Discord Gateway as %s", name or "the bot")
        self._on_session()

    def _connected(self, established: asyncio.Event) -> None:
        established.set()
        self.stats.state = "connected"
        self.stats.connected_at = self._clock()

    # --- Frames out -------------------------------------------------------------

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        """Beat every ``interval`` s, the first after a random part of it."""
        await asyncio.sleep(interval * random.random())
        while True:
            if not self._acked:
                raise _Closing(
                    "no heartbeat ACK since the last beat (zombie connection)",
                    _Outcome(resume=True),
                )
            self._acked = False
            self._beat_sent_at = self._monotonic()
            await self._send(ws, Op.HEARTBEAT, self._seq())
            await asyncio.sleep(interval)

    async def _send(self, ws: ClientConnection, op: Op, data: Any) -> None:
        await ws.send(json.dumps({"op": int(op), "d": data}))

    def _seq(self) -> int | None:
        return None if self._session is None else self._session.seq

    def _identify_payload(self) -> dict[str, Any]:
        self.stats.identifies += 1
        self._identified_at.append(self._monotonic())
        return {
            "token": self._token,
            "intents": self._intents,
            "properties": {"os": "linux", "browser": "job-gateway", "device": ""},
            "compress": False,
        }

    def _resume_payload(self, session: _Session) -> dict[str, Any]:
        return {
            "token": self._token,
            "session_id": session.session_id,
            "seq": session.seq,
        }

    # --- Identify limits --------------------------------------------------------

    async def _gateway_info(self, stop: asyncio.Event) -> GatewayInfo | None:
        """Ask ``GET /gateway/bot`` again; on a failure keep the last answer.

        Returns None if ``stop`` was set while waiting for a first answer.
        """
        failures = 0
        while True:
            try:
                self._info = await self._fetch_info()
                return self._info
            except Unauthorized:
                raise
            except (ValueError, DiscordError) as exc:
                self._note_error(f"GET /gateway/bot failed: {exc}")
                if self._info is not None:
                    return self._info
            failures += 1
            delay = min(
                RECONNECT_BACKOFF * 2.0 ** (failures - 1), RECONNECT_BACKOFF_MAX
            )
            if await _wait(stop, delay):
                return None

    async def _identify_slot(self, info: GatewayInfo, stop: asyncio.Event) -> bool:
        """Wait until an Identify is allowed; False if ``stop`` came first."""
        limit = info.session_start_limit
        if limit.remaining <= 0:
            self.stats.state = "waiting to identify"
            logger.error(
                "Discord allows no more sessions today (%d used); the next in %.0f s",
                limit.total,
                limit.reset_after,
            )
            if await _wait(stop, limit.reset_after):
                return False
        # One shard uses one max_concurrency bucket: one Identify per window.
        now = self._monotonic()
        while self._identified_at and self._identified_at[0] <= now - 60:
            self._identified_at.popleft()
        if self._identified_at:
            wait = self._identified_at[-1] + self._identify_window - now
            if wait > 0:
                self.stats.state = "waiting to identify"
                logger.info("identifying in %.1f s (Discord's identify limit)", wait)
                if await _wait(stop, wait):
                    return False
        return not stop.is_set()

    def _note_error(self, text: str) -> None:
        self.stats.last_error = text
        logger.warning("Discord Gateway: %s", text)


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until ``stop``; True if stopping."""
    return await wait_for_stop(stop, seconds)


def _decode(raw: str | bytes) -> dict[str, Any]:
    try:
        frame = json.loads(raw)
    except ValueError:
        raise _Closing(
            "Discord sent a frame that is not JSON", _Outcome(True)
        ) from None
    if not isinstance(frame, dict):
        raise _Closing("Discord sent a frame that is not an object", _Outcome(True))
    return frame
