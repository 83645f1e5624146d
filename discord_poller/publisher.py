"""Publishing jobs through the gateway's own signed ``POST /job``. Django-free.

Jobs wait in a bounded in-memory buffer, one queue per channel, and each
channel's jobs are sent one at a time, in message order. When the gateway is
down, busy (429) or failing (5xx), the job stays at the head of its queue and
is tried again with backoff: restarts and retries are safe because the gateway
de-duplicates by ``message_id``. A job is dropped, and counted, only once it
has expired, when the gateway refuses it (another 4xx), or when the buffer is
full (the oldest job goes: it is the one closest to expiry).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import httpx

from discord_poller.cursor import snowflake_ms
from discord_poller.embeds import ParsedJob
from discord_poller.waits import run_until
from gateway_client.signing import signed_headers_v2

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY: Final = 10_000
MAX_TTL_SECONDS: Final = 86_400  # the contract's bound on ``ttl``
# Overflow is logged for the first drop and then every this many.
_OVERFLOW_LOG_EVERY: Final = 1000


@dataclass(frozen=True)
class PendingJob:
    """A parsed job waiting to be published, and when its message was posted."""

    payload: Mapping[str, Any]  # ``ParsedJob.as_payload()``, without ``ttl``
    channel_id: str
    message_id: str
    message_ms: int  # unix milliseconds, from the message's snowflake

    @classmethod
    def from_message(cls, job: ParsedJob, channel_id: str, message_id: str) -> Self:
        """The job of the message ``message_id`` (a snowflake) in ``channel_id``."""
        payload = job.as_payload()
        payload["channel"] = channel_id
        payload["message_id"] = message_id
        return cls(payload, channel_id, message_id, snowflake_ms(message_id))

    def expires_at(self, ttl_seconds: float) -> float:
        """Unix seconds at which the job is worthless: its TTL counts from the post."""
        return self.message_ms / 1000 + ttl_seconds

    def body(self, now: float, ttl_seconds: float) -> dict[str, Any]:
        """The ``POST /job`` body at ``now``; ``ttl`` is what is left of its life."""
        left = int(self.expires_at(ttl_seconds) - now)
        return {**self.payload, "ttl": min(max(left, 1), MAX_TTL_SECONDS)}


@dataclass
class PublisherStats:
    """Counters for the poller's status report."""

    published: int = 0  # 201: stored and queued by this publisher
    duplicates: int = 0  # 200: the gateway had it already
    retries: int = 0  # attempts that failed and will be made again
    dropped_expired: int = 0
    dropped_rejected: int = 0  # 4xx other than 429
    dropped_overflow: int = 0
    last_error: str | None = None
    last_published_at: float | None = None  # unix seconds
    last_latency_ms: float | None = None  # from the message's time to the 201


