"""A fake Discord REST API for tests and benchmarks.

It speaks the part of Discord the poller uses, ``GET /api/v10/channels/{id}/
messages``, with real snowflakes, paging, token checks and per-channel
rate-limit headers, and it can be told to misbehave: 401, 403, 404, 5xx, 429s
(user, shared, global), Cloudflare bans, dropped or slow answers. It runs in
the test's event loop (``async with FakeDiscord() as fake``) or as a process
steered over HTTP::

    python -m testkit.fakes.discord --port 0 --mode discord-like

which prints ``READY <base url>`` once it listens. Control endpoints, under
``/_control/``: ``POST messages`` (``{channel_id, content, embeds}``: returns
the message), ``POST behaviour`` (``{faults, limit, window, global_limit,
token}``: each key given is replaced), ``GET requests?since=N``, ``DELETE
requests`` and ``GET stats``. The same application serves a fake Gateway
(``testkit/fakes/discord_gateway.py``): ``GET /api/v10/gateway/bot`` points at it,
and every message posted is dispatched there as ``MESSAGE_CREATE``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import hashlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

from aiohttp import web

__all__ = [
    "DEFAULT_TOKEN",
    "FakeDiscord",
    "FakeDiscordState",
    "Fault",
    "RequestRecord",
    "build_app",
    "main",
]

DISCORD_EPOCH_MS: Final = 1420070400000
DEFAULT_TOKEN: Final = "Bot fake-discord-token"
LOOPBACK: Final = "127.0.0.1"
# Requests per window per channel bucket, and the window in seconds.
MODES: Final = {"lenient": (50, 1.0), "discord-like": (5, 2.0)}
ROUTE: Final = "GET /channels/{channel_id}/messages"
BUCKET_HASH: Final = hashlib.sha256(ROUTE.encode()).hexdigest()[:32]
FAULT_KINDS: Final = frozenset(
    {
        "unauthorized",  # 401 whatever the token
        "forbidden",  # 403 Missing Access
        "not_found",  # 404 Unknown Channel
        "server_error",  # `status`, no rate-limit headers
        "user_429",  # bucket 429; the bucket stays shut for `retry_after`
        "shared_429",  # 429 with scope shared: not an invalid request
        "global_429",  # every request is refused for `retry_after`
        "ban_html",  # Cloudflare's 1015 page: 429, text/html, no headers
        "ban_json",  # Discord's block: 429 {"code": 0, ...} without headers
        "drop",  # the connection is closed without an answer
        "slow",  # the answer comes `delay` seconds late
    }
)
BAN_MESSAGE: Final = (
    "You are being blocked from accessing our API temporarily due to exceeding "
    "our rate limits frequently. Please read our docs at "
    "https://discord.com/developers/docs/topics/rate-limits to prevent this "
    "moving forward."
)
BAN_PAGE: Final = (
    "<!DOCTYPE html><html><head><title>Access denied | discord.com used "
    "Cloudflare to restrict access</title></head><body><h1>Error 1015</h1>"
    "<p>You are being rate limited</p><p>error code: 1015</p></body></html>"
)


@dataclass
class Fault:
    """A misbehaviour for one channel (or all), ``times`` times (None: always)."""

    kind: str
    channel_id: str | None = None
    times: int | None = None
    retry_after: float = 1.0  # the 429 kinds
    status: int = 500  # server_error
    delay: float = 1.0  # slow
    retry_after_header: int | None = None  # the ban kinds: a Retry-After to send

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")


@dataclass
class RequestRecord:
    """One request to the API, as the fake saw it."""

    monotonic: float  # time.monotonic(): one clock for every process of a host
    time: float  # epoch seconds
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    remote_port: int | None
    channel_id: str
    status: int | None = None  # None: the connection was dropped

    @classmethod
    def of(cls, request: web.Request, channel_id: str = "") -> RequestRecord:
        """The record of ``request``, taken as it arrives."""
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport else None
        return cls(
            monotonic=time.monotonic(),
            time=time.time(),
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers=dict(request.headers),
            remote_port=peer[1] if peer else None,
            channel_id=channel_id,
        )


@dataclass
class _Window:
    start: float
    reset_epoch: float
    count: int = 0
    blocked_until: float = 0.0


@dataclass
class FakeDiscordState:
    """Messages, behaviour and the request log; shared by app and controller."""

    token: str = DEFAULT_TOKEN
    limit: int = MODES["lenient"][0]
    window: float = MODES["lenient"][1]
    global_limit: int = 50  # per second, every route
    faults: list[Fault] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    violations: int = 0  # requests sent while the limits said to wait
    invalid_requests: int = 0  # 401, 403 and non-shared 429, as Discord counts
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # Called with ("MESSAGE_CREATE", message) for each message posted.
    listeners: list[Callable[[str, dict[str, Any]], None]] = field(default_factory=list)
    _ids: dict[str, list[int]] = field(default_factory=dict)
    _last_id: int = 0
    _buckets: dict[str, _Window] = field(default_factory=dict)
    _global: _Window = field(default_factory=lambda: _Window(-math.inf, 0.0))
    _global_until: float = 0.0

    @property
    def connections(self) -> set[int]:
        """Client ports seen: one per connection the client opened."""
        return {r.remote_port for r in self.requests if r.remote_port is not None}

    def post_message(
        self,
        channel_id: str,
        *,
        content: str = "",
        embeds: list[dict[str, Any]] | None = None,
        components: list[dict[str, Any]] | None = None,
        message_snapshots: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Add a bot's message to a channel, with a snowflake id of now.

        With ``message_snapshots`` it is a forwarded message, as Discord sends
        one: a ``message_reference`` of type 1 (forward) and the copies.
        """
        now_ms = int(time.time() * 1000)
        snowflake = max((now_ms - DISCORD_EPOCH_MS) << 22, self._last_id + 1)
        self._last_id = snowflake
        created = datetime.fromtimestamp(
            ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000, UTC
        )
        message = {
            "id": str(snowflake),
            "type": 0,
            "channel_id": channel_id,
            "author": {
                "id": "1100000000000000001",
                "username": "Notifier",
                "discriminator": "0000",
                "global_name": None,
                "avatar": None,
                "bot": True,
            },
            "content": content,
            "timestamp": created.isoformat(timespec="microseconds"),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": embeds or [],
            "pinned": False,
            "flags": 0,
            "components": components or [],
        }
        if message_snapshots:
            message["message_reference"] = {"type": 1, "channel_id": channel_id}
            message["message_snapshots"] = message_snapshots
        self.messages.setdefault(channel_id, []).append(message)
        self._ids.setdefault(channel_id, []).append(snowflake)
        for listener in self.listeners:
            listener("MESSAGE_CREATE", message)
        return message

    def list_messages(
        self, channel_id: str, *, after: int | None, before: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Discord's paging: exclusive cursors, the page newest first."""
        messages, ids = self.messages.get(channel_id, []), self._ids.get(channel_id, [])
        if after is not None:
            start = bisect.bisect_right(ids, after)
            page = messages[start : start + limit]
        else:
            end = len(ids) if before is None else bisect.bisect_left(ids, before)
            page = messages[max(end - limit, 0) : end]
        return page[::-1]

    def configure(self, data: dict[str, Any]) -> None:
        """Apply a behaviour document: every key given replaces the current value."""
        if "faults" in data:
            self.faults = [Fault(**f) for f in data["faults"]]
        for name in ("token", "limit", "window", "global_limit"):
            if name in data:
                setattr(self, name, type(getattr(self, name))(data[name]))

    def describe(self) -> dict[str, Any]:
        return {
            "token_set": bool(self.token),
            "limit": self.limit,
            "window": self.window,
            "global_limit": self.global_limit,
            "faults": [asdict(f) for f in self.faults],
        }

    def stats(self) -> dict[str, Any]:
        return {
            "requests": len(self.requests),
            "violations": self.violations,
            "invalid_requests": self.invalid_requests,
            "connections": len(self.connections),
            "messages": sum(len(m) for m in self.messages.values()),
        }

    def take_fault(self, channel_id: str) -> Fault | None:
        for fault in self.faults:
            if fault.channel_id in (None, channel_id):
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                return fault
        return None

    def consume(self, channel_id: str, now: float) -> tuple[bool, dict[str, str]]:
        """Count a request against its bucket: (allowed, rate-limit headers)."""
        bucket = self._buckets.get(channel_id)
        if bucket is None or now >= bucket.start + self.window:
            blocked = bucket.blocked_until if bucket is not None else 0.0
            bucket = self._buckets[channel_id] = _Window(
                now, _ceil_ms(time.time() + self.window), blocked_until=blocked
            )
        allowed = bucket.count < self.limit and now >= bucket.blocked_until
        if allowed:
            bucket.count += 1
        reset_after = _ceil_ms(
            max(bucket.start + self.window, bucket.blocked_until) - now
        )
        return allowed, {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.limit - bucket.count if allowed else 0),
            "X-RateLimit-Reset": f"{bucket.reset_epoch:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": BUCKET_HASH,
        }

    def block_bucket(self, channel_id: str, until: float) -> None:
        if channel_id in self._buckets:
            self._buckets[channel_id].blocked_until = until

    def consume_global(self, now: float) -> float:
        """Count a request against the global limit: seconds to wait, 0 if allowed."""
        if self._global_until > now:
            return self._global_until - now
        if now >= self._global.start + 1.0:
            self._global = _Window(now, 0.0)
        if self._global.count >= self.global_limit:
            return self._global.start + 1.0 - now
        self._global.count += 1
        return 0.0

    def block_global(self, until: float) -> None:
        self._global_until = max(self._global_until, until)


