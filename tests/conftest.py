"""Shared fixtures.

- ``api``: an httpx client speaking to the real ASGI application in-process.
- ``sign``: the three signing headers for the test keys.
- ``queue_backend``: runs a test once per queue backend (database, redis).
- ``redis_url`` / ``postgres_server``: real servers, started once per session.
- ``live_gateway``: a real daphne process on the test database.

The ``backends`` mark: the tests whose behaviour depends on the stack, which
``GATEWAY_TEST_STACK=services`` reruns on PostgreSQL and Redis (``-m
backends``). A test without it that reaches the stack's database, cache or
channel layer, or hands the stack to a process, fails and says so.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import channels.layers
import httpx
import psycopg
import pytest
import redis
from django.core.cache import CacheHandler
from django.db import connection
from hypothesis import settings as hypothesis_settings
from psycopg import sql

from gateway_client.signing import signed_headers
from testkit.servers import REPO_ROOT, DaphneProcess, PostgresServer, RedisServer
from tests.stack import API_KEY, HMAC_SECRET, STACK

# Hypothesis fails an example slower than 200 ms by default: a verdict on the
# machine's load, not on the code. No deadline here; pytest-timeout still ends
# a test that hangs.
hypothesis_settings.register_profile("suite", deadline=None)
hypothesis_settings.load_profile("suite")


def _unavailable(reason: str) -> None:
    # CI must run everything: a missing server there is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


# --- The backends mark ------------------------------------------------------------

# Fixtures that put a test on the stack's database, Redis or channel layer
# (including through pytest-django's ``django_db`` mark, checked beside them).
BACKEND_FIXTURES = frozenset(
    {
        "db",
        "transactional_db",
        "django_db_reset_sequences",
        "django_db_serialized_rollback",
        "live_server",
        "api",
        "live_gateway",
        "empty_redis",
    }
)

_MARK_IT = (
    "mark it @pytest.mark.backends (or its module: pytestmark), so that it runs "
    "on PostgreSQL and Redis too"
)

# --- Parallel runs ----------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Keep a module's tests on one worker, unless they name a group of their own.

    With ``--dist loadgroup`` (scripts/test) a module's tests then run one after
    another, as they were written to, and a module-scoped server starts once.
    A module of long, independent tests may spread them with
    ``pytest.mark.xdist_group`` marks of their own.
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


# The test running in this process, for checks made outside fixtures.
_current: pytest.Item | None = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """Know the running test from its first fixture, module-scoped ones too."""
    global _current
    _current = item
    try:
        return (yield)
    finally:
        _current = None


def backend_fixtures_used(item: pytest.Item) -> list[str]:
    """The fixtures and marks by which ``item`` reaches the stack's backends."""
    used = sorted(BACKEND_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if item.get_closest_marker("django_db") is not None:
        used.append("the django_db mark")
    return used


def _stack_dependency(what: str) -> None:
    """Fail the running test if it is not marked ``backends``."""
    item = _current
    if item is not None and item.get_closest_marker("backends") is None:
        pytest.fail(f"{item.nodeid} {what}: {_MARK_IT}", pytrace=False)


@pytest.fixture(autouse=True)
def _backends_mark_is_not_forgotten(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Fail a test that depends on the stack without the ``backends`` mark.

    Autouse fixtures are set up first: an unmarked test asking for the
    database fails before it reaches it. The cache and the channel layer,
    memory here and Redis on the services stack, are watched while it runs;
    a use is reported at teardown, as code under test may run in other
    threads or tasks and catch what is raised there.
    """
    item = request.node
    assert isinstance(item, pytest.Item)
    used: set[str] = set()
    if item.get_closest_marker("backends") is None:
        fixtures = backend_fixtures_used(item)
        if fixtures:
            _stack_dependency(f"uses {', '.join(fixtures)}")
        for cls, what in (
            (CacheHandler, "uses Django's cache"),
            (channels.layers.ChannelLayerManager, "uses the channel layer"),
        ):
            monkeypatch.setattr(cls, "__getitem__", _watched(cls, what, used))
    yield
    if used:
        what = " and ".join(sorted(used))
        pytest.fail(f"{item.nodeid} {what}: {_MARK_IT}", pytrace=False)


def _watched(cls: Any, what: str, used: set[str]) -> Callable[[Any, str], Any]:
    """``cls.__getitem__``, noting ``what`` in ``used`` at each call."""
    get: Callable[[Any, str], Any] = cls.__getitem__

    def watched(self: Any, alias: str) -> Any:
        used.add(what)
        return get(self, alias)

    return watched


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
    _stack_dependency("hands the stack's database to another process")
    params = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{params['NAME']}"
    return f"postgresql://{params['USER']}@{params['HOST']}:{params['PORT']}/{params['NAME']}"


def process_env(**overrides: str) -> dict[str, str]:
    """Environment for a gateway process sharing this test run's database."""
    env = {"API_KEY": API_KEY, "HMAC_SECRET": HMAC_SECRET, **overrides}
    if "DATABASE_URL" not in overrides:
        env["DATABASE_URL"] = database_url()
    return env


@contextlib.contextmanager
def own_postgres_database(request: pytest.FixtureRequest, prefix: str) -> Iterator[str]:
    """A migrated PostgreSQL database of the caller's own, dropped afterwards.

    On the services stack it lives on the stack's server; otherwise on a
    throwaway one (``postgres_server``). For tests of several gateway
    processes sharing one database, apart from the test database.
    """
    if STACK == "services":
        admin_url = os.environ["DATABASE_URL"]
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        admin_url = server.url
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"],
            cwd=REPO_ROOT,
            env={**os.environ, "DATABASE_URL": url},
            check=True,
            capture_output=True,
        )
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(drop.format(sql.Identifier(name)))


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
