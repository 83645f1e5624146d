"""A fake Discord Gateway (v10, JSON encoding) beside the fake REST API.

``testkit.fakes.discord.build_app`` attaches it to the same aiohttp application,
so one fake process (``python -m testkit.fakes.discord``) serves both:

- ``GET /api/v10/gateway/bot``: the URL of this Gateway and a
  ``session_start_limit``, behind the REST fake's token check and rate limits;
- ``GET /gateway`` (Identify) and ``GET /resume-gateway`` (the
  ``resume_gateway_url`` of READY): Hello, heartbeats and their ACKs,
  Identify, Resume with the replay of missed events, Invalid Session;
- every message posted through the REST fake is dispatched as
  ``MESSAGE_CREATE`` (and ``POST /_control/messages/{id}`` edits one, sent as
  ``MESSAGE_UPDATE``), with blank content and embeds unless the session asked
  for the Message Content intent, as Discord does.

Control endpoints, under ``/_control/gateway``: ``POST behaviour`` (each key
given is replaced; see ``GatewayBehaviour``), ``POST actions``
(``{"action": "drop" | "close" | "reconnect" | "invalid_session" |
"stop_acks" | "heartbeat_request", "code": ..., "resumable": ...}``, applied to
every open connection), ``GET log?since=N&wait=S`` (what happened, frame by
frame; waits up to S seconds for something new) and ``GET stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from aiohttp import WSMsgType, web

if TYPE_CHECKING:
    from testkit.fakes.discord import FakeDiscordState

__all__ = [
    "GUILD_ID",
    "FakeGatewayState",
    "GatewayBehaviour",
    "GatewayRecord",
    "attach_gateway",
]

GUILD_ID: Final = "1300000000000000001"
INTENT_GUILD_MESSAGES: Final = 1 << 9
INTENT_MESSAGE_CONTENT: Final = 1 << 15
ALL_INTENTS: Final = (1 << 26) - 1
IDENTIFY_WINDOW: Final = 5.0  # one Identify per 5 s for a one-shard bot


@dataclass
class GatewayBehaviour:
    """How the fake Gateway behaves; changed over ``POST behaviour``."""

    heartbeat_interval: int = 41250  # ms, Discord's usual
    deliver: bool = True  # False: events are kept for a Resume, not sent
    refuse_resumes: int = 0  # the next N Resumes get op 9 d=false
    close_on_identify: int | None = None  # answer Identify with this close code
    session_start_limit: dict[str, int] = field(
        default_factory=lambda: {
            "total": 1000,
            "remaining": 1000,
            "reset_after": 14_400_000,
            "max_concurrency": 1,
        }
    )


@dataclass
class GatewayRecord:
    """One thing that happened on a connection, as the fake saw it."""

    conn: int
    kind: str  # open, recv (from the client), send (to it), close, drop
    monotonic: float
    path: str = ""
    query: dict[str, str] = field(default_factory=dict)
    op: int | None = None
    t: str | None = None
    s: int | None = None
    d: Any = None
    code: int | None = None  # close: the code, and who sent it in ``by``
    by: str | None = None


@dataclass
class _Session:
    session_id: str
    intents: int
    seq: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    valid: bool = True
    conn: _Conn | None = None


class _Conn:
    def __init__(self, number: int, ws: web.WebSocketResponse, request: web.Request):
        self.number = number
        self.ws = ws
        self.transport = request.transport
        self.host = request.host
        self.closed_by_server = False
        self.close_code: int | None = None  # the code we closed with
        self.session: _Session | None = None
        self.acking = True
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()


@dataclass
class FakeGatewayState:
    """Sessions, connections, behaviour and the log of one fake Gateway."""

    rest: FakeDiscordState
    behaviour: GatewayBehaviour = field(default_factory=GatewayBehaviour)
    log: list[GatewayRecord] = field(default_factory=list)
    sessions: dict[str, _Session] = field(default_factory=dict)
    conns: dict[int, _Conn] = field(default_factory=dict)
    identifies: list[float] = field(default_factory=list)  # monotonic
    violations: int = 0  # Identify sooner than the limits allow
    _conn_count: int = 0
    _limit_set_at: float = field(default_factory=time.monotonic)
    _changed: asyncio.Event | None = None

    def record(self, record: GatewayRecord) -> None:
        self.log.append(record)
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for_news(self, since: int, timeout: float) -> None:
        """Return once the log is longer than ``since``, or after ``timeout``."""
        while len(self.log) <= since:
            if self._changed is None:
                self._changed = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                return

    def configure(self, data: dict[str, Any]) -> None:
        for name, value in data.items():
            if not hasattr(self.behaviour, name):
                raise ValueError(f"unknown behaviour {name!r}")
            setattr(self.behaviour, name, value)
            if name == "session_start_limit":
                self._limit_set_at = time.monotonic()

    def stats(self) -> dict[str, Any]:
        return {
            "connections": self._conn_count,
            "open": len(self.conns),
            "identifies": len(self.identifies),
            "resumes": sum(1 for r in self.log if r.kind == "recv" and r.op == 6),
            "violations": self.violations,
            "sessions": len(self.sessions),
        }

    # --- Events ----------------------------------------------------------------

    def dispatch_message(self, name: str, message: dict[str, Any]) -> None:
        """Send a message event to every valid session (or keep it for a Resume)."""
        for session in self.sessions.values():
            if not session.valid or not session.intents & INTENT_GUILD_MESSAGES:
                continue
            data = {**message, "guild_id": GUILD_ID}
            if not session.intents & INTENT_MESSAGE_CONTENT:
                data.update(content="", embeds=[], attachments=[], components=[])
            self._event(session, name, data)

    def _event(self, session: _Session, name: str, data: Any) -> dict[str, Any]:
        session.seq += 1
        frame = {"op": 0, "t": name, "s": session.seq, "d": data}
        session.events.append(frame)
        conn = session.conn
        if conn is not None and self.behaviour.deliver:
            conn.outbox.put_nowait(frame)
        return frame

    # --- Actions ---------------------------------------------------------------

    def act(self, data: dict[str, Any]) -> int:
        """Apply a control action to every open connection; return how many."""
        action = data.get("action")
        conns = list(self.conns.values())
        for conn in conns:
            if action == "drop":
                self.record(GatewayRecord(conn.number, "drop", time.monotonic()))
                if conn.transport is not None:
                    conn.transport.abort()
            elif action == "close":
                conn.outbox.put_nowait({"close": int(data.get("code", 4000))})
            elif action == "reconnect":
                conn.outbox.put_nowait({"op": 7, "d": None})
            elif action == "invalid_session":
                resumable = bool(data.get("resumable", False))
                if not resumable and conn.session is not None:
                    conn.session.valid = False
                conn.outbox.put_nowait({"op": 9, "d": resumable})
            elif action == "stop_acks":
                conn.acking = False
            elif action == "heartbeat_request":
                conn.outbox.put_nowait({"op": 1, "d": None})
            else:
                raise ValueError(f"unknown action {action!r}")
        return len(conns)


STATE_KEY: Final = web.AppKey("gateway_state", FakeGatewayState)


def attach_gateway(app: web.Application, rest: FakeDiscordState) -> FakeGatewayState:
    """Serve the fake Gateway and ``GET /gateway/bot`` from ``app``."""
    state = FakeGatewayState(rest)
    rest.listeners.append(state.dispatch_message)
    app[STATE_KEY] = state
    handlers = _Handlers(state)
    app.router.add_get("/api/v10/gateway/bot", handlers.gateway_bot)
    app.router.add_get("/gateway", handlers.websocket)
    app.router.add_get("/resume-gateway", handlers.websocket)
    app.router.add_post("/_control/messages/{message_id}", handlers.edit_message)
    app.router.add_post("/_control/gateway/behaviour", handlers.behaviour)
    app.router.add_get("/_control/gateway/behaviour", handlers.behaviour)
    app.router.add_post("/_control/gateway/actions", handlers.actions)
    app.router.add_get("/_control/gateway/log", handlers.log)
    app.router.add_get("/_control/gateway/stats", handlers.stats)
    return state


class _Handlers:
    def __init__(self, state: FakeGatewayState) -> None:
        self.state = state

    # --- REST ------------------------------------------------------------------

    async def gateway_bot(self, request: web.Request) -> web.Response:
        from testkit.fakes.discord import RequestRecord

        rest = self.state.rest
        record = RequestRecord.of(request)
        rest.requests.append(record)
        if request.headers.get("Authorization") != rest.token:
            rest.invalid_requests += 1
            record.status = 401
            return web.json_response(
                {"message": "401: Unauthorized", "code": 0}, status=401
            )
        allowed, headers = rest.consume("gateway/bot", time.monotonic())
        if not allowed:
            rest.violations += 1
            record.status = 429
            retry = float(headers["X-RateLimit-Reset-After"])
            body = {"message": "You are being rate limited.", "retry_after": retry}
            return web.json_response(
                {**body, "global": False},
                status=429,
                headers={**headers, "X-RateLimit-Scope": "user"},
            )
        record.status = 200
        limit = self.state.behaviour.session_start_limit
        return web.json_response(
            {
                "url": f"ws://{request.host}/gateway",
                "shards": 1,
                "session_start_limit": dict(limit),
            },
            headers=headers,
        )

    async def edit_message(self, request: web.Request) -> web.Response:
        data = await request.json()
        message_id = request.match_info["message_id"]
        for messages in self.state.rest.messages.values():
            for message in messages:
                if message["id"] == message_id:
                    for name in ("content", "embeds"):
                        if name in data:
                            message[name] = data[name]
                    message["edited_timestamp"] = datetime.now(UTC).isoformat()
                    for listener in self.state.rest.listeners:
                        listener("MESSAGE_UPDATE", message)
                    return web.json_response(message)
        return web.json_response({"message": "Unknown Message"}, status=404)

    # --- Control ---------------------------------------------------------------

    async def behaviour(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.state.configure(await request.json())
            except (TypeError, ValueError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(asdict(self.state.behaviour))

    async def actions(self, request: web.Request) -> web.Response:
        try:
            count = self.state.act(await request.json())
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"connections": count})

    async def log(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        wait = float(request.query.get("wait", "0"))
        if wait > 0:
            await self.state.wait_for_news(since, wait)
        log = self.state.log
        return web.json_response(
            {"log": [asdict(r) for r in log[since:]], "next": len(log)}
        )

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.stats())

    # --- The Gateway -----------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        ws = web.WebSocketResponse(autoping=True, heartbeat=None)
        await ws.prepare(request)
        state._conn_count += 1
        conn = _Conn(state._conn_count, ws, request)
        state.conns[conn.number] = conn
        state.record(
            GatewayRecord(
                conn.number,
                "open",
                time.monotonic(),
                path=request.path,
                query=dict(request.query),
            )
        )
        sender = asyncio.create_task(self._send_loop(conn))
        try:
            if request.query.get("v") != "10":
                conn.outbox.put_nowait({"close": 4012})
            elif request.query.get("encoding") != "json":
                conn.outbox.put_nowait({"close": 4002})
            else:
                interval = state.behaviour.heartbeat_interval
                conn.outbox.put_nowait(
                    {"op": 10, "d": {"heartbeat_interval": interval}}
                )
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                self._receive(conn, msg.data)
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            state.conns.pop(conn.number, None)
            if conn.session is not None and conn.session.conn is conn:
                conn.session.conn = None
                if ws.close_code in (1000, 1001) and not conn.closed_by_server:
                    conn.session.valid = False  # a clean close ends the session
            by = "server" if conn.closed_by_server else "client"
            code = conn.close_code if conn.closed_by_server else ws.close_code
            state.record(
                GatewayRecord(conn.number, "close", time.monotonic(), code=code, by=by)
            )
        return ws

    async def _send_loop(self, conn: _Conn) -> None:
        """Send the connection's frames in order; a ``close`` item closes it."""
        while (item := await conn.outbox.get()) is not None:
            if "close" in item:
                conn.closed_by_server = True
                conn.close_code = item["close"]
                await conn.ws.close(code=item["close"], message=b"fake close")
                return
            try:
                await conn.ws.send_str(json.dumps(item))
            except (ConnectionError, RuntimeError):
                return
            self.state.record(
                GatewayRecord(
                    conn.number,
                    "send",
                    time.monotonic(),
                    op=item.get("op"),
                    t=item.get("t"),
                    s=item.get("s"),
                    d=_summary(item),
                )
            )

    def _receive(self, conn: _Conn, raw: str) -> None:
        state = self.state
        try:
            frame = json.loads(raw)
            op, data = frame["op"], frame.get("d")
        except (ValueError, KeyError, TypeError):
            conn.outbox.put_nowait({"close": 4002})
            return
        shown = {**data, "token": "[token]"} if isinstance(data, dict) else data
        state.record(
            GatewayRecord(conn.number, "recv", time.monotonic(), op=op, d=shown)
        )
        if op == 1:
            if conn.acking:
                conn.outbox.put_nowait({"op": 11})
        elif op == 2:
            self._identify(conn, data)
        elif op == 6:
            self._resume(conn, data)
        else:
            conn.outbox.put_nowait({"close": 4001})

    def _token_ok(self, data: Any) -> bool:
        token = self.state.rest.token.removeprefix("Bot ")
        return isinstance(data, dict) and data.get("token") == token

    def _identify(self, conn: _Conn, data: Any) -> None:
        state, behaviour = self.state, self.state.behaviour
        if conn.session is not None:
            conn.outbox.put_nowait({"close": 4005})
            return
        if not self._token_ok(data):
            conn.outbox.put_nowait({"close": 4004})
            return
        if behaviour.close_on_identify is not None:
            conn.outbox.put_nowait({"close": behaviour.close_on_identify})
            return
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents & ~ALL_INTENTS:
            conn.outbox.put_nowait({"close": 4013})
            return
        now = time.monotonic()
        limit = behaviour.session_start_limit
        if limit.get("remaining", 1) <= 0:
            reset_at = state._limit_set_at + limit.get("reset_after", 0) / 1000
            if now < reset_at:
                state.violations += 1  # Discord would reset the bot's token
            limit["remaining"] = limit.get("total", 1000)
        if state.identifies and now - state.identifies[-1] < IDENTIFY_WINDOW:
            state.violations += 1
        state.identifies.append(now)
        limit["remaining"] = max(limit.get("remaining", 1) - 1, 0)
        for old in state.sessions.values():
            old.valid = False  # one session at a time: the old one is abandoned
        session = _Session(uuid.uuid4().hex, intents)
        state.sessions[session.session_id] = session
        session.conn = conn
        conn.session = session
        host = conn.host
        session.seq += 1
        conn.outbox.put_nowait(
            {
                "op": 0,
                "t": "READY",
                "s": session.seq,
                "d": {
                    "v": 10,
                    "user": {"id": "1100000000000000099", "username": "JobGateway"},
                    "guilds": [{"id": GUILD_ID, "unavailable": True}],
                    "session_id": session.session_id,
                    "resume_gateway_url": f"ws://{host}/resume-gateway",
                    "shard": [0, 1],
                    "application": {"id": "1100000000000000099", "flags": 0},
                },
            }
        )

    def _resume(self, conn: _Conn, data: Any) -> None:
        state = self.state
        session_id = data.get("session_id") if isinstance(data, dict) else None
        session = (
            state.sessions.get(session_id) if isinstance(session_id, str) else None
        )
        if state.behaviour.refuse_resumes > 0:
            state.behaviour.refuse_resumes -= 1
            if session is not None:
                session.valid = False
            session = None
        if session is None or not session.valid or not self._token_ok(data):
            conn.outbox.put_nowait({"op": 9, "d": False})
            return
        seq = data.get("seq")
        if not isinstance(seq, int) or seq > session.seq:
            conn.outbox.put_nowait({"close": 4007})
            return
        old = session.conn
        if old is not None and old is not conn and old.transport is not None:
            old.transport.abort()
        session.conn = conn
        conn.session = session
        for frame in session.events:
            if frame["s"] > seq:
                conn.outbox.put_nowait(frame)
        session.seq += 1
        conn.outbox.put_nowait({"op": 0, "t": "RESUMED", "s": session.seq, "d": {}})


def _summary(frame: dict[str, Any]) -> Any:
    """What the log keeps of a frame sent: the message id of a message event."""
    data = frame.get("d")
    if frame.get("t") in ("MESSAGE_CREATE", "MESSAGE_UPDATE") and isinstance(
        data, dict
    ):
        return {"id": data.get("id"), "channel_id": data.get("channel_id")}
    if frame.get("t") == "READY" and isinstance(data, dict):
        return {"session_id": data.get("session_id")}
    return data