class FakeDiscord:
    """The fake on a free loopback port; ``base_url`` ends in ``/api/v10``."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        mode: str = "lenient",
        limit: int | None = None,
        window: float | None = None,
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        mode_limit, mode_window = MODES[mode]
        self.state = FakeDiscordState(
            token=token,
            limit=mode_limit if limit is None else limit,
            window=mode_window if window is None else window,
        )
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.app = build_app(self.state)

    async def start(self) -> None:
        """Start listening; the chosen port is in ``port``."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self._port = self._runner.addresses[0][1]

    async def close(self) -> None:
        """Stop listening and close open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}/api/v10"

    @property
    def requests(self) -> list[RequestRecord]:
        return self.state.requests

    def post_message(self, channel_id: str, **kw: Any) -> dict[str, Any]:
        """Add a message now; see ``FakeDiscordState.post_message``."""
        return self.state.post_message(channel_id, **kw)

    def add_fault(self, kind: str, **kw: Any) -> Fault:
        """Misbehave as ``kind`` from now on; see ``Fault`` for the options."""
        fault = Fault(kind, **kw)
        self.state.faults.append(fault)
        return fault


# --- The application ---------------------------------------------------------


def build_app(state: FakeDiscordState) -> web.Application:
    """The aiohttp application of the API and its control endpoints."""
    app = web.Application()
    api = _Api(state)
    app.router.add_get("/api/v10/channels/{channel_id}/messages", api.messages)
    app.router.add_post("/_control/messages", api.control_post_message)
    app.router.add_post("/_control/behaviour", api.control_behaviour)
    app.router.add_get("/_control/behaviour", api.control_behaviour)
    app.router.add_get("/_control/requests", api.control_requests)
    app.router.add_delete("/_control/requests", api.control_requests)
    app.router.add_get("/_control/stats", api.control_stats)
    # Imported here: the Gateway fake builds on this module's state.
    from testkit.fakes.discord_gateway import attach_gateway

    attach_gateway(app, state)
    return app


class _Api:
    def __init__(self, state: FakeDiscordState) -> None:
        self.state = state

    async def messages(self, request: web.Request) -> web.StreamResponse:
        channel_id = request.match_info["channel_id"]
        record = RequestRecord.of(request, channel_id)
        self.state.requests.append(record)
        fault = self.state.take_fault(channel_id)
        if fault is not None and fault.kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # aiohttp's way to end a handler silently
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.delay)
            fault = None
        response = self._answer(request, channel_id, fault)
        record.status = response.status
        return response

    def _answer(
        self, request: web.Request, channel_id: str, fault: Fault | None
    ) -> web.Response:
        state, now = self.state, time.monotonic()
        kind = fault.kind if fault is not None else None
        if fault is not None and kind in ("ban_html", "ban_json"):
            state.invalid_requests += 1
            headers = {}
            if fault.retry_after_header is not None:
                headers["Retry-After"] = str(fault.retry_after_header)
            if kind == "ban_html":
                return web.Response(
                    status=429, text=BAN_PAGE, content_type="text/html", headers=headers
                )
            return web.json_response(
                {"code": 0, "message": BAN_MESSAGE}, status=429, headers=headers
            )
        if kind == "global_429" and fault is not None:
            state.block_global(now + fault.retry_after)
            state.invalid_requests += 1
            return _global_429(fault.retry_after)
        if (
            request.headers.get("Authorization") != state.token
            or kind == "unauthorized"
        ):
            state.invalid_requests += 1
            return _error(401, "401: Unauthorized", 0)
        global_wait = state.consume_global(now)
        if global_wait > 0:
            state.violations += 1
            state.invalid_requests += 1
            return _global_429(global_wait)
        allowed, headers = state.consume(channel_id, now)
        if not allowed:
            state.violations += 1
            state.invalid_requests += 1
            return _bucket_429(
                headers, float(headers["X-RateLimit-Reset-After"]), "user"
            )
        if fault is not None and kind in ("user_429", "shared_429"):
            if kind == "user_429":
                state.invalid_requests += 1
                state.block_bucket(channel_id, now + fault.retry_after)
                reset_after = max(
                    float(headers["X-RateLimit-Reset-After"]), fault.retry_after
                )
                headers["X-RateLimit-Remaining"] = "0"
                headers["X-RateLimit-Reset-After"] = f"{_ceil_ms(reset_after):.3f}"
            scope = "user" if kind == "user_429" else "shared"
            return _bucket_429(headers, fault.retry_after, scope)
        if kind == "forbidden":
            state.invalid_requests += 1
            return _error(403, "Missing Access", 50001, headers)
        if kind == "not_found":
            return _error(404, "Unknown Channel", 10003, headers)
        if kind == "server_error" and fault is not None:
            return web.Response(status=fault.status, text="upstream connect error")
        try:
            page = _page(request.query)
        except ValueError as exc:
            return web.json_response(
                {"message": "Invalid Form Body", "code": 50035, "errors": exc.args[0]},
                status=400,
                headers=headers,
            )
        return web.json_response(
            state.list_messages(channel_id, **page), headers=headers
        )

    async def control_post_message(self, request: web.Request) -> web.Response:
        data = await request.json()
        message = self.state.post_message(
            str(data["channel_id"]),
            content=data.get("content", ""),
            embeds=data.get("embeds"),
            components=data.get("components"),
            message_snapshots=data.get("message_snapshots"),
        )
        return web.json_response(message)

    async def control_behaviour(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                self.state.configure(await request.json())
            except (TypeError, ValueError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.state.describe())

    async def control_requests(self, request: web.Request) -> web.Response:
        if request.method == "DELETE":
            self.state.requests.clear()
            return web.json_response({"requests": [], "next": 0})
        since = int(request.query.get("since", "0"))
        log = self.state.requests
        return web.json_response(
            {"requests": [asdict(r) for r in log[since:]], "next": len(log)}
        )

    async def control_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.state.stats())


def _page(query: Any) -> dict[str, Any]:
    """Parse ``after``, ``before``, ``limit``; a ValueError holds Discord's errors."""
    raw = query.get("limit", "50")
    try:
        limit = int(raw)
    except ValueError:
        raise ValueError(_field_error("limit", "NUMBER_TYPE_COERCE", raw)) from None
    if not 1 <= limit <= 100:
        code = "NUMBER_TYPE_MIN" if limit < 1 else "NUMBER_TYPE_MAX"
        raise ValueError(_field_error("limit", code, raw))
    cursors: dict[str, int | None] = {}
    for name in ("after", "before"):
        value = query.get(name)
        if value is not None and not (value.isdigit() and len(value) <= 20):
            raise ValueError(_field_error(name, "NUMBER_TYPE_COERCE", value))
        cursors[name] = int(value) if value is not None else None
    return {"limit": limit, **cursors}


