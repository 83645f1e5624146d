"""``GET /health`` (signed, detailed) and ``GET /healthz`` (unsigned, says nothing)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from django.core.cache import cache
from pytest_django import Settings

from tests.stack import STACK

Sign = Callable[..., dict[str, str]]


pytestmark = pytest.mark.backends


@pytest.fixture(autouse=True)
def _fresh_state(request: pytest.FixtureRequest) -> Iterator[None]:
    # Rate-limit counts and (on the services stack) the Redis queue outlive a
    # test; each test here starts from nothing and leaves nothing.
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    cache.clear()
    yield
    cache.clear()


async def test_health_is_signed(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert response.status_code == 401
    assert response.json()["error"] == "missing_api_key"


async def test_health_reports_queue_depth_and_backends(
    api: httpx.AsyncClient, sign: Sign, queue_backend: str
) -> None:
    async def report() -> dict[str, Any]:
        response = await api.get("/health", headers=sign())
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body: dict[str, Any] = response.json()
        return body

    empty = await report()
    assert empty["ok"] is True
    assert empty["queue"]["backend"] == queue_backend
    assert empty["queue"]["depth"] == 0
    assert isinstance(empty["channel_layer"], str)
    assert isinstance(empty["database"], str)

    for n in range(2):
        await api.post("/job", json={"job_id": f"j{n}"}, headers=sign())
    assert (await report())["queue"]["depth"] == 2
    await api.get("/job/next", headers=sign())
    assert (await report())["queue"]["depth"] == 1


@pytest.mark.parametrize("headless", [True, False])
async def test_health_reports_headless_mode(
    api: httpx.AsyncClient, sign: Sign, settings: Settings, headless: bool
) -> None:
    settings.HEADLESS_MODE = headless
    response = await api.get("/health", headers=sign())
    assert response.json()["headless_mode"] is headless


async def test_health_wrong_method_is_405(api: httpx.AsyncClient, sign: Sign) -> None:
    response = await api.post("/health", headers=sign())
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-KEY": "wrong"}, {"X-API-KEY": "test-api-key", "X-TIMESTAMP": "x"}],
)
async def test_healthz_is_unsigned_and_says_nothing_else(
    api: httpx.AsyncClient, sign: Sign, headers: dict[str, str]
) -> None:
    # A queued job changes nothing: no depth, no backends, no version.
    await api.post("/job", json={"job_id": "a"}, headers=sign())
    response = await api.get("/healthz", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"ok": True}


async def test_healthz_answers_head(api: httpx.AsyncClient) -> None:
    assert (await api.head("/healthz")).status_code == 200


async def test_healthz_wrong_method_is_405(api: httpx.AsyncClient) -> None:
    response = await api.post("/healthz")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


async def test_healthz_is_never_rate_limited(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    settings.RATE_LIMIT_PER_MINUTE = 2
    statuses = {(await api.get("/healthz")).status_code for _ in range(10)}
    assert statuses == {200}
    # ...nor counted against the client's signed requests.
    signed = [(await api.get("/health", headers=sign())).status_code for _ in range(3)]
    assert signed == [200, 200, 429]
    assert (await api.get("/healthz")).status_code == 200
