"""The admin dashboard (``/admin/dashboard/``): who may see it, what its JSON says,
and the first-delivery times (``Job.delivered_at``) behind its latency chart.

Requests go through the real ASGI application (``api``), so the admin's full
middleware stack and its session login are exercised as daphne serves them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from importlib import import_module
from typing import Any

import httpx
import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.apps import apps as django_apps
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client
from django.utils import timezone
from pytest_django import Settings

from discord_poller.status import StatusReporter
from gateway_project.asgi import application
from jobs import dashboard, deliveries
from jobs.models import Job
from jobs.queues import get_queue
from tests.stack import API_KEY, STACK

Sign = Callable[..., dict[str, str]]

DATA = "/admin/dashboard/data"
PAGE = "/admin/dashboard/"

pytestmark = pytest.mark.backends


@pytest.fixture(autouse=True)
def _fresh_state(request: pytest.FixtureRequest) -> Iterator[None]:
    # The Redis queue and client counts, rate-limit counts and this process's
    # memories outlive a test; each test here starts from nothing.
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    cache.clear()
    dashboard.forget()
    deliveries.forget()
    yield
    dashboard.forget()
    deliveries.forget()


def _user(name: str, *, staff: bool, can_view_jobs: bool) -> User:
    user = User.objects.create_user(name, password="x" * 16, is_staff=staff)
    if can_view_jobs:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label="jobs", codename="view_job")
        )
    return user


def _session_cookie(user: User) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies[django_settings.SESSION_COOKIE_NAME].value


async def log_in(
    api: httpx.AsyncClient, name: str, *, staff: bool = True, can_view_jobs: bool = True
) -> None:
    """Log ``api`` in as a new user, as the admin's login form would."""
    user = await sync_to_async(_user)(name, staff=staff, can_view_jobs=can_view_jobs)
    cookie = await sync_to_async(_session_cookie)(user)
    api.cookies.set(django_settings.SESSION_COOKIE_NAME, cookie)


async def publish(api: httpx.AsyncClient, sign: Sign, job_id: str) -> dict[str, Any]:
    response = await api.post("/job", json={"job_id": job_id}, headers=sign())
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()["job"]
    return job


async def claim(api: httpx.AsyncClient, sign: Sign) -> dict[str, Any]:
    response = await api.get("/job/next", headers=sign())
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()["job"]
    return job


