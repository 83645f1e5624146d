"""The one module that talks to Discord's REST API. Django-free.

It reads channel messages as fast as Discord allows and never faster: it keeps
to the per-bucket rate-limit headers, to 429s (per bucket and global), to the
50 requests/s global limit, and it watches the invalid-request budget whose
overrun gets the IP banned by Cloudflare. A ban, once seen, stops every request
for a long cool-down instead of digging the hole deeper.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import httpx

logger = logging.getLogger(__name__)

DEFAULT_API_BASE: Final = "https://discord.com/api/v10"
# Discord bans an IP after 10,000 invalid requests in 10 minutes.
INVALID_WINDOW_SECONDS: Final = 600.0
DEFAULT_INVALID_SOFT_LIMIT: Final = 1000
DEFAULT_BAN_COOLDOWN: Final = 300.0
GLOBAL_WINDOW_SECONDS: Final = 1.0

_MESSAGES_ROUTE: Final = "GET /channels/{channel_id}/messages"
_GATEWAY_ROUTE: Final = "GET /gateway/bot"
_SNOWFLAKE = re.compile(r"[0-9]{1,20}")
# Two X-RateLimit-Reset values this close apart name the same window.
_SAME_WINDOW = 0.0005


def discord_user_agent(url: str, version: str) -> str:
    """Return the ``User-Agent`` Discord asks bots to send."""
    return f"DiscordBot ({url}, {version})"


class DiscordError(Exception):
    """A request to Discord failed; ``status`` and ``code`` say how, when known."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        channel_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.channel_id = channel_id


class Unauthorized(DiscordError):
    """401: the token was rejected. Nothing more is sent; the caller should exit."""


class Forbidden(DiscordError):
    """403: the bot may not read ``channel_id``."""


class NotFound(DiscordError):
    """404: ``channel_id`` does not exist or is not visible to the bot."""


class ServerError(DiscordError):
    """5xx: Discord failed on its side; asking again later is fine."""


class DiscordUnavailable(DiscordError):
    """Discord could not be reached: connect error, timeout, dropped connection."""


