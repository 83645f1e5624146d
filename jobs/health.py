"""What ``GET /health`` reports."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import DatabaseError

from discord_poller.status import read_status
from jobs import presence, wakeups
from jobs.db import in_db_thread
from jobs.queues import get_queue

_read_poller_status = in_db_thread(read_status)


async def health_report() -> dict[str, Any]:
    queue = get_queue()
    return {
        "ok": True,
        "headless_mode": settings.HEADLESS_MODE,
        "queue": {
            "backend": queue.name,
            "depth": await queue.depth(),
            "long_polls_waiting": wakeups.waiting(),
        },
        # "total" sums every replica's count (through Redis); null when Redis
        # cannot be read.
        "websocket_clients": {
            "process": presence.local_count(),
            "total": await presence.total_count(),
        },
        "channel_layer": settings.CHANNEL_LAYER,
        "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
        "poller": await _poller(),
    }


async def _poller() -> dict[str, Any] | None:
    """The poller's last report and its age; None if no poller ever reported.

    The poller runs in a process of its own and writes its report about once a
    second: an age of more than a few seconds means it is not running.
    """
    try:
        return await _read_poller_status()
    except DatabaseError:
        return {"error": "unavailable", "detail": "The poller status is unreadable."}