async def data(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get(DATA)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert "no-cache" in response.headers["cache-control"]
    body: dict[str, Any] = response.json()
    return body


@sync_to_async
def stored(pk: int) -> Job:
    return Job.objects.get(pk=pk)


# --- Who may see it --------------------------------------------------------------


@pytest.mark.parametrize("path", [PAGE, DATA])
async def test_anonymous_is_sent_to_the_admin_login(
    api: httpx.AsyncClient, path: str
) -> None:
    response = await api.get(path)
    assert response.status_code == 302
    assert response.headers["location"].startswith(f"/admin/login/?next={path}")


@pytest.mark.parametrize("path", [PAGE, DATA])
async def test_non_staff_users_are_refused(api: httpx.AsyncClient, path: str) -> None:
    await log_in(api, "visitor", staff=False)
    response = await api.get(path)
    assert response.status_code == 302
    assert response.headers["location"].startswith("/admin/login/")


@pytest.mark.parametrize("path", [PAGE, DATA])
async def test_staff_without_the_job_permission_are_forbidden(
    api: httpx.AsyncClient, path: str
) -> None:
    await log_in(api, "intern", can_view_jobs=False)
    assert (await api.get(path)).status_code == 403


# --- The page --------------------------------------------------------------------


async def test_the_admin_index_links_to_the_dashboard(api: httpx.AsyncClient) -> None:
    await log_in(api, "operator")
    response = await api.get("/admin/")
    assert response.status_code == 200
    assert f'href="{PAGE}"' in response.text
    assert "/admin/jobs/job/" in response.text  # the default index, extended


async def test_the_index_shows_no_link_to_staff_who_may_not_see_it(
    api: httpx.AsyncClient,
) -> None:
    await log_in(api, "intern", can_view_jobs=False)
    response = await api.get("/admin/")
    assert response.status_code == 200
    assert PAGE not in response.text


# WhiteNoise hands Django a file iterator that is not async: Django warns, then
# serves it all the same.
@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous")
async def test_the_page_loads_its_scripts_from_this_server_only(
    api: httpx.AsyncClient,
) -> None:
    await log_in(api, "operator")
    response = await api.get(PAGE)
    assert response.status_code == 200
    html = response.text
    assert f'data-url="{DATA}"' in html
    assert 'data-job-url="/admin/jobs/job/0/change/"' in html
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
    # Hashed names (uPlot.iife.min.0123abcd.js) once collectstatic has run.
    assert any("/uPlot.iife.min." in asset for asset in assets), assets
    # No CDN: the admin must work offline.
    assert all(asset.startswith("/static/") for asset in assets), assets
    for asset in assets:
        served = await api.get(asset)
        assert served.status_code == 200, asset
        assert served.content


def test_the_vendored_files_survive_collectstatic(
    settings: Settings, tmp_path: Any
) -> None:
    # The deploy collects static files with the manifest storage, which
    # rewrites references inside CSS and JS and fails on a missing one.
    settings.STATIC_ROOT = tmp_path
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {
            "BACKEND": "django.contrib.staticfiles.storage.ManifestStaticFilesStorage"
        },
    }
    call_command("collectstatic", interactive=False, verbosity=0)
    collected = {path.name for path in (tmp_path / "jobs").rglob("*")}
    assert {"uPlot.iife.min.js", "dashboard.js", "dashboard.css"} <= collected


# --- The data --------------------------------------------------------------------