class RateLimited(DiscordError):
    """429s kept coming after the allowed retries; ``retry_after`` in seconds."""

    def __init__(self, message: str, *, retry_after: float, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Banned(DiscordError):
    """Discord or Cloudflare blocks this IP; nothing is sent before ``until``.

    ``until`` is on the client's clock; ``retry_after`` is seconds from now.
    """

    def __init__(
        self, message: str, *, until: float, retry_after: float, **kw: Any
    ) -> None:
        super().__init__(message, **kw)
        self.until = until
        self.retry_after = retry_after


@dataclass
class ClientStats:
    """Counters for health reports and benchmarks."""

    requests: int = 0
    rate_limited: int = 0  # 429 answers, bans included
    rate_limit_wait: float = 0.0  # seconds spent waiting before sending
    last_latency: float | None = None  # seconds, of the last answered request
    bans: int = 0
    # Answers by HTTP status ("200", "429", ...), for /metrics.
    by_status: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class BucketState:
    """A channel's rate-limit bucket as last seen, to spread polls evenly."""

    limit: int | None  # None until Discord has answered
    remaining: int | None  # requests left in the window
    reset_in: float | None  # seconds until the window ends; None when unknown


@dataclass(frozen=True)
class _Headers:
    """The rate-limit headers of one answer."""

    bucket: str | None
    limit: int
    remaining: int
    reset_after: float
    reset: float | None  # epoch seconds: names the window

    @classmethod
    def parse(cls, headers: httpx.Headers) -> _Headers | None:
        remaining = _number(headers.get("x-ratelimit-remaining"))
        reset_after = _number(headers.get("x-ratelimit-reset-after"))
        reset = _number(headers.get("x-ratelimit-reset"))
        if reset_after is None and reset is not None:
            reset_after = max(reset - time.time(), 0.0)
        if remaining is None or reset_after is None:
            return None
        limit = _number(headers.get("x-ratelimit-limit"))
        return cls(
            bucket=headers.get("x-ratelimit-bucket"),
            limit=max(int(limit if limit is not None else remaining + 1), 1),
            remaining=max(int(remaining), 0),
            reset_after=max(reset_after, 0.0),
            reset=reset,
        )


class _Bucket:
    """What one rate-limit bucket allows. Every estimate errs towards waiting."""

    def __init__(self) -> None:
        self.limit = 1
        self.remaining: int | None = None  # None: no answer yet, send one at a time
        # Clock time the window ends; inf: a window we opened, no answer from it yet.
        self.reset_at = 0.0
        self.window: float | None = None  # X-RateLimit-Reset of the known window
        self.blocked_until = 0.0  # from a 429's retry_after
        self.inflight = 0
        self.changed = asyncio.Event()

    def delay(self, now: float) -> float | None:
        """Seconds to wait before sending; None: until a request in flight ends."""
        if self.blocked_until > now:
            return self.blocked_until - now
        if self.remaining is None or math.isinf(self.reset_at):
            if self.remaining:
                return 0.0
            return None if self.inflight else 0.0
        if self.remaining > 0 or now >= self.reset_at:
            return 0.0
        return self.reset_at - now

    def reserve(self, now: float) -> None:
        self.inflight += 1
        if self.remaining is None:
            return
        if now >= self.reset_at:
            # Discord's window has ended; the next answer says when the new one does.
            self.remaining, self.reset_at = self.limit, math.inf
        self.remaining = max(self.remaining - 1, 0)

    def release(self, now: float, info: _Headers | None) -> None:
        self.inflight -= 1
        if info is not None:
            self.apply(now, info)
        self.notify()

    def apply(self, now: float, info: _Headers) -> None:
        # Requests still in flight may not be counted in this answer yet.
        estimate = max(info.remaining - self.inflight, 0)
        self.limit = info.limit
        if (
            info.reset is None
            or self.window is None
            or info.reset > self.window + _SAME_WINDOW
        ):
            self.remaining, self.window = estimate, info.reset
            self.reset_at = now + info.reset_after
        elif info.reset >= self.window - _SAME_WINDOW and not math.isinf(self.reset_at):
            # Answers can overtake each other; the lowest count is the latest.
            self.remaining = min(self.remaining or 0, estimate)
            self.reset_at = max(self.reset_at, now + info.reset_after)
        # Otherwise the answer belongs to a window that has already ended.

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class DiscordClient:
    """An async Discord REST client over one kept-open ``httpx.AsyncClient``.

    ``token`` is sent verbatim as ``Authorization`` (a bot token reads
    ``Bot <token>``) and never logged. ``clock`` must advance in real seconds.
    """

    def __init__(
        self,
        token: str,
        api_base: str = DEFAULT_API_BASE,
        *,
        user_agent: str,
        clock: Callable[[], float] = time.monotonic,
        timeout: float = 10.0,
        max_retries: int = 2,
        ban_cooldown: float = DEFAULT_BAN_COOLDOWN,
        invalid_soft_limit: int = DEFAULT_INVALID_SOFT_LIMIT,
        slow_interval: float = 1.0,
        global_per_second: int = 50,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not token.strip() or "\n" in token or "\r" in token:
            raise ValueError("the Discord token is empty or spans several lines")
        if not user_agent.startswith("DiscordBot ("):
            raise ValueError('user_agent must read "DiscordBot (url, version)"')
        # Scrubbed from any text of Discord's that ends up in an exception.
        self._secrets = {token, *(p for p in token.split() if len(p) >= 8)}
        self._api_base = api_base.rstrip("/")
        self._clock = clock
        self._max_retries = max_retries
        self._ban_cooldown = ban_cooldown
        self._soft_limit = invalid_soft_limit
        self._slow_interval = slow_interval
        self._http = httpx.AsyncClient(
            base_url=self._api_base,
            headers={"Authorization": token, "User-Agent": user_agent},
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_keepalive_connections=20, keepalive_expiry=30),
            transport=transport,
        )
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._bucket_keys: dict[tuple[str, str], tuple[str, str]] = {}
        self._global_until = 0.0
        self._banned_until = 0.0
        self._unauthorized = False
        self._sent: deque[float] = deque(maxlen=max(global_per_second, 1))
        self._last_sent = -math.inf
        self._invalid: deque[float] = deque()
        self._warned_invalid = False
        self.stats = ClientStats()

    def __repr__(self) -> str:
        return f"<DiscordClient {self._api_base}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    @property
    def invalid_requests(self) -> int:
        """Invalid requests (401, 403, non-shared 429) in the last 10 minutes."""
        horizon = self._clock() - INVALID_WINDOW_SECONDS
        while self._invalid and self._invalid[0] <= horizon:
            self._invalid.popleft()
        if len(self._invalid) < self._soft_limit:
            self._warned_invalid = False
        return len(self._invalid)

    async def fetch_messages(
        self, channel_id: str, *, after: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Return up to ``limit`` messages newer than ``after``, newest first.

        The list is Discord's, in Discord's order: with ``after``, the ``limit``
        messages right after that id, the newest of them first.
        """
        _check_snowflake("channel_id", channel_id)
        if not 1 <= limit <= 100:
            raise ValueError("limit must be between 1 and 100")
        params = {"limit": str(limit)}
        if after is not None:
            _check_snowflake("after", after)
            params["after"] = after
        data = await self._get_json(
            _MESSAGES_ROUTE, channel_id, f"/channels/{channel_id}/messages", params
        )
        if not isinstance(data, list):
            raise DiscordError(
                "Discord answered something other than a list of messages",
                channel_id=channel_id,
            )
        return data

    async def gateway_bot(self) -> dict[str, Any]:
        """``GET /gateway/bot``: the Gateway's URL and the session start limit."""
        data = await self._get_json(_GATEWAY_ROUTE, "gateway", "/gateway/bot", {})
        if not isinstance(data, dict):
            raise DiscordError("GET /gateway/bot answered something other than JSON")
        return data

    def next_allowed_in(self, channel_id: str) -> float:
        """Seconds until a request for this channel may be sent; 0 if now.

        Requests still in flight are not waited for here; ``fetch_messages`` does.
        """
        now = self._clock()
        bucket = self._buckets.get(self._key(_MESSAGES_ROUTE, channel_id))
        bucket_delay = bucket.delay(now) if bucket is not None else 0.0
        return max(
            self._banned_until - now, self._client_delay(now), bucket_delay or 0.0, 0.0
        )

    def bucket_state(self, channel_id: str) -> BucketState:
        """What the channel's bucket allows now, as far as the client knows."""
        bucket = self._buckets.get(self._key(_MESSAGES_ROUTE, channel_id))
        if bucket is None or bucket.remaining is None:
            return BucketState(None, None, None)
        now = self._clock()
        if math.isinf(bucket.reset_at):
            return BucketState(bucket.limit, bucket.remaining, None)
        if now >= bucket.reset_at:
            return BucketState(bucket.limit, bucket.limit, 0.0)
        return BucketState(bucket.limit, bucket.remaining, bucket.reset_at - now)

    # --- Requests -----------------------------------------------------------

    async def _get_json(
        self, route: str, major: str, path: str, params: dict[str, str]
    ) -> Any:
        attempt = 0
        while True:
            response = await self._send(route, major, path, params)
            if response.is_success:
                try:
                    return response.json()
                except ValueError:
                    raise DiscordError(
                        "Discord answered with a body that is not JSON",
                        status=response.status_code,
                        channel_id=major,
                    ) from None
            # No await since _send() released the bucket: a 429's block is in
            # place before any waiter can run.
            retry_after = self._fail(response, route, major)
            if attempt >= self._max_retries:
                raise RateLimited(
                    f"still rate limited on channel {major} after {attempt + 1} tries",
                    retry_after=retry_after,
                    status=429,
                    channel_id=major,
                )
            attempt += 1

    async def _send(
        self, route: str, major: str, path: str, params: dict[str, str]
    ) -> httpx.Response:
        bucket = await self._acquire(route, major)
        self.stats.requests += 1
        started = self._clock()
        try:
            response = await self._http.get(path, params=params)
        except BaseException as exc:
            bucket.release(self._clock(), None)
            if isinstance(exc, httpx.RequestError):
                # The URL says which host was tried (DISCORD_API_BASE); the
                # token is in a header, never in the URL.
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else repr(exc)
                raise DiscordUnavailable(
                    f"could not reach GET {self._api_base}{path}: {reason}",
                    channel_id=major,
                ) from exc
            raise
        now = self._clock()
        self.stats.last_latency = now - started
        status = str(response.status_code)
        self.stats.by_status[status] = self.stats.by_status.get(status, 0) + 1
        info = _Headers.parse(response.headers)
        self._settle(route, major, bucket, now, info)
        logger.debug(
            "GET %s -> %s in %.0f ms (remaining %s, reset after %s)",
            path,
            response.status_code,
            self.stats.last_latency * 1000,
            info.remaining if info else "?",
            info.reset_after if info else "?",
        )
        return response

    def _settle(
        self, route: str, major: str, bucket: _Bucket, now: float, info: _Headers | None
    ) -> None:
        """Release the request's hold on its bucket and learn the bucket's hash."""
        if info is None or info.bucket is None:
            bucket.release(now, info)
            return
        key = (info.bucket, major)
        if self._bucket_keys.get((route, major)) != key:
            old = self._key(route, major)
            if self._buckets.get(old) is bucket:
                del self._buckets[old]
            self._bucket_keys[(route, major)] = key
        shared = self._buckets.setdefault(key, bucket)
        if shared is bucket:
            bucket.release(now, info)
        else:
            # Another route already uses this bucket: its state wins.
            bucket.release(now, None)
            shared.apply(now, info)
            shared.notify()

    def _key(self, route: str, major: str) -> tuple[str, str]:
        return self._bucket_keys.get((route, major), (route, major))

    async def _acquire(self, route: str, major: str) -> _Bucket:
        """Wait until a request may be sent on this route, then hold a place."""
        started = self._clock()
        try:
            while True:
                now = self._clock()
                self._refuse_if_blocked(now, major)
                key = self._key(route, major)
                bucket = self._buckets.setdefault(key, _Bucket())
                wait: float | None = self._client_delay(now)
                if wait is not None and wait <= 0:
                    wait = bucket.delay(now)
                    if wait is not None and wait <= 0:
                        bucket.reserve(now)
                        self._sent.append(now)
                        self._last_sent = now
                        return bucket
                await _wait(bucket.changed, wait)
        finally:
            self.stats.rate_limit_wait += self._clock() - started

    def _refuse_if_blocked(self, now: float, channel_id: str) -> None:
        if self._unauthorized:
            raise Unauthorized(
                "Discord rejected the token earlier (401); not sending",
                status=401,
                channel_id=channel_id,
            )
        if self._banned_until > now:
            left = self._banned_until - now
            raise Banned(
                f"Discord is blocking this IP; no request for {left:.1f} s more",
                until=self._banned_until,
                retry_after=left,
                channel_id=channel_id,
            )

    def _client_delay(self, now: float) -> float:
        """Seconds to wait for the limits that span every route."""
        delay = self._global_until - now
        if len(self._sent) == self._sent.maxlen:
            delay = max(delay, self._sent[0] + GLOBAL_WINDOW_SECONDS - now)
        if self.invalid_requests >= self._soft_limit:
            delay = max(delay, self._last_sent + self._slow_interval - now)
        return delay

    # --- Failed answers -----------------------------------------------------

    def _fail(self, response: httpx.Response, route: str, channel_id: str) -> float:
        """Raise the error an answer means; for a 429, return its retry_after."""
        status = response.status_code
        now = self._clock()
        body = _json_object(response)
        code = body.get("code") if body is not None else None
        code = code if isinstance(code, int) else None
        message = self._scrub(str(body.get("message", ""))[:200]) if body else ""
        kw: dict[str, Any] = {"status": status, "code": code, "channel_id": channel_id}
        if status == 401:
            self._count_invalid(now)
            self._unauthorized = True
            logger.error("Discord rejected the token (401); no more requests are sent")
            raise Unauthorized("Discord rejected the token (401 Unauthorized)", **kw)
        if status in (403, 429) and _is_ban(status, body, response.headers):
            self._count_invalid(now)
            if status == 429:
                self.stats.rate_limited += 1
            raise self._start_ban(now, response, kw)
        if status == 403:
            self._count_invalid(now)
            raise Forbidden(f"403 on channel {channel_id}: {message}", **kw)
        if status == 404:
            raise NotFound(f"404 on channel {channel_id}: {message}", **kw)
        if status == 429:
            assert body is not None  # _is_ban() answered otherwise
            return self._rate_limited(now, response, body, route, channel_id)
        if status >= 500:
            raise ServerError(
                f"Discord answered {status} on channel {channel_id}", **kw
            )
        raise DiscordError(f"Discord answered {status}: {message}", **kw)

    def _rate_limited(
        self,
        now: float,
        response: httpx.Response,
        body: dict[str, Any],
        route: str,
        channel_id: str,
    ) -> float:
        headers = response.headers
        self.stats.rate_limited += 1
        scope = headers.get("x-ratelimit-scope", "user")
        if scope != "shared":
            self._count_invalid(now)
        retry_after = _number(body.get("retry_after"))
        if retry_after is None:
            retry_after = _number(headers.get("retry-after"))
        retry_after = max(retry_after if retry_after is not None else 1.0, 0.0)
        is_global = body.get("global") is True or (
            headers.get("x-ratelimit-global", "").lower() == "true"
        )
        if is_global:
            self._global_until = max(self._global_until, now + retry_after)
        else:
            bucket = self._buckets.get(self._key(route, channel_id))
            if bucket is not None:
                bucket.blocked_until = max(bucket.blocked_until, now + retry_after)
        logger.warning(
            "Discord rate limited channel %s (scope %s%s): waiting %.3f s",
            channel_id,
            scope,
            ", global" if is_global else "",
            retry_after,
        )
        return retry_after

    def _start_ban(
        self, now: float, response: httpx.Response, kw: dict[str, Any]
    ) -> Banned:
        header = _number(response.headers.get("retry-after"))
        cooldown = max(self._ban_cooldown, header or 0.0)
        self._banned_until = max(self._banned_until, now + cooldown)
        self.stats.bans += 1
        kind = "HTML page" if "html" in response.headers.get("content-type", "") else ""
        logger.error(
            "Discord is blocking this IP (HTTP %s %s without rate-limit headers): "
            "no request for %.0f s. Too many invalid requests? %d in 10 minutes.",
            response.status_code,
            kind or "answer",
            cooldown,
            len(self._invalid),
        )
        return Banned(
            f"Discord is blocking this IP (HTTP {response.status_code}); "
            f"no request for {cooldown:.0f} s",
            until=self._banned_until,
            retry_after=cooldown,
            **kw,
        )

    def _count_invalid(self, now: float) -> None:
        self._invalid.append(now)
        count = self.invalid_requests
        if count >= self._soft_limit and not self._warned_invalid:
            self._warned_invalid = True
            logger.warning(
                "%d invalid Discord requests in 10 minutes (Discord bans at 10000): "
                "sending at most one request every %.1f s",
                count,
                self._slow_interval,
            )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


async def _wait(event: asyncio.Event, timeout: float | None) -> None:
    """Wait for ``event`` or ``timeout`` seconds, whichever comes first."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


def _is_ban(status: int, body: dict[str, Any] | None, headers: httpx.Headers) -> bool:
    """Whether a 403 or 429 comes from an IP block rather than a normal limit.

    Cloudflare's 1015 page is HTML; Discord's own block is ``{"code": 0, ...}``;
    neither carries rate-limit headers. Discord's real 403s carry a nonzero code.
    """
    if body is None:
        return True
    has_headers = any(name.startswith("x-ratelimit-") for name in headers)
    if status == 429:
        return not has_headers or "retry_after" not in body
    return not has_headers and not body.get("code")


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _check_snowflake(name: str, value: str) -> None:
    if not _SNOWFLAKE.fullmatch(value):
        raise ValueError(f"{name} must be a Discord snowflake id")
