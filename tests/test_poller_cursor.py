"""Reading a channel: snowflake time, the cursor, catch-up, paging and bursts."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import pytest_asyncio
import time_machine

from discord_poller.client import BucketState, DiscordClient, discord_user_agent
from discord_poller.cursor import Cursor, snowflake_at, snowflake_ms
from discord_poller.pacing import Pace, spread_delay
from discord_poller.publisher import Publisher
from discord_poller.runner import Poller
from testkit.fakes.discord import FakeDiscord

CHANNEL = "1390012345678901234"
UA = discord_user_agent("https://example.com/job-gateway", "1.0")
TTL = 300


def job_embed(job_id: str) -> list[dict[str, Any]]:
    return [{"title": "Server", "fields": [{"name": "Job ID", "value": job_id}]}]


class Gateway:
    """Stands in for ``POST /job``: records each body and answers 201."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        return httpx.Response(201, json={"queued": True, "job": {"id": 1, **body}})


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@asynccontextmanager
async def poller_for(
    fake: FakeDiscord, gateway: Gateway, **kw: Any
) -> AsyncIterator[Poller]:
    clock: Callable[[], float] = kw.pop("clock", time.time)
    discord = DiscordClient(fake.state.token, fake.base_url, user_agent=UA)
    publisher = Publisher(
        "http://gateway.test",
        "key",
        "secret",
        ttl_seconds=TTL,
        clock=clock,
        transport=httpx.MockTransport(gateway),
    )
    async with discord, publisher:
        yield Poller(
            discord,
            publisher,
            kw.pop("channels", [CHANNEL]),
            ttl_seconds=TTL,
            poll_seconds=kw.pop("poll_seconds", 0.25),
            burst_poll_seconds=kw.pop("burst_poll_seconds", 0.05),
            clock=clock,
            **kw,
        )


async def published(poller: Poller, gateway: Gateway) -> list[dict[str, Any]]:
    await poller._publisher.drain(5)
    return gateway.bodies


# --- Snowflakes and the cursor --------------------------------------------------


def test_snowflake_time_both_ways() -> None:
    # Discord's documented example: 175928847299117063 is 2016-04-30 11:18:25.796 UTC.
    assert snowflake_ms("175928847299117063") == 1462015105796
    assert snowflake_ms(snowflake_at(1462015105796)) == 1462015105796
    assert snowflake_at(1462015105796) < 175928847299117063
    assert snowflake_at(0) == 0


def test_the_cursor_never_reaches_back_past_the_ttl() -> None:
    now_ms = 1_800_000_000_000
    floor = snowflake_at(now_ms - TTL * 1000)
    assert Cursor().after(now_ms, TTL) == str(floor)
    assert Cursor(last_id=floor - 1).after(now_ms, TTL) == str(floor)
    assert Cursor(last_id=floor + 5).after(now_ms, TTL) == str(floor + 5)


def test_the_cursor_takes_new_messages_oldest_first() -> None:
    cursor = Cursor(last_id=10)
    page = [{"id": "13"}, {"id": "12"}, {"id": "9"}, {"id": "x"}, {"id": "12"}]
    assert [m["id"] for m in cursor.advance(page)] == ["12", "13"]
    assert cursor.last_id == 13
    assert cursor.advance([]) == []
    assert cursor.last_id == 13


# --- Catch-up through the poller ------------------------------------------------


async def test_start_publishes_only_messages_younger_than_the_ttl(
    fake: FakeDiscord,
) -> None:
    with time_machine.travel(time.time() - TTL - 100, tick=True):
        old = fake.post_message(CHANNEL, embeds=job_embed("old"))
    with time_machine.travel(time.time() - 200, tick=True):
        young = fake.post_message(CHANNEL, embeds=job_embed("young"))
    fake.post_message(CHANNEL, content="no job in this one")
    new = fake.post_message(CHANNEL, embeds=job_embed("new"))
    gateway = Gateway()
    async with poller_for(fake, gateway) as poller:
        assert await poller.poll_channel(CHANNEL) > 0
        bodies = await published(poller, gateway)
    after = int(fake.requests[0].query["after"])
    assert int(old["id"]) < after < int(young["id"])
    assert [b["job_id"] for b in bodies] == ["young", "new"]
    assert [b["message_id"] for b in bodies] == [young["id"], new["id"]]
    # The TTL counts from the message's time, not from the publish.
    assert 95 <= bodies[0]["ttl"] <= 100
    assert TTL - 5 <= bodies[1]["ttl"] <= TTL
    assert bodies[1]["channel"] == CHANNEL
    assert bodies[1]["source"] == "discord"
    assert poller.stats.skipped_no_job_id == 1


