"""Error answers (contract sections 2 and 5): always JSON, whatever went wrong."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError
from pytest_django import Settings
from redis.exceptions import ConnectionError as RedisConnectionError

from jobs import services
from jobs.models import Job
from jobs.queues import DatabaseQueue, RedisQueue
from testkit.servers import free_port
from tests.conftest import assert_error

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("empty_redis")]

Sign = Callable[..., dict[str, str]]

count_jobs = sync_to_async(Job.objects.count)


@pytest.fixture(params=[False, True], ids=["debug-off", "debug-on"])
def debug(request: pytest.FixtureRequest, settings: Settings) -> bool:
    """Run the test with DEBUG off and on: the API answers JSON either way."""
    settings.DEBUG = request.param
    return bool(request.param)


@pytest.mark.usefixtures("debug")
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/job/"),
        ("GET", "/jobs"),
        ("POST", "/job/next/extra"),
        ("DELETE", "/health/"),
        ("GET", "/%FF"),
        ("GET", "/admin"),
    ],
)
async def test_unknown_path_is_404_without_a_signature(
    api: httpx.AsyncClient, method: str, path: str
) -> None:
    assert_error(await api.request(method, path), 404, "not_found")


async def test_unknown_path_is_404_when_signed_too(
    api: httpx.AsyncClient, sign: Sign
) -> None:
    assert_error(await api.get("/nope", headers=sign()), 404, "not_found")


@pytest.mark.usefixtures("debug")
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/job", "POST"),
        ("PUT", "/job", "POST"),
        ("POST", "/job/next", "GET"),
        ("DELETE", "/health", "GET"),
        ("OPTIONS", "/job", "POST"),
    ],
)
async def test_wrong_method_is_405_after_the_signature(
    api: httpx.AsyncClient, sign: Sign, method: str, path: str, allowed: str
) -> None:
    unsigned = await api.request(method, path)
    assert_error(unsigned, 401, "missing_api_key")
    signed = await api.request(method, path, headers=sign())
    assert_error(signed, 405, "method_not_allowed")
    assert signed.headers["allow"] == allowed


@pytest.mark.usefixtures("debug")
async def test_unexpected_failure_is_500_json_without_details(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError("internal secret detail")

    monkeypatch.setattr(services, "publish", broken)
    response = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert_error(response, 500, "internal_error")
    assert "secret detail" not in response.text
    assert "Traceback" not in response.text


async def test_database_failure_while_claiming_is_503(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down(self: object, *args: object, **kwargs: object) -> NoReturn:
        raise OperationalError("could not connect to server")

    monkeypatch.setattr(DatabaseQueue, "claim", down)
    monkeypatch.setattr(RedisQueue, "claim", down)
    response = await api.get("/job/next", headers=sign())
    assert_error(response, 503, "unavailable")
    assert response.headers["retry-after"].isdigit()
    assert "could not connect" not in response.text


@pytest.mark.parametrize(
    "error", [OperationalError("database is gone"), RedisConnectionError("refused")]
)
async def test_failure_to_queue_stores_nothing(
    api: httpx.AsyncClient,
    sign: Sign,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
) -> None:
    def down(self: object, job: Job) -> NoReturn:
        raise error

    monkeypatch.setattr(DatabaseQueue, "enqueue", down)
    monkeypatch.setattr(RedisQueue, "enqueue", down)
    response = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert_error(response, 503, "unavailable")
    assert await count_jobs() == 0


async def test_redis_down_is_503_and_stores_nothing(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    # A real outage: nothing listens on this port.
    settings.QUEUE_BACKEND = "redis"
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    post = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert_error(post, 503, "unavailable")
    assert await count_jobs() == 0
    assert_error(await api.get("/job/next", headers=sign()), 503, "unavailable")


@pytest.mark.parametrize("path", ["/healthz", "/job/next", "/nope"])
async def test_disallowed_host_is_400_json(api: httpx.AsyncClient, path: str) -> None:
    response = await api.get(path, headers={"Host": "evil.example"})
    assert_error(response, 400, "bad_host")


async def test_refusals_are_answered_in_the_view_and_logged_once(
    api: httpx.AsyncClient,
    sign: Sign,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused request costs no thread hop and no extra log line.

    An error leaving a view makes Django call the middleware's
    process_exception in its one sync thread, and log every 4xx from a worker
    thread: a flood of forged requests would pay both (docs/security.md).
    """
    from jobs.middleware import ApiMiddleware

    handled_as_exceptions: list[Exception] = []
    real = ApiMiddleware.process_exception

    def recorded(self: ApiMiddleware, request: Any, exception: Exception) -> Any:
        handled_as_exceptions.append(exception)
        return real(self, request, exception)

    monkeypatch.setattr(ApiMiddleware, "process_exception", recorded)
    forged = {**sign(), "X-SIGNATURE": "0" * 64}
    assert_error(await api.get("/job/next", headers=forged), 401, "bad_signature")
    assert_error(await api.post("/job", headers=forged, json={}), 401, "bad_signature")
    assert_error(await api.get("/nope"), 404, "not_found")
    assert_error(
        await api.delete("/job/next", headers=sign()), 405, "method_not_allowed"
    )
    assert handled_as_exceptions == []
    assert not [r for r in caplog.records if r.name == "django.request"]


async def test_api_requests_send_no_request_signals_and_are_closed(
    api: httpx.AsyncClient, sign: Sign, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API skips Django's request signals but still closes each request."""
    from django.core.signals import request_finished, request_started
    from django.http import HttpRequest

    signalled: list[object] = []

    def receiver(sender: object, **kwargs: object) -> None:
        signalled.append(sender)

    closed: list[HttpRequest] = []
    real_close = HttpRequest.close

    def close(self: HttpRequest) -> None:
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(HttpRequest, "close", close)
    request_started.connect(receiver)
    request_finished.connect(receiver)
    try:
        assert (await api.get("/job/next", headers=sign())).status_code == 204
        forged = {**sign(), "X-SIGNATURE": "0" * 64}
        assert_error(await api.get("/job/next", headers=forged), 401, "bad_signature")
    finally:
        request_started.disconnect(receiver)
        request_finished.disconnect(receiver)
    assert signalled == []
    assert len(closed) == 2
