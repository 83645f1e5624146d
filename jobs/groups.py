"""Channel-layer group names: one for every job, one per Discord channel."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ALL_JOBS = "jobs.all"


def for_channel(channel: str) -> str:
    # Channel names are validated to the characters group names allow.
    return f"jobs.channel.{channel}"


def for_job(job: dict[str, Any]) -> Iterable[str]:
    """Every group a published job is sent to."""
    return (ALL_JOBS, for_channel(job["channel"]))
