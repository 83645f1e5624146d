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

Jobs that are ready at once (a burst, or a process behind on its clients) go
out together: each client that asked for batches (``/ws?batch=1``) gets them in
one ``{"type": "jobs", "jobs": [...]}`` frame, the others one frame per job.
Writing a frame costs daphne about the same whatever it holds, so a process
behind on its clients catches up by sending fewer, fuller frames rather than
falling further behind (docs/realtime.md#batched-frames).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Protocol

from channels.layers import get_channel_layer
from django.conf import settings

from jobs import layer_messages
from jobs.filters import JobFilter
from jobs.per_loop import PerLoop

logger = logging.getLogger(__name__)

# channels-redis and the in-memory layer forget a group member after a day.
REJOIN_SECONDS = 3600.0
# The most jobs in one frame, so that a client far behind gets frames of a
# size any WebSocket library takes (about 60 KB at typical job sizes).
MAX_BATCH = 100
# Writing to this many clients in a row, then letting the event loop run the
# requests and jobs that arrived meanwhile.
CLIENTS_PER_TURN = 50
# A round of writes that took longer than this (many clients, a busy process)
# is followed by a pause as long as the round: the fan-out then takes at most
# about half of the event loop, requests are served meanwhile, and the jobs
# published during the pause go out together in the next round's frames.
PAUSE_AFTER_SECONDS = 0.02


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
    """This process's one subscription, shared by every connected client."""

    def __init__(self) -> None:
        # Equal filters are one key (JobFilter is a frozen dataclass).
        self.groups: dict[JobFilter, set[Client]] = {}
        self._filters: dict[Client, JobFilter] = {}
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[dict[str, Any]] | None = None

    @property
    def clients(self) -> set[Client]:
        return set(self._filters)

    @property
    def backlog(self) -> int:
        """Jobs received from the layer and not yet being written to clients."""
        return 0 if self._inbox is None else self._inbox.qsize()

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

    async def _run(self) -> None:
        # Reading the layer and writing to clients are two tasks, so that jobs
        # arriving while clients are written to wait here, ready to go out
        # together, rather than in the layer, one at a time.
        inbox = self._inbox = asyncio.Queue(settings.FANOUT_BACKLOG)
        writer = asyncio.create_task(self._write(inbox))
        try:
            await self._read(inbox)
        finally:
            writer.cancel()

    async def _read(self, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        layer = get_channel_layer()
        backoff = 0.1
        while True:
            try:
                channel = await layer.new_channel()
                await layer.group_add(layer_messages.ALL_JOBS, channel)
                self._subscribed.set()
                backoff = 0.1
                await self._receive(layer, channel, inbox)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Clients keep their sockets; what they miss meanwhile,
                # they recover with since= (the channel layer is at-most-once).
                logger.warning("fan-out lost the channel layer: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _receive(
        self, layer: Any, channel: str, inbox: asyncio.Queue[dict[str, Any]]
    ) -> None:
        loop = asyncio.get_running_loop()
        rejoin_at = loop.time() + REJOIN_SECONDS
        while True:
            try:
                # Not wait_for(): it runs the receive as a task of its own,
                # one turn of the loop per message, where this takes every
                # message the layer already holds without a turn.
                async with asyncio.timeout_at(rejoin_at):
                    message = await layer.receive(channel)
            except TimeoutError:
                await layer.group_add(layer_messages.ALL_JOBS, channel)
                rejoin_at = loop.time() + REJOIN_SECONDS
                continue
            for job in layer_messages.published_jobs(message):
                # A full inbox leaves the jobs behind it in the layer.
                await inbox.put(job)

    async def _write(self, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await inbox.get()]
            while len(jobs) < MAX_BATCH and not inbox.empty():
                jobs.append(inbox.get_nowait())
            started = loop.time()
            try:
                await self.dispatch(jobs)
            except Exception:
                # The next jobs must still go out.
                logger.exception("could not dispatch %d jobs", len(jobs))
            busy = loop.time() - started
            if busy > PAUSE_AFTER_SECONDS:
                await asyncio.sleep(busy)


def _wants(job_filter: JobFilter, job: dict[str, Any]) -> bool:
    """Whether a group wants a job: one match for the whole group."""
    return job_filter.is_empty or job_filter.matches(job)


_hubs: PerLoop[Hub] = PerLoop(Hub)


def hub() -> Hub:
    """This process's hub (one per event loop: tests run several loops)."""
    return _hubs.get()
