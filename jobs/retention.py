"""Retention: expired jobs are marked, old ones deleted."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from jobs.models import Job


def prune() -> tuple[int, int]:
    """Mark queued jobs past expiry; delete jobs older than JOB_RETENTION_HOURS."""
    now = timezone.now()
    expired = Job.objects.filter(status=Job.Status.QUEUED, expires_at__lte=now).update(
        status=Job.Status.EXPIRED
    )
    cutoff = now - timedelta(hours=settings.JOB_RETENTION_HOURS)
    deleted, _ = Job.objects.filter(created_at__lt=cutoff).delete()
    return expired, deleted
