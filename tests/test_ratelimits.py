"""Rate limits (contract sections 2, 5, 6): per client, signed requests only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
import time_machine
from asgiref.sync import sync_to_async
from django.core.cache import cache
from pytest_django import Settings

from jobs.auth import client_ip
from jobs.models import Job
from testkit.servers import DaphneProcess, free_port
from tests.conftest import process_env
from tests.stack import STACK

Sign = Callable[..., dict[str, str]]

# Counts live in the cache: Redis on the services stack.
pytestmark = pytest.mark.backends


@pytest.fixture(autouse=True)
def _fresh_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    # Counts live in the cache, which outlives a test: start and end at zero.
    if STACK == "services":
        request.getfixturevalue("clean_redis")
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def limit(settings: Settings) -> int:
    """Three signed requests per window."""
    settings.RATE_LIMIT_PER_MINUTE = 3
    return 3


@pytest.fixture
async def other_client(
    transactional_db: None,
) -> AsyncIterator[httpx.AsyncClient]:
    """Like ``api``, from another address."""
    from gateway_project.asgi import application

    transport = httpx.ASGITransport(app=application, client=("198.51.100.9", 5000))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost"
    ) as client:
        yield client


def assert_limited(response: httpx.Response, window: int = 60) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == "rate_limited"
    assert 1 <= int(response.headers["retry-after"]) <= window


async def statuses(
    client: httpx.AsyncClient, sign: Sign, count: int, path: str = "/health"
) -> list[int]:
    return [(await client.get(path, headers=sign())).status_code for _ in range(count)]


# --- Counting -----------------------------------------------------------------


async def test_off_by_default(api: httpx.AsyncClient, sign: Sign) -> None:
    assert set(await statuses(api, sign, 20)) == {200}


async def test_the_request_after_the_limit_is_429(
    api: httpx.AsyncClient, sign: Sign, limit: int
) -> None:
    assert await statuses(api, sign, limit) == [200] * limit
    assert_limited(await api.get("/health", headers=sign()))


async def test_every_signed_endpoint_counts_towards_one_limit(
    api: httpx.AsyncClient, sign: Sign, limit: int
) -> None:
    assert (await api.get("/health", headers=sign())).status_code == 200
    assert (await api.get("/job/next", headers=sign())).status_code == 204
    posted = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert posted.status_code == 201
    limited = await api.post("/job", json={"job_id": "b"}, headers=sign())
    assert_limited(limited)
    assert (
        await sync_to_async(Job.objects.count)() == 1
    )  # the refused job is not stored


async def test_counts_are_per_client(
    api: httpx.AsyncClient,
    other_client: httpx.AsyncClient,
    sign: Sign,
    limit: int,
) -> None:
    await statuses(api, sign, limit)
    assert_limited(await api.get("/health", headers=sign()))
    assert await statuses(other_client, sign, limit) == [200] * limit


async def test_unsigned_requests_are_not_counted(
    api: httpx.AsyncClient, sign: Sign, limit: int
) -> None:
    # The signature is checked first: a stranger cannot use up a client's budget.
    for _ in range(10):
        assert (await api.get("/health")).status_code == 401
    assert await statuses(api, sign, limit) == [200] * limit
    assert_limited(await api.get("/health", headers=sign()))
    # Over the limit, an unsigned request is still told about its signature.
    assert (await api.get("/health")).status_code == 401


async def test_the_count_starts_again_in_the_next_window(
    api: httpx.AsyncClient, sign: Sign, settings: Settings, limit: int
) -> None:
    settings.RATE_LIMIT_WINDOW_SECONDS = 10
    with time_machine.travel(1_700_000_000, tick=False) as clock:
        await statuses(api, sign, limit)
        limited = await api.get("/health", headers=sign())
        assert_limited(limited, window=10)
        # Retry-After is exact: a second early is still this window.
        clock.shift(int(limited.headers["retry-after"]) - 1)
        assert_limited(await api.get("/health", headers=sign()), window=10)
        clock.shift(1)
        assert await statuses(api, sign, limit) == [200] * limit


# --- Who the client is: TRUSTED_PROXY_COUNT -----------------------------------


@pytest.mark.parametrize(
    ("count", "forwarded", "expected"),
    [
        (0, None, "10.0.0.9"),
        (0, "6.6.6.6", "10.0.0.9"),  # no proxy: the header is the client's own
        (1, None, "10.0.0.9"),
        (1, "", "10.0.0.9"),
        (1, "5.5.5.5", "5.5.5.5"),
        (1, "6.6.6.6, 5.5.5.5", "5.5.5.5"),  # the left end is client-controlled
        (1, "6.6.6.6,5.5.5.5", "5.5.5.5"),
        (2, "6.6.6.6, 4.4.4.4, 5.5.5.5", "4.4.4.4"),
        (2, "5.5.5.5", "10.0.0.9"),  # fewer entries than proxies: not believed
        (1, "6.6.6.6, not-an-ip", "10.0.0.9"),
        (1, "6.6.6.6, 5.5.5.5:443", "10.0.0.9"),
        (1, "2001:DB8:0:0::1", "2001:db8::1"),
    ],
)
def test_client_ip(
    settings: Settings, count: int, forwarded: str | None, expected: str
) -> None:
    settings.TRUSTED_PROXY_COUNT = count
    assert client_ip("10.0.0.9", forwarded) == expected


def test_client_ip_without_any_address(settings: Settings) -> None:
    settings.TRUSTED_PROXY_COUNT = 1
    assert client_ip(None, None) == "unknown"


async def test_a_spoofed_forwarded_for_does_not_escape_the_limit(
    api: httpx.AsyncClient, sign: Sign, settings: Settings, limit: int
) -> None:
    settings.TRUSTED_PROXY_COUNT = 1
    # Each request claims a new client at the left; the proxy's entry is the same.
    codes = [
        (
            await api.get(
                "/health",
                headers={**sign(), "X-Forwarded-For": f"6.6.6.{n}, 5.5.5.5"},
            )
        ).status_code
        for n in range(limit + 1)
    ]
    assert codes == [200] * limit + [429]
    # Another client behind the same proxy has its own count.
    other = await api.get("/health", headers={**sign(), "X-Forwarded-For": "5.5.5.6"})
    assert other.status_code == 200


async def test_without_trusted_proxies_forwarded_for_is_ignored(
    api: httpx.AsyncClient, sign: Sign, limit: int
) -> None:
    codes = [
        (
            await api.get(
                "/health", headers={**sign(), "X-Forwarded-For": f"6.6.6.{n}"}
            )
        ).status_code
        for n in range(limit + 1)
    ]
    assert codes == [200] * limit + [429]


async def test_the_claimer_is_the_forwarded_client(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    settings.TRUSTED_PROXY_COUNT = 1
    await api.post("/job", json={"job_id": "a"}, headers=sign())
    claimed = await api.get(
        "/job/next", headers={**sign(), "X-Forwarded-For": "6.6.6.6, 5.5.5.5"}
    )
    stored = await sync_to_async(Job.objects.get)(pk=claimed.json()["job"]["id"])
    assert stored.claimed_by == "5.5.5.5"


# --- The store is down --------------------------------------------------------


@pytest.fixture
def store_down(settings: Settings, limit: int) -> None:
    """Rate limits counted in a Redis that is not there."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{free_port()}/0",
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }


