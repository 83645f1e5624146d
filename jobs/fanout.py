"""Per-process fan-out: each process takes each job once, and frames it once.

The bus (``jobs.bus``) carries every published job once to every process,
to its one subscription, which hands it to this hub (and to the long-poll
wake-ups). The process then writes the same serialised frame to each of its
clients that wants it. Delivering through the
channel layer to each client instead (a group member per client) cost about
four times the CPU per frame and, with 1,000 clients, overflowed the per-channel
capacity and dropped frames (docs/benchmarks.md).

Clients are grouped by their filter (docs/filters.md): a job is matched once
per distinct filter, then written to every client of each matching group, so
1,000 clients sharing five filters cost five matches per job, not 1,000.

Jobs that are ready at once (a burst, or a process behind on its clients) go
out together: each client that asked for batches (``/ws?batch=1``) gets them in
one ``{"type": "jobs", "jobs": [...]}`` frame, the others one frame per job.
Writing a frame costs daphne about the same whatever it holds, so a process
behind on its clients catches up by sending fewer, fuller frames rather than
falling further behind (docs/realtime.md#batched-frames-batch1).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from typing import Any, Protocol

from django.conf import settings
from django.utils import timezone

from jobs import bus
from jobs.db import in_db_thread
from jobs.filters import JobFilter
from jobs.models import Job
from jobs.per_loop import PerLoop

logger = logging.getLogger(__name__)

# The most jobs in one frame, so that a client far behind gets frames of a
# size any WebSocket library takes (about 60 KB at typical job sizes).
MAX_BATCH = 100
# Writing to this many clients in a row, then letting the event loop run the
# requests and jobs that arrived meanwhile. That turn is all the room requests
# need during a long round: a round never pauses afterwards, because a pause
# is a wait for every job published during it, and the longer the machine
# makes the round, the longer the wait (docs/realtime.md#write-rounds).
CLIENTS_PER_TURN = 50
# The most jobs read from the store to fill one gap in the live stream.
MAX_FILL = 1000


# The ASGI scope extension under which a server may offer a WebSocket consumer
# a PreparedFrames (under daphne, gateway_project.server offers one).
PREPARED_FRAMES = "gateway.prepared_frames"


class PreparedFrames(Protocol):
    """A server's way to frame a frame once and send that copy to many sockets."""

    def prepare(self, frame: str) -> Any:
        """``frame`` framed once, for any connection's ``send``."""

    def send(self, prepared: Any) -> None:
        """Send a frame ``prepare`` made on this connection."""


def job_frame(job: dict[str, Any]) -> str:
    """One job's frame, as the contract has it."""
    return json.dumps({"type": "job", "job": job}, separators=(",", ":"))


def batch_frame(jobs: list[dict[str, Any]]) -> str:
    """Several jobs in one frame, oldest first (one job: the contract's frame)."""
    if len(jobs) == 1:
        return job_frame(jobs[0])
    return json.dumps({"type": "jobs", "jobs": jobs}, separators=(",", ":"))


class Batch:
    """Jobs ready at once for a group of clients, each frame serialised once.

    Batches of one dispatch share ``serialised``, so a job wanted by several
    groups is serialised once for them all.
    """

    __slots__ = (
        "_frame",
        "_frames",
        "_prepared",
        "jobs",
        "lowest_id",
        "sent",
        "serialised",
    )

    def __init__(
        self, jobs: list[dict[str, Any]], serialised: dict[int, str] | None = None
    ) -> None:
        self.jobs = jobs
        self.lowest_id = min(job["id"] for job in jobs)
        self.serialised = {} if serialised is None else serialised
        # Whether a client has had every job of it (jobs.deliveries notes them).
        self.sent = False
        self._frames: list[str] | None = None
        self._frame: str | None = None
        self._prepared: dict[bool, list[Any]] = {}

    def frames(self) -> list[str]:
        """One frame per job, for clients that did not ask for batches."""
        if self._frames is None:
            serialised = self.serialised
            self._frames = []
            for job in self.jobs:
                frame = serialised.get(job["id"])
                if frame is None:
                    frame = serialised[job["id"]] = job_frame(job)
                self._frames.append(frame)
        return self._frames

    def frame(self) -> str:
        """Every job in one frame."""
        if self._frame is None:
            self._frame = (
                self.frames()[0] if len(self.jobs) == 1 else batch_frame(self.jobs)
            )
        return self._frame

    def prepared(self, batched: bool, server: PreparedFrames) -> list[Any]:
        """``[frame()]`` or ``frames()``, framed once by ``server`` for every socket.

        One process has one server: every client's ``server`` frames alike.
        """
        prepared = self._prepared.get(batched)
        if prepared is None:
            frames = [self.frame()] if batched else self.frames()
            prepared = self._prepared[batched] = [server.prepare(f) for f in frames]
            if len(self.jobs) == 1:  # one frame either way
                self._prepared[not batched] = prepared
        return prepared


