"""Channel-layer group names, and the messages sent to them."""

from __future__ import annotations

from typing import Any

# Every published job is sent once to this group; each process's fan-out hub
# (jobs.fanout) is its one member there.
ALL_JOBS = "jobs.all"


def published(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``ALL_JOBS`` message for jobs published together, oldest first."""
    if len(jobs) == 1:
        return {"type": "job.published", "job": jobs[0]}
    return {"type": "jobs.published", "jobs": jobs}


def published_jobs(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The jobs an ``ALL_JOBS`` message carries (none if it is of another type)."""
    kind = message.get("type")
    if kind == "job.published":
        return [message["job"]]
    if kind == "jobs.published":
        return list(message["jobs"])
    return []
