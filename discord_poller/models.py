"""The poller's last status report, for the gateway's ``/health``."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from django.db import models


class PollerStatus(models.Model):
    """One row, rewritten by the running poller about once a second.

    The poller is a process of its own; this row is how the gateway's processes
    learn how it is doing. ``report`` holds the poller's counters and states as
    JSON, so that adding one needs no migration.
    """

    SINGLETON_ID: ClassVar[int] = 1

    started_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    report = models.JSONField(default=dict)

    class Meta:
        verbose_name = "poller status"
        verbose_name_plural = "poller status"

    def __str__(self) -> str:
        return f"poller status at {self.updated_at:%Y-%m-%d %H:%M:%S}"

    def as_health(self, now: datetime) -> dict[str, Any]:
        """What ``/health`` shows: the report, and how old it is."""
        return {
            "report_age_seconds": round((now - self.updated_at).total_seconds(), 3),
            "updated_at": self.updated_at.isoformat(),
            "started_at": self.started_at.isoformat(),
            **self.report,
        }
