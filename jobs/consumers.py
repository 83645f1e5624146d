"""The ``/ws`` consumer (contract section 3): push every job, replay on reconnect.

``where=``, ``channels=`` and ``tier=`` in the handshake (docs/filters.md) narrow
both the live stream and the replay to the jobs the filter matches; ``batch=1``
lets several jobs share a frame (docs/realtime.md#batched-frames-batch1).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal, TypedDict
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError

from gateway_client import signing
from jobs import deliveries, fanout, logs, metrics, presence, tickets
from jobs.auth import client_ip, hold_refusal, remember_nonce, scope_target
from jobs.db import in_db_thread
from jobs.filters import MAX_CLAUSES, FilterError, JobFilter, requested_filter
from jobs.models import Job
from jobs.payloads import PayloadError, load_json
from jobs.ratelimits import check_rate_limit
from jobs.responses import ApiError

# autobahn drops a handshake not answered within daphne's
# --websocket_connect_timeout (5 s by default), so a refused one is held at
# most this long (plus its jitter, a quarter) to be answered before then.
HANDSHAKE_HOLD_CEILING = 3.0
# Clients only ever send pings; anything bigger is a mistake or an attack.
MAX_CLIENT_FRAME = 4096
# Room for every where= clause besides the handshake's other parameters.
MAX_QUERY_FIELDS = 20 + MAX_CLAUSES
# Replay reads the store this many jobs at a time, so a reconnect after a long
# absence never holds every unexpired job in memory at once.
REPLAY_BATCH = 500
# Only jobs published while the client connected can arrive live after their
# replay, and those are the newest replayed ones: remembering this many bounds
# the de-duplication memory of a long replay.
REPLAY_MEMORY = 1000

_SINCE_RE = re.compile(r"[0-9]{1,18}")


class HelloFrame(TypedDict):
    type: Literal["hello"]
    server_time: float
    last_id: int | None


class PongFrame(TypedDict):
    type: Literal["pong"]
    server_time: float


class ErrorFrame(TypedDict):
    type: Literal["error"]
    error: str
    detail: str


# Job frames are shaped in one place, jobs.fanout.job_frame and batch_frame.
Frame = HelloFrame | PongFrame | ErrorFrame


class HandshakeError(ValueError):
    """The handshake is refused (HTTP 403); the reason is logged, never sent."""


class JobConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """One connected client: authorised before accept, then jobs as they come."""

    # Served by gateway_project.server.websocket_consumer(): without Channels'
    # hop to its sync thread on every message, where the server seam allows.
    # Jobs reach the consumer from its process's hub, never through a channel
    # of its own: without a layer, Channels opens none (on redis-pubsub, one
    # Redis subscription per connection, refused handshakes included).
    channel_layer_alias = None

    job_filter: JobFilter  # empty: every job
    batched: bool  # several jobs may share a frame
    # What the server offers to send one framed copy to every client, if any.
    prepared_frames: fanout.PreparedFrames | None
    counted: bool
    attached: bool
    # Live jobs wait here until the replay is sent; then they flow directly.
    pending: list[fanout.Batch] | None
    # Ids sent by the replay, so that their live frames are not sent twice.
    # Ids are committed in order and the hub sends them in order, so a live
    # job at or below the newest replayed one was replayed; the set keeps the
    # check exact without relying on it. At or below replay_floor: all replayed.
    replayed: set[int]
    replay_floor: int

    async def connect(self) -> None:
        self.job_filter = JobFilter()
        self.batched = False
        extensions = self.scope.get("extensions") or {}
        self.prepared_frames = extensions.get(fanout.PREPARED_FRAMES)
        self.counted = False
        self.attached = False
        self.pending = []
        self.replayed = set()
        self.replay_floor = 0
        started = time.monotonic()
        rid = logs.begin(logs.scope_header(self.scope, b"x-request-id"))
        try:
            query = _query(self.scope)
            await self._authorise(query)
            since = _since(query)
            batched = _batched(query)
            job_filter = _filter(self.scope)
        except (HandshakeError, ApiError) as exc:
            # Closing before accept() answers the handshake with HTTP 403; why
            # is logged, in the access line, never sent.
            await self.close()
            logs.websocket_access(self.scope, 403, started, refused=str(exc))
            return
        self.job_filter = job_filter
        self.batched = batched
        # Subscribe first, then read the store: a job published meanwhile is
        # then in the replay, in the live stream, or both, never in neither.
        # The hub sends this client only the jobs its filter matches.
        await fanout.hub().attach(self, job_filter)
        self.attached = True
        await self.accept(headers=[(b"x-request-id", rid.encode())])
        logs.websocket_access(self.scope, 101, started)
        self.counted = True
        metrics.WEBSOCKET_CLIENTS.inc()
        await presence.connected()
        # The hub has read the newest id already (at its first subscription)
        # and follows every job since: a handshake needs no query of its own.
        hub = fanout.hub()
        last_id = hub.newest if hub.high is not None else await _last_id()
        await self._send(
            {"type": "hello", "server_time": time.time(), "last_id": last_id}
        )
        if since is not None:
            await self._replay(since)
        await self._go_live()

    async def disconnect(self, code: int) -> None:
        # The count first: leaving a group can fail (Redis down), counting cannot.
        if self.attached:
            self.attached = False
            fanout.hub().detach(self)
        if self.counted:
            self.counted = False
            metrics.WEBSOCKET_CLIENTS.dec()
            await presence.disconnected()

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        if text_data is None:
            await self._error("bad_frame", "Send JSON text frames, not binary.")
            return
        if len(text_data.encode()) > MAX_CLIENT_FRAME:
            await self._error(
                "too_large", f"Frames are limited to {MAX_CLIENT_FRAME} bytes."
            )
            return
        try:
            message = load_json(text_data, what="frame")
        except PayloadError as exc:
            await self._error(exc.code, exc.detail)
            return
        if isinstance(message, dict) and message.get("type") == "ping":
            await self._send({"type": "pong", "server_time": time.time()})
            return
        await self._error(
            "unknown_type", 'The only message clients send is {"type": "ping"}.'
        )

    async def deliver(self, batch: fanout.Batch) -> None:
        """Jobs this client's filter matches, from the fan-out hub (jobs.fanout)."""
        if self.pending is not None:
            self.pending.append(batch)
            return
        await self._send_live(batch)

    async def _go_live(self) -> None:
        # No await between the last pending batch and going live, so no job
        # can slip in behind the list or overtake it.
        while self.pending:
            await self._send_live(self.pending.pop(0))
        self.pending = None

    async def _send_live(self, batch: fanout.Batch) -> None:
        # Runs once per client for every batch: the common case (nothing
        # replayed that the batch could repeat) costs no per-job work.
        if not self.replayed and batch.lowest_id > self.replay_floor:
            jobs = batch.jobs
        else:
            jobs = [job for job in batch.jobs if self._is_new(job["id"])]
        if not jobs:
            return
        if len(jobs) < len(batch.jobs):
            for frame in self._frames(jobs):
                await self.send(text_data=frame)
        elif self.prepared_frames is not None:  # the batch's frames, framed once
            for prepared in batch.prepared(self.batched, self.prepared_frames):
                self.prepared_frames.send(prepared)
        else:
            for frame in [batch.frame()] if self.batched else batch.frames():
                await self.send(text_data=frame)
        if jobs is batch.jobs:
            if batch.sent:
                return
            batch.sent = True  # the batch's first client notes it for all
        for job in jobs:
            deliveries.sent(job)  # the dashboard's and the metric's

    def _is_new(self, job_id: int) -> bool:
        """Whether a live job was not replayed to this client already."""
        if job_id <= self.replay_floor:
            return False  # replayed, or too old to be in flight
        if job_id in self.replayed:
            self.replayed.discard(job_id)  # each job arrives live at most once
            return False
        return True

    def _frames(self, jobs: list[dict[str, Any]]) -> list[str]:
        if not self.batched:
            return [fanout.job_frame(job) for job in jobs]
        return [
            fanout.batch_frame(jobs[start : start + fanout.MAX_BATCH])
            for start in range(0, len(jobs), fanout.MAX_BATCH)
        ]

    async def _replay(self, since: int) -> None:
        # The client has seen since: a live frame for it (or older) that was
        # still on its way from another process when the client attached is
        # not sent again.
        self.replay_floor = since
        cursor = since
        job_filter = self.job_filter
        while True:
            batch = await _replay_batch(cursor, job_filter.channels)
            wanted = [job for job in batch if _wants(job_filter, job)]
            for frame in self._frames(wanted):
                await self.send(text_data=frame)
            for job in wanted:
                deliveries.sent(job, replayed=True)
            self._remember([job["id"] for job in wanted])
            if len(batch) < REPLAY_BATCH:
                return
            cursor = batch[-1]["id"]

    def _remember(self, ids: list[int]) -> None:
        self.replayed.update(ids)
        if len(self.replayed) > 2 * REPLAY_MEMORY:
            kept = sorted(self.replayed)[-REPLAY_MEMORY:]
            self.replay_floor = kept[0] - 1
            self.replayed = set(kept)

    async def _authorise(self, query: dict[str, str]) -> None:
        """A ticket from ``POST /ws/ticket``, or the key (and signature if required).

        v2 signs the handshake as ``GET``, its path and query as sent, and an
        empty body; v2 rides in headers only (docs/security.md).
        """
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in self.scope.get("headers", [])
        }
        client = self.scope.get("client") or (None, None)
        ip = client_ip(client[0], headers.get("x-forwarded-for"))
        try:
            if "ticket" in query:
                await tickets.redeem(query["ticket"])
            else:
                await self._check_credentials(headers, query, ip)
        except signing.SignatureError as exc:
            await hold_refusal(ip, at_most=HANDSHAKE_HOLD_CEILING)
            raise HandshakeError(exc.code) from None
        except tickets.TicketRefused as exc:
            await hold_refusal(ip, at_most=HANDSHAKE_HOLD_CEILING)
            raise HandshakeError(str(exc)) from None
        except (RedisError, OSError) as exc:
            raise HandshakeError(f"the store is unavailable: {exc}") from None
        await check_rate_limit(None, ip)

    async def _check_credentials(
        self, headers: dict[str, str], query: dict[str, str], ip: str
    ) -> None:
        # Clients that cannot set headers put the v1 values in the query.
        offered = {
            "x-api-key": headers.get("x-api-key") or query.get("api_key"),
            "x-timestamp": headers.get("x-timestamp") or query.get("ts"),
            "x-signature": headers.get("x-signature") or query.get("sig"),
            "x-signature-version": headers.get("x-signature-version"),
            "x-nonce": headers.get("x-nonce"),
        }
        if not settings.WS_REQUIRE_SIGNATURE:
            signing.check_api_key(offered["x-api-key"], settings.API_KEYS)
            return
        verified = signing.verify_request(
            {name: value for name, value in offered.items() if value is not None},
            method="GET",
            target=scope_target(self.scope),
            api_keys=settings.API_KEYS,
            secrets=settings.HMAC_SECRETS,
            tolerance=settings.TIMESTAMP_TOLERANCE,
            require_v2=settings.REQUIRE_SIGNATURE_V2,
        )
        try:
            await remember_nonce(verified, ip, at_most=HANDSHAKE_HOLD_CEILING)
        except ApiError as exc:
            raise HandshakeError(exc.code) from None

    async def _send(self, frame: Frame) -> None:
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def _error(self, code: str, detail: str) -> None:
        await self._send({"type": "error", "error": code, "detail": detail})