class Client(Protocol):
    async def deliver(self, batch: Batch) -> None:
        """Send a batch's jobs, or keep them, or skip some."""


EVERYTHING = JobFilter()


class Hub:
    """This process's fan-out, one listener of the bus for every connected client."""

    def __init__(self) -> None:
        # Equal filters are one key (JobFilter is a frozen dataclass).
        self.groups: dict[JobFilter, set[Client]] = {}
        self._filters: dict[Client, JobFilter] = {}
        self._task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[dict[str, Any]] | None = None
        # Every job with an id up to this one has been dispatched (or was
        # committed before the hub subscribed): the live stream goes out in
        # id order, without gaps. None until the first subscription.
        self.high: int | None = None
        self._high_read: asyncio.Future[None] | None = None

    @property
    def clients(self) -> set[Client]:
        return set(self._filters)

    @property
    def newest(self) -> int | None:
        """The newest job id this process knows committed; None if none or unknown.

        Once a client is attached it is at least the newest id committed
        before it subscribed, and a job newer than it reaches the client live.
        """
        return self.high or None

    @property
    def backlog(self) -> int:
        """Jobs received from the bus and not yet being written to clients."""
        return 0 if self._inbox is None else self._inbox.qsize()

    async def attach(self, client: Client, job_filter: JobFilter = EVERYTHING) -> None:
        """Add a client wanting the jobs ``job_filter`` matches.

        Returns once jobs published from now on will reach it.
        """
        if self._task is None or self._task.done():
            # Reading the bus and writing to clients are two tasks, so that
            # jobs arriving while clients are written to wait in the inbox,
            # ready to go out together, rather than in the layer, one at a time.
            self._inbox = asyncio.Queue(settings.FANOUT_BACKLOG)
            self._task = asyncio.create_task(self._write(self._inbox))
        self.detach(client)
        self._filters[client] = job_filter
        self.groups.setdefault(job_filter, set()).add(client)
        await bus.subscription().join(self)
        if self._high_read is None:
            # Once, and once subscribed: a job committed later is newer.
            self._high_read = asyncio.ensure_future(self._read_high())
        await asyncio.shield(self._high_read)

    def detach(self, client: Client) -> None:
        job_filter = self._filters.pop(client, None)
        if job_filter is None:
            return
        members = self.groups.get(job_filter)
        if members is not None:
            members.discard(client)
            if not members:
                del self.groups[job_filter]

    def stop(self) -> None:
        """Stop hearing the bus and writing (tests: a hub of their own)."""
        bus.subscription().leave(self)
        if self._task is not None:
            self._task.cancel()

    def hear(self, news: bus.News) -> Awaitable[None] | None:
        """Take the jobs the bus carries into the inbox (``jobs.bus.Listener``).

        A full inbox holds the bus back: the jobs behind it wait in the layer.
        What is lost (``news.unknown``), clients recover with ``since=``.
        """
        inbox = self._inbox
        if inbox is None or not news.published:
            return None
        for index, job in enumerate(news.published):
            if inbox.full():
                return _put_all(inbox, news.published[index:])
            inbox.put_nowait(job)
        return None

    async def dispatch(self, jobs: list[dict[str, Any]]) -> None:
        """Write jobs to every client that wants them, each frame serialised once."""
        written = 0
        serialised: dict[int, str] = {}
        batches: dict[tuple[int, ...], Batch] = {}
        for job_filter, members in list(self.groups.items()):
            wanted = [job for job in jobs if _wants(job_filter, job)]
            if not wanted:
                continue
            key = tuple(job["id"] for job in wanted)
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = Batch(wanted, serialised)
            for client in list(members):
                if client not in members:
                    continue  # gone while the loop ran something else
                try:
                    await client.deliver(batch)
                except Exception:
                    # One broken connection must not cost the others their frame.
                    logger.exception(
                        "could not deliver jobs %s to a client",
                        ", ".join(str(job["id"]) for job in wanted),
                    )
                written += 1
                if written % CLIENTS_PER_TURN == 0:
                    await asyncio.sleep(0)

    async def _write(self, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        # Rounds follow each other at once: the jobs that arrived during one
        # (it yields every CLIENTS_PER_TURN clients) all go out in the next.
        while True:
            jobs = [await inbox.get()]
            while len(jobs) < MAX_BATCH and not inbox.empty():
                jobs.append(inbox.get_nowait())
            try:
                ordered = await self.in_order(jobs)
                for start in range(0, len(ordered), MAX_BATCH):
                    await self.dispatch(ordered[start : start + MAX_BATCH])
            except Exception:
                # The next jobs must still go out.
                logger.exception("could not dispatch %d jobs", len(jobs))

    async def _read_high(self) -> None:
        # Read once subscribed: a job committed later is newer than this.
        # Jobs that went out meanwhile set it already, and higher.
        try:
            newest = await _newest_id()
            if self.high is None:
                self.high = newest
        except Exception as exc:
            # Clients are served all the same; the first jobs to come set it.
            logger.warning("could not read the newest job id: %s", exc)

    async def in_order(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The jobs not dispatched yet, oldest first, with any gap before them filled.

        Ids are committed in their own order (jobs.services), so when a job
        arrives, every smaller id that will ever exist is committed already:
        one the channel layer has not brought yet (published by another
        replica, or lost by the layer) is read from the store now, and
        dropped when it arrives. A client is then never sent a job before an
        older one, and ``since=`` the newest id it saw misses nothing.
        """
        high = self.high
        fresh: dict[int, dict[str, Any]] = {}
        for job in jobs:
            if high is None or job["id"] > high:
                fresh[job["id"]] = job
        if not fresh:
            return []
        top = max(fresh)
        if high is not None and len(fresh) < top - high:
            try:
                for job in await _committed_between(high, top):
                    fresh.setdefault(job["id"], job)
            except Exception as exc:
                # Sent without them: a client that reconnects with since=
                # an older id still gets them.
                logger.warning("could not fill a gap in the live stream: %s", exc)
        self.high = top
        return [fresh[pk] for pk in sorted(fresh)]


@in_db_thread
def _newest_id() -> int:
    return Job.objects.order_by("-id").values_list("id", flat=True).first() or 0


@in_db_thread
def _committed_between(low: int, high: int) -> list[dict[str, Any]]:
    """The unexpired jobs with ids between ``low`` and ``high``, both excluded."""
    jobs = Job.objects.filter(id__gt=low, id__lt=high, expires_at__gt=timezone.now())
    return [job.to_wire() for job in jobs.order_by("id")[:MAX_FILL]]


async def _put_all(
    inbox: asyncio.Queue[dict[str, Any]], jobs: list[dict[str, Any]]
) -> None:
    for job in jobs:
        await inbox.put(job)


def _wants(job_filter: JobFilter, job: dict[str, Any]) -> bool:
    """Whether a group wants a job: one match for the whole group."""
    return job_filter.is_empty or job_filter.matches(job)


_hubs: PerLoop[Hub] = PerLoop(Hub)


def hub() -> Hub:
    """This process's hub (one per event loop: tests run several loops)."""
    return _hubs.get()