async def test_then_reads_after_the_last_seen_id(fake: FakeDiscord) -> None:
    first = fake.post_message(CHANNEL, embeds=job_embed("first"))
    gateway = Gateway()
    async with poller_for(fake, gateway) as poller:
        await poller.poll_channel(CHANNEL)
        await poller.poll_channel(CHANNEL)
        second = fake.post_message(CHANNEL, embeds=job_embed("second"))
        await poller.poll_channel(CHANNEL)
        bodies = await published(poller, gateway)
    assert [r.query["after"] for r in fake.requests[1:]] == [first["id"]] * 2
    assert [b["message_id"] for b in bodies] == [first["id"], second["id"]]


async def test_pages_until_caught_up_when_more_than_a_page_arrived(
    fake: FakeDiscord,
) -> None:
    ids = [
        fake.post_message(CHANNEL, embeds=job_embed(f"j{i}"))["id"] for i in range(250)
    ]
    gateway = Gateway()
    async with poller_for(fake, gateway) as poller:
        delays = [await poller.poll_channel(CHANNEL) for _ in range(3)]
        bodies = await published(poller, gateway)
    assert delays[:2] == [0.0, 0.0]  # a full page: the next one at once
    assert delays[2] > 0
    assert [r.query["after"] for r in fake.requests[1:]] == [ids[99], ids[199]]
    assert [b["message_id"] for b in bodies] == ids  # every one, oldest first


async def test_after_a_long_pause_the_cursor_skips_what_has_expired(
    fake: FakeDiscord,
) -> None:
    gateway = Gateway()
    offset = 0.0
    async with poller_for(fake, gateway, clock=lambda: time.time() + offset) as poller:
        first = fake.post_message(CHANNEL, embeds=job_embed("first"))
        await poller.poll_channel(CHANNEL)
        await published(poller, gateway)
        fake.post_message(CHANNEL, embeds=job_embed("missed"))
        offset = TTL + 1.0  # say, a ban's cool-down went by
        await poller.poll_channel(CHANNEL)
        bodies = await published(poller, gateway)
    assert int(fake.requests[1].query["after"]) > int(first["id"])
    assert [b["job_id"] for b in bodies] == ["first"]


# --- Pace and bursts -------------------------------------------------------------


def test_spread_uses_the_whole_bucket_evenly() -> None:
    assert spread_delay(BucketState(None, None, None)) == 0.0
    assert spread_delay(BucketState(5, 4, 2.0)) == pytest.approx(0.4)
    assert spread_delay(BucketState(5, 0, 0.4)) == pytest.approx(0.4)
    assert spread_delay(BucketState(5, 5, 0.0)) == 0.0


def test_a_burst_follows_jobs_for_a_while() -> None:
    pace = Pace(interval=1.0, burst_interval=0.1, burst_seconds=3.0)
    idle = BucketState(None, None, None)
    assert pace.next_delay(100.0, 100.0, idle, 0.0) == 1.0
    pace.found_jobs(100.0)
    assert pace.next_delay(100.0, 100.0, idle, 0.0) == pytest.approx(0.1)
    assert pace.next_delay(102.9, 102.9, idle, 0.0) == pytest.approx(0.1)
    assert pace.next_delay(103.0, 103.0, idle, 0.0) == 1.0
    # Discord's limits win over the interval, in a burst too.
    pace.found_jobs(103.0)
    assert pace.next_delay(103.0, 103.0, BucketState(5, 1, 2.0), 0.0) == 1.0
    assert pace.next_delay(103.0, 103.0, idle, 7.5) == 7.5


async def test_a_poll_that_found_jobs_starts_a_burst(fake: FakeDiscord) -> None:
    gateway = Gateway()
    now = [1000.0]
    async with poller_for(
        fake,
        gateway,
        poll_seconds=1.0,
        burst_poll_seconds=0.1,
        monotonic=lambda: now[0],
    ) as poller:
        assert await poller.poll_channel(CHANNEL) == pytest.approx(1.0)
        fake.post_message(CHANNEL, embeds=job_embed("burst"))
        assert await poller.poll_channel(CHANNEL) == pytest.approx(0.1)
        assert await poller.poll_channel(CHANNEL) == pytest.approx(0.1)
        now[0] += 3.0  # the burst is over
        assert await poller.poll_channel(CHANNEL) == pytest.approx(1.0)
