"""A separate process for the queue tests: fill the queue, or claim until empty.

    python -m tests.claimer seed COUNT      queue COUNT jobs, ids printed as JSON
    python -m tests.claimer claim NAME      claim until empty, ids printed as JSON

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
    command, argument = argv
    if command == "seed":
        print(json.dumps(seed(int(argument))))
    elif command == "claim":
        print(json.dumps(asyncio.run(claim_all(argument))))
    else:
        raise SystemExit(f"unknown command {command!r}")


def seed(count: int) -> list[int]:
    from datetime import timedelta

    from django.utils import timezone

    from jobs.models import Job
    from jobs.queues import get_queue

    now = timezone.now()
    jobs = Job.objects.bulk_create(
        Job(job_id=f"job-{n}", created_at=now, expires_at=now + timedelta(hours=1))
        for n in range(count)
    )
    queue = get_queue()
    for job in jobs:
        queue.enqueue(job)
    return [job.pk for job in jobs]


async def claim_all(name: str) -> list[int]:
    from jobs.queues import get_queue

    queue = get_queue()
    claimed = []
    while (job := await queue.claim(name)) is not None:
        claimed.append(job["id"])
    return claimed


if __name__ == "__main__":
    main(sys.argv[1:])
