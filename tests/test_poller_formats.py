"""Every notifier format of the fixtures, read from the fake Discord and posted
to ``POST /job`` by the poller (in this process; test_runpoller_e2e.py runs the
formats the fake's control API can post through real processes).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from discord_poller.client import DiscordClient, discord_user_agent
from discord_poller.publisher import Publisher
from discord_poller.runner import Poller
from testkit.fakes.discord import FakeDiscord

CHANNEL = "1390012345678901234"
UA = discord_user_agent("https://example.com/job-gateway", "1.0")
FIXTURES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "fixtures" / "discord_embeds.json").read_text("utf-8")
)


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f["id"] for f in FIXTURES])
async def test_each_format_is_published_as_the_parser_reads_it(
    fake: FakeDiscord, fixture: dict[str, Any]
) -> None:
    source = fixture["message"]
    message = fake.post_message(
        CHANNEL, content=source.get("content", ""), embeds=source.get("embeds")
    )
    # The fake stores what it returns: buttons and forwarded copies go in as-is.
    for key in ("components", "message_snapshots"):
        if key in source:
            message[key] = source[key]
    bodies: list[dict[str, Any]] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json={"job": {"id": len(bodies)}})

    discord = DiscordClient(fake.state.token, fake.base_url, user_agent=UA)
    publisher = Publisher(
        "http://gateway.test",
        "key",
        "secret",
        ttl_seconds=300,
        transport=httpx.MockTransport(gateway),
    )
    async with discord, publisher:
        poller = Poller(
            discord,
            publisher,
            [CHANNEL],
            ttl_seconds=300,
            poll_seconds=0.25,
            burst_poll_seconds=0.05,
        )
        await poller.poll_channel(CHANNEL)
        assert await publisher.drain(5) == 0
    expected = fixture["expected"]
    if expected is None:
        assert bodies == []
        assert poller.stats.skipped_no_job_id == 1
        return
    (body,) = bodies
    assert body["job_id"] == expected["job_id"]
    assert body.get("place_id") == expected["place_id"]
    assert body.get("title") == expected["title"]
    assert body["fields"] == expected["fields"]
    assert body["message_id"] == message["id"]
    assert body["channel"] == CHANNEL
