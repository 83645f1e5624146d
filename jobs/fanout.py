"""Per-process fan-out: each process takes each job once, and frames it once.

The channel layer carries every published job once to every process, to one
channel per process joined to ``jobs.all``. The process then writes the same
serialised frame to each of its clients that wants it. Delivering through the
channel layer to each client instead (a group member per client) cost about
four times the CPU per frame and, with 1,000 clients, overflowed the per-channel
capacity and dropped frames (docs/benchmarks.md).

Clients are grouped by their filter (docs/filters.md): a job is matched once
per distinct filter, then written to every client of each matching group, so
1,000 clients sharing five filters cost five matches per job, not 1,000.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from typing import Any, Protocol

from channels.layers import get_channel_layer

from jobs import groups
from jobs.filters import JobFilter

logger = logging.getLogger(__name__)

# channels-redis and the in-memory layer forget a group member after a day.
REJOIN_SECONDS = 3600.0


class Client(Protocol):
    async def deliver(self, job: dict[str, Any], frame: str) -> None:
        """Send one job's frame, or keep it, or skip it."""


EVERYTHING = JobFilter()


class Hub:
    """This process's one subscription, shared by every connected client."""

    def __init__(self) -> None:
        # Equal filters are one key (JobFilter is a frozen dataclass).
        self.groups: dict[JobFilter, set[Client]] = {}
        self._filters: dict[Client, JobFilter] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def clients(self) -> set[Client]:
        return set(self._filters)

    async def attach(self, client: Client, job_filter: JobFilter = EVERYTHING) -> None:
        """Add a client wanting the jobs ``job_filter`` matches.

        Returns once jobs published from now on will reach it.
        """
        if self._task is None or self._task.done():
            self._subscribed.clear()
            self._task = asyncio.create_task(self._run())
        self.detach(client)
        self._filters[client] = job_filter
        self.groups.setdefault(job_filter, set()).add(client)
        await self._subscribed.wait()

    def detach(self, client: Client) -> None:
        job_filter = self._filters.pop(client, None)
        if job_filter is None:
            return
        members = self.groups.get(job_filter)
        if members is not None:
            members.discard(client)
            if not members:
                del self.groups[job_filter]

    async def dispatch(self, job: dict[str, Any]) -> None:
        """Write one job to every client that wants it, serialised once."""
        frame: str | None = None
        for job_filter, members in list(self.groups.items()):
            if not _wants(job_filter, job):
                continue
            if frame is None:
                frame = json.dumps({"type": "job", "job": job}, separators=(",", ":"))
            for client in list(members):
                try:
                    await client.deliver(job, frame)
                except Exception:
                    # One broken connection must not cost the others their frame.
                    logger.exception("could not deliver job %s to a client", job["id"])

    async def _run(self) -> None:
        layer = get_channel_layer()
        backoff = 0.1
        while True:
            try:
                channel = await layer.new_channel()
                await layer.group_add(groups.ALL_JOBS, channel)
                self._subscribed.set()
                backoff = 0.1
                await self._receive(layer, channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Clients keep their sockets; what they miss meanwhile,
                # they recover with since= (the channel layer is at-most-once).
                logger.warning("fan-out lost the channel layer: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _receive(self, layer: Any, channel: str) -> None:
        loop = asyncio.get_running_loop()
        rejoin_at = loop.time() + REJOIN_SECONDS
        while True:
            timeout = max(rejoin_at - loop.time(), 0.0)
            try:
                message = await asyncio.wait_for(layer.receive(channel), timeout)
            except TimeoutError:
                await layer.group_add(groups.ALL_JOBS, channel)
                rejoin_at = loop.time() + REJOIN_SECONDS
                continue
            if message.get("type") == "job.published":
                await self.dispatch(message["job"])


def _wants(job_filter: JobFilter, job: dict[str, Any]) -> bool:
    """Whether a group wants a job: one match for the whole group."""
    return job_filter.is_empty or job_filter.matches(job)


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Hub] = (
    weakref.WeakKeyDictionary()
)


def hub() -> Hub:
    """This process's hub (one per event loop: tests run several loops)."""
    loop = asyncio.get_running_loop()
    found = _hubs.get(loop)
    if found is None:
        found = _hubs[loop] = Hub()
    return found
