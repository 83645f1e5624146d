"""WebSocket consumers without Channels' per-message hop to tidy connections."""

from __future__ import annotations

from typing import Any, TypeVar

from channels.consumer import AsyncConsumer, get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer

Consumer = TypeVar("Consumer", bound=type[AsyncWebsocketConsumer])

# What Channels' own methods, copied below less one step, refer to: on a
# release whose methods do anything else, the copies would drop it.
DISPATCH_USES = frozenset(
    {"getattr", "get_handler_name", "aclose_old_connections", "ValueError"}
)
DISCONNECT_USES = frozenset(
    {
        "groups",
        "channel_layer",
        "group_discard",
        "channel_name",
        "AttributeError",
        "InvalidChannelLayerError",
        "disconnect",
        "aclose_old_connections",
        "StopConsumer",
    }
)


def without_connection_tidying(consumer: Consumer) -> Consumer:
    """``consumer`` less Channels' ``aclose_old_connections()`` on every message.

    Channels hops, for every handshake, frame and disconnect, to the one
    thread that runs thread-sensitive code, to tidy that thread's database
    connections. The gateway's consumer does its database work in
    ``jobs.db``'s worker threads, which check their own. The hop was about a
    sixth of a refused handshake's CPU, and queued every connect behind that
    one thread. A consumer that joins groups of its own leaves them through
    Channels' own ``websocket_disconnect``.
    """

    class Lean(consumer):  # type: ignore[valid-type,misc]
        async def dispatch(self, message: dict[str, Any]) -> None:
            # Channels' AsyncConsumer.dispatch, less aclose_old_connections().
            handler = getattr(self, get_handler_name(message), None)
            if handler is None:
                raise ValueError(f"No handler for message type {message['type']}")
            await handler(message)

        async def websocket_disconnect(self, message: dict[str, Any]) -> None:
            # Channels' own, less aclose_old_connections() and its loop over
            # self.groups, which a consumer that joins none leaves empty.
            if self.groups:
                await super().websocket_disconnect(message)
            await self.disconnect(message["code"])
            raise StopConsumer

    Lean.__name__ = Lean.__qualname__ = consumer.__name__
    Lean.__module__ = consumer.__module__
    return Lean  # type: ignore[return-value]


def consumer_dispatch_problems() -> list[str]:
    """Why ``without_connection_tidying`` cannot be used here; empty if it can."""
    problems = []
    for owner, method, known in (
        (AsyncConsumer, "dispatch", DISPATCH_USES),
        (AsyncWebsocketConsumer, "websocket_disconnect", DISCONNECT_USES),
    ):
        code = getattr(getattr(owner, method, None), "__code__", None)
        used = set(code.co_names) if code is not None else set()
        if not used or used - known:
            more = sorted(used - known) or ["nothing"]
            problems.append(f"Channels' {owner.__name__}.{method} now uses {more}")
    return problems
