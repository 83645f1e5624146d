"""``python manage.py prunejobs``: retention. Schedule it (hourly is plenty)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from jobs import single_use
from jobs.retention import prune


class Command(BaseCommand):
    help = (
        "Mark expired jobs, delete jobs older than JOB_RETENTION_HOURS, and "
        "forget expired nonces and tickets."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        expired, deleted = prune()
        forgotten = single_use.prune()
        self.stdout.write(
            f"{expired} job(s) marked expired, {deleted} deleted; "
            f"{forgotten} expired nonce(s) and ticket(s) forgotten."
        )
