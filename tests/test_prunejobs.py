"""``manage.py prunejobs``: expired jobs marked, old jobs and used-up nonces deleted."""

from __future__ import annotations

import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone
from pytest_django import Settings

from jobs.models import Job, SingleUse

pytestmark = [pytest.mark.backends, pytest.mark.django_db]


def make_job(job_id: str, *, age: timedelta, ttl: timedelta, **values: object) -> Job:
    created = timezone.now() - age
    return Job.objects.create(
        job_id=job_id, created_at=created, expires_at=created + ttl, **values
    )


def prune() -> str:
    out = StringIO()
    call_command("prunejobs", stdout=out)
    return out.getvalue()


def test_marks_expired_queued_jobs_and_leaves_the_rest() -> None:
    minute = timedelta(minutes=1)
    stale = make_job("stale", age=10 * minute, ttl=5 * minute)
    waiting = make_job("waiting", age=minute, ttl=5 * minute)
    claimed = make_job(
        "claimed", age=10 * minute, ttl=5 * minute, status=Job.Status.CLAIMED
    )
    assert prune().startswith("1 job(s) marked expired, 0 deleted;")
    statuses = {
        job.job_id: job.status
        for job in Job.objects.filter(pk__in=[stale.pk, waiting.pk, claimed.pk])
    }
    assert statuses == {
        "stale": Job.Status.EXPIRED,
        "waiting": Job.Status.QUEUED,
        "claimed": Job.Status.CLAIMED,  # a claim is history, not a queued job
    }


def test_deletes_jobs_older_than_the_retention(settings: Settings) -> None:
    settings.JOB_RETENTION_HOURS = 2
    hour = timedelta(hours=1)
    make_job("old-claimed", age=3 * hour, ttl=hour, status=Job.Status.CLAIMED)
    make_job("old-queued", age=3 * hour, ttl=hour)
    make_job("young", age=hour, ttl=hour / 2, status=Job.Status.EXPIRED)
    make_job("new", age=timedelta(0), ttl=hour)
    assert ", 2 deleted;" in prune()
    assert sorted(Job.objects.values_list("job_id", flat=True)) == ["new", "young"]


def test_default_retention_is_24_hours() -> None:
    make_job("older", age=timedelta(hours=24, minutes=1), ttl=timedelta(minutes=5))
    make_job("younger", age=timedelta(hours=23, minutes=59), ttl=timedelta(minutes=5))
    prune()
    assert list(Job.objects.values_list("job_id", flat=True)) == ["younger"]


def test_forgets_expired_nonces_and_tickets() -> None:
    now = time.time()
    SingleUse.objects.create(key="nonce:old", value="1", expires_at=now - 1)
    SingleUse.objects.create(key="nonce:live", value="1", expires_at=now + 60)
    assert prune().endswith("; 1 expired nonce(s) and ticket(s) forgotten.\n")
    assert list(SingleUse.objects.values_list("key", flat=True)) == ["nonce:live"]


def test_nothing_to_do() -> None:
    assert prune() == (
        "0 job(s) marked expired, 0 deleted; "
        "0 expired nonce(s) and ticket(s) forgotten.\n"
    )