def _field_error(name: str, code: str, value: str) -> dict[str, Any]:
    message = {
        "NUMBER_TYPE_MIN": "int value should be greater than or equal to 1.",
        "NUMBER_TYPE_MAX": "int value should be less than or equal to 100.",
    }.get(code, f'Value "{value}" is not snowflake.')
    return {name: {"_errors": [{"code": code, "message": message}]}}


def _error(
    status: int, message: str, code: int, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"message": message, "code": code}, status=status, headers=headers
    )


def _bucket_429(
    headers: dict[str, str], retry_after: float, scope: str
) -> web.Response:
    headers = {
        **headers,
        "X-RateLimit-Scope": scope,
        "Retry-After": str(math.ceil(retry_after)),
    }
    body = {"message": "You are being rate limited.", "retry_after": retry_after}
    return web.json_response({**body, "global": False}, status=429, headers=headers)


def _global_429(retry_after: float) -> web.Response:
    retry_after = _ceil_ms(retry_after)
    headers = {
        "X-RateLimit-Global": "true",
        "X-RateLimit-Scope": "global",
        "Retry-After": str(math.ceil(retry_after)),
    }
    body = {"message": "You are being rate limited.", "retry_after": retry_after}
    return web.json_response({**body, "global": True}, status=429, headers=headers)


def _ceil_ms(seconds: float) -> float:
    """Round up to the millisecond, so a client that waits this long is never early."""
    return math.ceil(seconds * 1000) / 1000


# --- As a process ------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeDiscord(
        token=args.token,
        mode=args.mode,
        limit=args.limit,
        window=args.window,
        host=args.host,
        port=args.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with fake:
        print(f"READY {fake.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Run the fake until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--mode", choices=sorted(MODES), default="lenient")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="expected Authorization")
    parser.add_argument("--limit", type=int, help="requests per window per channel")
    parser.add_argument("--window", type=float, help="rate-limit window, seconds")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
