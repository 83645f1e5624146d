"""A pytest plugin that prepares the environment before Django reads it.

``GATEWAY_TEST_STACK=embedded`` (the default) runs the suite on SQLite and the
in-memory channel layer. ``GATEWAY_TEST_STACK=services`` first starts a real
PostgreSQL and a real Redis on free loopback ports and runs the same suite on
them. Loaded with ``-p tests.stack`` (see pyproject.toml), so it runs before
pytest-django sets Django up.

Under pytest-xdist every worker is a process of its own with its own scratch
directory (settings file, SQLite test database). On the services stack the
controlling process starts one PostgreSQL that the workers share, each in a
test database of its own (pytest-django names them ``test_postgres_gw0``...);
every worker starts a Redis of its own, because pub/sub channels, which the
channel layer and the long-poll wake-ups use, are server-wide whatever the
database index.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from testkit.servers import PostgresServer, RedisServer

API_KEY = "test-api-key"
HMAC_SECRET = "test-hmac-secret"

STACK = os.environ.get("GATEWAY_TEST_STACK", "embedded")
if STACK not in ("embedded", "services"):
    raise pytest.UsageError(
        f"GATEWAY_TEST_STACK must be embedded or services, not {STACK!r}"
    )

# "gw0", "gw1"... in a pytest-xdist worker, which xdist sets before the worker
# loads this plugin; None in the controlling process or a run without xdist.
WORKER = os.environ.get("PYTEST_XDIST_WORKER")

_scratch = Path(tempfile.mkdtemp(prefix=f"gateway-tests-{WORKER or 'main'}-"))
_servers: list[PostgresServer | RedisServer] = []

# Every setting the gateway and the poller read (gateway_project/settings.py
# and discord_poller/config.py), less those set below.
_SETTINGS_FROM_THE_SHELL = {
    "ADMIN_LOGIN_COOLOFF_MINUTES",
    "ADMIN_LOGIN_FAILURE_LIMIT",
    "ALLOWED_HOSTS",
    "AUTH_FAILURE_MAX_DELAY_SECONDS",
    "BURST_POLL_SECONDS",
    "CHANNEL_ID",
    "CHANNEL_LAYER",
    "CLAIM_TIMEOUT_SECONDS",
    "CSRF_TRUSTED_ORIGINS",
    "DATABASE_URL",
    "DEBUG",
    "DEDUP_WINDOW_SECONDS",
    "DISCORD_API_BASE",
    "DISCORD_BOT_URL",
    "DISCORD_MODE",
    "DISCORD_POLL_SECONDS",
    "DISCORD_TOKEN",
    "GATEWAY_SERVER_LEAVE_OUT",
    "HEADLESS_MODE",
    "HSTS_PRELOAD",
    "HSTS_SECONDS",
    "HTTPS_ONLY",
    "JOB_RETENTION_HOURS",
    "JOB_TTL_SECONDS",
    "LOG_FORMAT",
    "LOG_LEVEL",
    "LONG_POLL_RELOOK_SECONDS",
    "MAX_JOB_BYTES",
    "METRICS_TOKEN",
    "PORT",
    "PROMETHEUS_MULTIPROC_DIR",
    "QUEUE_BACKEND",
    "RATE_LIMIT_FAIL_OPEN",
    "RATE_LIMIT_PER_MINUTE",
    "RATE_LIMIT_WINDOW_SECONDS",
    "REDIS_URL",
    "RENDER_EXTERNAL_HOSTNAME",
    "RENDER_SERVICE_NAME",
    "REQUIRE_SIGNATURE_V2",
    "SERVICE_BASE_URL",
    "STATIC_MANIFEST",
    "TIERS",
    "TIMESTAMP_TOLERANCE",
    "TRUSTED_PROXY_COUNT",
    "WEB_CONCURRENCY",
    "WS_REQUIRE_SIGNATURE",
    "WS_TICKET_TTL",
}
# The tests own their configuration: nothing from the developer's shell or an
# app_settings.json in the checkout leaks in. A worker inherits the environment
# its controlling process prepared, shared PostgreSQL included.
if WORKER is None:
    for _name in list(os.environ):
        if _name in _SETTINGS_FROM_THE_SHELL:
            del os.environ[_name]
(_scratch / "settings.json").write_text("{}")
os.environ.update(
    {
        "SETTINGS_FILE": str(_scratch / "settings.json"),
        "API_KEY": API_KEY,
        "HMAC_SECRET": HMAC_SECRET,
        "DJANGO_SECRET_KEY": "test-django-secret-key",
        "TEST_SQLITE_FILE": str(_scratch / "test.sqlite3"),
        # Refusals are answered at once; tests of the delay set their own.
        "AUTH_FAILURE_DELAY_SECONDS": "0",
    }
)

if STACK == "services":
    for _missing in (
        PostgresServer.unavailable_reason(),
        RedisServer.unavailable_reason(),
    ):
        if _missing:
            raise pytest.UsageError(f"GATEWAY_TEST_STACK=services: {_missing}")
    if WORKER is None:
        _postgres = PostgresServer()
        _postgres.start()
        _servers.append(_postgres)
        os.environ["DATABASE_URL"] = _postgres.url
    # The controlling process of an xdist run starts one too, unused: it cannot
    # know yet whether workers will run the tests, and a Redis starts in
    # milliseconds.
    _redis = RedisServer()
    _redis.start()
    _servers.append(_redis)
    os.environ["REDIS_URL"] = _redis.url


def pytest_report_header() -> str:
    return f"gateway stack: {STACK}"


def pytest_unconfigure() -> None:
    for server in _servers:
        server.close()
    shutil.rmtree(_scratch, ignore_errors=True)
