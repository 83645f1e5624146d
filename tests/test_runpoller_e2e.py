"""End to end through real processes: the fake Discord, ``manage.py runpoller``,
daphne, and a WebSocket client.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.conftest import LiveGateway
from tests.test_runpoller import (
    CHANNEL,
    FakeDiscordProcess,
    job_embed,
    poller_env,
    poller_process,
    start_fake_discord,
)

pytestmark = [pytest.mark.backends, pytest.mark.processes]

FIXTURES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "fixtures" / "discord_embeds.json").read_text("utf-8")
)
FIXTURE_GUID = "0f8fad5b-d9cb-469f-a165-70867728950e"
# What a fixture's message holds besides its id: all the fake can post.
POSTED_PARTS = ("content", "embeds", "components", "message_snapshots")


@pytest.fixture
def fake_discord() -> Iterator[FakeDiscordProcess]:
    fake = start_fake_discord()
    try:
        yield fake
    finally:
        fake.process.close()


@asynccontextmanager
async def websocket(
    gateway: LiveGateway, query: str = ""
) -> AsyncIterator[ClientConnection]:
    """A client of ``/ws``, past its hello frame."""
    async with connect(
        f"{gateway.ws_url}/ws{query}",
        additional_headers={"X-API-KEY": gateway.api_key},
        proxy=None,
    ) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["type"] == "hello"
        yield ws


async def next_jobs(ws: ClientConnection, count: int, timeout: float = 30) -> list[Any]:
    jobs: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(jobs) < count:
            frame = json.loads(await ws.recv())
            if frame["type"] == "job":
                jobs.append(frame["job"])
    return jobs


async def assert_silence(ws: ClientConnection, seconds: float = 1.0) -> None:
    """Nothing more arrives: no job is delivered twice."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(ws.recv(), seconds)


def post_fixture(fake: FakeDiscordProcess, case: dict[str, Any]) -> dict[str, Any]:
    """Post a fixture's message (buttons and forwarded copies too) to CHANNEL."""
    message = case["message"]
    return fake.post(CHANNEL, **{k: message[k] for k in POSTED_PARTS if k in message})


def with_own_guid(fixture: dict[str, Any]) -> dict[str, Any]:
    # The fixtures share one job id; the gateway would take all but the first
    # for duplicates (DEDUP_WINDOW_SECONDS). Each gets its own.
    renamed: dict[str, Any] = json.loads(
        json.dumps(fixture).replace(FIXTURE_GUID, str(uuid.uuid4()))
    )
    return renamed


async def test_every_embed_format_arrives_once_with_its_job_id(
    live_gateway: LiveGateway, fake_discord: FakeDiscordProcess
) -> None:
    cases = [with_own_guid(fixture) for fixture in FIXTURES]
    expected = [case["expected"] for case in cases if case["expected"] is not None]
    env = poller_env(fake_discord, live_gateway.base_url)
    with poller_process(env) as poller:
        async with websocket(live_gateway) as ws:
            posted = [post_fixture(fake_discord, case) for case in cases]
            jobs = await next_jobs(ws, len(expected))
            await assert_silence(ws)
        output = poller.output()
    # In message order, each once, as the parser reads it.
    assert [job["job_id"] for job in jobs] == [e["job_id"] for e in expected]
    for job, want in zip(jobs, expected, strict=True):
        assert job["place_id"] == want["place_id"]
        assert job["title"] == want["title"]
        assert job["fields"] == want["fields"]
        assert job["channel"] == CHANNEL
        assert job["source"] == "discord"
    with_jobs = [m["id"] for m, c in zip(posted, cases, strict=True) if c["expected"]]
    assert [job["message_id"] for job in jobs] == with_jobs
    assert output.count("published job ") == len(expected)


async def test_a_job_posted_while_the_gateway_is_down_arrives_once(
    live_gateway: LiveGateway, fake_discord: FakeDiscordProcess
) -> None:
    env = poller_env(fake_discord, live_gateway.base_url)
    with poller_process(env) as poller:
        async with websocket(live_gateway) as ws:
            fake_discord.post(CHANNEL, embeds=job_embed("before-the-outage"))
            (before,) = await next_jobs(ws, 1)
        live_gateway.process.stop()
        fake_discord.post(CHANNEL, embeds=job_embed("during-the-outage"))
        await asyncio.sleep(3)  # the gateway stays down for 3 s: the scenario
        live_gateway.process.restart()
        # Replay from the last job seen: a job published before this client
        # connects is not missed, and one published twice would show twice.
        async with websocket(live_gateway, f"?since={before['id']}") as ws:
            (during,) = await next_jobs(ws, 1)
            await assert_silence(ws)
        output = poller.output()
    assert during["job_id"] == "during-the-outage"
    assert "the gateway could not be reached" in output
    assert output.count("published job during-the-outage") == 1