async def test_data_after_publishing_and_claiming(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    await log_in(api, "operator")
    empty = await data(api)
    assert empty["queue"] == {"backend": queue_backend, "depth": 0}
    assert empty["clients"] == {"process": 0, "total": 0}
    assert empty["latest_jobs"] == []
    assert empty["poller"] is None
    charts = empty["charts"]
    assert len(charts["minutes"]) == dashboard.CHART_MINUTES
    assert charts["minutes"] == sorted(charts["minutes"])
    assert {charts["minutes"][1] - charts["minutes"][0]} == {60}
    assert set(charts["published"]) == {0}
    for series in dashboard.LATENCY_SERIES:
        assert set(charts[series]) == {None}

    jobs = [await publish(api, sign, f"job-{n}") for n in range(3)]
    claimed = await claim(api, sign)
    assert claimed["id"] == jobs[0]["id"]
    dashboard.forget()  # the charts are cached for a few seconds
    body = await data(api)

    assert body["queue"]["depth"] == 2
    assert sum(body["charts"]["published"]) == 3
    latencies = [v for v in body["charts"]["latency_max_ms"] if v is not None]
    assert len(latencies) == 1 and latencies[0] >= 0  # one job delivered: claimed
    latest = body["latest_jobs"]
    assert [job["job_id"] for job in latest] == ["job-2", "job-1", "job-0"]
    assert [job["status"] for job in latest] == ["queued", "queued", "claimed"]
    assert [job["state"] for job in latest] == ["queued", "queued", "pulled"]
    assert [job["delivered_by"] for job in latest] == [None, None, "pull"]
    assert [job["latency_ms"] is None for job in latest] == [True, True, False]
    assert all(0 <= job["age_seconds"] < 60 for job in latest)
    assert set(latest[0]) == {
        "id",
        "job_id",
        "channel",
        "status",
        "delivered_by",
        "state",
        "age_seconds",
        "latency_ms",
    }


async def test_latest_jobs_are_the_newest_twenty_and_show_expiry_at_once(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    await log_in(api, "operator")
    for n in range(dashboard.LATEST_JOBS + 2):
        await publish(api, sign, f"job-{n}")
    await sync_to_async(Job.objects.filter(job_id="job-21").update)(
        expires_at=timezone.now() - timedelta(seconds=1)
    )
    latest = (await data(api))["latest_jobs"]
    assert len(latest) == dashboard.LATEST_JOBS
    assert latest[0]["job_id"] == "job-21"
    assert latest[0]["status"] == "expired"  # not yet swept, shown as it is
    assert latest[-1]["job_id"] == "job-2"


# --- How each job was delivered --------------------------------------------------


def test_a_job_s_state_says_how_it_was_delivered(transactional_db: None) -> None:
    now = timezone.now()
    first = now + timedelta(milliseconds=5)
    second = now + timedelta(seconds=1)
    lapsed = now - timedelta(seconds=1)
    claimed = {"status": Job.Status.CLAIMED, "claimed_by": "203.0.113.9"}
    rows: dict[str, dict[str, Any]] = {
        "waiting": {},
        "lapsed": {"expires_at": lapsed},
        "pushed": {"pushed_at": first, "delivered_at": first},
        "pushed-lapsed": {
            "pushed_at": first,
            "delivered_at": first,
            "expires_at": lapsed,
        },
        "pulled": {**claimed, "claimed_at": first, "delivered_at": first},
        "pushed-then-pulled": {
            **claimed,
            "pushed_at": first,
            "delivered_at": first,
            "claimed_at": second,
        },
        "pulled-then-pushed": {
            **claimed,
            "claimed_at": first,
            "delivered_at": first,
            "pushed_at": second,
        },
        # Pulled, then requeued in the admin (which clears claimed_at).
        "requeued": {"delivered_at": first},
    }
    for job_id, values in rows.items():
        values.setdefault("expires_at", now + timedelta(minutes=5))
        Job.objects.create(job_id=job_id, created_at=now, **values)
    client = Client()
    client.force_login(_user("operator", staff=True, can_view_jobs=True))

    response = client.get(DATA)

    assert response.status_code == 200
    latest = {job["job_id"]: job for job in response.json()["latest_jobs"]}
    shown = {
        job_id: (job["delivered_by"], job["state"]) for job_id, job in latest.items()
    }
    assert shown == {
        "waiting": (None, "queued"),
        "lapsed": (None, "expired"),
        "pushed": ("push", "pushed"),
        "pushed-lapsed": ("push", "pushed"),
        "pulled": ("pull", "pulled"),
        "pushed-then-pulled": ("both", "pushed + pulled"),
        "pulled-then-pushed": ("both", "pushed + pulled"),
        "requeued": ("pull", "pulled, requeued"),
    }
    # The queue's own status is still there: a pushed job waits to be pulled.
    assert latest["pushed"]["status"] == "queued"
    # A delivery time is never beside "queued".
    for job in latest.values():
        assert (job["latency_ms"] is None) == (job["delivered_by"] is None)
        assert job["latency_ms"] is None or job["state"] not in ("queued", "expired")
    assert latest["pushed"]["latency_ms"] == 5.0


@pytest.mark.usefixtures("layer")
async def test_pushed_pulled_and_both_through_the_gateway(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    await log_in(api, "operator")
    await publish(api, sign, "pulled")
    await claim(api, sign)  # no WebSocket client yet
    client = await ws_client()
    try:
        both = await publish(api, sign, "both")
        pushed = await publish(api, sign, "pushed")
        for job in (both, pushed):
            assert (await client.receive_json_from())["job"]["id"] == job["id"]
        assert (await claim(api, sign))["id"] == both["id"]
        await deliveries.flush()
    finally:
        await client.disconnect()
    await publish(api, sign, "waiting")

    latest = (await data(api))["latest_jobs"]

    shown = {job["job_id"]: (job["delivered_by"], job["state"]) for job in latest}
    assert shown == {
        "waiting": (None, "queued"),
        "pushed": ("push", "pushed"),
        "both": ("both", "pushed + pulled"),
        "pulled": ("pull", "pulled"),
    }
    assert {job["job_id"] for job in latest if job["latency_ms"] is None} == {"waiting"}


@sync_to_async
def make_job(
    job_id: str, created_at: datetime, delivered_after_ms: float | None
) -> None:
    delivered_at = (
        None
        if delivered_after_ms is None
        else created_at + timedelta(milliseconds=delivered_after_ms)
    )
    Job.objects.create(
        job_id=job_id,
        created_at=created_at,
        expires_at=created_at + timedelta(minutes=5),
        delivered_at=delivered_at,
    )


@pytest.mark.usefixtures("transactional_db")
async def test_charts_count_and_measure_by_minute_of_publishing() -> None:
    now = timezone.now().replace(second=30, microsecond=0)
    this_minute = now.replace(second=0)
    earlier = this_minute - timedelta(minutes=5)
    for n, ms in enumerate([10, 20, 30, 400]):
        await make_job(f"now-{n}", this_minute + timedelta(seconds=n), ms)
    await make_job("now-undelivered", this_minute, None)
    await make_job("earlier", earlier + timedelta(seconds=59), 5)
    # Published before the hour shown: counted nowhere.
    await make_job("old", this_minute - timedelta(minutes=60), 7)

    charts = await sync_to_async(dashboard.compute_charts)(now)

    minutes = charts["minutes"]
    assert minutes[-1] == int(this_minute.timestamp())
    assert minutes[0] == int((this_minute - timedelta(minutes=59)).timestamp())
    last, five_ago = -1, minutes.index(int(earlier.timestamp()))
    assert charts["published"][last] == 5
    assert charts["published"][five_ago] == 1
    assert sum(charts["published"]) == 6
    assert charts["latency_p50_ms"][last] == 25.0  # median of 10, 20, 30, 400
    assert charts["latency_p90_ms"][last] == 289.0  # 30 + 0.7 * (400 - 30)
    assert charts["latency_p99_ms"][last] == 388.9  # 30 + 0.97 * (400 - 30)
    assert charts["latency_max_ms"][last] == 400.0
    for series in dashboard.LATENCY_SERIES:
        assert charts[series][five_ago] == 5.0  # one job: every quantile is it
    others = [m for m in range(len(minutes)) if m not in (five_ago, len(minutes) - 1)]
    for series in dashboard.LATENCY_SERIES:
        assert {charts[series][m] for m in others} == {None}


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([7.0], 0.99, 7.0),
        ([1.0, 2.0, 3.0], 0.5, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 2.5),
        ([1.0, 2.0, 3.0, 4.0], 0.0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 1.0, 4.0),
        ([0.0, 10.0], 0.9, 9.0),
    ],
)
def test_percentiles_lie_between_neighbours(
    values: list[float], fraction: float, expected: float
) -> None:
    assert dashboard.percentile(values, fraction) == pytest.approx(expected)


@pytest.mark.usefixtures("transactional_db")
async def test_charts_are_cached_for_a_few_seconds() -> None:
    now = timezone.now()
    first = await sync_to_async(dashboard.charts)(now)
    await make_job("new", now, None)
    assert await sync_to_async(dashboard.charts)(now) is first
    dashboard.forget()
    assert sum((await sync_to_async(dashboard.charts)(now))["published"]) == 1


async def test_the_poller_panel(api: httpx.AsyncClient) -> None:
    await log_in(api, "operator")
    assert (await data(api))["poller"] is None  # no poller has reported
    report = {
        "state": "running",
        "discord": {
            "last_poll_at": "2026-11-28T17:00:00+00:00",
            "rate_limited": 2,
            "rate_limit_wait_seconds": 1.5,
            "last_error": "HTTP 502",
            "last_error_at": "2026-11-28T16:59:00+00:00",
        },
        "jobs": {"published": 7, "buffered": 0, "last_error": None},
    }
    assert await StatusReporter(lambda: report).write()
    poller = (await data(api))["poller"]
    assert poller == {
        "state": "running",
        "report_age_seconds": poller["report_age_seconds"],
        "stale": False,
        "last_poll_at": "2026-11-28T17:00:00+00:00",
        "last_error": "HTTP 502",
        "last_error_at": "2026-11-28T16:59:00+00:00",
        "rate_limited": 2,
        "rate_limit_wait_seconds": 1.5,
        "published": 7,
        "buffered": 0,
        "publish_error": None,
    }
    assert 0 <= poller["report_age_seconds"] < 5


async def test_a_silent_poller_is_stale(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await log_in(api, "operator")
    assert await StatusReporter(lambda: {"state": "running"}).write()
    monkeypatch.setattr(dashboard, "POLLER_STALE_SECONDS", -1.0)
    poller = (await data(api))["poller"]
    assert poller["stale"] is True
    assert poller["last_poll_at"] is None  # a report without the keys is shown too


async def test_a_queue_that_cannot_be_read_shows_as_unknown(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await log_in(api, "operator")

    async def broken(self: Any) -> int:
        raise ConnectionError("the queue's store is down")

    queue = type(get_queue())
    monkeypatch.setattr(queue, "depth", broken)
    assert (await data(api))["queue"]["depth"] is None


# --- First delivery: Job.delivered_at --------------------------------------------

KEY_HEADER = [(b"x-api-key", API_KEY.encode())]


@pytest.fixture
async def layer() -> AsyncIterator[None]:
    """The channel layer, emptied after the test, on the test's own loop."""
    yield
    await get_channel_layer().flush()


async def ws_client() -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, "/ws", headers=KEY_HEADER)
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "hello"
    return communicator


async def test_the_first_claim_records_the_delivery(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    job = await publish(api, sign, "pulled")
    assert (await stored(job["id"])).delivered_at is None
    await claim(api, sign)
    pulled = await stored(job["id"])
    assert pulled.delivered_at is not None
    assert pulled.delivered_at == pulled.claimed_at
    assert pulled.delivered_at >= pulled.created_at


async def test_a_claim_put_back_was_no_delivery(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    # The claimer went away before the job reached it (jobs.views puts it back).
    job = await publish(api, sign, "released")
    queue = get_queue()
    claimed = await queue.claim("203.0.113.9")
    assert claimed is not None and claimed["id"] == job["id"]
    assert (await stored(job["id"])).delivered_at is not None
    await queue.release(claimed)
    assert (await stored(job["id"])).delivered_at is None
    # A delivery before the claim is kept when the claim is put back.
    deliveries.sent(job)
    await deliveries.flush()
    pushed_at = (await stored(job["id"])).delivered_at
    assert pushed_at is not None
    claimed = await queue.claim("203.0.113.9")
    assert claimed is not None
    await queue.release(claimed)
    assert (await stored(job["id"])).delivered_at == pushed_at


async def test_a_push_after_a_claim_is_recorded_and_outlives_its_release(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    # The claim's answer and the broadcast's frame race: either may come first.
    job = await publish(api, sign, "raced")
    await claim(api, sign)  # noted in this process too
    deliveries.sent(job)
    await deliveries.flush()
    both = await stored(job["id"])
    assert both.pushed_at is not None and both.claimed_at is not None
    assert both.delivered_at == both.claimed_at <= both.pushed_at
    # The claim is put back (its client went away): the push still stands.
    await get_queue().release(job)
    released = await stored(job["id"])
    assert (released.status, released.claimed_at) == (Job.Status.QUEUED, None)
    assert released.delivered_at == released.pushed_at == both.pushed_at


def test_the_migration_fills_pushed_at_where_only_a_push_delivered(
    transactional_db: None,
) -> None:
    fill_pushed_at = import_module("jobs.migrations.0005_job_pushed_at").fill_pushed_at
    now = timezone.now()
    later = now + timedelta(seconds=1)
    rows = {
        "never": {},
        "pushed": {"delivered_at": now},
        "pushed-then-pulled": {"delivered_at": now, "claimed_at": later},
        "pulled": {"delivered_at": now, "claimed_at": now},
    }
    for job_id, values in rows.items():
        Job.objects.create(job_id=job_id, expires_at=later, **values)

    fill_pushed_at(django_apps, None)

    filled = dict(Job.objects.values_list("job_id", "pushed_at"))
    assert filled == {
        "never": None,
        "pushed": now,
        "pushed-then-pulled": now,
        "pulled": None,
    }


@pytest.mark.usefixtures("layer")
async def test_a_websocket_delivery_is_recorded_once_and_kept(
    api: httpx.AsyncClient,
    sign: Sign,
    queue_backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    written: list[int] = []
    write = deliveries._write

    async def counting(batch: dict[int, datetime]) -> None:
        written.extend(batch)
        await write(batch)

    monkeypatch.setattr(deliveries, "_write", counting)
    clients = [await ws_client(), await ws_client()]
    try:
        job = await publish(api, sign, "pushed")
        for client in clients:
            frame = await client.receive_json_from()
            assert frame["job"]["id"] == job["id"]
        await deliveries.flush()
        pushed = await stored(job["id"])
        assert pushed.delivered_at is not None
        assert pushed.delivered_at >= pushed.created_at
        # Two clients, one write; a later claim keeps the first delivery.
        assert written == [job["id"]]
        await claim(api, sign)
        claimed = await stored(job["id"])
        assert claimed.claimed_at is not None
        assert claimed.delivered_at == pushed.delivered_at < claimed.claimed_at
        # Sent again (another broadcast): nothing more is written.
        deliveries.sent(job)
        await deliveries.flush()
        assert written == [job["id"]]
    finally:
        for client in clients:
            await client.disconnect()


@pytest.mark.usefixtures("layer")
async def test_frames_never_wait_for_the_delivery_write(
    monkeypatch: pytest.MonkeyPatch, api: httpx.AsyncClient, sign: Sign
) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def stuck(batch: dict[int, datetime]) -> None:
        started.set()
        await release.wait()

    monkeypatch.setattr(deliveries, "FLUSH_DELAY_SECONDS", 0)
    monkeypatch.setattr(deliveries, "_write", stuck)
    client = await ws_client()
    try:
        first = await publish(api, sign, "first")
        assert (await client.receive_json_from())["job"]["id"] == first["id"]
        await asyncio.wait_for(started.wait(), 2)
        # The write of the first job hangs; the next job still goes out.
        second = await publish(api, sign, "second")
        frame = await client.receive_json_from(timeout=2)
        assert frame["job"]["id"] == second["id"]
    finally:
        release.set()
        await client.disconnect()


async def test_the_memory_of_recorded_jobs_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(deliveries, "MEMORY", 3)
    monkeypatch.setattr(deliveries, "FLUSH_DELAY_SECONDS", 60)  # no writes here
    created_at = timezone.now().isoformat()
    for job_id in range(1, 6):
        deliveries.sent({"id": job_id, "created_at": created_at})
    assert deliveries._pushed.ids == {3, 4, 5}
    assert list(deliveries._pushed.order) == [3, 4, 5]
    assert sorted(deliveries._pending) == [1, 2, 3, 4, 5]


@pytest.mark.usefixtures("transactional_db")
async def test_a_burst_is_written_in_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deliveries, "FLUSH_DELAY_SECONDS", 60)  # flushed below
    now = timezone.now()

    @sync_to_async
    def burst() -> list[int]:
        jobs = Job.objects.bulk_create(
            Job(job_id=f"burst-{n}", created_at=now, expires_at=now)
            for n in range(deliveries.BATCH + 1)
        )
        return [job.pk for job in jobs]

    ids = await burst()
    batches: list[int] = []
    write = deliveries._write

    async def counting(batch: dict[int, datetime]) -> None:
        batches.append(len(batch))
        await write(batch)

    monkeypatch.setattr(deliveries, "_write", counting)
    for pk in ids:
        deliveries.sent({"id": pk, "created_at": now.isoformat()})
    noted = dict(deliveries._pending)
    await deliveries.flush()
    assert batches == [deliveries.BATCH, 1]
    recorded = await sync_to_async(
        lambda: dict(Job.objects.filter(pk__in=ids).values_list("pk", "delivered_at"))
    )()
    assert recorded == noted  # each job its own moment
