"""Nonces and tickets are kept for their whole window: no eviction, no restart forgets.

The store is Redis with ``REDIS_URL`` and the database without it
(``jobs.single_use``); both are checked here, and the embedded default through
a real daphne process that is restarted between a request and its replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import time_machine
from django.db import connection
from pytest_django import Settings

from gateway_client import signing
from jobs import single_use, tickets
from jobs.models import SingleUse
from tests.conftest import LiveGateway, assert_error, database_url
from tests.stack import API_KEY, HMAC_SECRET

pytestmark = [pytest.mark.backends, pytest.mark.usefixtures("transactional_db")]

# Django's local-memory cache, the store before this one, held 300 entries.
MORE_THAN_AN_EVICTING_CACHE_HOLDS = 1_000


async def test_a_value_is_kept_whatever_comes_after_it(store: str) -> None:
    assert await single_use.add("nonce:first", "1", 60)
    for number in range(MORE_THAN_AN_EVICTING_CACHE_HOLDS):
        assert await single_use.add(f"nonce:{number}", "1", 60)
    assert not await single_use.add("nonce:first", "1", 60)
    assert await single_use.take("nonce:first") == "1"


async def test_of_simultaneous_adds_exactly_one_wins(store: str) -> None:
    won = await asyncio.gather(
        *(single_use.add("nonce:race", "1", 60) for _ in range(8))
    )
    assert sorted(won) == [False] * 7 + [True]


@pytest.mark.usefixtures("store")
async def test_a_ticket_is_good_after_a_thousand_others() -> None:
    first, _ = await tickets.issue()
    for _ in range(MORE_THAN_AN_EVICTING_CACHE_HOLDS):
        await tickets.issue()
    await tickets.redeem(first)
    with pytest.raises(tickets.TicketRefused, match="already used"):
        await tickets.redeem(first)


async def test_the_database_store_expires_and_takes_over_on_time(
    settings: Settings,
) -> None:
    settings.REDIS_URL = ""
    now = time.time()
    with time_machine.travel(now, tick=False):
        assert await single_use.add("nonce:short", "1", 10)
        assert await single_use.add("ticket:short", "t", 10)
    with time_machine.travel(now + 9.9, tick=False):
        assert not await single_use.add("nonce:short", "1", 10)
    with time_machine.travel(now + 10, tick=False):
        # Its time is up: the key is free again, and what it held is gone.
        assert await single_use.take("ticket:short") is None
        assert await single_use.add("nonce:short", "1", 10)
    with time_machine.travel(now + 19.9, tick=False):
        assert not await single_use.add("nonce:short", "1", 10)


async def test_the_database_store_prunes_what_expired(settings: Settings) -> None:
    settings.REDIS_URL = ""
    # Another test's clock may have been far ahead: a clock set back prunes too.
    with time_machine.travel(time.time() + 10 * single_use.PRUNE_EVERY_SECONDS):
        await single_use.add("nonce:from-the-future", "1", 10)
    now = time.time()
    with time_machine.travel(now, tick=False):
        for number in range(5):
            assert await single_use.add(f"nonce:{number}", "1", 10)
    with time_machine.travel(now + single_use.PRUNE_EVERY_SECONDS + 11, tick=False):
        assert await single_use.add("nonce:new", "1", 10)
    keys = [key async for key in SingleUse.objects.values_list("key", flat=True)]
    assert sorted(keys) == ["nonce:from-the-future", "nonce:new"]


@contextlib.contextmanager
def another_writer_holds(key: str) -> Iterator[None]:
    """Another connection, mid-transaction, holding what an add of ``key`` needs.

    On SQLite the database's write lock; on PostgreSQL the key's row.
    """
    if connection.vendor == "sqlite":
        other = sqlite3.connect(str(connection.settings_dict["NAME"]))
        other.isolation_level = None
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
        return
    with psycopg.connect(database_url()) as pg:
        pg.execute(
            "INSERT INTO jobs_singleuse (key, value, expires_at) VALUES (%s, '1', 0)",
            [key],
        )
        yield
        pg.rollback()


async def test_a_busy_database_never_blocks_the_event_loop(settings: Settings) -> None:
    settings.REDIS_URL = ""
    with another_writer_holds("nonce:busy"):
        adding = asyncio.create_task(single_use.add("nonce:busy", "1", 60))
        # The loop goes on turning while the add waits for the other writer.
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not adding.done()
    assert await asyncio.wait_for(adding, timeout=30)
    assert not await single_use.add("nonce:busy", "1", 60)


# --- Through a real daphne, on the embedded default ----------------------------


def v2_get(target: str) -> dict[str, str]:
    return signing.signed_headers_v2(API_KEY, HMAC_SECRET, method="GET", target=target)


def test_a_replay_is_refused_after_a_thousand_requests_and_a_restart(
    live_gateway: LiveGateway,
) -> None:
    captured = v2_get("/job/next")
    with httpx.Client(base_url=live_gateway.base_url, timeout=30) as client:
        assert client.get("/job/next", headers=captured).status_code == 204
        for _ in range(MORE_THAN_AN_EVICTING_CACHE_HOLDS):
            assert client.get("/job/next", headers=v2_get("/job/next")).is_success
        assert_error(client.get("/job/next", headers=captured), 401, "replayed_nonce")

        used_before_the_restart = v2_get("/health")
        assert client.get("/health", headers=used_before_the_restart).status_code == 200
        live_gateway.process.restart()
        assert_error(
            client.get("/health", headers=used_before_the_restart),
            401,
            "replayed_nonce",
        )
        assert client.get("/health", headers=v2_get("/health")).status_code == 200


def test_a_ticket_outlives_other_traffic_and_a_restart(
    live_gateway: LiveGateway,
) -> None:
    from websockets.sync.client import connect

    with httpx.Client(base_url=live_gateway.base_url, timeout=30) as client:
        headers = signing.signed_headers_v2(
            API_KEY, HMAC_SECRET, method="POST", target="/ws/ticket"
        )
        ticket = client.post("/ws/ticket", headers=headers).json()["ticket"]
        for _ in range(MORE_THAN_AN_EVICTING_CACHE_HOLDS // 2):
            assert client.get("/job/next", headers=v2_get("/job/next")).is_success
    live_gateway.process.restart()
    with connect(f"{live_gateway.ws_url}/ws?ticket={ticket}", open_timeout=10) as ws:
        assert '"hello"' in str(ws.recv(timeout=10))