class Publisher:
    """Sends jobs to ``POST /job`` over one kept-open ``httpx.AsyncClient``.

    ``clock`` gives unix seconds; it decides expiry and signs the requests.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        hmac_secret: str,
        *,
        ttl_seconds: float,
        capacity: int = DEFAULT_CAPACITY,
        timeout: float = 5.0,
        retry_initial: float = 0.1,
        retry_max: float = 2.0,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._api_key = api_key
        self._secret = hmac_secret
        self._ttl = ttl_seconds
        self._capacity = capacity
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._clock = clock
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_keepalive_connections=20, keepalive_expiry=30),
            transport=transport,
        )
        self._queues: dict[str, deque[PendingJob]] = {}
        self._ready: dict[str, asyncio.Event] = {}
        self._inflight: dict[str, PendingJob] = {}
        self._failures: dict[str, int] = {}
        self._size = 0
        self.stats = PublisherStats()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; what is still buffered is lost."""
        await self._http.aclose()

    @property
    def size(self) -> int:
        """Jobs buffered, the ones being sent included."""
        return self._size

    def pending(self, channel_id: str) -> int:
        """Jobs buffered for one channel."""
        return len(self._queues.get(channel_id, ()))

    def submit(self, job: PendingJob) -> None:
        """Buffer ``job`` behind the earlier jobs of its channel; never blocks."""
        if self._size >= self._capacity:
            self._drop_oldest()
        self._queues.setdefault(job.channel_id, deque()).append(job)
        self._size += 1
        self._ready_event(job.channel_id).set()

    async def publish_next(self, channel_id: str) -> float | None:
        """Try once to publish the channel's oldest job.

        Return None when the channel has nothing left to send, 0.0 to go on at
        once, or the seconds to wait before trying again (gateway unavailable).
        """
        queue = self._queues.get(channel_id)
        if not queue:
            return None
        now = self._clock()
        self._drop_expired(queue, now)
        if not queue:
            return None
        job = queue[0]
        self._inflight[channel_id] = job
        try:
            request = self._http.build_request(
                "POST", "/job", json=job.body(now, self._ttl)
            )
            # Signature v2: this request, this body, once (docs/security.md).
            request.headers.update(
                signed_headers_v2(
                    self._api_key,
                    self._secret,
                    method=request.method,
                    target=request.url.raw_path.decode("ascii"),
                    body=request.content,
                    now=now,
                )
            )
            response = await self._http.send(request)
        except httpx.HTTPError as exc:
            reason = f"the gateway could not be reached ({type(exc).__name__})"
            return self._retry(channel_id, reason, None)
        finally:
            self._inflight.pop(channel_id, None)
        status = response.status_code
        if status == 429 or status >= 500:
            retry_after = _seconds(response.headers.get("retry-after"))
            return self._retry(
                channel_id, f"the gateway answered {status}", retry_after
            )
        self._remove(queue, job)
        if self._failures.pop(channel_id, 0):
            logger.info("the gateway takes jobs again (%d buffered)", self._size)
        if status == 201:
            self._published(job, response)
        elif status == 200:
            self.stats.duplicates += 1
            logger.info(
                "job %s channel %s message %s was published before",
                job.payload.get("job_id"),
                job.channel_id,
                job.message_id,
            )
        else:
            self.stats.dropped_rejected += 1
            self.stats.last_error = f"the gateway refused a job ({status})"
            logger.error(
                "the gateway refused job %s channel %s message %s: %s %s; dropped",
                job.payload.get("job_id"),
                job.channel_id,
                job.message_id,
                status,
                _error_text(response),
            )
        return 0.0

    async def run_channel(self, channel_id: str) -> None:
        """Publish the channel's jobs as they come, until cancelled."""
        ready = self._ready_event(channel_id)
        while True:
            delay = await self.publish_next(channel_id)
            if delay is None:
                ready.clear()
                await ready.wait()
            elif delay > 0:
                await asyncio.sleep(delay)  # cancelled at once on shutdown

    async def drain(self, timeout: float, stop: asyncio.Event | None = None) -> int:
        """Publish what is buffered, retrying, for at most ``timeout`` seconds.

        Returns how many jobs are left; ``stop`` ends the attempt early.
        """

        async def one(channel_id: str) -> None:
            while (delay := await self.publish_next(channel_id)) is not None:
                if delay > 0:
                    await asyncio.sleep(delay)

        channels = [one(channel) for channel in list(self._queues)]
        await run_until(stop or asyncio.Event(), *channels, timeout=timeout)
        return self._size

    # --- Bookkeeping ---------------------------------------------------------

    def _ready_event(self, channel_id: str) -> asyncio.Event:
        return self._ready.setdefault(channel_id, asyncio.Event())

    def _published(self, job: PendingJob, response: httpx.Response) -> None:
        now = self._clock()
        latency_ms = (now - job.message_ms / 1000) * 1000
        self.stats.published += 1
        self.stats.last_published_at = now
        self.stats.last_latency_ms = latency_ms
        stored = _json(response).get("job")
        logger.info(
            "published job %s (id %s) channel %s message %s: %.0f ms after the post",
            job.payload.get("job_id"),
            stored.get("id") if isinstance(stored, dict) else "?",
            job.channel_id,
            job.message_id,
            latency_ms,
        )

    def _retry(self, channel_id: str, reason: str, retry_after: float | None) -> float:
        failures = self._failures.get(channel_id, 0) + 1
        self._failures[channel_id] = failures
        self.stats.retries += 1
        self.stats.last_error = reason
        backoff = min(
            self._retry_max, self._retry_initial * 2.0 ** min(failures - 1, 30)
        )
        # Jitter: channels and restarted gateways do not meet in lockstep.
        delay = max(backoff * random.uniform(0.8, 1.0), retry_after or 0.0)
        if failures == 1:
            logger.warning(
                "%s; retrying channel %s with backoff (%d jobs buffered)",
                reason,
                channel_id,
                self._size,
            )
        return delay

    def _remove(self, queue: deque[PendingJob], job: PendingJob) -> None:
        if queue and queue[0] is job:
            queue.popleft()
            self._size -= 1

    def _drop_expired(self, queue: deque[PendingJob], now: float) -> None:
        # A channel's queue is in message order, so the expired jobs lead it.
        while queue and queue[0].expires_at(self._ttl) <= now:
            job = queue.popleft()
            self._size -= 1
            self.stats.dropped_expired += 1
            logger.warning(
                "job %s channel %s message %s expired before it could be "
                "published; dropped",
                job.payload.get("job_id"),
                job.channel_id,
                job.message_id,
            )

    def _drop_oldest(self) -> None:
        """Make room: drop the oldest buffered job that is not being sent."""
        victim: tuple[deque[PendingJob], int, PendingJob] | None = None
        for channel_id, queue in self._queues.items():
            sending = self._inflight.get(channel_id)
            for index in range(min(len(queue), 2)):
                if queue[index] is sending:
                    continue
                if victim is None or queue[index].message_ms < victim[2].message_ms:
                    victim = (queue, index, queue[index])
                break
        if victim is None:
            return  # every buffered job is being sent: let the buffer grow by one
        queue, index, job = victim
        del queue[index]
        self._size -= 1
        self.stats.dropped_overflow += 1
        if self.stats.dropped_overflow % _OVERFLOW_LOG_EVERY == 1:
            logger.warning(
                "the buffer is full (%d jobs): dropped job %s of channel %s; "
                "%d dropped so far",
                self._capacity,
                job.payload.get("job_id"),
                job.channel_id,
                self.stats.dropped_overflow,
            )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_text(response: httpx.Response) -> str:
    """The gateway's error code and detail (they never echo a secret)."""
    body = _json(response)
    code, detail = body.get("error"), body.get("detail")
    if isinstance(code, str):
        return f"{code}: {detail}" if isinstance(detail, str) else code
    return response.reason_phrase


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds; None when absent or not a number."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 3600 else None
