"""A separate process for the queue tests: fill the queue, or claim until empty.

    python -m tests.claimer seed COUNT      queue COUNT jobs, ids printed as JSON
    python -m tests.claimer claim NAME      claim until empty, ids printed as JSON
    python -m tests.claimer claim NAME WHERE...   the same, for a filtered claimer

Seeded jobs have a ``Money`` field: every third one says ``10M``, the others
``1M`` (``where=money>=10M`` matches a third of them).

Configuration (DATABASE_URL, REDIS_URL, QUEUE_BACKEND) comes from the
environment, as for the gateway itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
    import django

    django.setup()
    command, argument, *where = argv
    if command == "seed":
        print(json.dumps(seed(int(argument))))
    elif command == "claim":
        print(json.dumps(asyncio.run(claim_all(argument, where))))
    else:
        raise SystemExit(f"unknown command {command!r}")


def seed(count: int) -> list[int]:
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import Job
    from jobs.numbers import numbers_from_fields
    from jobs.queues import get_queue

    now = timezone.now()
    fields = [{"Money": "10M" if n % 3 == 0 else "1M"} for n in range(count)]
    jobs = Job.objects.bulk_create(
        Job(
            job_id=f"job-{n}",
            fields=fields[n],
            numbers=numbers_from_fields(fields[n]),
            created_at=now,
            expires_at=now + timedelta(hours=1),
        )
        for n in range(count)
    )
    queue = get_queue()
    for job in jobs:
        queue.enqueue(job)
    return [job.pk for job in jobs]


async def claim_all(name: str, where: list[str]) -> list[int]:
    from jobs.filters import build_filter
    from jobs.queues import get_queue

    queue = get_queue()
    job_filter = build_filter(where, None, None, {})
    claimed = []
    while (job := await queue.claim(name, job_filter)) is not None:
        claimed.append(job["id"])
    return claimed


if __name__ == "__main__":
    main(sys.argv[1:])
