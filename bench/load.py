"""Load generators: wrk for the request rate, aiohttp for publishing and draining.

Both sides of a comparison get the very same load, so only the server differs.
Every loop here is bounded by a count and by a deadline.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bench.common import API_KEY, HMAC_SECRET, Signer
from gateway_client.signing import signed_headers_v2

NEXT_PATH = "/job/next"
JOB_PATH = "/job"
_RESULT_MARK = "BENCH_RESULT "
# Header values go into a Lua string literal: allow nothing that needs escaping.
_SAFE_HEADER_VALUE = re.compile(r"[A-Za-z0-9_.:-]+")
# Prints wrk's figures as one JSON line after MARK (latencies in µs).
_DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'MARK{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,'
    .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\\n',
    summary.requests, summary.duration,
    latency:percentile(50.0), latency:percentile(99.0),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""
# Stop a phase early after this many failed requests: the figures are void.
_MAX_ERRORS = 100


# --- wrk: signed GET /job/next on an empty queue --------------------------------


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, latency and every kind of failure it counted."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        """Non-2xx answers, socket errors and timeouts: must be 0."""
        return sum(self.errors.values())


def wrk_available() -> str | None:
    """Why wrk cannot run here, or None if it can."""
    if shutil.which("wrk") is None:
        return "wrk is not installed (Debian: apt-get install wrk)"
    return None


def wrk_script(headers: dict[str, str]) -> str:
    """A wrk Lua script sending ``headers`` and printing its figures as JSON."""
    lines = ['wrk.method = "GET"']
    for name, value in headers.items():
        if not (
            _SAFE_HEADER_VALUE.fullmatch(name) and _SAFE_HEADER_VALUE.fullmatch(value)
        ):
            raise ValueError(f"header {name!r} is not safe to embed in Lua")
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    # done() runs once at the end, so it costs the load nothing.
    lines.append(_DONE_LUA.replace("MARK", _RESULT_MARK))
    return "\n".join(lines)


def run_wrk(
    base_url: str,
    headers: dict[str, str],
    *,
    duration: float,
    threads: int = 2,
    connections: int = 64,
) -> WrkResult:
    """``wrk -tT -cC -dDs`` on signed ``GET /job/next``."""
    reason = wrk_available()
    if reason:
        raise RuntimeError(reason)
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as scratch:
        script = Path(scratch) / "signed.lua"
        script.write_text(wrk_script(headers))
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--timeout", "5s",
            "-s", str(script),
            base_url + NEXT_PATH,
        ]  # fmt: skip
        completed = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    for line in completed.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            data = json.loads(line[len(_RESULT_MARK) :])
            break
    else:
        raise RuntimeError(
            f"wrk exited {completed.returncode} without figures:\n"
            f"{completed.stdout}\n{completed.stderr}"
        )
    errors = {
        "non-2xx": data["status"],
        "connect": data["connect"],
        "read": data["read"],
        "write": data["write"],
        "timeout": data["timeout"],
    }
    return WrkResult(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors={kind: count for kind, count in errors.items() if count},
    )


def probe_empty(base_url: str, signer: Signer) -> str | None:
    """None if ``GET /job/next`` says the queue is empty, else what it said.

    The contract's empty answer is 204; the seed's is ``200 {"job": null}``.
    """
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(
        parts.hostname or "", parts.port, timeout=10
    )
    try:
        connection.request("GET", NEXT_PATH, headers=signer.headers())
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status == 204 and not body:
        return None
    if response.status == 200 and json.loads(body) == {"job": None}:
        return None
    return f"HTTP {response.status} {body[:200]!r}"


# --- aiohttp: publish N jobs, then drain them with C clients --------------------


@dataclass
class Phase:
    """Requests made by a pool of clients: how many, how long, what failed."""

    count: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def fail(self, what: str) -> bool:
        """Count a failure; True while the phase may go on."""
        self.errors[what] += 1
        return sum(self.errors.values()) < _MAX_ERRORS


@dataclass
class Publish(Phase):
    """A publish: the ids the server queued, and those whose answer never came.

    A request cut off (deadline, connection error) may still have been stored,
    so its job may or may not turn up in the drain.
    """

    queued: list[str] = field(default_factory=list)
    unanswered: set[str] = field(default_factory=set)


@dataclass
class Drain(Phase):
    """A drain: the ``job_id`` of every job handed out, in the order received."""

    claimed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    """Whether every published job was claimed exactly once."""

    missing: int
    duplicated: int
    unexpected: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)

    def __str__(self) -> str:
        if self.ok:
            return "each job exactly once"
        return (
            f"{self.missing} never claimed, {self.duplicated} claimed twice or "
            f"more, {self.unexpected} never published"
        )


def check_exactly_once(
    published: Sequence[str],
    claimed: Sequence[str],
    *,
    uncertain: Iterable[str] = (),
) -> Verdict:
    """Compare what was published with what the drain received.

    ``uncertain`` jobs (their publish got no answer) may or may not be claimed,
    but never twice.
    """
    counts = Counter(claimed)
    expected = set(published)
    return Verdict(
        missing=len(expected - counts.keys()),
        duplicated=sum(1 for n in counts.values() if n > 1),
        unexpected=len(counts.keys() - expected - set(uncertain)),
    )


def _session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


async def publish(
    base_url: str,
    job_ids: Sequence[str],
    *,
    concurrency: int,
    deadline: float,
    signer: Signer | None = None,
) -> Publish:
    """``POST /job`` each id with ``concurrency`` clients."""
    signer = signer or Signer()
    phase = Publish()
    pending = iter(job_ids)
    url = base_url + JOB_PATH

    async def client(session: aiohttp.ClientSession) -> None:
        for job_id in pending:  # shared: each id is taken by one client only
            body = json.dumps({"job_id": job_id}).encode()
            headers = {**signer.headers(), "Content-Type": "application/json"}
            phase.unanswered.add(job_id)  # until the answer is read
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    answer = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not phase.fail(type(exc).__name__):
                    return
                continue
            phase.unanswered.discard(job_id)
            phase.count += 1
            # 201 from the gateway, 200 from the seed; both say queued: true.
            if status in (200, 201) and json.loads(answer).get("queued") is True:
                phase.queued.append(job_id)
            elif not phase.fail(f"HTTP {status}"):
                return

    await _run_clients(client, phase, concurrency, deadline)
    return phase


async def drain(
    base_url: str,
    *,
    clients: int,
    max_requests: int,
    deadline: float,
    signer: Signer | None = None,
) -> Drain:
    """``clients`` loops of ``GET /job/next``, each until the queue says empty."""
    signer = signer or Signer()
    phase = Drain()
    url = base_url + NEXT_PATH

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(max_requests):
            try:
                async with session.get(url, headers=signer.headers()) as response:
                    answer = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not phase.fail(type(exc).__name__):
                    return
                continue
            phase.count += 1
            if status == 204:
                return
            if status != 200:
                if not phase.fail(f"HTTP {status}"):
                    return
                continue
            job: dict[str, Any] | None = json.loads(answer).get("job")
            if job is None:  # the seed's "empty"
                return
            phase.claimed.append(job["job_id"])
        phase.fail("request limit reached before the queue was empty")

    await _run_clients(client, phase, clients, deadline)
    return phase


async def v2_requests(base_url: str, *, concurrency: int, duration: float) -> Phase:
    """``GET /job/next`` on an empty queue, each request signed v2 afresh.

    Every request carries a new nonce, so the server remembers one per request:
    what this measures beside the v1 rate is the cost of that store.
    """
    phase = Phase()
    url = base_url + NEXT_PATH
    stop = time.monotonic() + duration

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            headers = signed_headers_v2(
                API_KEY, HMAC_SECRET, method="GET", target=NEXT_PATH
            )
            try:
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not phase.fail(type(exc).__name__):
                    return
                continue
            phase.count += 1
            if status != 204 and not phase.fail(f"HTTP {status}"):
                return

    await _run_clients(client, phase, concurrency, stop + 30)
    return phase


async def _run_clients(
    client: Any, phase: Phase, concurrency: int, deadline: float
) -> None:
    """Run ``concurrency`` copies of ``client`` on one session; time them."""
    timeout = max(1.0, deadline - time.monotonic())
    async with _session(concurrency, timeout=min(timeout, 30.0)) as session:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(client(session) for _ in range(concurrency)))
        except TimeoutError:
            phase.fail("phase deadline passed")
        phase.seconds = time.perf_counter() - started
