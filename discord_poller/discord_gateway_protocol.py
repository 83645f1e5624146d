"""Discord Gateway v10: opcodes, intents, close codes, and the shapes of what
Discord answers. Django-free; the connection itself is ``discord_gateway``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

GATEWAY_VERSION: Final = 10
INTENT_GUILD_MESSAGES: Final = 1 << 9
INTENT_MESSAGE_CONTENT: Final = 1 << 15  # privileged: enabled in the portal
INTENTS: Final = INTENT_GUILD_MESSAGES | INTENT_MESSAGE_CONTENT
# Close codes Discord says not to reconnect after, with what to do about them.
FATAL_CLOSE_CODES: Final = {
    4004: "Authentication failed: Discord rejected DISCORD_TOKEN; check the bot "
    'token (written "Bot <token>")',
    4010: "Invalid shard: this poller runs one shard",
    4011: "Sharding required: the bot is in too many guilds for one shard; "
    "use a bot of its own for the notifier channels",
    4012: "Invalid API version",
    4013: "Invalid intent(s)",
    4014: "Disallowed intent(s): enable the Message Content Intent under Bot > "
    "Privileged Gateway Intents in the Discord Developer Portal",
}
# The session is gone after these: reconnect, but identify anew.
NEW_SESSION_CLOSE_CODES: Final = frozenset({4007, 4009})


class Op(IntEnum):
    """Gateway opcodes used here."""

    DISPATCH = 0
    HEARTBEAT = 1
    IDENTIFY = 2
    RESUME = 6
    RECONNECT = 7
    INVALID_SESSION = 9
    HELLO = 10
    HEARTBEAT_ACK = 11


class GatewayFatal(Exception):
    """Discord closed the Gateway with a code that must not be retried."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SessionStartLimit:
    """``session_start_limit`` of ``GET /gateway/bot``; ``reset_after`` in s."""

    total: int
    remaining: int
    reset_after: float
    max_concurrency: int

    @classmethod
    def parse(cls, data: Any) -> SessionStartLimit:
        data = data if isinstance(data, Mapping) else {}
        return cls(
            total=_int(data.get("total"), 1000),
            remaining=_int(data.get("remaining"), 1000),
            reset_after=_int(data.get("reset_after"), 0) / 1000,
            max_concurrency=max(_int(data.get("max_concurrency"), 1), 1),
        )


@dataclass(frozen=True)
class GatewayInfo:
    """What ``GET /gateway/bot`` answers."""

    url: str
    shards: int
    session_start_limit: SessionStartLimit

    @classmethod
    def parse(cls, data: Any) -> GatewayInfo:
        """Read Discord's answer; ValueError when it has no usable URL."""
        if not isinstance(data, Mapping) or not isinstance(data.get("url"), str):
            raise ValueError("GET /gateway/bot answered without a url")
        url = data["url"]
        if urlsplit(url).scheme not in ("ws", "wss"):
            raise ValueError("GET /gateway/bot answered a url that is not ws(s)://")
        return cls(
            url=url,
            shards=_int(data.get("shards"), 1),
            session_start_limit=SessionStartLimit.parse(
                data.get("session_start_limit")
            ),
        )


@dataclass
class GatewayStats:
    """The connection's state and counters, for the status report."""

    state: str = "starting"
    connects: int = 0
    identifies: int = 0
    resumes: int = 0  # RESUMED received
    reconnects: int = 0
    events: int = 0
    heartbeat_interval_ms: float | None = None
    latency_ms: float | None = None  # heartbeat to its ACK
    connected_at: float | None = None  # unix seconds of the last READY/RESUMED
    last_event_at: float | None = None
    last_close_code: int | None = None
    last_error: str | None = None

    def as_report(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "connects": self.connects,
            "identifies": self.identifies,
            "resumes": self.resumes,
            "reconnects": self.reconnects,
            "events": self.events,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "latency_ms": None
            if self.latency_ms is None
            else round(self.latency_ms, 1),
            "last_close_code": self.last_close_code,
            "last_error": self.last_error,
        }


def gateway_url(base: str) -> str:
    """``base`` with ``v=10&encoding=json``, the path defaulting to ``/``."""
    parts = urlsplit(base)
    query = urlencode({"v": GATEWAY_VERSION, "encoding": "json"})
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))


def identify_token(token: str) -> str:
    """The token as Identify and Resume take it: without the ``Bot `` prefix."""
    return token.removeprefix("Bot ").strip()


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)
