"""Shared fixtures.

- ``api``: an httpx client speaking to the real ASGI application in-process.
- ``sign``: the three signing headers for the test keys.
- ``queue_backend``: runs a test once per queue backend (database, redis).
- ``redis_url`` / ``postgres_server``: real servers, started once per session.
- ``live_gateway``: a real daphne process on the test database.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from django.db import connection

from gateway_client.signing import signed_headers
from testkit.servers import DaphneProcess, PostgresServer, RedisServer
from tests.stack import API_KEY, HMAC_SECRET, STACK


def _unavailable(reason: str) -> None:
    # CI must run everything: a missing server there is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def sign() -> Callable[..., dict[str, str]]:
    """``sign()`` gives valid headers; keyword arguments override the parts."""

    def make(
        api_key: str = API_KEY, secret: str = HMAC_SECRET, now: float | None = None
    ) -> dict[str, str]:
        return signed_headers(api_key, secret, now=now)

    return make


@pytest.fixture
async def api(transactional_db: None) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the ASGI application, in this process, on the test database."""
    from django.conf import settings

    from gateway_project.asgi import application

    if settings.REDIS_URL:
        # The Redis queue outlives each test's database flush: empty it too.
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    transport = httpx.ASGITransport(app=application, client=("203.0.113.7", 5000))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost"
    ) as client:
        yield client


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's test database, whose PostgreSQL sessions end with the run.

    Worker threads (``jobs.db.in_db_thread``) keep their connections for the
    process's life; ended here, they no longer stop the test database's drop.
    """
    yield
    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: the stack's own, or one started for this session."""
    if STACK == "services":
        yield os.environ["REDIS_URL"]
        return
    reason = RedisServer.unavailable_reason()
    if reason:
        _unavailable(reason)
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    reason = PostgresServer.unavailable_reason()
    if reason:
        _unavailable(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


@pytest.fixture
def empty_redis(request: pytest.FixtureRequest) -> None:
    """On the services stack, an empty Redis: its queue and nonces outlive tests."""
    if STACK == "services":
        request.getfixturevalue("clean_redis")


@pytest.fixture(params=["database", "redis"])
def store(request: pytest.FixtureRequest, settings: Any) -> str:
    """Run the test on each store of single-use values (``jobs.single_use``).

    ``database`` is the embedded default's; ``redis`` the one with ``REDIS_URL``.
    """
    if request.param == "redis":
        settings.REDIS_URL = request.getfixturevalue("clean_redis")
    else:
        settings.REDIS_URL = ""
        # The queue must not follow REDIS_URL away.
        settings.QUEUE_BACKEND = "database"
    return str(request.param)


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    """Check an error answer's shape (contract section 5); return its ``detail``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    detail: str = body["detail"]
    return detail


@pytest.fixture(params=["database", "redis"])
def queue_backend(request: pytest.FixtureRequest, settings: Any) -> str:
    """Run the test once per queue backend."""
    backend: str = request.param
    settings.QUEUE_BACKEND = backend
    if backend == "redis":
        settings.REDIS_URL = request.getfixturevalue("clean_redis")
    return backend


def database_url() -> str:
    """The test database, as a URL other processes can open."""
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    return f"postgresql://{params['USER']}@{params['HOST']}:{params['PORT']}/{params['NAME']}"


def process_env(**overrides: str) -> dict[str, str]:
    """Environment for a gateway process sharing this test run's database."""
    env = {
        "DATABASE_URL": database_url(),
        "API_KEY": API_KEY,
        "HMAC_SECRET": HMAC_SECRET,
    }
    env.update(overrides)
    return env


@dataclass
class LiveGateway:
    process: DaphneProcess
    api_key: str = API_KEY
    hmac_secret: str = HMAC_SECRET

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def ws_url(self) -> str:
        return self.process.ws_url


@pytest.fixture
def live_gateway(transactional_db: None) -> Iterator[LiveGateway]:
    """A real daphne process serving the gateway on the test database."""
    with DaphneProcess(env=process_env()) as process:
        yield LiveGateway(process)
