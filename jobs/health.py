"""What ``GET /health`` reports."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from jobs import presence, wakeups
from jobs.queues import get_queue


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
    }
