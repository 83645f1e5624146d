"""The job store: every published job, kept for the admin and for replay."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.db import models
from django.utils import timezone


class Job(models.Model):
    """One Roblox server job, as published, with where it stands in the queue."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        CLAIMED = "claimed"
        # Held by a worker's lease (GET /job/next?lease=S) until it is acked
        # (then claimed), released or runs out (then queued again, or expired).
        LEASED = "leased"
        EXPIRED = "expired"

    job_id = models.CharField("job id", max_length=64)
    place_id = models.BigIntegerField(null=True, blank=True)
    channel = models.CharField(max_length=64, default="api")
    source = models.CharField(max_length=32, default="api")
    # NULL, not "", for "none": unique must allow many jobs without a message,
    # and the contract tells null from an empty title.
    message_id = models.CharField(max_length=64, null=True, blank=True, unique=True)
    title = models.CharField(max_length=256, null=True, blank=True)  # noqa: DJ001
    fields = models.JSONField(default=dict, blank=True)
    # What the fields state as numbers (jobs.numbers), read once at publish so
    # that every claim, push and replay filters on it without re-parsing.
    numbers = models.JSONField(default=dict, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.GenericIPAddressField(null=True, blank=True)
    # When a client first had the job (its claim or its first WebSocket frame,
    # whichever came first): the dashboard's delivery latency. Set once, by the
    # queue and the consumer only, hence not editable in the admin.
    delivered_at = models.DateTimeField(null=True, blank=True, editable=False)
    # When a WebSocket client first had the job, whether or not a claim came
    # first: with ``claimed_at``, the dashboard tells pushed, pulled and both.
    pushed_at = models.DateTimeField(null=True, blank=True, editable=False)
    # The lease a worker holds on a leased job (jobs.leases): its token and
    # when it runs out (never after expires_at). Both empty in any other status.
    lease_token = models.CharField(  # noqa: DJ001
        max_length=64, null=True, blank=True, editable=False
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-id"]
        indexes = [
            # The claim query: the oldest queued job, nothing else scanned.
            models.Index(
                fields=["id"],
                condition=models.Q(status="queued"),
                name="job_queued_idx",
            ),
            # De-duplication by job_id within a time window.
            models.Index(fields=["job_id", "created_at"], name="job_dedup_idx"),
            # The admin's filters, and retention's range delete.
            models.Index(fields=["created_at"], name="job_created_idx"),
            models.Index(fields=["channel", "id"], name="job_channel_idx"),
            models.Index(fields=["status", "id"], name="job_status_idx"),
            # The sweep for leases that ran out: leased jobs only.
            models.Index(
                fields=["lease_expires_at"],
                condition=models.Q(status="leased"),
                name="job_lease_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.job_id} (#{self.pk})"

    @property
    def is_expired(self) -> bool:
        return self.expires_at <= timezone.now()

    def to_wire(self) -> dict[str, Any]:
        """The job as clients receive it (contract section 4)."""
        return {
            "id": self.pk,
            "job_id": self.job_id,
            "place_id": self.place_id,
            "channel": self.channel,
            "source": self.source,
            "message_id": self.message_id,
            "title": self.title,
            "fields": self.fields,
            "numbers": self.numbers,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
        }


def _iso(moment: datetime) -> str:
    # Milliseconds and a Z, as in the contract's example.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class SingleUse(models.Model):
    """A value good once within its lifetime: a v2 nonce or a WebSocket ticket.

    The store of ``jobs.single_use`` when there is no Redis: the primary key makes
    "first to ask wins" one statement, and rows are kept until they expire, so
    no traffic evicts them and a restart forgets none.
    """

    key = models.CharField(max_length=160, primary_key=True)
    value = models.CharField(max_length=64)
    # Unix time, as the callers count lifetimes in seconds. Not indexed: the
    # once-a-minute prune scans the table in a worker thread, and every v2
    # request's write is cheaper for it.
    expires_at = models.FloatField()

    def __str__(self) -> str:
        return self.key.partition(":")[0]
