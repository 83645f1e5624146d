"""The ``/ws`` consumer (contract section 3): push every job, replay on reconnect."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal, TypedDict
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from gateway_client import signing
from jobs import groups, presence
from jobs.auth import client_ip
from jobs.db import in_db_thread
from jobs.models import Job
from jobs.payloads import CHANNEL_RE
from jobs.ratelimits import check_rate_limit
from jobs.responses import ApiError

logger = logging.getLogger(__name__)

# Clients only ever send pings; anything bigger is a mistake or an attack.
MAX_CLIENT_FRAME = 4096


class JobPublished(TypedDict):
    type: Literal["job.published"]
    job: dict[str, Any]


class HandshakeError(ValueError):
    """The handshake is refused (HTTP 403); the reason is logged, never sent."""


class JobConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    """One connected client: authorised before accept, then jobs as they come."""

    subscribed: list[str]
    replayed_up_to: int

    async def connect(self) -> None:
        self.subscribed = []
        self.replayed_up_to = 0
        try:
            query = _query(self.scope)
            await self._authorise(query)
            since = _since(query)
            channels = _channels(query)
        except (HandshakeError, ApiError) as exc:
            logger.info("WebSocket handshake refused: %s", exc)
            # Closing before accept() answers the handshake with HTTP 403.
            await self.close()
            return
        self.subscribed = [groups.for_channel(c) for c in channels] or [groups.ALL_JOBS]
        # Join first, then read the store: a job published meanwhile is then in
        # the replay, in the live stream, or both, never in neither.
        for group in self.subscribed:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await presence.connected()
        self.counted = True
        await self._send(
            {"type": "hello", "server_time": time.time(), "last_id": await _last_id()}
        )
        if since is not None:
            for job in await _replay(since, channels):
                await self._send({"type": "job", "job": job})
                self.replayed_up_to = job["id"]

    async def disconnect(self, code: int) -> None:
        for group in self.subscribed:
            await self.channel_layer.group_discard(group, self.channel_name)
        if getattr(self, "counted", False):
            self.counted = False
            await presence.disconnected()

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None
    ) -> None:
        if text_data is None:
            await self._error("bad_frame", "Send JSON text frames, not binary.")
            return
        if len(text_data) > MAX_CLIENT_FRAME:
            await self._error(
                "too_large", f"Frames are limited to {MAX_CLIENT_FRAME} bytes."
            )
            return
        try:
            message = json.loads(text_data)
        except ValueError:
            await self._error("bad_json", "The frame is not valid JSON.")
            return
        if isinstance(message, dict) and message.get("type") == "ping":
            await self._send({"type": "pong", "server_time": time.time()})
            return
        await self._error(
            "unknown_type", 'The only message clients send is {"type": "ping"}.'
        )

    async def job_published(self, event: JobPublished) -> None:
        job = event["job"]
        if job["id"] <= self.replayed_up_to:
            return  # already sent by the replay
        await self._send({"type": "job", "job": job})

    async def _authorise(self, query: dict[str, str]) -> None:
        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in self.scope.get("headers", [])
        }
        try:
            signing.check_api_key(
                headers.get("x-api-key") or query.get("api_key"), settings.API_KEYS
            )
            if settings.WS_REQUIRE_SIGNATURE:
                signing.check_signature(
                    headers.get("x-timestamp") or query.get("ts"),
                    headers.get("x-signature") or query.get("sig"),
                    settings.HMAC_SECRETS,
                    tolerance=settings.TIMESTAMP_TOLERANCE,
                )
        except signing.SignatureError as exc:
            raise HandshakeError(exc.code) from None
        client = self.scope.get("client") or (None, None)
        ip = client_ip(client[0], headers.get("x-forwarded-for"))
        await check_rate_limit(None, ip)

    async def _send(self, frame: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(frame, separators=(",", ":")))

    async def _error(self, code: str, detail: str) -> None:
        await self._send({"type": "error", "error": code, "detail": detail})


def _query(scope: dict[str, Any]) -> dict[str, str]:
    raw = scope.get("query_string", b"").decode("latin-1")
    try:
        parsed = parse_qs(raw, strict_parsing=bool(raw), max_num_fields=20)
    except ValueError:
        raise HandshakeError("malformed query string") from None
    return {name: values[-1] for name, values in parsed.items()}


def _since(query: dict[str, str]) -> int | None:
    raw = query.get("since")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise HandshakeError("since must be a job id")
    return int(raw)


def _channels(query: dict[str, str]) -> list[str]:
    raw = query.get("channels")
    if raw is None:
        return []
    channels = [c.strip() for c in raw.split(",")]
    if not channels or not all(CHANNEL_RE.fullmatch(c) for c in channels):
        raise HandshakeError("channels must be a comma-separated list of channel ids")
    return sorted(set(channels))


@in_db_thread
def _last_id() -> int | None:
    return Job.objects.order_by("-id").values_list("id", flat=True).first()


@in_db_thread
def _replay(since: int, channels: list[str]) -> list[dict[str, Any]]:
    # Bounded by design: only unexpired jobs, and those live minutes.
    jobs = Job.objects.filter(id__gt=since, expires_at__gt=timezone.now())
    if channels:
        jobs = jobs.filter(channel__in=channels)
    return [job.to_wire() for job in jobs.order_by("id")]
