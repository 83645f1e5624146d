"""``python manage.py prunejobs``: retention. Schedule it (hourly is plenty)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from jobs.retention import prune


class Command(BaseCommand):
    help = "Mark expired jobs, and delete jobs older than JOB_RETENTION_HOURS."

    def handle(self, *args: Any, **options: Any) -> None:
        expired, deleted = prune()
        self.stdout.write(f"{expired} job(s) marked expired, {deleted} deleted.")