@pytest.mark.usefixtures("store_down")
async def test_store_down_is_503_by_default(api: httpx.AsyncClient, sign: Sign) -> None:
    response = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable"
    assert "retry-after" in response.headers
    assert await sync_to_async(Job.objects.count)() == 0


@pytest.mark.usefixtures("store_down")
async def test_store_down_lets_requests_through_when_fail_open(
    api: httpx.AsyncClient, sign: Sign, settings: Settings
) -> None:
    settings.RATE_LIMIT_FAIL_OPEN = True
    posted = await api.post("/job", json={"job_id": "a"}, headers=sign())
    assert posted.status_code == 201, posted.text
    assert (await api.get("/job/next", headers=sign())).status_code == 200


@pytest.mark.usefixtures("store_down")
async def test_store_down_never_touches_unsigned_or_healthz(
    api: httpx.AsyncClient,
) -> None:
    assert (await api.get("/health")).status_code == 401
    assert (await api.get("/healthz")).status_code == 200


# --- Through a real daphne ----------------------------------------------------


@pytest.mark.processes
def test_live_limit_behind_one_proxy(transactional_db: None, sign: Sign) -> None:
    env = process_env(RATE_LIMIT_PER_MINUTE="2", TRUSTED_PROXY_COUNT="1")
    with (
        DaphneProcess(env=env) as gateway,
        httpx.Client(base_url=gateway.base_url, timeout=10) as client,
    ):

        def get(forwarded: str) -> httpx.Response:
            return client.get(
                "/health", headers={**sign(), "X-Forwarded-For": forwarded}
            )

        assert get("6.6.6.1, 5.5.5.5").status_code == 200
        assert get("6.6.6.2, 5.5.5.5").status_code == 200
        limited = get("6.6.6.3, 5.5.5.5")
        assert_limited(limited)
        assert get("5.5.5.6").status_code == 200
        assert client.get("/healthz").status_code == 200