def _query(scope: dict[str, Any]) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    try:
        # Blank values kept: "since=" is malformed, not absent.
        parsed = parse_qs(
            raw,
            keep_blank_values=True,
            strict_parsing=bool(raw),
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except ValueError:
        raise HandshakeError("malformed query string") from None
    return {name: values[-1] for name, values in parsed.items()}


def _since(query: dict[str, str]) -> int | None:
    raw = query.get("since")
    if raw is None:
        return None
    # ASCII only: str.isdigit() also accepts "²", which int() refuses.
    if not _SINCE_RE.fullmatch(raw):
        raise HandshakeError("since must be a job id")
    return int(raw)


def _batched(query: dict[str, str]) -> bool:
    raw = query.get("batch", "0")
    if raw not in ("0", "1"):
        raise HandshakeError("batch must be 0 or 1")
    return raw == "1"


def _filter(scope: dict[str, Any]) -> JobFilter:
    """The handshake's filter; every ``where=`` counts, not only the last."""
    raw = scope.get("query_string", b"").decode("latin-1")
    # Well-formed already: _query() has read this string.
    params = parse_qs(raw, keep_blank_values=True)
    try:
        return requested_filter(
            params.get("where", []),
            params["channels"][-1] if "channels" in params else None,
            params["tier"][-1] if "tier" in params else None,
        )
    except FilterError as exc:
        raise HandshakeError(f"bad filter: {exc}") from None


def _wants(job_filter: JobFilter, job: dict[str, Any]) -> bool:
    return job_filter.is_empty or job_filter.matches(job)


@in_db_thread
def _last_id() -> int | None:
    return Job.objects.order_by("-id").values_list("id", flat=True).first()


@in_db_thread
def _replay_batch(after: int, channels: frozenset[str] | None) -> list[dict[str, Any]]:
    # Bounded by design: only unexpired jobs, and a batch of them at a time.
    # Channels are narrowed here; the rest of the filter by the caller.
    jobs = Job.objects.filter(id__gt=after, expires_at__gt=timezone.now())
    if channels is not None:
        jobs = jobs.filter(channel__in=sorted(channels))
    return [job.to_wire() for job in jobs.order_by("id")[:REPLAY_BATCH]]


class NoSuchPathConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """A handshake to any path but ``/ws``: refused with a 403, in one access line.

    Channels' router would raise for a path it has no route for, and daphne
    log that as an error with its traceback, for every stray or hostile
    handshake.
    """

    async def connect(self) -> None:
        logs.websocket_access(self.scope, 403, time.monotonic(), refused="no such path")
        await self.close()
