"""The Django admin for jobs: the list, its filters and search, the page, actions."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone
from pytest_django import Settings

from gateway_client.signing import signed_headers
from jobs.models import Job
from tests.stack import API_KEY, HMAC_SECRET, STACK

CHANGELIST = "/admin/jobs/job/"


pytestmark = pytest.mark.backends


@pytest.fixture
def staff(transactional_db: None, request: pytest.FixtureRequest) -> Client:
    """A logged-in superuser; transactional, so the API's threads see the rows."""
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    # No password: hashing one costs a second per test, and force_login needs none.
    user = User.objects.create(username="boss", is_staff=True, is_superuser=True)
    client = Client()
    client.force_login(user)
    return client


def make_job(**values: Any) -> Job:
    """A stored job, five minutes from expiry unless told otherwise."""
    values.setdefault("job_id", "job-1")
    values.setdefault("expires_at", timezone.now() + timedelta(minutes=5))
    return Job.objects.create(**values)


def api(method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A signed request to the real ASGI application, from this sync test."""
    from gateway_project.asgi import application

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost"
        ) as client:
            headers = signed_headers(API_KEY, HMAC_SECRET)
            return await client.request(method, path, headers=headers, **kwargs)

    return async_to_sync(send)()


def listed(client: Client, query: str = "") -> list[str]:
    """The job ids the changelist shows for ``query``."""
    response = client.get(CHANGELIST + query)
    assert response.status_code == 200
    return sorted(job.job_id for job in response.context["cl"].result_list)


def act(client: Client, action: str, *jobs: Job) -> str:
    """Run an admin action on ``jobs``; return the message it left."""
    response = client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [job.pk for job in jobs]},
        follow=True,
    )
    assert response.status_code == 200
    return " ".join(str(message) for message in response.context["messages"])


# --- The list -----------------------------------------------------------------


def test_needs_a_staff_login(transactional_db: None) -> None:
    response = Client().get(CHANGELIST)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")


def test_changelist_shows_status_ids_channel_and_age(staff: Client) -> None:
    make_job(
        job_id="0f8fad5b-d9cb",
        place_id=109983668079237,
        channel="1390012345678901234",
        created_at=timezone.now() - timedelta(hours=2, minutes=13),
    )
    make_job(job_id="stale-one", expires_at=timezone.now() - timedelta(seconds=1))
    page = staff.get(CHANGELIST).content.decode()
    headers = re.findall(r'<th scope="col"[^>]*>.*?</th>', page, re.S)
    header_text = " ".join(re.sub(r"<[^>]+>", " ", h) for h in headers).lower()
    for column in ("status", "job id", "place id", "channel", "age"):
        assert column in header_text
    for value in ("0f8fad5b-d9cb", "109983668079237", "1390012345678901234"):
        assert value in page
    # One unit, on one line: the list fits 1,280 px (tests/test_dashboard_browser.py).
    assert "2\xa0hours" in page
    assert "13\xa0minutes" not in page
    assert "queued" in page
    # A queued job past its expiry is shown for what it is.
    assert "expired (not yet swept)" in page


def test_the_list_takes_the_width_the_app_list_took(staff: Client) -> None:
    make_job()
    page = staff.get(CHANGELIST).content.decode()
    assert re.search(r'href="/static/jobs/admin(\.[0-9a-f]+)?\.css"', page)
    assert 'id="nav-sidebar"' not in page
    # Elsewhere the admin keeps its app list.
    assert 'id="nav-sidebar"' in staff.get("/admin/auth/user/").content.decode()


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("?status__exact=claimed", ["claimed"]),
        ("?status__exact=queued", ["discord", "queued"]),
        ("?source__exact=discord", ["discord"]),
        ("?channel__exact=1390012345678901234", ["discord"]),
    ],
)
def test_filters(staff: Client, query: str, expected: list[str]) -> None:
    make_job(job_id="queued")
    make_job(job_id="claimed", status=Job.Status.CLAIMED)
    make_job(job_id="discord", source="discord", channel="1390012345678901234")
    assert listed(staff, query) == expected


def test_search_by_job_id_and_message_id(staff: Client) -> None:
    make_job(job_id="aaa-111", message_id="1390098765432109876")
    make_job(job_id="bbb-222", message_id="1390098765432100000")
    assert listed(staff, "?q=aaa-111") == ["aaa-111"]
    assert listed(staff, "?q=1390098765432100000") == ["bbb-222"]
    assert listed(staff, "?q=nothing-like-it") == []


def test_change_page_shows_every_field_read_only(staff: Client) -> None:
    job = make_job(
        job_id="readable",
        title="Brainrot <Notify>",
        fields={"Name": "La Grande Combinasion", "Money": "$10M/s <b>"},
        message_id="1390098765432109876",
    )
    url = f"{CHANGELIST}{job.pk}/change/"
    page = staff.get(url).content.decode()
    for text in ("readable", "1390098765432109876", "La Grande Combinasion"):
        assert text in page
    # Shown, escaped, never interpreted.
    assert "Brainrot &lt;Notify&gt;" in page
    assert "$10M/s &lt;b&gt;" in page
    assert 'name="job_id"' not in page
    staff.post(url, {"job_id": "changed", "status": "claimed"})
    job.refresh_from_db()
    assert (job.job_id, job.status) == ("readable", Job.Status.QUEUED)


def test_jobs_cannot_be_added_here(staff: Client) -> None:
    assert staff.get(f"{CHANGELIST}add/").status_code == 403
    assert f"{CHANGELIST}add/" not in staff.get(CHANGELIST).content.decode()


# --- Actions ------------------------------------------------------------------


@pytest.mark.usefixtures("queue_backend")
def test_requeue_makes_a_job_claimable_again(staff: Client, settings: Settings) -> None:
    settings.JOB_TTL_SECONDS = 120
    job = make_job(
        job_id="again",
        status=Job.Status.CLAIMED,
        claimed_at=timezone.now(),
        claimed_by="203.0.113.7",
        expires_at=timezone.now() - timedelta(minutes=1),
    )
    assert "1 job(s) requeued" in act(staff, "requeue", job)
    job.refresh_from_db()
    assert job.status == Job.Status.QUEUED
    assert (job.claimed_at, job.claimed_by) == (None, None)
    fresh = job.expires_at - timezone.now()
    assert timedelta(seconds=110) < fresh <= timedelta(seconds=120)

    claimed = api("GET", "/job/next")
    assert claimed.status_code == 200, claimed.text
    assert claimed.json()["job"]["id"] == job.pk
    assert api("GET", "/job/next").status_code == 204


@pytest.mark.usefixtures("queue_backend")
def test_requeueing_a_waiting_job_does_not_hand_it_out_twice(staff: Client) -> None:
    posted = api("POST", "/job", json={"job_id": "waiting"}).json()["job"]
    job = Job.objects.get(pk=posted["id"])
    act(staff, "requeue", job)
    assert api("GET", "/job/next").json()["job"]["id"] == job.pk
    assert api("GET", "/job/next").status_code == 204


@pytest.mark.usefixtures("queue_backend")
def test_requeueing_an_expired_waiting_job_hands_it_out_once(
    staff: Client,
) -> None:
    posted = api("POST", "/job", json={"job_id": "late", "ttl": 1}).json()["job"]
    job = Job.objects.get(pk=posted["id"])
    # Its expiry passes while it still waits in the queue; then it is requeued.
    Job.objects.filter(pk=job.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    act(staff, "requeue", job)
    assert api("GET", "/job/next").json()["job"]["id"] == job.pk
    assert api("GET", "/job/next").status_code == 204
    job.refresh_from_db()
    assert job.status == Job.Status.CLAIMED


def test_a_requeued_job_goes_by_its_id_or_to_the_back_by_backend(
    staff: Client, queue_backend: str
) -> None:
    # README, "Admin": the database queue hands out the oldest id first; the
    # Redis queue appends the requeued job to its list.
    first, second, third = (
        api("POST", "/job", json={"job_id": name}).json()["job"]["id"]
        for name in ("first", "second", "third")
    )
    assert api("GET", "/job/next").json()["job"]["id"] == first
    act(staff, "requeue", Job.objects.get(pk=first))
    order = [api("GET", "/job/next").json()["job"]["id"] for _ in range(3)]
    if queue_backend == "database":
        assert order == [first, second, third]
    else:
        assert order == [second, third, first]
    assert api("GET", "/job/next").status_code == 204


@pytest.mark.usefixtures("queue_backend")
def test_expire_takes_a_job_out_of_the_queue(staff: Client) -> None:
    posted = api("POST", "/job", json={"job_id": "doomed"}).json()["job"]
    kept = api("POST", "/job", json={"job_id": "kept"}).json()["job"]
    job = Job.objects.get(pk=posted["id"])
    assert "1 job(s) expired" in act(staff, "expire", job)
    job.refresh_from_db()
    assert job.status == Job.Status.EXPIRED
    assert job.expires_at <= timezone.now()
    # Never handed out now: the next claim skips it.
    assert api("GET", "/job/next").json()["job"]["id"] == kept["id"]
    assert api("GET", "/job/next").status_code == 204
    job.refresh_from_db()
    assert job.status == Job.Status.EXPIRED


def test_expire_leaves_expired_jobs_alone(staff: Client) -> None:
    expired_at = timezone.now() - timedelta(hours=1)
    job = make_job(status=Job.Status.EXPIRED, expires_at=expired_at)
    assert "0 job(s) expired" in act(staff, "expire", job)
    job.refresh_from_db()
    assert job.expires_at == expired_at


# --- Leases -------------------------------------------------------------------


def test_the_list_and_the_page_show_a_lease_and_when_it_ends(staff: Client) -> None:
    posted = api("POST", "/job", json={"job_id": "held"}).json()["job"]
    leased = api("GET", "/job/next?lease=120")
    assert leased.status_code == 200, leased.text
    ends = timezone.localtime(Job.objects.get(pk=posted["id"]).lease_expires_at)
    shown = f"until {ends:%H:%M:%S}"
    page = staff.get(CHANGELIST).content.decode()
    assert shown in page and "Leased" in page
    assert listed(staff, "?status__exact=leased") == ["held"]
    detail = staff.get(f"{CHANGELIST}{posted['id']}/change/").content.decode()
    assert shown in detail


def test_requeue_ends_a_lease(staff: Client) -> None:
    posted = api("POST", "/job", json={"job_id": "held"}).json()["job"]
    token = api("GET", "/job/next?lease=120").json()["lease"]["token"]
    assert "1 job(s) requeued" in act(
        staff, "requeue", Job.objects.get(pk=posted["id"])
    )
    lost = api("POST", f"/job/{posted['id']}/ack", json={"lease": token})
    assert lost.status_code == 409, lost.text
    again = api("GET", "/job/next")
    assert again.json()["job"]["id"] == posted["id"]
