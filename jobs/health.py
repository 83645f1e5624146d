"""What ``GET /health`` reports."""

from __future__ import annotations

from typing import Any

from django.conf import settings

from jobs.queues import get_queue


async def health_report() -> dict[str, Any]:
    queue = get_queue()
    return {
        "ok": True,
        "headless_mode": settings.HEADLESS_MODE,
        "queue": {"backend": queue.name, "depth": await queue.depth()},
        "channel_layer": settings.CHANNEL_LAYER,
        "database": settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1],
    }
