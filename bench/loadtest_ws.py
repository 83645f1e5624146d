"""The load test's WebSocket side: receipts per client, their tally, a client process.

Each client keeps, for every job of the phase, the time its first frame arrived
(one slot per job in a flat array of floats, NaN until it arrives) and counts
any second frame of the same job as a duplicate. At 1,000 clients and 6,000 jobs
that is 48 MB per phase, where keeping every frame would take gigabytes. Jobs of
a phase are named ``<prefix>-<number>``, so a frame's slot is read straight from
its ``job_id``, without parsing the rest of the JSON while the clock runs.

The clients of a phase run in one or more child processes (``ClientProcess``),
so that the work of reading 100,000 frames a second can use more than one core.
"""

from __future__ import annotations

import array
import asyncio
import math
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.common import run_async
from bench.fanout_client import (
    _OP_BINARY,
    _OP_CONTINUATION,
    _OP_TEXT,
    ClientPool,
    WsClient,
)

__all__ = [
    "ClientProcess",
    "Clients",
    "Connected",
    "Receipt",
    "Report",
    "WsTally",
    "job_name",
    "tally_ws",
]

# Every "job_id" of a job frame (one, or several in a batched frame) is a job's
# own: the phase's jobs carry no field of that name.
_JOB_ID = re.compile(rb'"job_id"\s*:\s*"([^"]{1,64})"')
CONNECT_TIMEOUT = 120.0
CLOSE_TIMEOUT = 5.0
_MISSING = math.nan


def job_name(prefix: str, number: int) -> str:
    """The ``job_id`` of job ``number`` of a phase."""
    return f"{prefix}-{number:06d}"


# --- What one client received ------------------------------------------------------


class Receipt:
    """One client's view of a phase: first arrival per job, and the anomalies.

    ``arrivals[n]`` is when job ``n`` first arrived (``time.time()``), NaN if it
    has not. ``duplicated`` counts frames of a job already received,
    ``foreign`` frames of a job not of this phase, ``other`` frames that are
    not jobs (hello, pong, error).
    """

    __slots__ = ("_jobs", "_prefix", "arrivals", "duplicated", "foreign", "other")

    def __init__(self, prefix: str, jobs: int) -> None:
        self._prefix = (prefix + "-").encode()
        self._jobs = jobs
        self.arrivals = array.array("d", [_MISSING]) * jobs
        self.duplicated = 0
        self.foreign = 0
        self.other = 0

    def record(self, arrived: float, payload: bytes) -> int:
        """File one text frame; how many of its jobs arrived for the first time."""
        found = _JOB_ID.findall(payload)
        if not found:
            self.other += 1
            return 0
        first = 0
        for job_id in found:
            slot = self._slot(job_id)
            if slot is None:
                self.foreign += 1
            elif not math.isnan(self.arrivals[slot]):
                self.duplicated += 1
            else:
                self.arrivals[slot] = arrived
                first += 1
        return first

    def _slot(self, job_id: bytes) -> int | None:
        if not job_id.startswith(self._prefix):
            return None
        digits = job_id[len(self._prefix) :]
        if not digits.isdigit():
            return None
        slot = int(digits)
        return slot if slot < self._jobs else None


