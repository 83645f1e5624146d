"""Where the reading of one channel stands, and snowflake time. Django-free.

A channel is read forwards with ``after=``: the cursor is the newest message id
seen. It never points further back than the job TTL: on start, and after any
long pause (a ban, a channel backed off), only the messages still worth
publishing are fetched, oldest first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

DISCORD_EPOCH_MS: Final = 1420070400000
_SNOWFLAKE = re.compile(r"[0-9]{1,20}")


def snowflake_ms(snowflake: str | int) -> int:
    """The moment a snowflake id was made, in unix milliseconds."""
    return (int(snowflake) >> 22) + DISCORD_EPOCH_MS


def snowflake_at(unix_ms: float) -> int:
    """The smallest snowflake of ``unix_ms``: ``after=`` it fetches what came later."""
    return max(int(unix_ms) - DISCORD_EPOCH_MS, 0) << 22


@dataclass
class Cursor:
    """The newest message id seen in one channel; None before the first."""

    last_id: int | None = None

    def after(self, now_ms: float, ttl_seconds: float) -> str:
        """The ``after=`` id of the next request.

        The last id seen, but never a message older than ``ttl_seconds``: those
        are worthless, and skipping them keeps catch-up short.
        """
        floor = snowflake_at(now_ms - ttl_seconds * 1000)
        return str(max(self.last_id or 0, floor))

    def advance(self, page: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Move past a page; return its messages not seen before, oldest first."""
        fresh: dict[int, Mapping[str, Any]] = {}
        for message in page:
            raw = message.get("id") if isinstance(message, Mapping) else None
            if not isinstance(raw, str) or not _SNOWFLAKE.fullmatch(raw):
                continue  # nothing to order it by, or to resume after
            number = int(raw)
            if self.last_id is None or number > self.last_id:
                fresh.setdefault(number, message)
        if fresh:
            self.last_id = max(fresh)
        return [fresh[number] for number in sorted(fresh)]