@dataclass
class WsTally:
    """Delivery to every client of a phase, checked job by job."""

    clients: int = 0
    expected: int = 0
    delivered: int = 0
    missing: int = 0
    late: int = 0
    duplicated: int = 0
    unexpected: int = 0
    # Per job: how many reached every client, none, or only some. A job lost
    # before the fan-out (a channel layer dropping it) reaches none.
    jobs_to_all: int = 0
    jobs_to_none: int = 0
    jobs_to_some: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every expected frame exactly once, and nothing else."""
        return not (self.missing or self.duplicated or self.unexpected)


def tally_ws(
    receipts: Iterable[Receipt],
    sent_at: Sequence[float],
    *,
    expected: Iterable[int],
    uncertain: Iterable[int] = (),
    until: float = math.inf,
) -> WsTally:
    """Match every client's receipt against the jobs the server accepted.

    ``sent_at[n]`` is when job ``n`` was posted; ``expected`` the jobs the
    server accepted, which every client must receive exactly once;
    ``uncertain`` jobs (posted, no answer) may arrive or not. A frame arriving
    after ``until`` is ``late``: it counts as missing too. A frame of a job
    that was refused, or not of this phase at all, is ``unexpected``.
    """
    wanted = sorted(set(expected))
    allowed = set(wanted) | set(uncertain)
    result = WsTally()
    reached = dict.fromkeys(wanted, 0)
    for receipt in receipts:
        result.clients += 1
        result.expected += len(wanted)
        result.duplicated += receipt.duplicated
        result.unexpected += receipt.foreign
        arrivals = receipt.arrivals
        for slot, arrived in enumerate(arrivals):
            if not math.isnan(arrived) and slot not in allowed:
                result.unexpected += 1
        for slot in wanted:
            arrived = arrivals[slot]
            if math.isnan(arrived):
                result.missing += 1
            elif arrived > until:
                result.missing += 1
                result.late += 1
            else:
                result.delivered += 1
                reached[slot] += 1
                result.latencies_ms.append((arrived - sent_at[slot]) * 1000.0)
    for count in reached.values():
        if count == result.clients:
            result.jobs_to_all += 1
        elif count == 0:
            result.jobs_to_none += 1
        else:
            result.jobs_to_some += 1
    result.latencies_ms.sort()
    return result


# --- The client side ---------------------------------------------------------------


class LoadPool(ClientPool):
    """A ClientPool whose clients file their frames in receipts."""

    def __init__(
        self, host: str, port: int, *, prefix: str, jobs: int, batch: bool
    ) -> None:
        super().__init__(host, port, wait_for_hello=True, batch=batch)
        self.prefix = prefix
        self.jobs = jobs
        self.first_arrivals = 0
        self.client_type = LoadClient


class LoadClient(WsClient):
    """A WsClient that files each job frame in its receipt as it arrives."""

    def __init__(
        self, host: str, path: str, pool: ClientPool, *, wait_for_hello: bool
    ) -> None:
        super().__init__(host, path, pool, wait_for_hello=wait_for_hello)
        assert isinstance(pool, LoadPool)
        self.load_pool = pool
        self.receipt = Receipt(pool.prefix, pool.jobs)
        self._text: bytearray | None = None

    def _frame(self, opcode: int, fin: bool, payload: bytearray, now: float) -> None:
        if opcode in (_OP_TEXT, _OP_BINARY):
            self._text = bytearray(payload)
        elif opcode == _OP_CONTINUATION and self._text is not None:
            self._text += payload
        else:
            super()._frame(opcode, fin, payload, now)  # control frames
            return
        if not fin or self._text is None:
            return
        text, self._text = bytes(self._text), None
        if not self.ready.done():
            self.ready.set_result(None)  # the hello: the client is subscribed
            self.receipt.other += 1
        else:
            self.load_pool.first_arrivals += self.receipt.record(now, text)


# --- Messages between the load test and a client process ---------------------------


@dataclass(frozen=True)
class Connected:
    """A client process's clients are connected (or gave up)."""

    connected: int
    failures: dict[str, int]
    seconds: float


@dataclass(frozen=True)
class Report:
    """A client process's receipts, once told to stop."""

    receipts: list[Receipt]
    dropped: int
    cpu_seconds: float


@dataclass(frozen=True)
class Clients:
    """What a client process connects: ``count`` clients of one phase."""

    host: str
    port: int
    count: int
    prefix: str
    jobs: int
    batch: bool


def _serve(conn: Connection, clients: Clients) -> None:
    """A client process: connect, report progress on request, report, close."""
    _raise_file_limit(clients.count)
    run_async(_clients(conn, clients))


async def _clients(conn: Connection, clients: Clients) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[Any] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
    pool = LoadPool(
        clients.host,
        clients.port,
        prefix=clients.prefix,
        jobs=clients.jobs,
        batch=clients.batch,
    )
    seconds = await pool.connect(clients.count, timeout=CONNECT_TIMEOUT)
    conn.send(Connected(len(pool.clients), dict(pool.failures), seconds))
    while True:
        command = await commands.get()
        if command == "progress":
            conn.send(pool.first_arrivals)
        elif command == "stop":
            break
    loop.remove_reader(conn.fileno())
    # The event loop made the pipe non-blocking; a large report needs it blocking.
    os.set_blocking(conn.fileno(), True)
    dropped = sum(1 for client in pool.clients if client.closed.done())
    conn.send(
        Report(
            [
                client.receipt
                for client in pool.clients
                if isinstance(client, LoadClient)
            ],
            dropped,
            time.process_time(),
        )
    )
    await pool.close(timeout=CLOSE_TIMEOUT)


def _raise_file_limit(count: int) -> None:
    import resource

    needed = count + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class ClientProcess:
    """``count`` WebSocket clients of one phase, in a process of their own."""

    def __init__(self, clients: Clients) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve,
            args=(child, clients),
            name="loadtest-clients",
            daemon=True,
        )
        self.process.start()
        child.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    async def _ask(self, message: str | None, timeout: float) -> Any:
        if message is not None:
            self._conn.send(message)
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, self._conn.poll, timeout)
        if not ready:
            raise TimeoutError(f"the client process did not answer {message!r}")
        return self._conn.recv()

    async def connected(self) -> Connected:
        """Wait until its clients are connected (or have failed)."""
        answer = await self._ask(None, CONNECT_TIMEOUT + 60.0)
        assert isinstance(answer, Connected)
        return answer

    async def first_arrivals(self) -> int:
        """How many (client, job) frames have arrived so far, first copies only."""
        answer = await self._ask("progress", 30.0)
        assert isinstance(answer, int)
        return answer

    async def stop(self) -> Report:
        """Stop recording; return every receipt."""
        answer = await self._ask("stop", 120.0)
        assert isinstance(answer, Report)
        return answer

    def close(self) -> None:
        """Wait for the process to close its connections and exit."""
        self.process.join(CLOSE_TIMEOUT + 10.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        self._conn.close()


def split(total: int, parts: int) -> list[int]:
    """``total`` clients over ``parts`` processes, as evenly as possible."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]
